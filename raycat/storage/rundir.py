"""Run-directory I/O: atomic writes of Parquet/JSON/text on local paths and cloud URIs, and reads
(``parquet_dataset``: a Parquet file as a Ray Dataset read on the workers).

A reader never sees a half-written file: data goes to a temporary name first and is renamed into
place (on object stores a single PUT is already atomic, and the rename is a copy).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raycat.errors import RaycatError
from raycat.storage import rowkey


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem of ``path`` and the path within it."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def absolute(path: str) -> str:
    """A local path made absolute (Ray workers do not share the driver's cwd); URIs unchanged."""
    return path if "://" in path else os.path.abspath(path)


def join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts)


def exists(path: str) -> bool:
    filesystem, fs_path = _fs(path)
    return filesystem.get_file_info(fs_path).type != pafs.FileType.NotFound


def remove_file(path: str) -> None:
    """Delete a file if it is there (a stage output the new run no longer writes)."""
    filesystem, fs_path = _fs(path)
    if filesystem.get_file_info(fs_path).type == pafs.FileType.File:
        filesystem.delete_file(fs_path)


def remove_dir(path: str) -> None:
    """Delete a directory and everything under it, if it is there (a stage's scratch files)."""
    filesystem, fs_path = _fs(path)
    if filesystem.get_file_info(fs_path).type == pafs.FileType.Directory:
        filesystem.delete_dir(fs_path)


def copy_into(path: str, out: pa.NativeFile, chunk: int = 1 << 20) -> None:
    """Append a local or URI file's bytes to an open stream, a chunk at a time."""
    filesystem, fs_path = _fs(path)
    with filesystem.open_input_stream(fs_path) as f:
        while data := f.read(chunk):
            out.write(data)


def upload_dir(source: str, dest: str) -> None:
    """Copy a finished directory (an HF model dir) to ``dest``; each a local path or a cloud URI, the
    files streamed from one to the other."""
    source_fs, source_path = _fs(source)
    filesystem, fs_path = _fs(dest)
    filesystem.create_dir(fs_path, recursive=True)
    pafs.copy_files(source_path, fs_path, source_filesystem=source_fs, destination_filesystem=filesystem)


def replace_dir(source: str, dest: str) -> None:
    """``dest``'s contents replaced by ``source``'s (files of an earlier, interrupted export at the
    same place must not mix with this one). Readers wait for a marker the caller writes afterwards."""
    filesystem, fs_path = _fs(dest)
    if filesystem.get_file_info(fs_path).type != pafs.FileType.NotFound:
        filesystem.delete_dir_contents(fs_path, missing_dir_ok=True)
    upload_dir(source, dest)


def list_dirs(directory: str) -> list[str]:
    filesystem, fs_path = _fs(directory)
    if filesystem.get_file_info(fs_path).type == pafs.FileType.NotFound:
        return []
    return sorted(
        i.base_name for i in filesystem.get_file_info(pafs.FileSelector(fs_path)) if i.type == pafs.FileType.Directory
    )


