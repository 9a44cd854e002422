"""Questions stage: load a corpus through its adapter, validate, write questions/ in the run dir."""

from __future__ import annotations

import json

import pandas as pd

from raycat import rundir
from raycat.config import RaycatConfig
from raycat.data import load_questions, select_rows


def stage_questions(cfg: RaycatConfig) -> tuple[str, pd.DataFrame, dict]:
    """Returns (questions.parquet path, the questions, summary). Quarantined rows go to quarantine.jsonl."""
    d = cfg.data
    df, bad, n_read = load_questions(d)
    n_valid = len(df)
    df = select_rows(df, d.limit, d.sample, d.seed)
    out = rundir.join(cfg.run_dir, "questions")
    path = rundir.join(out, "questions.parquet")
    rundir.write_parquet(path, df)
    quarantine = rundir.join(out, "quarantine.jsonl")
    if bad or rundir.exists(quarantine):
        rundir.write_text(quarantine, "".join(json.dumps(b) + "\n" for b in bad))
    summary = {
        "source": d.source,
        "path": d.path,
        "rows_read": n_read,
        "valid": n_valid,
        "selected": int(len(df)),
        "quarantined": len(bad),
        "quarantine_reasons": pd.Series([b["field"] + ": " + b["reason"].split(" (")[0] for b in bad], dtype=str)
        .value_counts()
        .to_dict(),
    }
    rundir.write_json(rundir.join(out, "summary.json"), summary)
    return path, df, summary
