"""The teach stage's finalize before it streamed (a6eb314's raycat/teach/stage.py and core.py): the
whole taught rows and every part held in memory. Kept as the oracle the streamed finalize is checked
against (tests/teach/test_finalize.py); the frames are returned, and written where the old code wrote."""

from __future__ import annotations

import numpy as np
import pandas as pd

from raycat.config import RaycatConfig
from raycat.data.prompts import TEACH_PROMPT_VERSION
from raycat.errors import RaycatError
from raycat.storage import rowkey, rundir
from raycat.teach.core import BANDS, _saving, resolve
from raycat.teach.stage import PART_COLUMNS, TeachPlan, parts_dir, rows_path, taught_bands


def read_parts(directory: str) -> pd.DataFrame:
    return rundir.read_parts(directory, PART_COLUMNS)


def accounting(rows: pd.DataFrame, prices: dict[str, tuple[float, float, str] | None]) -> dict:
    """Token, time and cost totals of ``rows`` (every teacher's result for the rows taught)."""
    per_teacher = {}
    for name, answers in rows.groupby("teacher"):
        totals = {
            "rows": int(len(answers)),
            "attempts": int(answers["attempts"].sum()),
            "prompt_tokens": int(answers["prompt_tokens"].sum()),
            "completion_tokens": int(answers["completion_tokens"].sum()),
            "engine_seconds": float(answers["engine_seconds"].sum()),
            "gpu_seconds": float(answers["gpu_seconds"].sum()),
        }
        price = prices.get(name)
        if price:
            totals["cost"] = (totals["prompt_tokens"] * price[0] + totals["completion_tokens"] * price[1]) / 1e6
            totals["currency"] = price[2]
        per_teacher[str(name)] = totals
    prompt_tokens, completion_tokens = int(rows["prompt_tokens"].sum()), int(rows["completion_tokens"].sum())
    out = {
        "per_teacher": per_teacher,
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "rows_taught": int(rows["_key"].nunique()) if "_key" in rows else int(len(rows)),
    }
    costs = [d["cost"] for d in per_teacher.values() if "cost" in d]
    if costs:
        out["cost"] = float(sum(costs))
    return out


def band_accounting(pool: pd.DataFrame, spent: pd.DataFrame, taught: list[str]) -> dict:
    """Teacher tokens per band of the training pool, and the saving of teaching only ``taught``.

    ``pool``: ``_key, band`` of every training row; ``spent``: every teacher result found for pool rows
    (``_key``, prompt and completion tokens over all attempts), from this run or any earlier one sharing
    the cache. A band's tokens are measured for the rows the teacher has answered; the rest are
    estimated from that band's measured mean per row (or, for a band never taught, from the mean of the
    measured rows of all bands) and labelled so. The saving compares the taught bands' tokens with all
    bands' tokens and says whether both are measured."""
    tokens = (spent["prompt_tokens"] + spent["completion_tokens"]).groupby(spent["_key"]).sum()
    measured_all = tokens[tokens.index.isin(set(pool["_key"]))]
    overall_mean = float(measured_all.mean()) if len(measured_all) else None
    per_band, bases = {}, []
    for band in BANDS:
        keys = pool.loc[pool["band"] == band, "_key"]
        got = tokens.reindex(keys).dropna()
        entry = {"rows": int(len(keys)), "taught": band in taught, "measured_rows": int(len(got))}
        entry["measured_tokens"] = int(got.sum())
        missing = len(keys) - len(got)
        mean, source = (
            (float(got.mean()), "this band's measured mean per row")
            if len(got)
            else (overall_mean, "the measured mean per row of all bands")
        )
        entry["estimated_rows"] = int(missing)
        entry["estimated_tokens"] = float(missing * mean) if missing and mean is not None else 0.0
        if missing and mean is None:
            entry["basis"] = "unknown: no row of any band was measured"
        elif missing:
            entry["basis"] = f"measured for {len(got)} rows, estimated for {missing} from {source}"
        else:
            entry["basis"] = "measured"
        entry["tokens"] = entry["measured_tokens"] + entry["estimated_tokens"]
        per_band[band] = entry
        bases.append(entry["basis"])
    exact = all(b == "measured" for b in bases)
    out = {"per_band": per_band, "saving": _saving(per_band, taught, exact)}
    if list(taught) != ["hard"]:
        # Every band taught (distill_all / random_split in the run): the saving above is 0 by
        # construction; the method's own saving, teaching the hard band only, is measured here.
        out["hard_only_saving"] = _saving(per_band, ["hard"], exact)
    return out


