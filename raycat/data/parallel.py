"""The questions stage over a corpus of several files: one Ray task per file, so no process holds it.

The driver lists the files and holds per-file counts, the MedMCQA ``cop`` values and the table of ids
found more than once, never rows. The steps, each a set of tasks running ``raycat.data.corpus``' rules:

1. MedMCQA with data.medmcqa_cop_base unset: every file's set of ``cop`` values, for the convention.
2. ``_check``: a file read and every row checked; the rows stay in the object store, and the ids'
   places leave in hash partitions.
3. ``_duplicates``: one task per partition, the ids found more than once with their first copy.
4. ``_settle``: a file's later copies of an id and ambiguous golds quarantined, row hashes added; its
   kept rows and its quarantine records written to ``questions/parts/`` in the run dir.
5. ``_write``: one task streams those files in corpus order into questions.parquet (row groups of
   ``rundir.group_rows``, the selected positions only) and quarantine.jsonl, a row group at a time, and
   removes them. Rows never reach it through the object store: a task that read every file's rows from
   there would touch (and count in its resident set) object-store pages for the whole corpus.

A file is the unit of work: a corpus in one big file is read by one task (``questions.build``).
"""

from __future__ import annotations

import json
from collections import Counter
from contextlib import ExitStack

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from raycat.config import RaycatConfig
from raycat.data import questions
from raycat.data.adapters import check_rows, cop_values, read_file, selected
from raycat.data.corpus import (
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


def _spool(cfg: RaycatConfig) -> str:
    """Where the settled files wait for ``_write`` (the run dir: shared by every node)."""
    return rundir.join(cfg.run_dir, "questions", "parts")


def _spooled(cfg: RaycatConfig, shard: int) -> tuple[str, str]:
    """(kept rows, quarantine records) of file ``shard``."""
    base = rundir.join(_spool(cfg), f"{shard:06d}")
    return f"{base}.parquet", f"{base}.quarantine.jsonl"


def _settle(cfg: RaycatConfig, location: str, shard: int, checked, dups) -> dict:
    valid, bad = checked
    settled = resolve(valid, bad, dups, lambda: read_file(cfg.data, location))
    rows_path, bad_path = _spooled(cfg, shard)
    table = pa.Table.from_pandas(settled.good[SCHEMA.names], schema=SCHEMA, preserve_index=False)
    with rundir.atomic_output(rows_path) as stream:
        pq.write_table(table.replace_schema_metadata(None), stream, row_group_size=rundir.GROUP_ROWS)
    if settled.bad:
        rundir.write_text(bad_path, "".join(json.dumps(public(b)) + "\n" for b in settled.bad))
    return {
        "valid": len(settled.good),
        "first_bad": settled.bad[0] if settled.bad else None,
        "reasons": reason_counts(settled.bad),
        "repeated": (settled.repeated_ids, settled.repeated),
    }


def _write(cfg: RaycatConfig, counts: list[int], with_quarantine: bool) -> dict:
    """questions.parquet and quarantine.jsonl from the settled files, in order, a row group in memory."""
    data = cfg.data
    keep = selected(sum(counts), data.limit, data.sample, data.seed)
    block = rundir.group_rows(questions.block_rows(cfg))
    pending: list[pa.Table] = []
    n_selected = max_options = start = 0
    with ExitStack() as stack:
        stream = stack.enter_context(rundir.atomic_output(questions.path(cfg.run_dir)))
        writer = stack.enter_context(pq.ParquetWriter(stream, SCHEMA))
        quarantine_path = questions.quarantine_path(cfg.run_dir)
        quarantine = stack.enter_context(rundir.atomic_output(quarantine_path)) if with_quarantine else None
        for shard in range(len(counts)):
            rows_path, bad_path = _spooled(cfg, shard)
            if quarantine is not None and rundir.exists(bad_path):
                rundir.copy_into(bad_path, quarantine)
            with rundir.open_input_file(rows_path) as f:
                for batch in pq.ParquetFile(f).iter_batches(batch_size=rundir.GROUP_ROWS):
                    stop = start + batch.num_rows
                    rows = pa.Table.from_batches([batch]).take(keep[(keep >= start) & (keep < stop)] - start)
                    start = stop
                    n_selected += len(rows)
                    if len(rows):
                        max_options = max(max_options, pc.max(pc.list_value_length(rows["options"])).as_py())
                    pending.append(rows)
                    pending = flush_groups(writer, pending, block, final=False)
        flush_groups(writer, pending, block, final=True)
    rundir.remove_dir(_spool(cfg))
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
    rundir.remove_dir(_spool(cfg))  # an interrupted run's
    settles = [task(_settle).remote(cfg, f, i, c[0], dups) for i, (f, c) in enumerate(zip(files, checks, strict=True))]
    del checks  # each file's checked rows are freed once its settle task has them
    stats = _gather(settles)
    if data.on_bad_rows == "error":
        raise_first_bad([s["first_bad"] for s in stats])
    reasons = sum((s["reasons"] for s in stats), Counter())
    counts = [s["valid"] for s in stats]
    write = ray.remote(num_cpus=1)(_write)
    with_quarantine = bool(reasons) or rundir.exists(questions.quarantine_path(cfg.run_dir))
    written = _gather([write.remote(cfg, counts, with_quarantine)])[0]
    notes.update(repeated_note([s["repeated"] for s in stats]))
    n_valid, max_options = sum(counts), written["max_options"]
    return questions.write_summary(cfg, n_read, n_valid, written["selected"], reasons, max_options, notes)
