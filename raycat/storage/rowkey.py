"""Row identity for every row-level cache: the row's id plus a hash of its content.

Sources whose id is the row number (GSM8K, MMLU CSV, generic data without an id column) reuse ids
when ``data.path`` / ``split`` / ``subset`` change. Score parts, the teacher cache and eval parts are
therefore keyed by (id, ``row_hash``): a reused id with new content is computed again, never handed
the old question's entropy, CoT or answer.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd

# Cannot occur in a JSON-encoded hash and is vanishingly rare in ids.
SEP = "\x1f"


def row_hash(question: str, options, gold: str, category: str) -> str:
    """What a model is shown (question, options, category in the prompt) and graded against (gold)."""
    body = json.dumps([question, [str(o) for o in options], str(gold), category or ""], ensure_ascii=False)
    return hashlib.sha256(body.encode()).hexdigest()[:16]


def add(rows: pd.DataFrame) -> pd.DataFrame:
    """``rows`` with their ``row_hash`` column (canonical question records)."""
    hashes = [
        row_hash(q, list(o), g, c)
        for q, o, g, c in zip(rows["question"], rows["options"], rows["gold"], rows["category"], strict=True)
    ]
    return rows.assign(row_hash=pd.Series(hashes, index=rows.index, dtype=object))


def keys(rows: pd.DataFrame) -> pd.Series:
    """One string per row: id and row_hash. Rows of an older raycat (no row_hash) match nothing."""
    hashes = rows["row_hash"].astype(str) if "row_hash" in rows else pd.Series("", index=rows.index)
    return rows["id"].astype(str) + SEP + hashes


def key64(rows: pd.DataFrame) -> np.ndarray:
    """``keys`` as 64-bit hashes (pandas' fixed-key SipHash, the same in every process): 8 bytes a row,
    so corpus-sized key sets fit any worker. Two of 10M keys collide with probability ~3e-6."""
    if not len(rows):
        return np.empty(0, dtype=np.uint64)
    return pd.util.hash_pandas_object(keys(rows), index=False).to_numpy(dtype=np.uint64)


class KeySet:
    """A set of ``key64`` hashes as one sorted array: membership of a whole batch at once."""

    def __init__(self, hashes: np.ndarray | None = None):
        self._sorted = np.unique(hashes) if hashes is not None else np.empty(0, dtype=np.uint64)

    @classmethod
    def union(cls, sets: list[KeySet]) -> KeySet:
        return cls(np.concatenate([s._sorted for s in sets])) if sets else cls()

    def __len__(self) -> int:
        return len(self._sorted)

    def contains(self, hashes: np.ndarray) -> np.ndarray:
        """One bool per hash."""
        if not len(self._sorted):
            return np.zeros(len(hashes), dtype=bool)
        at = np.searchsorted(self._sorted, hashes).clip(max=len(self._sorted) - 1)
        return self._sorted[at] == hashes
