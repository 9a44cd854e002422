"""The split as raycat computed it before it streamed (raycat/split.py at 4d2a225): whole frames in
one task. Kept as the reference the streamed stage must reproduce file for file
(tests/split/test_stage.py) and the array rules row for row (tests/split/test_plan.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd

from raycat.config import RaycatConfig, SplitConfig
from raycat.errors import MissingInputError, RaycatError
from raycat.storage import rowkey, rundir

BANDS = ("easy", "medium", "hard")


def quantile_thresholds(entropy: np.ndarray, quantiles: tuple[float, float]) -> tuple[float, float]:
    lo, hi = np.quantile(np.asarray(entropy, dtype=np.float64), quantiles, method="linear")
    return float(lo), float(hi)


def rank_bands(entropy: np.ndarray, ids: np.ndarray, quantiles: tuple[float, float]) -> np.ndarray:
    """Quantile bands by rank of (entropy, id). Without ties this is exactly ``assign_bands`` at the
    linear quantiles (ceil(q * (n - 1)) rows fall below the q-quantile); with ties (coarse entropies,
    many confident answers at 0.0) the rows tied at a threshold are split by id, so band sizes still
    follow the quantiles instead of the easy band emptying into medium."""
    n = len(entropy)
    order = np.lexsort((np.asarray(ids).astype(str), np.asarray(entropy, dtype=np.float64)))
    n_low, n_high = (int(np.ceil(q * (n - 1))) if n else 0 for q in quantiles)
    bands = np.empty(n, dtype=object)
    bands[order[:n_low]], bands[order[n_low:n_high]], bands[order[n_high:]] = "easy", "medium", "hard"
    return bands.astype(str)


def held_out_bands(test: pd.DataFrame, pool: pd.DataFrame, quantiles, t_low: float, t_high: float) -> np.ndarray:
    """Bands of held-out rows by the training rows' rule: by value, and a row tied with a threshold
    by where its (entropy, id) falls among the pool's, as ``rank_bands`` splits the pool's own tied
    rows (with 40 % of entropies at 0.0 the held-out easy band is not empty)."""
    entropy = test["entropy"].to_numpy(dtype=np.float64)
    bands = assign_bands(entropy, t_low, t_high)
    tied = np.flatnonzero((entropy == t_low) | (entropy == t_high))
    if not len(tied):
        return bands
    n = len(pool)
    n_low, n_high = (int(np.ceil(q * (n - 1))) if n else 0 for q in quantiles)
    pool_entropy = pool["entropy"].to_numpy(dtype=np.float64)
    pool_ids, ids = pool["id"].astype(str).to_numpy(), test["id"].astype(str).to_numpy()
    for value in {t_low, t_high}:
        rows = tied[entropy[tied] == value]
        # Position among the pool's (entropy, id) order: rows below the value, then tied ids before.
        same = np.sort(pool_ids[pool_entropy == value])
        position = int((pool_entropy < value).sum()) + np.searchsorted(same, ids[rows])
        bands[rows] = np.where(position < n_low, "easy", np.where(position < n_high, "medium", "hard"))
    return bands


def assign_bands(entropy: np.ndarray, t_low: float, t_high: float) -> np.ndarray:
    e = np.asarray(entropy, dtype=np.float64)
    return np.where(e < t_low, "easy", np.where(e < t_high, "medium", "hard"))


def _norm(text) -> str:
    return " ".join(str(text).lower().split())


def duplicate_groups(rows: pd.DataFrame) -> pd.Series:
    """A group label per row: rows whose normalised question and option set are identical share one
    (MMLU-Pro has 158 such groups, MMLU test 106); each label is the group's smallest id."""
    key = [
        _norm(q) + "\x1f" + "\x1f".join(sorted(_norm(o) for o in opts))
        for q, opts in zip(rows["question"], rows["options"], strict=True)
    ]
    ids = rows["id"].astype(str)
    return ids.groupby(pd.Series(key, index=rows.index)).transform("min")


def holdout_mask(ids: pd.Series, fraction: float, seed: int, groups: pd.Series | None = None) -> np.ndarray:
    """Seeded test selection that depends on the id set, not on row order. With ``groups`` (one label
    per row), whole groups are drawn, so duplicates never straddle train and test; groups are taken in
    seeded order until the test set holds ``round(fraction * rows)`` rows or more."""
    n_test = int(round(fraction * len(ids)))
    labels = (groups if groups is not None else ids).astype(str).to_numpy()
    # Sorted: the draw depends on the labels, not on row order.
    unique = np.unique(labels)
    order = unique[np.random.default_rng(seed).permutation(len(unique))]
    sizes = pd.Series(labels).value_counts()
    taken, chosen = 0, []
    for label in order:
        if taken >= n_test:
            break
        chosen.append(label)
        taken += int(sizes[label])
    return np.isin(labels, chosen)


