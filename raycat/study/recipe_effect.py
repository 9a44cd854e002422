"""The method's effect inside a study: recipe against recipe, and whether the design could see one.

Every variant of a study trains every recipe of ``study.recipes`` on the same training pool and
evaluates them on the same held-out rows, so recipes are compared *within* a run: for each pair, each
seed's per-row differences (final model of recipe a minus final model of recipe b, on the rows both
answered), pooled over seeds, overall and per band, with two intervals:

- ``ci95`` (rows): the clustered bootstrap over test rows (a row's differences under every seed drawn
  together: the seeds share test rows). It says how sure the difference is *for these trained models*.
- ``ci95_seeds`` (seeds x rows): a two-level bootstrap that also redraws the training seeds, so the
  run-to-run spread of training enters: the interval for the recipes, not for three particular runs.
  With few seeds it is the honest one, and the power below is computed from it.

Beside them:

- the per-seed differences, so a reader sees how much training seeds move the result;
- ``mde80``: the smallest difference this design detects with 80 % power at the 5 % level, from the
  seeds x rows bootstrap's standard error (``(z_0.975 + z_0.8) x SE``, about 2.8 SE): a null result's power;
- teacher tokens per recipe, from the teach stage's per-band accounting (a recipe pays for the CoT of
  the bands its CoT phases read);
- the signal check the method rests on: ROC AUC of the student's entropy for right vs wrong on the
  held-out rows (bootstrap CI), and the base student's held-out accuracy (not at chance, not at ceiling).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from raycat.evaluate.core import clustered_paired_bootstrap
from raycat.evaluate.stage import SINGLE_TOKEN_BASE
from raycat.recipes import BANDS, RECIPES
from raycat.storage import rowkey, rundir

BASE = "base"  # the untrained student's name in eval.parquet (answering the training prompt)
# SINGLE_TOKEN_BASE: the untrained student's single-token answers from the score stage, on the same
# held-out rows (the eval report's row of that name): the base a small student is judged by when it
# cannot yet write the trained answer format.
# z_0.975 + z_0.8: a difference this many standard errors from 0 is found 80 % of the time at the 5 % level.
POWER_Z = 1.959964 + 0.841621


def pairs(recipes: list[str]) -> list[tuple[str, str]]:
    """The first recipe (the method under study) against every other recipe, then against the base student
    (its single-token answers, and its answers to the training prompt)."""
    first = recipes[0]
    return [(first, other) for other in recipes[1:]] + [(first, SINGLE_TOKEN_BASE), (first, BASE)]


def final_models(rows: pd.DataFrame) -> dict[str, str]:
    """Recipe -> the eval.parquet name of its final model (its last evaluated phase; a later phase may be
    empty and untrained), plus ``base``."""
    names = set(rows["model"])
    out = {b: b for b in (BASE, SINGLE_TOKEN_BASE) if b in names}
    for recipe in RECIPES:
        done = sorted(n for n in names if n.startswith(f"{recipe}/"))
        if done:
            out[recipe] = done[-1]
    return out


def compared_answers(run_dir: str) -> pd.DataFrame | None:
    """The variant's eval answers on the rows every one of its models answered; None before its eval."""
    path = rundir.join(run_dir, "eval", "eval.parquet")
    if not rundir.exists(path):
        return None
    rows = rundir.read_parquet(path)
    return rows[rows["compared"]] if "compared" in rows else rows


def _answers(run_dir: str) -> pd.DataFrame | None:
    """``compared_answers`` plus the score stage's single-token answers of the base student on the same
    rows (eval/rows.parquet) as ``SINGLE_TOKEN_BASE``."""
    rows = compared_answers(run_dir)
    if rows is None:
        return None
    scored = rundir.join(run_dir, "eval", "rows.parquet")
    if rundir.exists(scored):
        single = rundir.read_parquet_columns(scored, ["id", "row_hash", "band", "correct"])
        compared = rows[["id", "row_hash"]].drop_duplicates()
        single = single.merge(compared, on=["id", "row_hash"]).assign(model=SINGLE_TOKEN_BASE)
        rows = pd.concat([rows, single], ignore_index=True)
    return rows


