"""Questions stage: load a corpus through its adapter, validate, write questions/ in the run dir.

``build`` is the pure work (read, validate, de-duplicate, select, write); ``stage_questions`` runs it as
a Ray task, so the corpus is read on a worker and only the summary comes back to the driver.
"""

from __future__ import annotations

import json

import pandas as pd

from raycat.config import RaycatConfig
from raycat.data.adapters import load_questions, select_rows
from raycat.ray_env import remote_call
from raycat.storage import rowkey, rundir


def block_rows(cfg: RaycatConfig) -> int:
    """Rows per Parquet row group of questions.parquet, which is also a block of the score pipeline: a
    few engine batches, so parts (the resume state) and progress arrive every few batches."""
    return max(16, 4 * cfg.score.engine.batch_size)


def path(run_dir: str) -> str:
    return rundir.join(run_dir, "questions", "questions.parquet")


def dataset(run_dir: str):
    """questions.parquet as a Ray Dataset read on the workers, one block per row group."""
    return rundir.parquet_dataset(path(run_dir))


def build(cfg: RaycatConfig) -> dict:
    """Write questions.parquet (and quarantine.jsonl); return the summary. Quarantined rows go to
    quarantine.jsonl with the reason."""
    data = cfg.data
    questions, bad, n_read = load_questions(data)
    notes = questions.attrs.get("notes", {})
    n_valid = len(questions)
    # The row hash: every cache downstream keys on it.
    questions = rowkey.add(select_rows(questions, data.limit, data.sample, data.seed))
    out = rundir.join(cfg.run_dir, "questions")
    # Each row group is one read task and one block of the score pipeline, on the workers.
    rundir.write_parquet(path(cfg.run_dir), questions, row_group_size=block_rows(cfg))
    quarantine = rundir.join(out, "quarantine.jsonl")
    if bad or rundir.exists(quarantine):
        rundir.write_text(quarantine, "".join(json.dumps(b) + "\n" for b in bad))
    summary = {
        "source": data.source,
        "path": data.path,
        "rows_read": n_read,
        "valid": n_valid,
        "selected": int(len(questions)),
        "quarantined": len(bad),
        "quarantine_reasons": pd.Series([b["field"] + ": " + b["reason"].split(" (")[0] for b in bad], dtype=str)
        .value_counts()
        .to_dict(),
        "max_options": int(questions["options"].map(len).max()) if len(questions) else 0,
        **notes,
    }
    rundir.write_json(rundir.join(out, "summary.json"), summary)
    return summary


def stage_questions(cfg: RaycatConfig) -> dict:
    """``build`` as a Ray task (call inside a Ray session): the driver holds the summary, not the rows.
    A bad row (data.on_bad_rows=error) comes back as the same error, naming the row and field."""
    import ray

    # Workers do not share the driver's working directory: they get the run dir as an absolute path.
    cfg = cfg.model_copy(update={"run_dir": rundir.absolute(cfg.run_dir)})
    return remote_call(ray.remote(num_cpus=1)(build), cfg)
