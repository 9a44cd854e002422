"""Each model's answers to the test rows as arrays in the rows' order, streamed: what eval.finalize
computes its metrics from, without holding the test rows or any model's answers whole.

The rows file (eval/rows.parquet) fixes the order and the 64-bit keys (``merge.order_keys``); a
model's part files are read a batch at a time and the first answer to each row (read order) leaves
~12 bytes behind. eval.parquet is written in a second pass over the parts, the same rows picked.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd

from raycat.storage import merge, rowkey, rundir

TALLY_COLUMNS = ["id", "row_hash", "skip_reason", "correct", "extracted", "completion_tokens"]


@dataclass
class Rows:
    """The test rows' keys and what the tables group by, in the rows file's order."""

    sorted_keys: np.ndarray
    index: np.ndarray
    band: pd.Categorical
    category: pd.Categorical
    # The base student's score-stage answer (None when the rows have no ``correct``), and where it
    # gave no option (None without a ``predicted`` column).
    correct: np.ndarray | None
    unpredicted: np.ndarray | None

    @classmethod
    def read(cls, path: str) -> Rows:
        sorted_keys, index = merge.order_keys([path])
        names = rundir.parquet_columns(path)
        base = "correct" in names
        wanted = [
            "band",
            "category",
            *(["correct"] if base else []),
            *(["predicted"] if base and "predicted" in names else []),
        ]
        parts = {c: [] for c in wanted}
        for batch in rundir.iter_parquet(path, wanted):
            for c in wanted:
                column = batch[c]
                if c == "predicted":
                    column = column.isna()
                parts[c].append(column.astype("category") if c in ("band", "category") else column)

        def joined(c: str) -> pd.Series:
            if not parts[c]:
                return pd.Series([], dtype=object)
            return pd.concat(parts[c], ignore_index=True) if len(parts[c]) > 1 else parts[c][0]

        return cls(
            sorted_keys,
            index,
            pd.Categorical(joined("band")),
            pd.Categorical(joined("category")),
            joined("correct").astype(bool).to_numpy() if base else None,
            joined("predicted").to_numpy(dtype=bool) if "predicted" in parts else None,
        )


@dataclass
class Answers:
    """One model's first answer to each test row, as arrays in the rows' order."""

    answered: np.ndarray
    skipped: np.ndarray  # asked nothing: its prompt did not fit (skip_reason)
    correct: np.ndarray
    unparsed: np.ndarray  # no [[X]] found
    completion_tokens: np.ndarray


def first_rows(rows: Rows, parts_dir: str, columns: list[str] | None) -> Iterator[tuple[pd.DataFrame, np.ndarray]]:
    """(part rows, their positions in the rows file) for each batch of a model's parts: rows of this
    content only, the first copy of each (read order)."""
    seen = np.zeros(len(rows.index), dtype=bool)
    for f in rundir.list_files(parts_dir, ".parquet"):
        for part in rundir.iter_parquet(f, columns):
            pos = merge.positions(rows.sorted_keys, rows.index, rowkey.key64(part))
            first = pos >= 0
            first[first] = ~pd.Series(pos[first]).duplicated().to_numpy() & ~seen[pos[first]]
            seen[pos[first]] = True
            yield part[first], pos[first]


def read_answers(rows: Rows, parts_dir: str) -> Answers:
    n = len(rows.index)
    out = Answers(np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool), np.zeros(n, bool), np.full(n, np.nan))
    for part, pos in first_rows(rows, parts_dir, TALLY_COLUMNS):
        out.answered[pos] = True
        out.skipped[pos] = part["skip_reason"].fillna("").to_numpy() != ""
        out.correct[pos] = part["correct"].astype(bool).to_numpy()
        out.unparsed[pos] = part["extracted"].isna().to_numpy()
        out.completion_tokens[pos] = part["completion_tokens"].to_numpy(dtype=float)
    return out


def first_excluded(answers: list[Answers], n: int) -> np.ndarray:
    """Per test row, the first model (index in ``answers``) that could not be asked it or has no answer
    recorded; -1 where every model answered (the paired comparison's rows)."""
    out = np.full(n, -1, dtype=np.int64)
    for i, a in enumerate(answers):
        out[(out < 0) & (a.skipped | ~a.answered)] = i
    return out


def table_rows(rows: Rows, keep: np.ndarray, correct: np.ndarray, unparsed: np.ndarray) -> pd.DataFrame:
    """What ``core.accuracy_table`` reads, for the rows ``keep`` marks (in the rows' order)."""
    return pd.DataFrame(
        {
            "correct": correct[keep],
            "band": np.asarray(rows.band)[keep],
            "category": np.asarray(rows.category)[keep],
            "extracted": np.where(unparsed[keep], None, ""),
        }
    )