def _differences(rows: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    cols = ["id", "row_hash", "band", "correct"]
    both = rows.loc[rows["model"] == a, cols].merge(
        rows.loc[rows["model"] == b, ["id", "row_hash", "correct"]], on=["id", "row_hash"], suffixes=("_a", "_b")
    )
    return pd.DataFrame(
        {
            "row": rowkey.keys(both).to_numpy(),
            "band": both["band"].to_numpy(),
            "difference": both["correct_a"].to_numpy(dtype=float) - both["correct_b"].to_numpy(dtype=float),
        }
    )


def seeds_rows_bootstrap(per_seed: list[pd.DataFrame], resamples: int, seed: int, level: float = 0.95) -> dict:
    """Two-level percentile bootstrap of the mean difference: each resample draws the seeds with
    replacement, then the test rows (by key) with replacement, and averages the drawn (seed, row)
    differences. ``per_seed``: one frame of ``row, difference`` per seed."""
    frames = [f for f in per_seed if len(f)]
    if not frames:
        return {"ci95_seeds": [None, None], "se_seeds": None}
    rows = np.unique(np.concatenate([f["row"].to_numpy().astype(str) for f in frames]))
    table = np.full((len(frames), len(rows)), np.nan)
    for s, frame in enumerate(frames):
        # A row answered twice under one seed (never, on compared rows) would count once: its mean.
        means = frame.groupby(frame["row"].astype(str))["difference"].mean()
        table[s, np.searchsorted(rows, means.index.to_numpy())] = means.to_numpy()
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for i in range(resamples):  # one draw at a time: bounded memory for large held-out sets
        drawn = table[rng.integers(0, len(frames), len(frames))][:, rng.integers(0, len(rows), len(rows))]
        means[i] = np.nanmean(drawn) if np.isfinite(drawn).any() else np.nan
    means = means[np.isfinite(means)]
    low, high = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"ci95_seeds": [float(low), float(high)], "se_seeds": float(means.std(ddof=1)) if len(means) > 1 else None}


def _interval(per_seed: list[pd.DataFrame], resamples: int, seed: int) -> dict:
    """Rows-only and seeds x rows intervals of the pooled mean difference, with the power of the latter."""
    pooled = pd.concat(per_seed, ignore_index=True)
    rows = clustered_paired_bootstrap(pooled["difference"], pooled["row"], resamples, seed)
    both = seeds_rows_bootstrap(per_seed, resamples, seed)
    se = both["se_seeds"]
    return {**rows, **both, "mde80": None if se is None else POWER_Z * se}


def recipe_paired(variants: list[dict], recipes: list[str], resamples: int = 2000, seed: int = 0) -> list[dict]:
    """Per variant label and recipe pair: the pooled paired difference with its CI, per band, per seed."""
    groups: dict[tuple[str, str, str], list[pd.DataFrame]] = {}
    seeds: dict[tuple[str, str, str], list[dict]] = {}
    for variant in variants:
        rows = _answers(variant["run_dir"])
        if rows is None:
            continue
        final = final_models(rows)
        for a, b in pairs(recipes):
            if a not in final or b not in final:
                continue
            diff = _differences(rows, final[a], final[b])
            key = (variant["label"], a, b)
            groups.setdefault(key, []).append(diff)
            mean = float(diff["difference"].mean()) if len(diff) else None
            seeds.setdefault(key, []).append({"seed": variant["seed"], "diff": mean, "n": int(len(diff))})
    out = []
    for (label, a, b), per_seed in groups.items():
        pooled = pd.concat(per_seed, ignore_index=True)
        per_band = {
            band: _interval([f[f["band"] == band] for f in per_seed], resamples, seed)
            for band in BANDS
            if (pooled["band"] == band).any()
        }
        out.append(
            {
                "variant": label,
                "a": a,
                "b": b,
                "seeds": len(per_seed),
                **_interval(per_seed, resamples, seed),
                "per_seed": seeds[(label, a, b)],
                "per_band": per_band,
            }
        )
    return out