def _per_category_bands(pool: pd.DataFrame, test: pd.DataFrame, cfg: SplitConfig) -> dict[str, list[float]]:
    """The same quantiles within each category's training rows (a subject the student finds hard
    overall still gets an easy band); held-out rows use their category's thresholds (the global ones
    for a category with no training rows). Sets ``band`` in place; returns the thresholds."""
    per_category = {}
    cats_pool, cats_test = pool["category"].fillna(""), test["category"].fillna("")
    for category, idx in pool.groupby(cats_pool).groups.items():
        part = pool.loc[idx]
        pool.loc[idx, "band"] = rank_bands(part["entropy"].to_numpy(), part["id"].to_numpy(), cfg.quantiles)
        low, high = quantile_thresholds(part["entropy"].to_numpy(), cfg.quantiles)
        per_category[str(category)] = [float(low), float(high)]
        in_category = cats_test == category
        test.loc[in_category, "band"] = held_out_bands(test.loc[in_category], part, cfg.quantiles, low, high)
    return per_category


def _balanced(test: pd.DataFrame, counts: dict[str, int], seed: int) -> pd.DataFrame:
    """The same number of held-out rows per band (seeded); refused when a band has none."""
    n = min(counts.values())
    if n == 0:
        empty = [band for band in BANDS if counts[band] == 0]
        raise RaycatError(
            f"split.test_balance: the held-out set has no {' / '.join(empty)} row(s) ({counts}), so a "
            "balanced test set would be empty; raise split.test_fraction or set split.test_balance=false"
        )
    return pd.concat([test[test["band"] == band].sample(n=n, random_state=seed) for band in BANDS]).sort_index()


def split_frame(rows: pd.DataFrame, cfg: SplitConfig) -> tuple[dict[str, pd.DataFrame], pd.DataFrame, dict]:
    """Returns ({band: rows}, test rows, thresholds info). Each row keeps its entropy and gets a band."""
    rows = rows.reset_index(drop=True)
    groups = duplicate_groups(rows)
    test_mask = holdout_mask(rows["id"], cfg.test_fraction, cfg.seed, groups)
    pool, test = rows[~test_mask].copy(), rows[test_mask].copy()
    if cfg.thresholds is not None:
        t_low, t_high, method = *cfg.thresholds, "absolute"
    else:
        t_low, t_high = quantile_thresholds(pool["entropy"].to_numpy(), cfg.quantiles)
        method = "quantiles"
    if method == "quantiles":
        pool["band"] = rank_bands(pool["entropy"].to_numpy(), pool["id"].to_numpy(), cfg.quantiles)
    else:
        pool["band"] = assign_bands(pool["entropy"].to_numpy(), t_low, t_high)
    ties = int(((pool["entropy"] == t_low) | (pool["entropy"] == t_high)).sum()) if method == "quantiles" else 0
    if method == "quantiles":
        test["band"] = held_out_bands(test, pool, cfg.quantiles, t_low, t_high)
    else:
        test["band"] = assign_bands(test["entropy"].to_numpy(), t_low, t_high)
    per_category = _per_category_bands(pool, test, cfg) if cfg.per_category and method == "quantiles" else None
    test_before = {b: int((test["band"] == b).sum()) for b in BANDS}
    if cfg.test_balance and len(test):
        test = _balanced(test, test_before, cfg.seed)
    bands = {b: pool[pool["band"] == b] for b in BANDS}
    before = {b: int(len(v)) for b, v in bands.items()}
    if cfg.balance_per_band is not None:
        bands = {
            b: v.sample(n=min(cfg.balance_per_band, len(v)), random_state=cfg.seed).sort_index()
            for b, v in bands.items()
        }
    info = {
        "method": method,
        "quantiles": list(cfg.quantiles) if method == "quantiles" else None,
        "thresholds": [t_low, t_high],
        "per_category_thresholds": per_category,
        "rule": "easy < t_low <= medium < t_high <= hard"
        + ("; training rows by rank of (entropy, id), so rows tied at a threshold are split by id" if ties else ""),
        "rows_at_a_threshold": ties,
        "pool_rows": int(len(pool)),
        "test_rows": int(len(test)),
        "counts_before_balancing": before,
        "counts": {b: int(len(v)) for b, v in bands.items()},
        "test_counts": {b: int((test["band"] == b).sum()) for b in BANDS},
        "test_counts_before_balancing": test_before,
        "test_balance": cfg.test_balance,
        "balance_per_band": cfg.balance_per_band,
        "test_fraction": cfg.test_fraction,
        "duplicate_groups": {
            "groups": int(groups.duplicated(keep=False).groupby(groups).any().sum()),
            "rows": int(groups.duplicated(keep=False).sum()),
            "rule": "identical normalised question + option set: the whole group goes to train or to test",
        },
        "seed": cfg.seed,
    }
    return bands, test, info


