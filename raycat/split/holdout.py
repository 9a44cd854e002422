"""Which rows are held out: duplicate groups, the seeded group draw, balancing draws. Pure
numpy/pyarrow over compact per-row arrays (a rank, a 128-bit digest), never a frame of rows.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def id_ranks(ids) -> np.ndarray:
    """Each id's rank in string order (code point order, the order of Python's ``sorted``). Arrow
    sorts UTF-8 bytewise, which is the same order, and stably, so equal ids keep row order."""
    ids = ids if isinstance(ids, pa.Array | pa.ChunkedArray) else pa.array(np.asarray(ids).astype(str))
    order = pc.sort_indices(ids).to_numpy()
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


def _norm(text) -> str:
    return " ".join(str(text).lower().split())


def group_digests(questions, options) -> np.ndarray:
    """One 128-bit digest (two uint64 columns) per row of its normalised question and option set:
    rows with equal digests are duplicates (MMLU-Pro has 158 such groups, MMLU test 106)."""
    keys = (
        _norm(q) + "\x1f" + "\x1f".join(sorted(_norm(o) for o in opts))
        for q, opts in zip(questions, options, strict=True)
    )
    raw = b"".join(hashlib.blake2b(k.encode(), digest_size=16).digest() for k in keys)
    return np.frombuffer(raw, dtype=np.uint64).reshape(-1, 2)


def group_labels(digests: np.ndarray, id_rank: np.ndarray) -> np.ndarray:
    """A group label per row: the smallest id rank among the rows sharing its digest."""
    n = len(id_rank)
    if not n:
        return np.empty(0, dtype=np.int64)
    order = np.lexsort((id_rank, digests[:, 1], digests[:, 0]))
    d = digests[order]
    start = np.ones(n, dtype=bool)
    start[1:] = (d[1:] != d[:-1]).any(axis=1)
    first = np.maximum.accumulate(np.where(start, np.arange(n), 0))
    labels = np.empty(n, dtype=np.int64)
    labels[order] = id_rank[order][first]
    return labels


def duplicate_counts(labels: np.ndarray) -> tuple[int, int]:
    """(groups with more than one row, rows in them)."""
    _, counts = np.unique(labels, return_counts=True)
    return int((counts > 1).sum()), int(counts[counts > 1].sum())


def holdout_mask(labels, fraction: float, seed: int) -> np.ndarray:
    """Seeded test selection that depends on the label set, not on row order: whole groups (one label
    per row; a row's own id when it has no duplicate) in a seeded order over the sorted labels, until
    the test set holds ``round(fraction * rows)`` rows or more. Duplicates never straddle train and test."""
    labels = np.asarray(labels)
    n_test = int(round(fraction * len(labels)))
    unique, codes = np.unique(labels, return_inverse=True)
    sizes = np.bincount(codes.ravel(), minlength=len(unique))
    order = np.random.default_rng(seed).permutation(len(unique))
    taken_before = np.cumsum(sizes[order]) - sizes[order]
    chosen = np.zeros(len(unique), dtype=bool)
    chosen[order[taken_before < n_test]] = True
    return chosen[codes.ravel()]