def write_bytes(path: str, data: bytes) -> None:
    filesystem, fs_path = _fs(path)
    parent = fs_path.rsplit("/", 1)[0]
    filesystem.create_dir(parent, recursive=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
    with filesystem.open_output_stream(tmp) as f:
        f.write(data)
    filesystem.move(tmp, fs_path)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json_if_exists(path: str) -> Any:
    """A finished stage's JSON, or None where that stage did not run."""
    return read_json(path) if exists(path) else None


def read_json(path: str) -> Any:
    filesystem, fs_path = _fs(path)
    with filesystem.open_input_stream(fs_path) as f:
        data = f.read()
    try:
        return json.loads(data)
    except ValueError as e:
        # Written atomically by raycat, so only an outside edit gets here.
        raise RaycatError(f"{path} is not valid JSON ({e}); restore it or delete it and rerun its stage") from e


def write_parquet(path: str, frame: pd.DataFrame, row_group_size: int | None = None) -> None:
    """``row_group_size``: rows per row group, the unit ``row_groups`` / ``read_row_groups`` split a
    file into for parallel reads."""
    buf = io.BytesIO()
    # No pandas metadata: frames coming out of Ray Data carry ArrowDtype annotations that plain
    # pandas cannot read back; the Arrow schema alone round-trips every column we write.
    table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
    pq.write_table(table, buf, row_group_size=row_group_size)
    write_bytes(path, buf.getvalue())


def parquet_schema(path: str) -> pa.Schema:
    """A Parquet file's Arrow schema (from its footer), without pandas metadata."""
    with open_input_file(path) as f:
        return pq.read_schema(f).remove_metadata()


def parquet_rows(path: str) -> int:
    """A Parquet file's row count, from its footer."""
    with open_input_file(path) as f:
        return pq.ParquetFile(f).metadata.num_rows


def parquet_columns(path: str) -> list[str]:
    return list(parquet_schema(path).names)


# A Parquet footer grows with the file's row groups and every reader parses all of it: with row groups
# of a few engine batches (128 rows), each of a 2M-row corpus's 15,625 read tasks parsed an 18.6 MiB
# footer (bench/footer.py). Files the pipelines read are written in groups of at least GROUP_ROWS rows,
# a read task covers about READ_ROWS rows, and the pipeline cuts its blocks (``actor_pool.run``).
GROUP_ROWS = 8192
READ_ROWS = 8192


def group_rows(block_rows: int) -> int:
    """Rows per row group of a file whose pipeline blocks hold ``block_rows`` rows."""
    return max(block_rows, GROUP_ROWS)


def row_group_rows(path: str) -> list[int]:
    """The row count of each row group of a Parquet file (its footer only is read)."""
    filesystem, fs_path = _fs(path)
    with filesystem.open_input_file(fs_path) as f:
        meta = pq.ParquetFile(f).metadata
        return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]


def read_row_groups(path: str, groups: list[int]) -> pd.DataFrame:
    filesystem, fs_path = _fs(path)
    with filesystem.open_input_file(fs_path) as f:
        return pq.ParquetFile(f).read_row_groups(groups).to_pandas(ignore_metadata=True)


def read_spans(counts: list[int], rows: int) -> list[tuple[int, int]]:
    """Consecutive row groups (first, stop) of at least ``rows`` rows each (the last may hold fewer)."""
    spans, first, held = [], 0, 0
    for g, n in enumerate(counts):
        held += n
        if held >= rows:
            spans.append((first, g + 1))
            first, held = g + 1, 0
    if first < len(counts):
        spans.append((first, len(counts)))
    return spans


def _read_groups(batch: pd.DataFrame) -> pd.DataFrame:
    """On a worker: the row groups a ``parquet_dataset`` batch names, as one frame."""
    frame = pd.concat(
        [
            read_row_groups(path, list(range(int(first), int(stop))))
            for path, first, stop in zip(batch["path"], batch["first"], batch["stop"], strict=True)
        ]
    )
    # List columns (options) arrive as numpy arrays; Ray Data would try its tensor type on them, fail on
    # ragged lengths and fall back to pickling with a warning. Plain lists become Arrow lists.
    for column in frame.columns:
        if len(frame) and frame[column].dtype == object and isinstance(frame[column].iloc[0], np.ndarray):
            frame[column] = frame[column].map(list)
    return frame


def parquet_spans(path: str, task_rows: int = READ_ROWS) -> list[tuple[int, int]]:
    """The row groups (first, stop) each of ``parquet_dataset``'s read tasks reads, in order."""
    return read_spans(row_group_rows(path), task_rows)


def parquet_dataset(path: str, num_cpus: float = 0.1, task_rows: int = READ_ROWS):
    """A Parquet file as a Ray Dataset read on the workers, in file order: each small read task (a
    fraction of a CPU, so reading never waits on CPUs the engines hold) parses the footer once and
    reads whole row groups, at least ``task_rows`` rows, as one block. Not a task per row group: every
    pass (each training epoch) reruns the reads, and a task may start a Python process (Ray ends idle
    workers after a second), ~1 s of CPU. Ray Data's own Parquet reader lists files in a 1-CPU task,
    which waits forever on a node the engines fill."""
    import ray

    path = absolute(path)
    spans = parquet_spans(path, task_rows)
    items = [{"path": path, "first": first, "stop": stop} for first, stop in spans]
    dataset = ray.data.from_items(items, override_num_blocks=max(1, len(items)))
    return dataset.map_batches(_read_groups, batch_size=1, batch_format="pandas", num_cpus=num_cpus)


