"""The split decided on compact per-row arrays: which rows are held out, each row's band, which rows
balancing keeps, and the thresholds.json summary. ``split_frame`` applies it to a small frame; the
stage (``split.stage``) streams the same decision over a corpus.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from raycat.config import SplitConfig
from raycat.errors import RaycatError
from raycat.split import holdout, rules
from raycat.split.rules import BANDS
from raycat.storage import merge


@dataclass
class Assignment:
    band: np.ndarray  # int8 code per row (rules.BANDS), for held-out rows too
    test: np.ndarray  # bool: held out
    kept: np.ndarray  # bool: drawn by split.balance_per_band / split.test_balance (all, without them)
    info: dict


def _per_category(
    entropy,
    id_rank,
    categories,
    names,
    test,
    band,
    cfg,
) -> dict[str, list[float]]:
    """The same quantiles within each category's training rows (a subject the student finds hard
    overall still gets an easy band); held-out rows use their category's thresholds (the global ones
    for a category with no training rows). Sets ``band`` in place; returns the thresholds."""
    per_category = {}
    pool = ~test
    for code in np.unique(categories[pool]):
        mine = categories == code
        part = np.flatnonzero(pool & mine)
        e, r = entropy[part], id_rank[part]
        band[part] = rules.rank_codes(e, r, cfg.quantiles)
        low, high = rules.quantile_thresholds(e, cfg.quantiles)
        per_category[str(names[code])] = [float(low), float(high)]
        held = np.flatnonzero(test & mine)
        band[held] = rules.held_out_codes(entropy[held], id_rank[held], e, r, cfg.quantiles, low, high)
    return per_category


def _balanced_test(band: np.ndarray, test: np.ndarray, seed: int) -> np.ndarray:
    """The same number of held-out rows per band (seeded); refused when a band has none."""
    counts = {b: int((test & (band == i)).sum()) for i, b in enumerate(BANDS)}
    n = min(counts.values())
    if n == 0:
        empty = [b for b in BANDS if counts[b] == 0]
        raise RaycatError(
            f"split.test_balance: the held-out set has no {' / '.join(empty)} row(s) ({counts}), so a "
            "balanced test set would be empty; raise split.test_fraction or set split.test_balance=false"
        )
    return _draw_per_band(band, test, lambda rows: n, seed)


def _draw_per_band(band: np.ndarray, among: np.ndarray, size, seed: int) -> np.ndarray:
    """Per band, ``size(rows)`` of the rows ``among`` marks, at DataFrame.sample's positions."""
    kept = np.zeros(len(band), dtype=bool)
    for i in range(len(BANDS)):
        rows = np.flatnonzero(among & (band == i))
        kept[rows[merge.sample_positions(len(rows), size(len(rows)), seed)]] = True
    return kept


def assign(
    entropy: np.ndarray, id_rank: np.ndarray, labels: np.ndarray, categories: np.ndarray, names, cfg: SplitConfig
) -> Assignment:
    """``entropy`` (no NaN), ``id_rank`` (``holdout.id_ranks``), ``labels`` (``holdout.group_labels``),
    ``categories`` (codes into the sorted category ``names``, "" for none) for each row to split."""
    entropy = np.asarray(entropy, dtype=np.float64)
    test = holdout.holdout_mask(labels, cfg.test_fraction, cfg.seed)
    pool = ~test
    if cfg.thresholds is not None:
        t_low, t_high, method = *cfg.thresholds, "absolute"
    else:
        if not pool.any():
            raise RaycatError(
                f"no scored row left to take quantiles of ({int(test.sum())} held out, none in the training "
                "pool): check score/skipped.parquet, or lower split.test_fraction"
            )
        t_low, t_high = rules.quantile_thresholds(entropy[pool], cfg.quantiles)
        method = "quantiles"
    band = np.empty(len(entropy), dtype=np.int8)
    if method == "quantiles":
        band[pool] = rules.rank_codes(entropy[pool], id_rank[pool], cfg.quantiles)
        band[test] = rules.held_out_codes(
            entropy[test], id_rank[test], entropy[pool], id_rank[pool], cfg.quantiles, t_low, t_high
        )
        ties = int((pool & ((entropy == t_low) | (entropy == t_high))).sum())
    else:
        band[:] = rules.assign_codes(entropy, t_low, t_high)
        ties = 0
    per_category = None
    if cfg.per_category and method == "quantiles":
        per_category = _per_category(entropy, id_rank, categories, names, test, band, cfg)
    test_before = {b: int((test & (band == i)).sum()) for i, b in enumerate(BANDS)}
    kept_test = _balanced_test(band, test, cfg.seed) if cfg.test_balance and test.any() else test
    before = {b: int((pool & (band == i)).sum()) for i, b in enumerate(BANDS)}
    kept_pool = pool
    if cfg.balance_per_band is not None:
        kept_pool = _draw_per_band(band, pool, lambda rows: min(cfg.balance_per_band, rows), cfg.seed)
    dup_groups, dup_rows = holdout.duplicate_counts(labels)
    info = {
        "method": method,
        "quantiles": list(cfg.quantiles) if method == "quantiles" else None,
        "thresholds": [t_low, t_high],
        "per_category_thresholds": per_category,
        "rule": "easy < t_low <= medium < t_high <= hard"
        + ("; training rows by rank of (entropy, id), so rows tied at a threshold are split by id" if ties else ""),
        "rows_at_a_threshold": ties,
        "pool_rows": int(pool.sum()),
        "test_rows": int(kept_test.sum()),
        "counts_before_balancing": before,
        "counts": {b: int((kept_pool & (band == i)).sum()) for i, b in enumerate(BANDS)},
        "test_counts": {b: int((kept_test & (band == i)).sum()) for i, b in enumerate(BANDS)},
        "test_counts_before_balancing": test_before,
        "test_balance": cfg.test_balance,
        "balance_per_band": cfg.balance_per_band,
        "test_fraction": cfg.test_fraction,
        "duplicate_groups": {
            "groups": dup_groups,
            "rows": dup_rows,
            "rule": "identical normalised question + option set: the whole group goes to train or to test",
        },
        "seed": cfg.seed,
    }
    return Assignment(band=band, test=test, kept=kept_pool | kept_test, info=info)


def category_codes(values) -> tuple[np.ndarray, np.ndarray]:
    """(codes, sorted names) of a category column, None as ""."""
    names, codes = np.unique(pd.Series(values, dtype=object).fillna("").astype(str).to_numpy(), return_inverse=True)
    return codes.ravel().astype(np.int32), names


def split_frame(rows: pd.DataFrame, cfg: SplitConfig) -> tuple[dict[str, pd.DataFrame], pd.DataFrame, dict]:
    """A small frame (``id``, ``question``, ``options``, ``entropy``, optional ``category``) split in
    memory: ({band: rows}, test rows, thresholds info); each row keeps its entropy and gets a band."""
    rows = rows.reset_index(drop=True)
    rank = holdout.id_ranks(rows["id"])
    labels = holdout.group_labels(holdout.group_digests(rows["question"], rows["options"]), rank)
    categories, names = category_codes(rows["category"] if "category" in rows else [None] * len(rows))
    a = assign(rows["entropy"].to_numpy(), rank, labels, categories, names, cfg)
    rows = rows.assign(band=rules.NAMES[a.band])
    bands = {b: rows[~a.test & a.kept & (a.band == i)] for i, b in enumerate(BANDS)}
    return bands, rows[a.test & a.kept], a.info
