"""Diagnostics of a scoring run (pure pandas/numpy): accuracy, ROC AUC, histogram, mode deviation."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import spearmanr
from sklearn.metrics import roc_auc_score

MIN_CATEGORY_ROWS = 10


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


def score_metrics(scores: pd.DataFrame, bins: int = 20) -> dict:
    """The score stage's metrics.json body from the merged rows (scored and skipped)."""
    scored = scores[scores["status"] == "scored"]
    idk = scored["idk"].astype(bool)
    # The paper drops "I don't know" answers before AUC and the split; we count them instead of hiding them.
    valid = scored[~idk]
    correct = valid["correct"].astype(bool).to_numpy()
    entropy = valid["entropy"].astype(float).to_numpy()
    skip_reasons = scores.loc[scores["status"] == "skipped", "skip_reason"].value_counts()
    metrics: dict = {
        "rows": int(len(scores)),
        "scored": int(len(scored)),
        "idk": int(idk.sum()),
        "skipped": {str(k): int(v) for k, v in skip_reasons.items()},
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
        named = scored["predicted_greedy"].fillna("").astype(str).ne("") & scored["predicted_greedy"].ne("IDK")
        answered = scored[named]
        correct_greedy = answered["correct_greedy"].astype(bool).to_numpy()
        metrics["greedy"] = {
            "rows": int(len(answered)),
            "invalid": int((scored["predicted_greedy"].fillna("").astype(str) == "").sum()),
            "idk": int((scored["predicted_greedy"] == "IDK").sum()),
            "agree_with_options_argmax": _f((scored["predicted_greedy"] == scored["predicted"]).mean())
            if len(scored)
            else None,
        }
        metrics["accuracy_greedy"] = _f(correct_greedy.mean()) if len(answered) else None
        metrics["roc_auc_greedy"] = (
            roc_auc(correct_greedy, answered["entropy"].astype(float).to_numpy()) if len(answered) else None
        )
    categories = {}
    for category, part in valid.groupby("category"):
        if len(part) >= MIN_CATEGORY_ROWS:
            auc = roc_auc(part["correct"].astype(bool).to_numpy(), part["entropy"].astype(float).to_numpy())
            accuracy = float(part["correct"].astype(bool).mean())
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
    mass = valid["option_mass"].dropna().astype(float)
    if len(mass):
        metrics["option_mass"] = {"mean": float(mass.mean()), "median": float(mass.median()), "min": float(mass.min())}
    sample = scored[scored["entropy_full"].notna()]
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