def cut_blocks(dataset, block: int, num_cpus: float):
    """``dataset``'s blocks cut into blocks of at most ``block`` rows by tasks of ``num_cpus``."""
    from ray.data._internal.logical.operators import StreamingRepartition

    dataset = dataset.repartition(target_num_rows_per_block=block)
    op = dataset._logical_plan.dag
    if not isinstance(op, StreamingRepartition) or not hasattr(op, "ray_remote_args"):
        raise RuntimeError(f"this Ray ({op!r}) has no streaming repartition with remote args; see rundir.cut_blocks")
    # Ray Data fuses map_batches -> streaming repartition only where their remote args match, and
    # ``repartition`` takes none: unfused, the cut asks a whole CPU, which engines may hold forever.
    object.__setattr__(op, "ray_remote_args", {"num_cpus": num_cpus})
    return dataset


def read_parquet_columns(path: str, columns: list[str]) -> pd.DataFrame:
    filesystem, fs_path = _fs(path)
    return pq.read_table(fs_path, filesystem=filesystem, columns=columns).to_pandas(ignore_metadata=True)


def read_parquet(path: str) -> pd.DataFrame:
    filesystem, fs_path = _fs(path)
    return pq.read_table(fs_path, filesystem=filesystem).to_pandas(ignore_metadata=True)


def size(path: str) -> int:
    filesystem, fs_path = _fs(path)
    return int(filesystem.get_file_info(fs_path).size)


def read_bytes(path: str) -> bytes:
    filesystem, fs_path = _fs(path)
    with filesystem.open_input_stream(fs_path) as f:
        return f.read()


def list_files(directory: str, suffix: str) -> list[str]:
    """Finished files only: temporaries (``.tmp-*``) of an interrupted write are ignored."""
    filesystem, fs_path = _fs(directory)
    if filesystem.get_file_info(fs_path).type == pafs.FileType.NotFound:
        return []
    infos = filesystem.get_file_info(pafs.FileSelector(fs_path, recursive=False))
    prefix = directory.rstrip("/")
    return sorted(
        f"{prefix}/{i.base_name}"
        for i in infos
        if i.type == pafs.FileType.File and i.base_name.endswith(suffix) and not i.base_name.startswith(".tmp-")
    )


def write_part(batch: pd.DataFrame, directory: str) -> int:
    """Write one finished batch as an atomic part file named after its ids; returns its rows.

    Part files are the resume state of a stage: whatever was written survives an interruption, and a
    rerun skips the ids found in them. The name is a digest of the batch's ids, so a batch computed
    again (a retried Ray task) replaces its part instead of adding a duplicate.
    """
    if not len(batch):
        return 0
    digest = hashlib.sha256("\n".join(sorted(map(str, batch["id"]))).encode()).hexdigest()[:24]
    write_parquet(join(directory, f"part-{digest}.parquet"), batch)
    return len(batch)


def part_keys(directory: str, status: str | None = None) -> rowkey.KeySet:
    """The (id, row_hash) keys (as ``rowkey.key64``) that already have a part in ``directory``; with
    ``status``, only rows whose ``status`` column equals it (``"!failed"``: differs from it). Parts of
    an older raycat, without a row_hash, count as not done: their rows are computed again. 8 bytes a
    row: part files are read one at a time, two key columns each."""
    out: list[np.ndarray] = []
    for f in list_files(directory, ".parquet"):
        have = parquet_columns(f)
        if "row_hash" not in have:
            continue
        columns = ["id", "row_hash"] + (["status"] if status is not None else [])
        rows = read_parquet_columns(f, columns)
        if status is not None and status.startswith("!"):
            rows = rows[rows["status"] != status[1:]]
        elif status is not None:
            rows = rows[rows["status"] == status]
        out.append(rowkey.key64(rows))
    return rowkey.KeySet(np.concatenate(out)) if out else rowkey.KeySet()


