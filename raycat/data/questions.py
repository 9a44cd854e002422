"""Questions stage: load a corpus through its adapter, validate, write questions/ in the run dir.

``build`` is the pure work (read, validate, de-duplicate, select, write) in one process;
``stage_questions`` runs it as a Ray task for one file or a hub split, and a corpus of several files
through ``raycat.data.parallel``, one task per file. Either way only the summary comes back to the driver.
"""

from __future__ import annotations

import json
from collections import Counter

from raycat.config import RaycatConfig
from raycat.data import sources
from raycat.data.adapters import select_rows
from raycat.data.corpus import load_questions, reason_counts
from raycat.errors import RaycatError
from raycat.ray_env import remote_call
from raycat.storage import rowkey, rundir


def block_rows(cfg: RaycatConfig) -> int:
    """A few score engine batches: questions.parquet's row groups hold ``rundir.group_rows`` of it
    (the score pipeline cuts its own blocks of 4 batches, ``actor_pool.run``)."""
    return max(16, 4 * cfg.score.engine.batch_size)


def path(run_dir: str) -> str:
    return rundir.join(run_dir, "questions", "questions.parquet")


def quarantine_path(run_dir: str) -> str:
    return rundir.join(run_dir, "questions", "quarantine.jsonl")


def dataset(cfg: RaycatConfig):
    """questions.parquet as a Ray Dataset read on the workers (the score pipeline cuts its blocks)."""
    return rundir.parquet_dataset(path(cfg.run_dir))


def build(cfg: RaycatConfig) -> dict:
    """Write questions.parquet (and quarantine.jsonl); return the summary. Quarantined rows go to
    quarantine.jsonl with the reason."""
    data = cfg.data
    questions, bad, n_read = load_questions(data)
    notes = questions.attrs.get("notes", {})
    n_valid = len(questions)
    # The row hash: every cache downstream keys on it.
    questions = rowkey.add(select_rows(questions, data.limit, data.sample, data.seed))
    # Read back on the workers (``dataset``) in blocks cut from these groups.
    rundir.write_parquet(path(cfg.run_dir), questions, row_group_size=rundir.group_rows(block_rows(cfg)))
    quarantine = quarantine_path(cfg.run_dir)
    if bad or rundir.exists(quarantine):
        rundir.write_text(quarantine, "".join(json.dumps(b) + "\n" for b in bad))
    max_options = int(questions["options"].map(len).max()) if len(questions) else 0
    return write_summary(cfg, n_read, n_valid, len(questions), reason_counts(bad), max_options, notes)


def write_summary(
    cfg: RaycatConfig, n_read: int, n_valid: int, n_selected: int, reasons: Counter, max_options: int, notes: dict
) -> dict:
    """questions/summary.json: what was read, kept, quarantined (per reason) and noted."""
    summary = {
        "source": cfg.data.source,
        "path": cfg.data.path,
        **({"revision": cfg.data.revision} if cfg.data.revision else {}),
        "rows_read": n_read,
        "valid": n_valid,
        "selected": int(n_selected),
        "quarantined": sum(reasons.values()),
        "quarantine_reasons": dict(reasons.most_common()),
        "max_options": max_options,
        **notes,
    }
    rundir.write_json(rundir.join(cfg.run_dir, "questions", "summary.json"), summary)
    return summary


def stage_questions(cfg: RaycatConfig) -> dict:
    """``build`` as a Ray task (call inside a Ray session): the driver holds the summary, not the rows.
    A bad row (data.on_bad_rows=error) comes back as the same error, naming the row and field."""
    import ray

    # Workers do not share the driver's working directory: they get the run dir as an absolute path.
    cfg = cfg.model_copy(update={"run_dir": rundir.absolute(cfg.run_dir)})
    files = sources.resolve(cfg.data.path) if cfg.data.source != "synthetic" and cfg.data.path else None
    if files is not None and cfg.data.revision:
        raise RaycatError(
            f"data.revision={cfg.data.revision!r} pins a hub dataset, but data.path {cfg.data.path} names "
            "files here; remove data.revision (files are fingerprinted by name, size and mtime)"
        )
    if files is not None and len(files) > 1:
        from raycat.data import parallel

        return parallel.build(cfg, [rundir.absolute(f) for f in files])
    return remote_call(ray.remote(num_cpus=1)(build), cfg)
