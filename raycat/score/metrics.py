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


def score_metrics(df: pd.DataFrame, bins: int = 20) -> dict:
    scored = df[df["status"] == "scored"]
    idk = scored["idk"].astype(bool)
    # The paper drops "I don't know" answers before AUC and the split; we count them instead of hiding them.
    valid = scored[~idk]
    correct = valid["correct"].astype(bool).to_numpy()
    ent = valid["entropy"].astype(float).to_numpy()
    m: dict = {
        "rows": int(len(df)),
        "scored": int(len(scored)),
        "idk": int(idk.sum()),
        "skipped": {str(k): int(v) for k, v in df.loc[df["status"] == "skipped", "skip_reason"].value_counts().items()},
        "accuracy": _f(correct.mean()) if len(valid) else None,
        "roc_auc": roc_auc(correct, ent) if len(valid) else None,
        "roc_auc_convention": "positive = correct answer, score = -entropy",
    }
    m["gini"] = abs(2 * m["roc_auc"] - 1) if m["roc_auc"] is not None else None
    m["correctness"] = {
        "correct": "arg-max among the option tokens (always an option); accuracy, roc_auc, split and report use it",
        "correct_greedy": "the decoded token, as the paper: a non-option answer is invalid; accuracy_greedy and "
        "roc_auc_greedy drop invalid and 'I don't know' rows, as the paper does before its ROC AUC (~0.73)",
    }
    if "correct_greedy" in scored:
        g = scored[scored["predicted_greedy"].fillna("").astype(str).ne("") & scored["predicted_greedy"].ne("IDK")]
        yg = g["correct_greedy"].astype(bool).to_numpy()
        m["greedy"] = {
            "rows": int(len(g)),
            "invalid": int((scored["predicted_greedy"].fillna("").astype(str) == "").sum()),
            "idk": int((scored["predicted_greedy"] == "IDK").sum()),
            "agree_with_options_argmax": _f((scored["predicted_greedy"] == scored["predicted"]).mean())
            if len(scored)
            else None,
        }
        m["accuracy_greedy"] = _f(yg.mean()) if len(g) else None
        m["roc_auc_greedy"] = roc_auc(yg, g["entropy"].astype(float).to_numpy()) if len(g) else None
    cats = {}
    for cat, g in valid.groupby("category"):
        if len(g) >= MIN_CATEGORY_ROWS:
            auc = roc_auc(g["correct"].astype(bool).to_numpy(), g["entropy"].astype(float).to_numpy())
            cats[str(cat)] = {"n": int(len(g)), "accuracy": float(g["correct"].astype(bool).mean()), "roc_auc": auc}
    m["per_category"] = cats
    if len(ent):
        counts, edges = np.histogram(ent, bins=bins)
        m["entropy"] = {
            "mean": float(ent.mean()),
            "min": float(ent.min()),
            "max": float(ent.max()),
            "histogram": {"counts": counts.tolist(), "edges": edges.tolist()},
        }
    mass = valid["option_mass"].dropna().astype(float)
    if len(mass):
        m["option_mass"] = {"mean": float(mass.mean()), "median": float(mass.median()), "min": float(mass.min())}
    sample = scored[scored["entropy_full"].notna()]
    dev = {}
    if len(sample):
        full = sample["entropy_full"].astype(float)
        if sample["entropy_options"].notna().all():
            dev["options_vs_full"] = _deviation(sample["entropy_options"].astype(float), full)
        topk = sample["entropy_topk"].astype(float)
        dev["topk_vs_full"] = _deviation(topk, full)
        bound = sample["entropy_topk_bound"].astype(float)
        dev["topk_vs_full"]["max_bound_nats"] = _f(bound.max())
        # 1e-5: engines return float32 logprobs, so entropies carry ~1e-6 nats of rounding noise.
        dev["topk_vs_full"]["within_bound"] = bool(((topk - full).abs() <= bound + 1e-5).all())
    m["deviation_from_full"] = dev
    return m