def file_keys(path: str) -> rowkey.KeySet:
    """The ``key64`` set of a Parquet file's rows (id, row_hash), streamed."""
    keys = [rowkey.key64(b) for b in iter_parquet(path, ["id", "row_hash"])]
    return rowkey.KeySet(np.concatenate(keys)) if keys else rowkey.KeySet()


def iter_parquet(path: str, columns: list[str] | None = None, batch_rows: int = 65536) -> Iterator[pd.DataFrame]:
    """A Parquet file as frames of at most ``batch_rows`` rows, in file order, read as they are used:
    memory is one batch, whatever the file's size."""
    with open_input_file(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=columns):
            yield batch.to_pandas(ignore_metadata=True)


def fingerprint(path: str, only: set[str] | None = None) -> str:
    """A cheap content fingerprint of a local or URI file or directory: every file's relative name,
    size and modification time (weights retrained in place keep their size, not their mtime), from one
    listing. ``only``: just these files under the directory (named as ``list_tree`` names them). A
    path that does not exist here (a hub id) gives "" (its revision is in the config)."""
    try:
        filesystem, fs_path = _fs(path)
        info = filesystem.get_file_info(fs_path)
    except (OSError, ValueError, pa.ArrowException):
        return ""
    if info.type == pafs.FileType.NotFound:
        return ""
    infos = (
        [info]
        if info.type == pafs.FileType.File
        else filesystem.get_file_info(pafs.FileSelector(fs_path, recursive=True))
    )
    digest = hashlib.sha256()
    for i in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        if only is not None and join(path, i.path[len(fs_path.rstrip("/")) :].lstrip("/")) not in only:
            continue
        mtime = i.mtime_ns if i.mtime_ns is not None else ""
        digest.update(f"{i.path[len(fs_path) :]}\0{i.size}\0{mtime}\n".encode())
    return digest.hexdigest()[:16]


def read_parts(directory: str, columns: list[str]) -> pd.DataFrame:
    frames = [read_parquet(f) for f in list_files(directory, ".parquet")]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)


def file_type(path: str) -> str | None:
    """ "file", "dir", or None where nothing is at ``path`` (local path or URI)."""
    filesystem, fs_path = _fs(path)
    kind = filesystem.get_file_info(fs_path).type
    return {pafs.FileType.File: "file", pafs.FileType.Directory: "dir"}.get(kind)


def list_tree(directory: str) -> list[str]:
    """Every file under ``directory``, recursively, sorted, each named the way ``directory`` is (a URI
    stays a URI, a relative path stays relative)."""
    filesystem, fs_path = _fs(directory)
    root = fs_path.rstrip("/")
    selector = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    infos = filesystem.get_file_info(selector)
    return sorted(join(directory, i.path[len(root) :].lstrip("/")) for i in infos if i.type == pafs.FileType.File)


def read_input(path: str, compression: str | None = None) -> bytes:
    """A local or URI file's bytes, decompressed where ``compression`` ("gzip", "zstd") says."""
    filesystem, fs_path = _fs(path)
    with filesystem.open_input_stream(fs_path, compression=compression) as f:
        return f.read()


def open_input_file(path: str):
    """A seekable local or URI file (Parquet's footer is at the end)."""
    filesystem, fs_path = _fs(path)
    return filesystem.open_input_file(fs_path)


@contextmanager
def atomic_output(path: str) -> Iterator[pa.NativeFile]:
    """A stream for a file too large to build in memory first: it appears at ``path`` only when the
    block ends without an error (written under a temporary name, then renamed, as ``write_bytes``)."""
    filesystem, fs_path = _fs(path)
    parent = fs_path.rsplit("/", 1)[0]
    filesystem.create_dir(parent, recursive=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
    try:
        with filesystem.open_output_stream(tmp) as stream:
            yield stream
    except BaseException:
        with suppress(OSError):
            filesystem.delete_file(tmp)
        raise
    filesystem.move(tmp, fs_path)
