"""``models.localize`` from several processes on one node: one download, shared by all of them."""

import multiprocessing
import os
import time
import uuid
from pathlib import Path

from raycat.storage import models


def _localize_with_slow_copies(uri: str, cache: str, copies: str, start, out) -> None:
    """A worker process: every file copy leaves a marker and takes 0.3 s, so overlapping downloads show."""
    import pyarrow.fs as pafs

    os.environ["RAYCAT_CACHE"] = cache
    real_copy = pafs.copy_files

    def slow_copy(src, dst, **kwargs):
        Path(copies, uuid.uuid4().hex).write_text(src)
        time.sleep(0.3)
        real_copy(src, dst, **kwargs)

    pafs.copy_files = slow_copy
    # All workers are imported and patched before any of them looks at the cache.
    start.wait(timeout=120)
    out.put(models.localize(uri))


def test_processes_on_one_node_share_one_download(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    files = {"config.json": b'{"a": 1}', "tokenizer.json": b"{}", "model.safetensors": b"w" * 1000}
    for name, data in files.items():
        (src / name).write_bytes(data)
    copies = tmp_path / "copies"
    copies.mkdir()
    ctx = multiprocessing.get_context("spawn")
    n = 4
    start, out = ctx.Barrier(n), ctx.Queue()
    args = (f"file://{src}", str(tmp_path / "cache"), str(copies), start, out)
    procs = [ctx.Process(target=_localize_with_slow_copies, args=args) for _ in range(n)]
    for p in procs:
        p.start()
    paths = [out.get(timeout=180) for _ in range(n)]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    # Each file fetched once, by one of the processes; the others waited for it.
    fetched = sorted(Path(m.read_text()).name for m in copies.iterdir())
    assert fetched == sorted(files)
    assert len(set(paths)) == 1
    local = Path(paths[0])
    assert (local / ".complete").is_file()
    assert {name: (local / name).read_bytes() for name in files} == files
