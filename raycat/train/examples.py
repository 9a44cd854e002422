"""A phase's training examples prepared at corpus size by one task, a batch at a time; memory is a
batch or a shuffle bucket (``EXAMPLE_BUCKET_TOKENS`` tokens) plus ~30 bytes a phase row (the shuffle's
positions, the CoT join's keys), whatever the corpus; local disk holds the encoded examples once.

1. the phase's rows: its band files in order (random_split: the seeded positions of the bands'
   concatenation it keeps); a CoT phase joins each row to its teacher target by (id, row_hash), the
   first copy in teach/cot.parquet (``merge.OrderedParts``); rows without one are skipped (``NO_COT``);
2. each batch encoded (``batches.encode_rows``; on ``train.encoders``' actors, back in order) and spooled
   to the node's local disk;
3. the examples spread by their shuffled position (the order ``DataFrame.sample(frac=1)`` gave) into
   buckets (``merge.Buckets``), then read back in order: to hash the input ids and labels, to hash the
   ids (the same bytes ``json.dumps`` of the whole lists hashed, so phase hashes stay as they were),
   and, for a phase not trained yet, to write examples.parquet with the few rows repeated so every
   worker gets the same number (DistributedSampler's rule: DeepSpeed ranks must run the same steps).
skipped.parquet lists each batch's rows without a CoT, then its over-long ones (the whole-frame
preparation listed every row without a CoT first).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, deque
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raycat.recipes import NO_COT, Phase
from raycat.storage import merge, rundir

# Rows tokenized at a time; rows per row group of examples.parquet (the training workers' read tasks
# take whole groups, ~rundir.READ_ROWS rows a task).
BATCH_ROWS = 4096
EXAMPLE_BLOCK_ROWS = 4096
SPOOL_ROWS = 32_768
BUCKET_ROWS = merge.BUCKET_ROWS
# Tokens per shuffle bucket: input ids + labels, 8 bytes each, ~130 MB in a frame; reading a bucket
# holds a few copies of it (Arrow, pandas, sorted), which is the preparation task's peak.
EXAMPLE_BUCKET_TOKENS = 8_000_000
EXAMPLES = pa.schema([("input_ids", pa.list_(pa.int64())), ("labels", pa.list_(pa.int64()))])
SKIPPED = pa.schema([("id", pa.string()), ("phase", pa.string()), ("skip_reason", pa.string())])


class Skipped(merge.ParquetSink):
    """skipped.parquet of a recipe (id, phase, skip_reason), streamed, with the counts."""

    def __init__(self, path: str):
        super().__init__(path, SKIPPED, row_group_size=65536)
        self.counts: Counter = Counter()

    def add(self, rows: pd.DataFrame, phase: str, reason: str | None = None) -> None:
        rows = rows[["id"]].assign(phase=phase, skip_reason=reason) if reason else rows.assign(phase=phase)
        self.counts.update(zip(rows["phase"], rows["skip_reason"], strict=True))
        self.write(rows[["id", "phase", "skip_reason"]])

    def summary(self) -> list[dict]:
        """Counts by phase and reason, sorted (as a groupby gives them)."""
        return [{"phase": p, "skip_reason": r, "n": n} for (p, r), n in sorted(self.counts.items())]


def phase_rows(
    phase: Phase,
    band_paths: list[str],
    keep: np.ndarray | None,
    cot_path: str | None,
    batch_rows: int | None = None,
    scratch: str = "",
) -> Iterator[tuple[pd.DataFrame, pd.DataFrame]]:
    """(rows, rows without a teacher CoT) of a phase, a batch at a time, in its band files' order;
    ``scratch`` names the CoT join's local dir (one per phase of a recipe)."""
    batches = _with_targets(
        phase, band_paths, cot_path, batch_rows or BATCH_ROWS, scratch or f"{cot_path}#{phase.name}"
    )
    for _, batch in merge.kept(batches, keep):
        batch = batch.reset_index(drop=True)
        if phase.target != "cot":
            yield batch, batch.iloc[:0]
            continue
        missing = batch["target"].isna().to_numpy()
        yield batch[~missing].reset_index(drop=True), batch[missing]


