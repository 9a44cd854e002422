"""Diagnostics of a scoring run (pure pandas/numpy): accuracy, ROC AUC, histogram, mode deviation."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from raycat.entropy import roc_auc

MIN_CATEGORY_ROWS = 10


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
