"""Band rules on arrays: thresholds, ranks and held-out bands. Pure numpy; bands are int8 codes
(0 easy, 1 medium, 2 hard) so a corpus-sized band array is one byte a row.

Ids enter as ``id_rank``: each row's rank in the string order of the ids (``holdout.id_ranks``), so
the (entropy, id) tie-break of the rank rule needs no string per row.
"""

from __future__ import annotations

import numpy as np

from raycat.split import holdout

BANDS = ("easy", "medium", "hard")
NAMES = np.array(BANDS)


def quantile_thresholds(entropy: np.ndarray, quantiles: tuple[float, float]) -> tuple[float, float]:
    lo, hi = np.quantile(np.asarray(entropy, dtype=np.float64), quantiles, method="linear")
    return float(lo), float(hi)


def assign_codes(entropy: np.ndarray, t_low: float, t_high: float) -> np.ndarray:
    e = np.asarray(entropy, dtype=np.float64)
    return np.where(e < t_low, 0, np.where(e < t_high, 1, 2)).astype(np.int8)


def assign_bands(entropy: np.ndarray, t_low: float, t_high: float) -> np.ndarray:
    return NAMES[assign_codes(entropy, t_low, t_high)]


def _cuts(n: int, quantiles: tuple[float, float]) -> tuple[int, int]:
    """Rows below each quantile: ceil(q * (n - 1)), what the linear quantile puts below it."""
    low, high = (int(np.ceil(q * (n - 1))) if n else 0 for q in quantiles)
    return low, high


def rank_codes(entropy: np.ndarray, id_rank: np.ndarray, quantiles: tuple[float, float]) -> np.ndarray:
    """Quantile bands by rank of (entropy, id). Without ties this is exactly ``assign_codes`` at the
    linear quantiles; with ties (coarse entropies, many confident answers at 0.0) the rows tied at a
    threshold are split by id, so band sizes still follow the quantiles instead of the easy band
    emptying into medium."""
    n = len(entropy)
    order = np.lexsort((np.asarray(id_rank), np.asarray(entropy, dtype=np.float64)))
    n_low, n_high = _cuts(n, quantiles)
    codes = np.empty(n, dtype=np.int8)
    codes[order[:n_low]], codes[order[n_low:n_high]], codes[order[n_high:]] = 0, 1, 2
    return codes


def rank_bands(entropy: np.ndarray, ids: np.ndarray, quantiles: tuple[float, float]) -> np.ndarray:
    """``rank_codes`` as band names, for ids given as strings (small frames: studies, tests)."""
    return NAMES[rank_codes(entropy, holdout.id_ranks(ids), quantiles)]


def held_out_codes(
    entropy: np.ndarray,
    id_rank: np.ndarray,
    pool_entropy: np.ndarray,
    pool_id_rank: np.ndarray,
    quantiles: tuple[float, float],
    t_low: float,
    t_high: float,
) -> np.ndarray:
    """Bands of held-out rows by the training rows' rule: by value, and a row tied with a threshold
    by where its (entropy, id) falls among the pool's, as ``rank_codes`` splits the pool's own tied
    rows (with 40 % of entropies at 0.0 the held-out easy band is not empty). Ranks of both sets
    come from one ranking of all their ids."""
    entropy = np.asarray(entropy, dtype=np.float64)
    codes = assign_codes(entropy, t_low, t_high)
    tied = np.flatnonzero((entropy == t_low) | (entropy == t_high))
    if not len(tied):
        return codes
    n_low, n_high = _cuts(len(pool_entropy), quantiles)
    for value in {t_low, t_high}:
        rows = tied[entropy[tied] == value]
        # Position among the pool's (entropy, id) order: rows below the value, then tied ids before.
        same = np.sort(pool_id_rank[pool_entropy == value])
        position = int((pool_entropy < value).sum()) + np.searchsorted(same, id_rank[rows])
        codes[rows] = np.where(position < n_low, 0, np.where(position < n_high, 1, 2))
    return codes