def _with_targets(
    phase: Phase, paths: list[str], cot_path: str | None, batch_rows: int, scratch: str
) -> Iterator[pd.DataFrame]:
    """The band files' batches taken as one; a CoT phase's carry ``target``."""
    if phase.target != "cot":
        for path in paths:
            for batch in rundir.iter_parquet(path, batch_rows=batch_rows):
                yield batch.drop(columns="target", errors="ignore")
        return
    ordered = merge.OrderedParts(scratch, paths, BUCKET_ROWS, files=[cot_path], positions=True, columns=["target"])
    for start, batch, found in merge.aligned(paths, ordered, batch_rows):
        target = np.full(len(batch), None, dtype=object)
        if len(found):
            target[found["_pos"].to_numpy() - start] = found["target"].to_numpy()
        yield batch.drop(columns="target", errors="ignore").assign(target=target)


class JsonList:
    """``json.dumps(a whole list)``'s bytes fed to a hash a batch of items at a time."""

    def __init__(self, h=None):
        self.h, self.first = h or hashlib.sha256(), True
        self.h.update(b"[")

    def add(self, items: list) -> None:
        if items:
            self.h.update(((", " if not self.first else "") + json.dumps(items, default=str)[1:-1]).encode())
            self.first = False

    def close(self):
        self.h.update(b"]")
        return self.h


_MARK = "\x00raycat streamed list\x00"


def dict_hash(fields: dict, key: str, batches: Iterator[list]) -> str:
    """The hash of ``json.dumps({**fields, key: the whole list}, sort_keys=True, default=str)``, streamed."""
    head, tail = json.dumps({**fields, key: _MARK}, sort_keys=True, default=str).split(json.dumps(_MARK))
    out = JsonList(hashlib.sha256(head.encode()))
    for items in batches:
        out.add(items)
    h = out.close()
    h.update(tail.encode())
    return h.hexdigest()[:16]


def _spool(rows, encode, map_batches, spool: Path, skipped: Skipped, phase: str) -> dict:
    """Every batch encoded (``map_batches(encode, batches)``, in order) and appended to a local Parquet
    file; returns the counts."""
    stats = dict.fromkeys(("rows", "examples", "truncated", "tokens", "target_tokens"), 0)
    schema = pa.schema([("id", pa.string()), *EXAMPLES])
    pending: list[pa.Table] = []
    # Each sent batch's size and rows without a CoT, until its encoding comes back.
    sizes: deque[int] = deque()
    no_cots: deque[pd.DataFrame] = deque()

    def sent():
        for batch, no_cot in rows:
            sizes.append(len(batch))
            no_cots.append(no_cot)
            yield batch

    with pq.ParquetWriter(spool, schema) as writer:
        for encoded, skip in map_batches(encode, sent()):
            size, no_cot = sizes.popleft(), no_cots.popleft()
            if len(no_cot):
                skipped.add(no_cot, phase, NO_COT)
            if len(skip):
                skipped.add(skip, phase)
            stats["rows"] += size
            stats["examples"] += len(encoded)
            if len(encoded):
                stats["truncated"] += int(encoded["truncated"].sum())
                stats["tokens"] += int(encoded["num_tokens"].sum())
                stats["target_tokens"] += int(encoded["num_target_tokens"].sum())
                table = pa.Table.from_pandas(encoded[schema.names], preserve_index=False)
                pending.append(table.replace_schema_metadata(None).cast(schema))
                # Row groups of SPOOL_ROWS, fewer when examples are long (a group is what the shuffle
                # reads at once): small groups would make many tiny bucket files at 10M rows.
                pending = merge.flush_groups(writer, pending, _group_rows(stats), final=False)
        if pending:
            merge.flush_groups(writer, pending, _group_rows(stats), final=True)
    return stats