def split_files(cfg: RaycatConfig) -> dict:
    """Scores + questions → easy / medium / hard (+ test) Parquet files and thresholds.json (the
    pure work; ``run`` runs it as a Ray task, so the rows stay on a worker)."""
    run_dir = cfg.run_dir
    scores_path = rundir.join(run_dir, "score", "scores.parquet")
    if not rundir.exists(scores_path):
        raise MissingInputError(f"{scores_path} not found: run `raycat score` with this config first")
    questions_path = rundir.join(run_dir, "questions", "questions.parquet")
    if not rundir.exists(questions_path):
        raise MissingInputError(f"{questions_path} not found: rerun `raycat score` with this config")
    scores = rundir.read_parquet(scores_path)
    questions = rundir.read_parquet(questions_path)
    keep = ["id", "row_hash", "entropy", "predicted", "correct", "idk", "option_mass", "template_hash", "entropy_mode"]
    keep += [c for c in ("predicted_greedy", "correct_greedy") if c in scores]
    if "row_hash" not in scores or "row_hash" not in questions:
        raise MissingInputError(f"{scores_path} was written by an older raycat: rerun `raycat score`")
    # The same id and content: questions.parquet is rewritten by each score run, scores only when it finishes.
    scored = questions.merge(scores[keep], on=["id", "row_hash"], how="inner", validate="one_to_one")
    # Rows the score stage set aside, with the reason.
    skipped_path = rundir.join(run_dir, "score", "skipped.parquet")
    accounted = set(rowkey.keys(scores))
    if rundir.exists(skipped_path):
        accounted |= set(rowkey.keys(rundir.read_parquet_columns(skipped_path, ["id", "row_hash"])))
    stale = int((~rowkey.keys(questions).isin(accounted)).sum())
    if stale:
        raise MissingInputError(
            f"{stale} question(s) of {questions_path} have no score for their current content in "
            f"{scores_path} (an interrupted or older `raycat score`); rerun `raycat score`"
        )
    # "I don't know" answers (paper preset) have no usable entropy rank; set aside, never silently.
    idk = scored["idk"].astype(bool)
    missing = scored[~idk & scored["entropy"].isna()]
    # np.quantile would turn one NaN into NaN thresholds and every row into "hard".
    if len(missing):
        raise RaycatError(
            f"{len(missing)} scored row(s) have no entropy (e.g. {', '.join(map(str, missing['id'][:3]))}) in "
            f"{scores_path}; rerun `raycat score` (a scores.parquet edited by hand, or an older raycat)"
        )
    skipped = scored[idk].assign(skip_reason="student answered 'I don't know' (paper preset fallback)")
    bands, test, info = split_frame(scored[~idk], cfg.split)
    placed = set(test["id"]).union(*(set(v["id"]) for v in bands.values()))
    unsampled = scored[~idk & ~scored["id"].isin(placed)].assign(
        skip_reason="not drawn by split.balance_per_band or split.test_balance"
    )
    skipped = pd.concat([skipped, unsampled], ignore_index=True)
    split_dir = rundir.join(run_dir, "split")
    for band, rows in bands.items():
        rundir.write_parquet(rundir.join(split_dir, f"{band}.parquet"), rows)
    if len(test):
        rundir.write_parquet(rundir.join(split_dir, "test.parquet"), test)
    rundir.write_parquet(rundir.join(split_dir, "skipped.parquet"), skipped)
    info["skipped"] = {"idk": int(idk.sum()), "not_drawn_by_balancing": int(len(unsampled))}
    rundir.write_json(rundir.join(split_dir, "thresholds.json"), info)
    return info