def pool_keys(cfg: RaycatConfig) -> pd.DataFrame:
    """``_key, band`` of every training-pool row (the split's easy / medium / hard files)."""
    frames = []
    for band in ("easy", "medium", "hard"):
        path = rundir.join(cfg.run_dir, "split", f"{band}.parquet")
        if rundir.exists(path):
            keys = rundir.read_parquet_columns(path, ["id", "row_hash"])
            frames.append(pd.DataFrame({"_key": rowkey.keys(keys), "band": band}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["_key", "band"])


def _cascade(rows: pd.DataFrame, results: list[pd.DataFrame]) -> pd.DataFrame:
    """Each row's result across the teachers, in cascade order: the first verified one, otherwise the
    last teacher that answered (a wrong CoT is kept over a later teacher's failed request: under
    teach.on_wrong=keep it is a target), otherwise the last failure, otherwise the last skip (a prompt
    too long for that teacher). ``results``: one frame per teacher, with ``_key`` (rowkey.keys)."""
    n = len(results)
    tiers = {"verified": 0, "failed": 2, "skipped": 3}

    def rank(r: pd.DataFrame, i: int) -> pd.Series:
        tier = r["status"].map(tiers).fillna(1).astype(int).to_numpy()
        # Verified rows by teacher order; the others by reverse teacher order.
        return pd.Series(tier * 10_000 + np.where(tier == 0, i, n - i), index=r.index)

    both = pd.concat([r.assign(_rank=rank(r, i)) for i, r in enumerate(results)], ignore_index=True)
    best = both.sort_values("_rank", kind="stable").drop_duplicates("_key").set_index("_key")
    missing = rows["_key"][~rows["_key"].isin(best.index)]
    if len(missing):
        raise RaycatError(
            f"{len(missing)} row(s) have no teacher result (e.g. {missing.iloc[0].split(rowkey.SEP)[0]}); "
            "rerun `raycat teach` to finish them"
        )
    return best.loc[rows["_key"]].drop(columns=["_rank"]).reset_index(drop=True)


def finalize(cfg: RaycatConfig, plans: list[TeachPlan], teach_dir: str) -> dict:
    """On a worker: pick each row's result across the cascade, apply teach.on_wrong, write cot/skipped
    Parquet; returns the metrics (``run`` writes them)."""
    teach = cfg.teach
    rows = rundir.read_parquet(rows_path(cfg.run_dir))
    rows["_key"] = rowkey.keys(rows)
    want = set(rows["_key"])
    pool = pool_keys(cfg)
    in_pool = set(pool["_key"])
    results, spent_pool = [], []
    # Each cache is read once; only this content's rows count (a reused id is a new row).
    for plan in plans:
        answers = read_parts(parts_dir(cfg, plan))
        # A row retried after a failed request has a newer part: its answer wins over the failure.
        answers = answers.assign(_key=rowkey.keys(answers), _failed=answers["status"].eq("failed"))
        answers = answers.sort_values("_failed", kind="stable").drop(columns=["_failed"])
        results.append(answers.loc[answers["_key"].isin(want)].drop_duplicates("_key"))
        # Every band, from this run or an earlier one sharing the cache: the per-band accounting.
        spent_pool.append(answers.loc[answers["_key"].isin(in_pool)].drop_duplicates("_key"))
    chosen = _cascade(rows, results).drop(columns=["id", "row_hash"])
    resolved = [
        resolve(status, response, gold, teach.on_wrong)
        for status, response, gold in zip(chosen["status"], chosen["response"], rows["gold"], strict=True)
    ]
    out = pd.concat([rows.drop(columns=["_key"]), chosen], axis=1)
    out["final_status"] = [final for final, _, _ in resolved]
    out["target"] = [target for _, target, _ in resolved]
    whys = zip([why for _, _, why in resolved], chosen["reason"], strict=True)
    out["reason"] = ["; ".join(x for x in pair if x) for pair in whys]
    out["teach_prompt_version"] = TEACH_PROMPT_VERSION
    out["teacher_template_hash"] = out["teacher"].map({plan.name: plan.template_hash for plan in plans})
    rundir.write_parquet(rundir.join(teach_dir, "cot.parquet"), out[out["target"].notna()])
    rundir.write_parquet(rundir.join(teach_dir, "skipped.parquet"), out[out["target"].isna()])
    # Accounting counts every attempt of every teacher that worked on these rows.
    spent = pd.concat(results, ignore_index=True)
    prices = {
        t.model.path: (t.price.prompt_per_mtok, t.price.completion_per_mtok, t.price.currency) if t.price else None
        for t in teach.teachers
    }
    metrics = {
        "rows": int(len(out)),
        "bands": teach.bands,
        "status": {s: int(n) for s, n in out["final_status"].value_counts().items()},
        "attempt_status": {s: int(n) for s, n in out["status"].value_counts().items()},
        "accounting": {
            **accounting(spent, prices),
            "pool_rows": int(len(pool)),
            **band_accounting(pool, pd.concat(spent_pool, ignore_index=True), taught_bands(cfg)),
        },
        "provenance": {
            "prompt_version": TEACH_PROMPT_VERSION,
            "on_wrong": teach.on_wrong,
            "teachers": [
                {"model": p.name, "revision": p.revision, "cache_key": p.cache_key, "template_hash": p.template_hash}
                for p in plans
            ],
        },
    }
    failed = metrics["status"].get("failed", 0)
    metrics["failure_ratio"] = failed / len(out) if len(out) else 0.0
    return metrics