def _group_rows(stats: dict) -> int:
    """Rows of about ``EXAMPLE_BUCKET_TOKENS`` tokens at the mean length so far, at most SPOOL_ROWS."""
    return max(1, min(SPOOL_ROWS, EXAMPLE_BUCKET_TOKENS // max(1, stats["tokens"] // max(1, stats["examples"]))))


def _write(buckets: merge.Buckets, n: int, extra: int, seed: int, path: str) -> None:
    """examples.parquet: the shuffled examples, then ``extra`` rows repeated for equal shards."""
    pick = np.random.default_rng(seed).choice(n, size=extra, replace=n < extra) if extra else np.empty(0, int)
    repeated: dict[int, tuple] = {}
    block = max(1, min(math.ceil((n + extra) / 8), EXAMPLE_BLOCK_ROWS))
    with merge.ParquetSink(path, EXAMPLES, row_group_size=block) as out:
        for chunk in buckets.chunks(columns=["input_ids", "labels"]):
            for at in np.flatnonzero(np.isin(chunk["_pos"].to_numpy(), pick)):
                repeated[int(chunk["_pos"].iloc[at])] = (chunk["input_ids"].iloc[at], chunk["labels"].iloc[at])
            out.write(chunk[["input_ids", "labels"]])
        if extra:
            out.write(pd.DataFrame([repeated[int(p)] for p in pick], columns=["input_ids", "labels"]))


def _token_hashes(buckets: merge.Buckets) -> tuple[str, str]:
    """The list hashes of every example's input ids and labels, in one pass over the buckets, a slice
    at a time (JSON text of a whole bucket of long examples would be gigabytes)."""
    inputs, labels = JsonList(), JsonList()
    for chunk in buckets.chunks(keep=True, columns=["input_ids", "labels"]):
        for at in range(0, len(chunk), BATCH_ROWS):
            part = chunk.iloc[at : at + BATCH_ROWS]
            inputs.add([x.tolist() for x in part["input_ids"]])
            labels.add([x.tolist() for x in part["labels"]])
    return inputs.close().hexdigest()[:16], labels.close().hexdigest()[:16]


def prepare(
    rows: Iterator[tuple[pd.DataFrame, pd.DataFrame]],
    encode: Callable[[pd.DataFrame], tuple[pd.DataFrame, pd.DataFrame]],
    *,
    phase: str,
    fields: dict,
    seed: int,
    world: int,
    out_path: str,
    trained: Callable[[str], bool],
    skipped: Skipped,
    map_batches: Callable = map,
) -> tuple[dict, str]:
    """(stats, hash) of one phase; examples.parquet written unless ``trained(hash)``. The hash is of
    ``fields`` plus the shuffled examples' ``rows`` (ids), ``inputs`` and ``labels``. ``map_batches``
    runs ``encode`` over the batches in order (``train.encoders.pool``: on Ray actors)."""
    with merge.scratch(out_path) as tmp:
        stats = _spool(rows, encode, map_batches, tmp / "spool.parquet", skipped, phase)
        n = stats["examples"]
        # The positions DataFrame.sample(frac=1.0, random_state=seed) gives: one seeded shuffle.
        order = np.random.RandomState(seed).choice(n, size=n, replace=False)
        target = np.empty(n, dtype=np.int64)
        target[order] = np.arange(n)
        # Buckets of ~EXAMPLE_BUCKET_TOKENS tokens: a bucket is what one read holds.
        per_bucket = max(1, min(BUCKET_ROWS, EXAMPLE_BUCKET_TOKENS // max(1, stats["tokens"] // max(1, n))))
        buckets, start = merge.Buckets(tmp, per_bucket), 0
        for batch in rundir.iter_parquet(str(tmp / "spool.parquet"), batch_rows=per_bucket):
            buckets.add(batch, target[start : start + len(batch)])
            start += len(batch)
        (tmp / "spool.parquet").unlink()
        del order, target
        inputs, labels = _token_hashes(buckets)
        ids = (c["id"].tolist() for c in buckets.chunks(keep=True, columns=["id"]))
        phase_hash = dict_hash({**fields, "inputs": inputs, "labels": labels}, "rows", ids)
        stats["repeated"] = (-n) % world if n else 0
        if n and not trained(phase_hash):
            _write(buckets, n, stats["repeated"], seed, out_path)
    return stats, phase_hash
