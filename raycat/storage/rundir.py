"""Run-directory I/O: atomic writes of Parquet/JSON/text on local paths and cloud URIs.

A reader never sees a half-written file: data goes to a temporary name first and is renamed into
place (on object stores a single PUT is already atomic, and the rename is a copy).
"""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq


def _fs(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    import os

    return pafs.LocalFileSystem(), os.path.abspath(path)


def absolute(path: str) -> str:
    """A local path made absolute (Ray workers do not share the driver's cwd); URIs unchanged."""
    import os

    return path if "://" in path else os.path.abspath(path)


def join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts)


def exists(path: str) -> bool:
    fs, p = _fs(path)
    return fs.get_file_info(p).type != pafs.FileType.NotFound


def upload_dir(local_dir: str, dest: str) -> None:
    """Copy a finished local directory (an HF model dir) to ``dest``, a local path or a cloud URI."""
    fs, p = _fs(dest)
    fs.create_dir(p, recursive=True)
    pafs.copy_files(local_dir, p, destination_filesystem=fs)


def replace_dir(local_dir: str, dest: str) -> None:
    """``dest``'s contents replaced by ``local_dir``'s (files of an earlier, interrupted export at the
    same place must not mix with this one). Readers wait for a marker the caller writes afterwards."""
    fs, p = _fs(dest)
    if fs.get_file_info(p).type != pafs.FileType.NotFound:
        fs.delete_dir_contents(p, missing_dir_ok=True)
    upload_dir(local_dir, dest)


def list_dirs(directory: str) -> list[str]:
    fs, p = _fs(directory)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return []
    return sorted(i.base_name for i in fs.get_file_info(pafs.FileSelector(p)) if i.type == pafs.FileType.Directory)


def write_bytes(path: str, data: bytes) -> None:
    fs, p = _fs(path)
    parent = p.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
    with fs.open_output_stream(tmp) as f:
        f.write(data)
    fs.move(tmp, p)


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json_if_exists(path: str) -> Any:
    """A finished stage's JSON, or None where that stage did not run."""
    return read_json(path) if exists(path) else None


def read_json(path: str) -> Any:
    from raycat.errors import RaycatError

    fs, p = _fs(path)
    with fs.open_input_stream(p) as f:
        data = f.read()
    try:
        return json.loads(data)
    except ValueError as e:  # written atomically by raycat, so only an outside edit gets here
        raise RaycatError(f"{path} is not valid JSON ({e}); restore it or delete it and rerun its stage") from e


def write_parquet(path: str, df: pd.DataFrame, row_group_size: int | None = None) -> None:
    """``row_group_size``: rows per row group, the unit ``row_groups`` / ``read_row_groups`` split a
    file into for parallel reads."""
    buf = io.BytesIO()
    # No pandas metadata: frames coming out of Ray Data carry ArrowDtype annotations that plain
    # pandas cannot read back; the Arrow schema alone round-trips every column we write.
    table = pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(None)
    pq.write_table(table, buf, row_group_size=row_group_size)
    write_bytes(path, buf.getvalue())


def parquet_columns(path: str) -> list[str]:
    fs, p = _fs(path)
    with fs.open_input_file(p) as f:
        return list(pq.ParquetFile(f).schema_arrow.names)


def row_groups(path: str) -> list[int]:
    """The row groups of a Parquet file (its footer only is read)."""
    fs, p = _fs(path)
    with fs.open_input_file(p) as f:
        return list(range(pq.ParquetFile(f).num_row_groups))


def read_row_groups(path: str, groups: list[int]) -> pd.DataFrame:
    fs, p = _fs(path)
    with fs.open_input_file(p) as f:
        return pq.ParquetFile(f).read_row_groups(groups).to_pandas(ignore_metadata=True)


def read_parquet_columns(path: str, columns: list[str]) -> pd.DataFrame:
    fs, p = _fs(path)
    return pq.read_table(p, filesystem=fs, columns=columns).to_pandas(ignore_metadata=True)


def read_parquet(path: str) -> pd.DataFrame:
    fs, p = _fs(path)
    return pq.read_table(p, filesystem=fs).to_pandas(ignore_metadata=True)


def size(path: str) -> int:
    fs, p = _fs(path)
    return int(fs.get_file_info(p).size)


def read_bytes(path: str) -> bytes:
    fs, p = _fs(path)
    with fs.open_input_stream(p) as f:
        return f.read()


def list_files(directory: str, suffix: str) -> list[str]:
    """Finished files only: temporaries (``.tmp-*``) of an interrupted write are ignored."""
    fs, p = _fs(directory)
    if fs.get_file_info(p).type == pafs.FileType.NotFound:
        return []
    infos = fs.get_file_info(pafs.FileSelector(p, recursive=False))
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


def part_keys(directory: str, status: str | None = None) -> set[str]:
    """The (id, row_hash) keys (``rowkey.keys``) that already have a part in ``directory``; with
    ``status``, only rows whose ``status`` column equals it. Parts of an older raycat, without a
    row_hash, count as not done: their rows are computed again."""
    from raycat.storage import rowkey

    out: set[str] = set()
    for f in list_files(directory, ".parquet"):
        have = parquet_columns(f)
        if "row_hash" not in have:
            continue
        cols = ["id", "row_hash"] + (["status"] if status is not None else [])
        df = read_parquet_columns(f, cols)
        if status is not None:
            df = df[df["status"] == status]
        out.update(rowkey.keys(df))
    return out


def fingerprint(path: str) -> str:
    """A cheap content fingerprint of a local or URI file or directory: every file's relative name,
    size and modification time (weights retrained in place keep their size, not their mtime). A path
    that does not exist here (a hub id) gives "" (its revision is in the config)."""
    try:
        fs, p = _fs(path)
        info = fs.get_file_info(p)
    except (OSError, ValueError, pa.ArrowException):
        return ""
    if info.type == pafs.FileType.NotFound:
        return ""
    infos = [info] if info.type == pafs.FileType.File else fs.get_file_info(pafs.FileSelector(p, recursive=True))
    h = hashlib.sha256()
    for i in sorted((i for i in infos if i.type == pafs.FileType.File), key=lambda i: i.path):
        mtime = i.mtime_ns if i.mtime_ns is not None else ""
        h.update(f"{i.path[len(p) :]}\0{i.size}\0{mtime}\n".encode())
    return h.hexdigest()[:16]


def read_parts(directory: str, columns: list[str]) -> pd.DataFrame:
    frames = [read_parquet(f) for f in list_files(directory, ".parquet")]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