def teacher_tokens(recipe: str, accounting: dict | None) -> dict:
    """The teacher tokens a recipe needs: the CoT of every band its CoT phases read (random_split's CoT
    phase reads |hard| rows drawn from all bands: estimated at all bands' mean per row)."""
    if not any(phase.target == "cot" for phase in RECIPES[recipe]):
        return {"tokens": 0, "basis": "measured: the recipe trains on no teacher CoT"}
    per_band = (accounting or {}).get("per_band")
    if not per_band:
        return {"tokens": None, "basis": "unknown: the run has no teach accounting"}
    bands = sorted({b for phase in RECIPES[recipe] if phase.target == "cot" for b in phase.bands}, key=BANDS.index)
    if recipe == "random_split":
        rows = sum(per_band[b]["rows"] for b in BANDS)
        mean = sum(per_band[b]["tokens"] for b in BANDS) / rows if rows else 0.0
        return {"tokens": mean * per_band["hard"]["rows"], "basis": "estimate: |hard| rows x all bands' mean per row"}
    measured = all(per_band[b]["basis"] == "measured" for b in bands)
    return {
        "tokens": sum(per_band[b]["tokens"] for b in bands),
        "bands": bands,
        "basis": "measured" if measured else "estimate: " + "; ".join(f"{b}: {per_band[b]['basis']}" for b in bands),
    }


def recipe_costs(variants: list[dict], recipes: list[str]) -> list[dict]:
    """Teacher tokens per recipe, per variant label (mean over its seeds; the teacher cache makes them equal
    unless a seed key changes the teacher's rows)."""
    out: dict[tuple[str, str], list[dict]] = {}
    for variant in variants:
        metrics = rundir.read_json_if_exists(rundir.join(variant["run_dir"], "teach", "metrics.json")) or {}
        for recipe in recipes:
            out.setdefault((variant["label"], recipe), []).append(teacher_tokens(recipe, metrics.get("accounting")))
    rows = []
    for (label, recipe), found in out.items():
        tokens = [f["tokens"] for f in found if f["tokens"] is not None]
        rows.append(
            {
                "variant": label,
                "recipe": recipe,
                "teacher_tokens": float(np.mean(tokens)) if tokens else None,
                "basis": sorted({f["basis"] for f in found}),
            }
        )
    return rows


def signal(run_dir: str, resamples: int = 2000, seed: int = 0) -> dict | None:
    """The student's entropy against its own correctness on the held-out rows (split/test.parquet), with
    a bootstrap CI, and the base student's held-out accuracy from eval; None before the split."""
    from raycat.score.metrics import roc_auc  # sklearn: kept out of the CLI's start-up

    path = rundir.join(run_dir, "split", "test.parquet")
    if not rundir.exists(path):
        return None
    test = rundir.read_parquet_columns(path, ["entropy", "correct"]).dropna()
    entropy, correct = test["entropy"].to_numpy(dtype=float), test["correct"].to_numpy(dtype=bool)
    rng = np.random.default_rng(seed)
    aucs = []
    for _ in range(resamples if len(test) else 0):  # one draw at a time: held-out sets can be large
        drawn = rng.integers(0, len(test), len(test))
        if (auc := roc_auc(correct[drawn], entropy[drawn])) is not None:
            aucs.append(auc)
    low, high = np.quantile(aucs, [0.025, 0.975]).tolist() if aucs else [None, None]
    rows = _answers(run_dir)
    base = rows[rows["model"] == SINGLE_TOKEN_BASE] if rows is not None else None
    return {
        "rows": int(len(test)),
        "auc": roc_auc(correct, entropy),
        "auc_ci95": [low, high],
        "score_accuracy": float(correct.mean()) if len(test) else None,
        "base_accuracy": float(base["correct"].astype(bool).mean()) if base is not None and len(base) else None,
        "basis": "held-out rows (split/test.parquet): the student's score-stage entropy and answer; base "
        "accuracy: its single-token answers on the rows the eval compared",
    }
