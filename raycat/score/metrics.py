"""Diagnostics of a scoring run (pure pandas/numpy): accuracy, ROC AUC, histogram, mode deviation."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

MIN_CATEGORY_ROWS = 10
# The score part columns scored_summary reads (an empty merge still reports the greedy section).
SUMMARY_INPUTS = [
    "status",
    "idk",
    "correct",
    "entropy",
    "option_mass",
    "category",
    "predicted",
    "predicted_greedy",
    "correct_greedy",
]
DEVIATION_COLUMNS = ["entropy_full", "entropy_options", "entropy_topk", "entropy_topk_bound"]


def roc_auc(correct: np.ndarray, entropy: np.ndarray) -> float | None:
    """AUC of -entropy for predicting a correct answer (the paper's convention); None if one class."""
    y = np.asarray(correct, dtype=bool)
    if y.all() or not y.any():
        return None
    return float(roc_auc_score(y, -np.asarray(entropy, dtype=np.float64)))


def _f(x) -> float | None:
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else float(x)


def _deviation(approx: pd.Series, full: pd.Series) -> dict:
    diff = (approx - full).abs()
    rho = spearmanr(approx, full).statistic if len(full) > 2 else None
    return {"n": int(len(full)), "mean_abs_nats": _f(diff.mean()), "max_abs_nats": _f(diff.max()), "spearman": _f(rho)}


def scored_summary(scores: pd.DataFrame) -> pd.DataFrame:
    """What the metrics need of each scored row, in ~25 bytes (bools, two floats, a category code), so
    a merge that streams a corpus keeps only this per row."""
    scored = scores[scores["status"] == "scored"]
    out = pd.DataFrame(
        {
            "idk": scored["idk"].astype(bool).to_numpy(),
            "correct": scored["correct"].astype(bool).to_numpy(),
            "entropy": scored["entropy"].astype(float).to_numpy(),
            "option_mass": scored["option_mass"].astype(float).to_numpy(),
            "category": pd.Categorical(scored["category"].to_numpy()),
        }
    )
    if "correct_greedy" in scored:
        greedy = scored["predicted_greedy"]
        named = greedy.fillna("").astype(str)
        out["named"] = (named.ne("") & greedy.ne("IDK")).to_numpy()
        out["invalid"] = (named == "").to_numpy()
        out["greedy_idk"] = (greedy == "IDK").to_numpy()
        out["agree"] = (greedy == scored["predicted"]).to_numpy()
        out["correct_greedy"] = scored["correct_greedy"].astype(bool).to_numpy()
    return out


def concat_summaries(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Chunks' ``scored_summary`` frames as one, the category codes merged (no string per row)."""
    frames = [f for f in frames if len(f)]
    if not frames:
        return scored_summary(pd.DataFrame(columns=SUMMARY_INPUTS))
    # One category dtype for all chunks, so concat keeps the codes (sorted: groupby's order).
    names = sorted({c for f in frames for c in f["category"].cat.categories}, key=str)
    return pd.concat([f.assign(category=f["category"].cat.set_categories(names)) for f in frames], ignore_index=True)


def deviation_rows(scores: pd.DataFrame) -> pd.DataFrame:
    """The scored rows also scored in full mode (the deviation sample: a few hundred)."""
    scored = scores[scores["status"] == "scored"]
    columns = [c for c in DEVIATION_COLUMNS if c in scored]
    return scored.loc[scored["entropy_full"].notna(), columns]


def score_metrics(scores: pd.DataFrame, bins: int = 20) -> dict:
    """The score stage's metrics.json body from the merged rows (scored and skipped)."""
    reasons = scores.loc[scores["status"] == "skipped", "skip_reason"].value_counts()
    skipped = {str(k): int(v) for k, v in reasons.items()}
    return summary_metrics(scored_summary(scores), len(scores), skipped, deviation_rows(scores), bins)


def summary_metrics(scored: pd.DataFrame, rows: int, skipped: dict, sample: pd.DataFrame, bins: int = 20) -> dict:
    """``score_metrics`` from ``scored_summary`` rows (of every scored row), the row count, the skipped
    rows counted by reason and the ``deviation_rows``."""
    idk = scored["idk"].to_numpy()
    # The paper drops "I don't know" answers before AUC and the split; we count them instead of hiding them.
    valid = scored[~idk]
    correct = valid["correct"].to_numpy()
    entropy = valid["entropy"].to_numpy()
    metrics: dict = {
        "rows": int(rows),
        "scored": int(len(scored)),
        "idk": int(idk.sum()),
        "skipped": skipped,
        "accuracy": _f(correct.mean()) if len(valid) else None,
        "roc_auc": roc_auc(correct, entropy) if len(valid) else None,
        "roc_auc_convention": "positive = correct answer, score = -entropy",
    }
    metrics["gini"] = abs(2 * metrics["roc_auc"] - 1) if metrics["roc_auc"] is not None else None
    metrics["correctness"] = {
        "correct": "arg-max among the option tokens (always an option); accuracy, roc_auc, split and report use it",
        "correct_greedy": "the decoded token, as the paper: a non-option answer is invalid; accuracy_greedy and "
        "roc_auc_greedy drop invalid and 'I don't know' rows, as the paper does before its ROC AUC (~0.73)",
    }
    if "correct_greedy" in scored:
        answered = scored[scored["named"]]
        correct_greedy = answered["correct_greedy"].to_numpy()
        metrics["greedy"] = {
            "rows": int(len(answered)),
            "invalid": int(scored["invalid"].sum()),
            "idk": int(scored["greedy_idk"].sum()),
            "agree_with_options_argmax": _f(scored["agree"].mean()) if len(scored) else None,
        }
        metrics["accuracy_greedy"] = _f(correct_greedy.mean()) if len(answered) else None
        metrics["roc_auc_greedy"] = roc_auc(correct_greedy, answered["entropy"].to_numpy()) if len(answered) else None
    categories = {}
    for category, part in valid.groupby("category", observed=True):
        if len(part) >= MIN_CATEGORY_ROWS:
            auc = roc_auc(part["correct"].to_numpy(), part["entropy"].to_numpy())
            accuracy = float(part["correct"].mean())
            categories[str(category)] = {"n": int(len(part)), "accuracy": accuracy, "roc_auc": auc}
    metrics["per_category"] = categories
    if len(entropy):
        counts, edges = np.histogram(entropy, bins=bins)
        metrics["entropy"] = {
            "mean": float(entropy.mean()),
            "min": float(entropy.min()),
            "max": float(entropy.max()),
            "histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
        }
    mass = valid["option_mass"].dropna()
    if len(mass):
        metrics["option_mass"] = {"mean": float(mass.mean()), "median": float(mass.median()), "min": float(mass.min())}
    deviation = {}
    if len(sample):
        full = sample["entropy_full"].astype(float)
        if sample["entropy_options"].notna().all():
            deviation["options_vs_full"] = _deviation(sample["entropy_options"].astype(float), full)
        topk = sample["entropy_topk"].astype(float)
        deviation["topk_vs_full"] = _deviation(topk, full)
        bound = sample["entropy_topk_bound"].astype(float)
        deviation["topk_vs_full"]["max_bound_nats"] = _f(bound.max())
        # 1e-5: engines return float32 logprobs, so entropies carry ~1e-6 nats of rounding noise.
        deviation["topk_vs_full"]["within_bound"] = bool(((topk - full).abs() <= bound + 1e-5).all())
    metrics["deviation_from_full"] = deviation
    return metrics
