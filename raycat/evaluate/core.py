"""Pure core of the eval stage: bootstrap intervals (drawn in blocks), paired differences and accuracy
tables (which rows every model could be asked: ``tally``).

No Ray and no engine here: numpy and pandas on rows already read (tests/evaluate/test_core.py).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

BANDS = ("easy", "medium", "hard")
MIN_CATEGORY_ROWS = 10
# Row indices drawn at a time: one (resamples, n) draw of a 100k-row test set would be 0.8 GB.
DRAW_BLOCK = 1 << 22


def per_resample(n: int, resamples: int, rng: np.random.Generator, stat) -> np.ndarray:
    """``stat(drawn)`` of ``resamples`` draws of ``n`` indices with replacement (``drawn``: a block of
    rows of indices), drawn a block at a time; below ``DRAW_BLOCK`` indices, one draw as before."""
    per = max(1, DRAW_BLOCK // max(1, n))
    blocks = [rng.integers(0, n, size=(min(per, resamples - i), n)) for i in range(0, resamples, per)]
    return np.concatenate([stat(drawn) for drawn in blocks]) if blocks else np.empty(0)


def bootstrap_ci(correct: np.ndarray, resamples: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of a mean of per-row values (0/1 outcomes, or paired differences of them);
    (nan, nan) for an empty set."""
    x = np.asarray(correct, dtype=np.float64)
    if len(x) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = per_resample(len(x), resamples, rng, lambda drawn: x[drawn].mean(axis=1))
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int, seed: int, level: float = 0.95) -> dict:
    """Accuracy difference a − b on the same rows, with a paired percentile bootstrap CI (the rows are
    resampled once for both models, so the CI reflects the models' disagreement, not the row draw twice)."""
    x = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(x) == 0:
        return {"n": 0, "diff": None, "ci95": [None, None]}
    # The bootstrap of the per-row differences.
    lo, hi = bootstrap_ci(x, resamples, seed, level)
    return {"n": int(len(x)), "diff": float(x.mean()), "ci95": [lo, hi]}


def clustered_paired_bootstrap(
    differences: np.ndarray, clusters: np.ndarray, resamples: int, seed: int, level: float = 0.95
) -> dict:
    """Mean of per-row differences whose rows come in clusters (the same test question under several
    seeds: its differences are correlated), with a percentile bootstrap CI that resamples whole
    clusters, so S seeds of the same rows do not narrow the interval as S independent rows would."""
    x = np.asarray(differences, dtype=np.float64)
    if len(x) == 0:
        return {"n": 0, "clusters": 0, "diff": None, "ci95": [None, None]}
    labels, index = np.unique(np.asarray(clusters).astype(str), return_inverse=True)
    sums = np.bincount(index, weights=x, minlength=len(labels))
    counts = np.bincount(index, minlength=len(labels)).astype(np.float64)
    rng = np.random.default_rng(seed)
    means = per_resample(len(labels), resamples, rng, lambda drawn: sums[drawn].sum(axis=1) / counts[drawn].sum(axis=1))
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"n": int(len(x)), "clusters": int(len(labels)), "diff": float(x.mean()), "ci95": [float(lo), float(hi)]}


def paired_table(correct: dict[str, np.ndarray], resamples: int, seed: int) -> list[dict]:
    """``paired_bootstrap`` of every pair of models (a before b in ``correct``'s order) on the same rows."""
    names = list(correct)
    return [
        {"a": a, "b": b, **paired_bootstrap(correct[a], correct[b], resamples, seed)}
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    ]


def band_average_ci(rows: pd.DataFrame, resamples: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of the unweighted mean of the band accuracies: each band's rows are
    resampled within the band (its size fixed), the three band means averaged per resample."""
    rng = np.random.default_rng(seed)
    band_means = []
    for band in BANDS:
        correct = rows.loc[rows["band"] == band, "correct"].to_numpy(dtype=np.float64)
        band_means.append(per_resample(len(correct), resamples, rng, lambda drawn, c=correct: c[drawn].mean(axis=1)))
    averages = np.mean(band_means, axis=0)
    lo, hi = np.quantile(averages, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def accuracy_table(rows: pd.DataFrame, resamples: int, seed: int) -> dict:
    """Accuracy with CI overall, per band and per category (categories with n >= 10)."""

    def one(part: pd.DataFrame) -> dict:
        correct = part["correct"].to_numpy(dtype=bool)
        lo, hi = bootstrap_ci(correct, resamples, seed)
        return {
            "n": int(len(correct)),
            "accuracy": float(correct.mean()) if len(correct) else None,
            "ci95": [lo, hi],
            "unparsed": int(part["extracted"].isna().sum()),
        }

    out = {"overall": one(rows), "per_band": {}, "per_category": {}}
    for band in BANDS:
        out["per_band"][band] = one(rows[rows["band"] == band])
    # The unweighted mean of the band accuracies: comparable across test sets with other band mixes.
    accuracies = [out["per_band"][band]["accuracy"] for band in BANDS]
    out["band_average"] = float(np.mean(accuracies)) if all(a is not None for a in accuracies) else None
    out["band_average_ci95"] = list(band_average_ci(rows, resamples, seed)) if out["band_average"] is not None else None
    for category, part in rows.groupby("category"):
        if len(part) >= MIN_CATEGORY_ROWS:
            out["per_category"][str(category)] = one(part)
    return out
