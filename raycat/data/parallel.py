"""The questions stage over a corpus of several files: one Ray task per file, so no process holds it.

The driver lists the files and holds per-file counts, the MedMCQA ``cop`` values and the table of ids
found more than once, never rows. The steps, each a set of tasks running ``raycat.data.corpus``' rules:

1. MedMCQA with data.medmcqa_cop_base unset: every file's set of ``cop`` values, for the convention.
2. ``_check``: a file read and every row checked; the rows stay in the object store, and the ids'
   places leave in hash partitions.
3. ``_duplicates``: one task per partition, the ids found more than once with their first copy.
4. ``_settle``: a file's later copies of an id and ambiguous golds quarantined, row hashes added.
5. ``_write``: one task streams the files' rows in corpus order into questions.parquet (row groups of
   ``rundir.group_rows``, the selected positions only) and their bad rows into quarantine.jsonl, holding one
   file's rows at a time.

A file is the unit of work: a corpus in one big file is read by one task (``questions.build``).
"""

from __future__ import annotations

import json
from collections import Counter
from contextlib import ExitStack

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raycat.config import RaycatConfig
from raycat.data import questions
from raycat.data.adapters import check_rows, cop_values, read_file, selected
from raycat.data.corpus import (
    Resolved,
    decide_cop_base,
    duplicates,
    id_partitions,
    no_rows,
    public,
    raise_first_bad,
    reason_counts,
    repeated_note,
    resolve,
    shard_names,
)
from raycat.ray_env import get
from raycat.storage import rundir
from raycat.storage.merge import flush_groups

# Enough reducers that each holds a small share of the ids; few enough that a file's task returns
# few objects.
MAX_PARTITIONS = 16
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("question", pa.string()),
        ("options", pa.list_(pa.string())),
        ("gold", pa.string()),
        ("category", pa.string()),
        ("source", pa.string()),
        ("row_hash", pa.string()),
    ]
)


def _census(cfg: RaycatConfig, location: str) -> set[int]:
    return cop_values(read_file(cfg.data, location))


def _check(cfg: RaycatConfig, location: str, shard: int, name: str, partitions: int):
    records = read_file(cfg.data, location)
    valid, bad = check_rows(cfg.data, records, shard, name)
    return (valid, bad), len(records), *id_partitions(valid, partitions)


def _duplicates(*places):
    return duplicates(list(places))


def _settle(cfg: RaycatConfig, location: str, checked, dups) -> tuple[Resolved, dict]:
    valid, bad = checked
    settled = resolve(valid, bad, dups, lambda: read_file(cfg.data, location))
    stats = {
        "valid": len(settled.good),
        "first_bad": settled.bad[0] if settled.bad else None,
        "reasons": reason_counts(settled.bad),
        "repeated": (settled.repeated_ids, settled.repeated),
    }
    return settled, stats


def _write(cfg: RaycatConfig, settled: list, counts: list[int], with_quarantine: bool) -> dict:
    """questions.parquet and quarantine.jsonl from the settled files, in order, one file in memory."""
    import ray

    data = cfg.data
    keep = selected(sum(counts), data.limit, data.sample, data.seed)
    block = rundir.group_rows(questions.block_rows(cfg))
    starts = np.cumsum([0, *counts])
    pending: list[pa.Table] = []
    n_selected = max_options = 0
    with ExitStack() as stack:
        stream = stack.enter_context(rundir.atomic_output(questions.path(cfg.run_dir)))
        writer = stack.enter_context(pq.ParquetWriter(stream, SCHEMA))
        quarantine_path = questions.quarantine_path(cfg.run_dir)
        quarantine = stack.enter_context(rundir.atomic_output(quarantine_path)) if with_quarantine else None
        for ref, start, stop in zip(settled, starts[:-1], starts[1:], strict=True):
            part: Resolved = ray.get(ref)
            rows = part.good.iloc[keep[(keep >= start) & (keep < stop)] - start]
            if quarantine is not None and part.bad:
                quarantine.write("".join(json.dumps(public(b)) + "\n" for b in part.bad).encode())
            n_selected += len(rows)
            max_options = max(max_options, int(rows["options"].map(len).max()) if len(rows) else 0)
            pending.append(pa.Table.from_pandas(rows[SCHEMA.names], schema=SCHEMA, preserve_index=False))
            pending = flush_groups(writer, pending, block, final=False)
        flush_groups(writer, pending, block, final=True)
    return {"selected": n_selected, "max_options": int(max_options)}


def _gather(refs: list) -> list:
    """Results in corpus order; refs are waited on one by one, so a raycat error is the first file's,
    as reading them one by one would give."""
    return [get(ref) for ref in refs]


def build(cfg: RaycatConfig, files: list[str]) -> dict:
    """questions/ for a corpus of several files (absolute paths or URIs), on the workers; the summary."""
    import ray

    task = ray.remote(num_cpus=1, scheduling_strategy="SPREAD")
    data, notes = cfg.data, {}
    if data.source == "medmcqa":
        values = _gather([task(_census).remote(cfg, f) for f in files])
        data, notes = decide_cop_base(data, set().union(*values))
        cfg = cfg.model_copy(update={"data": data})
    n = min(MAX_PARTITIONS, len(files))
    checks = [
        task(_check).options(num_returns=2 + n).remote(cfg, f, i, name, n)
        for i, (f, name) in enumerate(zip(files, shard_names(files), strict=True))
    ]
    n_read = sum(_gather([c[1] for c in checks]))
    if not n_read:
        raise no_rows(data)
    dups = ray.put(pd.concat(_gather([task(_duplicates).remote(*(c[2 + k] for c in checks)) for k in range(n)])))
    settle = task(_settle).options(num_returns=2)
    settles = [settle.remote(cfg, f, c[0], dups) for f, c in zip(files, checks, strict=True)]
    del checks  # each file's checked rows are freed once its settle task has them
    stats = _gather([s[1] for s in settles])
    if data.on_bad_rows == "error":
        raise_first_bad([s["first_bad"] for s in stats])
    reasons = sum((s["reasons"] for s in stats), Counter())
    counts = [s["valid"] for s in stats]
    write = ray.remote(num_cpus=1)(_write)
    with_quarantine = bool(reasons) or rundir.exists(questions.quarantine_path(cfg.run_dir))
    written = _gather([write.remote(cfg, [s[0] for s in settles], counts, with_quarantine)])[0]
    notes.update(repeated_note([s["repeated"] for s in stats]))
    n_valid, max_options = sum(counts), written["max_options"]
    return questions.write_summary(cfg, n_read, n_valid, written["selected"], reasons, max_options, notes)
