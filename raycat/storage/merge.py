"""A stage's part files merged into the corpus order, in memory bounded by a bucket, not the corpus.

Parts arrive in whatever order Ray Data finished its blocks, and a part can hold a row twice over
(a killed run's worker finished a part the rerun also computed). ``OrderedParts`` yields the parts'
rows in the order of a rows file (questions.parquet), each key once, first part file (by name) winning:

1. the rows file's keys, streamed: 8 bytes a row (``rowkey.key64``) plus a sorted index of them;
2. each part file, a batch at a time: its rows are looked up, the first copy of each kept, and spread
   by corpus position into buckets of ``bucket_rows`` on the worker's local disk;
3. each bucket in turn: read, sorted by position, yielded.

So memory is one batch or one bucket plus ~17 bytes a corpus row, at 10M rows ~170 MB.
``ParquetSink`` writes the chunks to one Parquet file, atomically, without holding them.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raycat.errors import RaycatError
from raycat.storage import rowkey, rundir

BUCKET_ROWS = 100_000


def unified_schema(files: list[str], extra: dict[str, pa.DataType] | None = None) -> pa.Schema:
    """One schema for every file (a column that is all null in one file and typed in another takes
    the type), from the footers; ``extra`` columns appended where the files lack them."""
    schema = pa.unify_schemas([rundir.parquet_schema(f) for f in files], promote_options="permissive")
    for name, kind in (extra or {}).items():
        if name not in schema.names:
            schema = schema.append(pa.field(name, kind))
    return schema


def part_schema(parts_dir: str, extra: dict[str, pa.DataType] | None = None) -> pa.Schema | None:
    """``unified_schema`` of a stage's part files; None when there are no parts."""
    files = rundir.list_files(parts_dir, ".parquet")
    return unified_schema(files, extra) if files else None


