"""Each taught row's result across the teacher cascade, streamed: what ``teach.finalize`` merges.

The rows file (teach/rows.parquet) fixes the order. Every teacher's part files are read once, a batch
at a time: their rows for this run are looked up by 64-bit key (``merge.positions``) and spread by row
position into buckets on the worker's local disk; the rows of the training pool only leave their
tokens behind, in arrays of the pool's size (~9 bytes a pool row a teacher), for the per-band
accounting. Then the rows file and the buckets are walked side by side (``merge.aligned``), a batch of
rows with every teacher's answers to them at a time. Memory: a batch, a bucket and those arrays, never
the taught rows or the answers whole (a hard band of 250k CoTs is GBs of text).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from raycat.errors import RaycatError
from raycat.storage import merge, rowkey, rundir
from raycat.teach.core import teacher_totals

# Order of preference across the cascade: verified < an answer (wrong, unparsed...) < failed < skipped.
TIERS = {"verified": 0, "failed": 2, "skipped": 3}
PART_BATCH_ROWS = 16_384


def per_teacher(found: pd.DataFrame) -> pd.DataFrame:
    """Each teacher's result for each row of ``found`` (answers with ``_pos``, ``_teacher``: the
    teacher's place in the cascade, and ``_seq``: the order read): its first answer that is not a failed
    request (a row retried after an outage has a newer part), else its first failure."""
    failed = found["status"].eq("failed").to_numpy()
    ordered = found.assign(_failed=failed).sort_values(["_failed", "_seq"], kind="stable")
    return ordered.drop_duplicates(["_pos", "_teacher"]).drop(columns=["_failed"])


def cascade(results: pd.DataFrame, n_teachers: int) -> pd.DataFrame:
    """One result per ``_pos`` across the teachers (``per_teacher``'s frame), sorted by ``_pos``: the
    first verified one in cascade order, otherwise the last teacher that answered (a wrong CoT is kept
    over a later teacher's failed request: under teach.on_wrong=keep it is a target), otherwise the
    last failure, otherwise the last skip (a prompt too long for that teacher)."""
    tier = results["status"].map(TIERS).fillna(1).astype(int).to_numpy()
    i = results["_teacher"].to_numpy()
    rank = tier * 10_000 + np.where(tier == 0, i, n_teachers - i)
    best = results.assign(_rank=rank).sort_values("_rank", kind="stable").drop_duplicates("_pos")
    return best.sort_values("_pos").drop(columns=["_rank"]).reset_index(drop=True)


@dataclass
class PoolTokens:
    """Each training-pool row's tokens per teacher (the result ``per_teacher`` would pick), filled a
    batch of parts at a time. ``state``: 0 no answer, 1 a failed request, 2 an answer."""

    sorted_keys: np.ndarray
    index: np.ndarray
    n_teachers: int
    tokens: np.ndarray = field(init=False)
    state: np.ndarray = field(init=False)

    def __post_init__(self):
        self.tokens = np.zeros((self.n_teachers, len(self.index)))
        self.state = np.zeros((self.n_teachers, len(self.index)), dtype=np.int8)

    def add(self, teacher: int, part: pd.DataFrame, keys: np.ndarray) -> None:
        pos = merge.positions(self.sorted_keys, self.index, keys)
        mine = pos >= 0
        if not mine.any():
            return
        failed = part["status"].eq("failed").to_numpy()[mine]
        spent = (part["prompt_tokens"].to_numpy(dtype=float) + part["completion_tokens"].to_numpy(dtype=float))[mine]
        # In read order, answers before failures: the first of each row is this batch's candidate.
        order = np.lexsort((np.arange(len(failed)), failed))
        pos, failed, spent = pos[mine][order], failed[order], spent[order]
        first = ~pd.Series(pos).duplicated().to_numpy()
        pos, failed, spent = pos[first], failed[first], np.nan_to_num(spent[first])
        state = self.state[teacher]
        # A row takes the candidate when it has nothing yet, or a failure and now an answer.
        take = (state[pos] == 0) | ((state[pos] == 1) & ~failed)
        state[pos[take]] = np.where(failed[take], 1, 2)
        self.tokens[teacher, pos[take]] = spent[take]

    def per_row(self) -> np.ndarray:
        """Each pool row's tokens summed over the teachers that answered it; NaN where none did."""
        answered = self.state > 0
        total = np.where(answered, self.tokens, 0.0).sum(axis=0)
        return np.where(answered.any(axis=0), total, np.nan)


@dataclass
class Merged:
    """What the walk found: counts for the metrics, summed over the batches."""

    rows: int = 0
    final_status: Counter = field(default_factory=Counter)
    attempt_status: Counter = field(default_factory=Counter)
    totals: dict = field(default_factory=dict)
    rows_taught: int = 0
    missing: int = 0
    missing_example: str | None = None

    def add_totals(self, results: pd.DataFrame) -> None:
        self.rows_taught += int(results["_pos"].nunique())
        for name, sums in teacher_totals(results).items():
            mine = self.totals.setdefault(name, dict.fromkeys(sums, 0))
            for k, v in sums.items():
                mine[k] += v


def pool_index(band_paths: dict[str, str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sorted keys, index, band of each pool row) of the split's band files taken as one."""
    paths = [p for p in band_paths.values() if rundir.exists(p)]
    sorted_keys, index = merge.order_keys(paths)
    bands = np.concatenate(
        [np.full(rundir.parquet_rows(p), band, dtype=object) for band, p in band_paths.items() if rundir.exists(p)]
        or [np.empty(0, dtype=object)]
    )
    return sorted_keys, index, bands


def spread(rows_path: str, parts_dirs: list[str], pool: PoolTokens, buckets: merge.Buckets) -> None:
    """Every teacher's parts, read once: the answers to this run's rows into ``buckets`` (by row
    position), the tokens of pool rows into ``pool``."""
    sorted_keys, index = merge.order_keys([rows_path])
    seq = 0
    for teacher, directory in enumerate(parts_dirs):
        for f in rundir.list_files(directory, ".parquet"):
            for part in rundir.iter_parquet(f, batch_rows=PART_BATCH_ROWS):
                keys = rowkey.key64(part)
                pool.add(teacher, part, keys)
                pos = merge.positions(sorted_keys, index, keys)
                mine = pos >= 0
                found = part[mine].assign(_teacher=teacher, _seq=np.arange(seq, seq + len(part))[mine])
                seq += len(part)
                if len(found):
                    buckets.add(found, pos[mine])


def walk(rows_path: str, buckets: merge.Buckets, n_teachers: int, merged: Merged) -> Iterator[pd.DataFrame]:
    """Per batch of the rows file: the rows with their chosen result's columns (``_pos`` and
    ``_teacher`` dropped; the rows' own ``id`` and ``row_hash`` kept). A row no teacher answered is
    counted in ``merged.missing`` and left out."""
    for start, batch, found in merge.aligned([rows_path], buckets.chunks(), batch_rows=PART_BATCH_ROWS):
        have = np.zeros(len(batch), dtype=bool)
        if len(found):
            results = per_teacher(found)
            merged.add_totals(results)
            chosen = cascade(results, n_teachers)
            have[chosen["_pos"].to_numpy(dtype=np.int64) - start] = True
        if not have.all():
            merged.missing += int((~have).sum())
            merged.missing_example = merged.missing_example or str(batch["id"][~have].iloc[0])
        if not have.any():
            continue
        picked = chosen.drop(columns=["id", "row_hash", "_pos", "_teacher", "_seq"]).reset_index(drop=True)
        yield pd.concat([batch[have].reset_index(drop=True), picked], axis=1)


def no_result_error(merged: Merged) -> RaycatError:
    return RaycatError(
        f"{merged.missing} row(s) have no teacher result (e.g. {merged.missing_example}); "
        "rerun `raycat teach` to finish them"
    )
