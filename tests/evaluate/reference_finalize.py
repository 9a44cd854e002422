"""The eval stage's finalize before it streamed (82e0c98's raycat/evaluate/stage.py and core.py): the
test rows and every model's answers held whole. Kept as the oracle the streamed finalize is checked
against (tests/evaluate/test_finalize.py); eval.parquet is written under ``out_dir``."""

from __future__ import annotations

import numpy as np
import pandas as pd

from raycat.config import RaycatConfig
from raycat.data.prompts import TRAIN_PROMPT_VERSION
from raycat.evaluate.core import accuracy_table, paired_table
from raycat.evaluate.stage import PART_COLUMNS, SINGLE_TOKEN_BASE, EvalPlan, parts_dir, rows_path
from raycat.storage import rowkey, rundir


def read_parts(directory: str) -> pd.DataFrame:
    return rundir.read_parts(directory, PART_COLUMNS)


def excluded_rows(want: set[str], answers: dict[str, pd.DataFrame]) -> dict[str, str]:
    """Row key → why it is left out of every model's accuracy: the first model (in ``answers``' order)
    that could not be asked it (prompt too long for its generation budget) or has no answer recorded.
    ``want``: the keys of the rows under test; ``answers``: each model's answers, indexed by row key."""
    excluded: dict[str, str] = {}
    for name, answered in answers.items():
        for key, why in answered.loc[answered["skip_reason"].fillna("") != "", "skip_reason"].items():
            excluded.setdefault(key, f"{name}: {why}")
        for key in want - set(answered.index):
            excluded.setdefault(key, f"{name}: no answer recorded")
    return excluded


def read_answers(cfg: RaycatConfig, plans: list[EvalPlan], want: set[str]) -> dict[str, pd.DataFrame]:
    """Each model's answers to the rows under test (``want``: their keys), indexed by row key. Only this
    content's rows count: an id reused by another data.path is a new row."""
    answers = {}
    for plan in plans:
        parts = read_parts(parts_dir(cfg, plan))
        parts = parts.assign(_key=rowkey.keys(parts)).loc[lambda f: f["_key"].isin(want)].drop_duplicates("_key")
        answers[plan.name] = parts.set_index("_key")
    return answers


def single_token_metrics(cfg: RaycatConfig, rows: pd.DataFrame, common: list[str]) -> tuple[dict, np.ndarray]:
    """The base student in the single-token format it was scored in (its score-stage answer, no [[X]]
    format to learn) on the compared rows: (its metrics, its per-row correctness)."""
    evaluation = cfg.eval
    compared = rows.set_index("_key").loc[common]
    single = pd.DataFrame(
        {"correct": compared["correct"].astype(bool), "band": compared["band"], "category": compared["category"]}
    )
    single["extracted"] = compared["predicted"]
    metrics = {
        **accuracy_table(single, evaluation.bootstrap_resamples, evaluation.seed),
        "kind": "single-token (the score stage's answer: arg-max among the option tokens)",
        "path": cfg.score.student.path,
        "adapter": None,
        "cache_key": None,
        "skipped": 0,
        "mean_completion_tokens": 1.0,
    }
    return metrics, single["correct"].to_numpy()


def model_metrics(
    cfg: RaycatConfig, plan: EvalPlan, answers: pd.DataFrame, common: list[str]
) -> tuple[dict, np.ndarray]:
    """One model's answers on the compared rows: (its metrics, its per-row correctness)."""
    evaluation = cfg.eval
    scored = answers.loc[[key for key in common if key in answers.index]]
    metrics = {
        **accuracy_table(scored, evaluation.bootstrap_resamples, evaluation.seed),
        "kind": plan.kind,
        "path": plan.model_path,
        "adapter": plan.adapter,
        "cache_key": plan.cache_key,
        "skipped": int((answers["skip_reason"].fillna("") != "").sum()),
        "mean_completion_tokens": float(scored["completion_tokens"].mean()) if len(scored) else None,
    }
    return metrics, scored["correct"].astype(bool).to_numpy()


def finalize(cfg: RaycatConfig, plans: list[EvalPlan], out_dir: str) -> dict:
    """On a worker: every model's answers on eval/rows.parquet merged into eval.parquet; the metrics.

    Every model is compared on the same rows: a row that any model could not be asked (its prompt too
    long for that model's generation budget) is left out of every model's accuracy and counted. The
    base student is also reported in the single-token format it was scored in (its score-stage answer,
    no [[X]] format to learn), so the baseline is not 0 by construction."""
    evaluation = cfg.eval
    rows = rundir.read_parquet(rows_path(cfg.run_dir))
    rows["_key"] = rowkey.keys(rows)
    want = set(rows["_key"])
    answers = read_answers(cfg, plans, want)
    excluded = excluded_rows(want, answers)
    common = [key for key in rows["_key"] if key not in excluded]
    frames, metrics, correct = [], {}, {}
    if evaluation.include_base and "correct" in rows:
        metrics[SINGLE_TOKEN_BASE], correct[SINGLE_TOKEN_BASE] = single_token_metrics(cfg, rows, common)
    for plan in plans:
        answered = answers[plan.name]
        frames.append(answered.reset_index(drop=True).assign(compared=answered.index.isin(common)))
        metrics[plan.name], correct[plan.name] = model_metrics(cfg, plan, answered, common)
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=PART_COLUMNS)
    rundir.write_parquet(rundir.join(out_dir, "eval.parquet"), out)
    reasons = pd.Series(list(excluded.values()), dtype=str)
    return {
        "test_rows": int(len(rows)),
        "compared_rows": len(common),
        "excluded_rows": {
            "n": len(excluded),
            "rule": "a row any model could not be asked is left out of every model's accuracy (paired comparison)",
            "reasons": reasons.str.split(":").str[0].value_counts().to_dict() if len(reasons) else {},
        },
        "models": metrics,
        "paired": paired_table(correct, evaluation.bootstrap_resamples, evaluation.seed),
        "provenance": {
            "prompt_version": TRAIN_PROMPT_VERSION,
            "greedy": True,
            "seed": evaluation.seed,
            "bootstrap_resamples": evaluation.bootstrap_resamples,
            "bands": "the student's pre-training entropy bands (split thresholds)",
            "paired": "a − b on the same rows; paired percentile bootstrap 95% CI",
        },
    }