@contextlib.contextmanager
def scratch(name: str, tmp_root: str | None = None) -> Iterator[Path]:
    """A directory on this node's local disk, one per ``name``, wiped first and removed after: work
    retried after its worker died (Ray retries the task) reuses it instead of leaving another copy."""
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    tmp = Path(tmp_root or tempfile.gettempdir()) / f"raycat-merge-{digest}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class Buckets:
    """Rows spread by a target position into files of ``bucket_rows`` positions on local disk, read
    back a bucket at a time in position order (``_pos`` kept): an external sort by position."""

    def __init__(self, directory: Path, bucket_rows: int = BUCKET_ROWS):
        self.dir, self.bucket_rows = directory, bucket_rows
        self._files: dict[int, list[Path]] = {}

    def add(self, frame: pd.DataFrame, pos: np.ndarray) -> None:
        for bucket in np.unique(pos // self.bucket_rows):
            mine = pos // self.bucket_rows == bucket
            files = self._files.setdefault(int(bucket), [])
            path = self.dir / f"{bucket:09d}-{len(files):09d}.parquet"
            chunk = frame[mine].assign(_pos=pos[mine])
            pq.write_table(pa.Table.from_pandas(chunk, preserve_index=False).replace_schema_metadata(None), path)
            files.append(path)

    def chunks(self, keep: bool = False, columns: list[str] | None = None) -> Iterator[pd.DataFrame]:
        """Each bucket, sorted by ``_pos`` (only ``columns`` and ``_pos`` read, when given); with
        ``keep``, the files stay for another pass."""
        wanted = None if columns is None else [*columns, "_pos"]
        for bucket in sorted(self._files):
            frames = [pq.read_table(p, columns=wanted).to_pandas(ignore_metadata=True) for p in self._files[bucket]]
            if not keep:
                for p in self._files.pop(bucket):
                    p.unlink()
            yield pd.concat(frames, ignore_index=True).sort_values("_pos", kind="stable").reset_index(drop=True)


def key_index(keys: np.ndarray, twice: str) -> tuple[np.ndarray, np.ndarray]:
    """(sorted keys, their positions in ``keys``) for ``positions``; a key there twice is refused
    with the error ``twice``."""
    index = np.argsort(keys, kind="stable")
    sorted_keys = keys[index]
    if len(sorted_keys) > 1 and (sorted_keys[1:] == sorted_keys[:-1]).any():
        raise RaycatError(twice)
    return sorted_keys, index


def order_keys(order_paths: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """``key_index`` of the rows of ``order_paths`` taken as one file; two rows with one 64-bit key
    (~3e-6 at 10M rows) would share one merged row: refused."""
    keys = [rowkey.key64(b) for path in order_paths for b in rundir.iter_parquet(path, ["id", "row_hash"])]
    return key_index(
        np.concatenate(keys) if keys else np.empty(0, dtype=np.uint64),
        f"{', '.join(order_paths)}: two rows share a 64-bit (id, row_hash) key; give one of them another id",
    )


class OrderedParts:
    """Iterate for the chunks; ``rows``, ``duplicates`` and ``missing`` hold the counts afterwards."""

    def __init__(
        self,
        parts_dir: str,
        order_path: str | list[str],
        bucket_rows: int = BUCKET_ROWS,
        tmp_root: str | None = None,
        files: list[str] | None = None,
        positions: bool = False,
        columns: list[str] | None = None,
    ):
        """``order_path``: the rows file, or files taken as one in this order; ``files``: these files
        instead of ``parts_dir``'s (which still names the scratch dir); ``positions``: each chunk keeps
        its rows' positions in the rows file as ``_pos``; ``columns``: only these of the parts (with
        ``id`` and ``row_hash``)."""
        self.parts_dir, self.bucket_rows = parts_dir, bucket_rows
        self.order_paths = [order_path] if isinstance(order_path, str) else list(order_path)
        self.tmp_root, self.files, self.positions = tmp_root, files, positions
        self.columns = None if columns is None else list(dict.fromkeys(["id", "row_hash", *columns]))
        self.rows = self.duplicates = self.missing = 0

    def __iter__(self) -> Iterator[pd.DataFrame]:
        sorted_keys, index = order_keys(self.order_paths)
        seen = np.zeros(len(sorted_keys), dtype=bool)
        with scratch(self.parts_dir, self.tmp_root) as tmp:
            buckets = Buckets(tmp, self.bucket_rows)
            files = self.files if self.files is not None else rundir.list_files(self.parts_dir, ".parquet")
            # Batches of each file, so neither a big part nor a whole stage file is ever held.
            for part in (part for f in files for part in rundir.iter_parquet(f, self.columns)):
                pos = positions(sorted_keys, index, rowkey.key64(part))
                first = pos >= 0
                first[first] = ~pd.Series(pos[first]).duplicated().to_numpy() & ~seen[pos[first]]
                # Rows of this corpus seen before (in this part or an earlier one) are the extra copies.
                self.duplicates += int(((pos >= 0) & ~first).sum())
                part, pos = part[first], pos[first]
                seen[pos] = True
                buckets.add(part, pos)
            self.rows = int(seen.sum())
            self.missing = int(len(seen) - self.rows)
            del seen, sorted_keys, index
            for chunk in buckets.chunks():
                yield chunk if self.positions else chunk.drop(columns="_pos")


def aligned(
    order_paths: list[str], chunks, batch_rows: int = 65536
) -> Iterator[tuple[int, pd.DataFrame, pd.DataFrame]]:
    """(start, batch, matches) for each batch of the rows of ``order_paths`` taken as one file, where
    ``matches`` are the rows of ``chunks`` (frames in ``_pos`` order, e.g. ``OrderedParts`` with
    positions) whose ``_pos`` falls in the batch: two sorted streams walked side by side."""
    chunks = iter(chunks)
    pending, start, more = pd.DataFrame({"_pos": np.empty(0, dtype=np.int64)}), 0, True
    for path in order_paths:
        for batch in rundir.iter_parquet(path, batch_rows=batch_rows):
            end = start + len(batch)
            while more and (not len(pending) or pending["_pos"].iloc[-1] < end):
                chunk = next(chunks, None)
                more = chunk is not None
                if more:
                    pending = pd.concat([pending, chunk], ignore_index=True) if len(pending) else chunk
            n = int(np.searchsorted(pending["_pos"].to_numpy(), end))
            mine, pending = pending.iloc[:n], pending.iloc[n:].reset_index(drop=True)
            yield start, batch, mine
            start = end


def sample_positions(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted positions that ``DataFrame.sample(n=size, random_state=seed)`` draws from n rows, so a
    stream keeps the rows a whole-frame sample kept."""
    return np.sort(np.random.RandomState(seed).choice(n, size=size, replace=False))


def kept(batches, keep: np.ndarray | None) -> Iterator[tuple[int, pd.DataFrame]]:
    """(start, rows) of each batch of a stream (its first row at position ``start``), only the rows at
    the sorted positions ``keep`` (None: every row)."""
    start = 0
    for batch in batches:
        rows = batch
        if keep is not None:
            lo, hi = np.searchsorted(keep, [start, start + len(batch)])
            rows = batch.iloc[keep[lo:hi] - start]
        yield start, rows
        start += len(batch)


def positions(sorted_keys: np.ndarray, index: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Each wanted key's position in the rows file, -1 where it is not there."""
    if not len(sorted_keys):
        return np.full(len(wanted), -1, dtype=np.int64)
    at = np.searchsorted(sorted_keys, wanted).clip(max=len(sorted_keys) - 1)
    return np.where(sorted_keys[at] == wanted, index[at], -1).astype(np.int64)


class ParquetSink:
    """Frames written one after another into one Parquet file under ``schema`` (a column a frame lacks
    is null); the file appears at ``path`` only when the block ends without an error
    (``rundir.atomic_output``). With ``row_group_size``, rows are held until they fill a row group,
    so small frames still make whole groups (one Ray block each downstream)."""

    def __init__(self, path: str, schema: pa.Schema, row_group_size: int | None = None):
        self.path, self.schema, self.row_group_size = path, schema, row_group_size
        self.rows = 0
        self._pending: list[pa.Table] = []

    def __enter__(self) -> ParquetSink:
        self._output = rundir.atomic_output(self.path)
        self._writer = pq.ParquetWriter(self._output.__enter__(), self.schema)
        return self

    def write(self, frame: pd.DataFrame) -> None:
        if not len(frame):
            return
        table = pa.Table.from_pandas(frame, preserve_index=False).replace_schema_metadata(None)
        for field in self.schema:
            if field.name not in table.column_names:
                table = table.append_column(field.name, pa.nulls(len(table), field.type))
        table = table.select(self.schema.names).cast(self.schema)
        self.rows += len(frame)
        if self.row_group_size is None:
            self._writer.write_table(table)
        else:
            self._pending = flush_groups(self._writer, [*self._pending, table], self.row_group_size, final=False)

    def __exit__(self, *exc) -> bool:
        try:
            if exc[0] is None and self._pending:
                flush_groups(self._writer, self._pending, self.row_group_size, final=True)
            self._writer.close()
        except BaseException as e:
            # A file that did not close is not published.
            self._output.__exit__(type(e), e, e.__traceback__)
            raise
        self._output.__exit__(*exc)
        return False


def flush_groups(writer: pq.ParquetWriter, pending: list[pa.Table], block: int, final: bool) -> list[pa.Table]:
    """Write the whole row groups of ``block`` rows pending (and, at the end, the rest); return the rest."""
    if not pending:
        # Whole groups already written: rows a multiple of ``block``.
        return []
    table = pa.concat_tables(pending).replace_schema_metadata(None)
    whole = len(table) if final else len(table) - len(table) % block
    if whole:
        writer.write_table(table.slice(0, whole), row_group_size=block)
    return [table.slice(whole)] if whole < len(table) else []
