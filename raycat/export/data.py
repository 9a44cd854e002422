"""A run dir's training conversations and verified CoT, streamed into the export formats.

Per recipe and phase, the rows training reads (``train.examples.phase_rows``: its bands, random_split's
draw, a CoT phase's teacher target joined by id and content), in training's order before its shuffle;
and teach/cot.parquet's rows (the verified CoT, or the teach.on_wrong fallback, with the teacher and
its tokens). Each batch is written as it is read to ``<recipe>/<phase>/{messages,sharegpt,alpaca}.jsonl``
and ``<recipe>/<phase>/rows.parquet`` (id, band, gold, category, messages; what the Hugging Face dataset
is built from), so memory is a batch whatever the corpus. Rows training cannot use are not exported
and are counted by reason (a CoT phase's rows without a teacher target). Rows training skipped as
longer than its ``max_length`` are exported: the text has no token limit (train/<recipe>/skipped.parquet
lists them).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from raycat.config import RaycatConfig
from raycat.export.formats import FORMATS, conversation, record
from raycat.recipes import NO_COT, RECIPES, Phase, phase_sources
from raycat.storage import rundir
from raycat.train import examples
from raycat.train.stage import input_paths

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
ROWS = pa.schema(
    [
        ("id", pa.string()),
        ("band", pa.string()),
        ("category", pa.string()),
        ("gold", pa.string()),
        ("messages", pa.list_(MESSAGE)),
    ]
)
# teach/cot.parquet's columns the export keeps beside the conversation, where the file has them.
TAUGHT = ("id", "band", "category", "gold", "teacher", "final_status", "prompt_tokens", "completion_tokens", "target")


class Files:
    """One export unit's files (every format's JSON Lines and rows.parquet), appended a batch at a time."""

    def __init__(self, directory: Path, schema: pa.Schema):
        directory.mkdir(parents=True, exist_ok=True)
        self.directory, self.rows = directory, 0
        self.jsonl = {form: (directory / f"{form}.jsonl").open("w", encoding="utf-8") for form in FORMATS}
        self.parquet = pq.ParquetWriter(directory / "rows.parquet", schema)

    def write(self, table: pa.Table) -> None:
        for form, out in self.jsonl.items():
            out.write(
                "".join(json.dumps(record(m, form), ensure_ascii=False) + "\n" for m in table["messages"].to_pylist())
            )
        self.parquet.write_table(table)
        self.rows += len(table)

    def close(self) -> None:
        for out in self.jsonl.values():
            out.close()
        self.parquet.close()


def _table(rows: pd.DataFrame, kind: str, schema: pa.Schema) -> pa.Table:
    """A batch of band (or cot.parquet) rows as the export's columns, with the trained conversation."""
    cot = rows["target"] if "target" in rows else [None] * len(rows)
    messages = [
        conversation(r.question, r.options, r.category, kind, r.gold, c)
        for r, c in zip(rows.itertuples(index=False), cot, strict=True)
    ]
    columns = {name: rows[name].astype(object).where(rows[name].notna(), None) for name in schema.names if name in rows}
    frame = pd.DataFrame({**{k: list(v) for k, v in columns.items()}, "messages": messages})
    for name in schema.names:
        if name not in frame:
            frame[name] = None
    return pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)


def _phases(cfg: RaycatConfig, recipe: str, scratch: Path) -> Iterator[tuple[Phase, pd.DataFrame, pd.DataFrame]]:
    """(phase, rows, rows without a teacher target) of every phase of ``recipe``, a batch at a time."""
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"recipe": recipe})})
    band_paths, cot_path = input_paths(cfg)
    sizes = {band: rundir.parquet_rows(path) for band, path in band_paths.items()}
    for phase, bands, keep in phase_sources(recipe, sizes, cfg.train.seed):
        paths = [band_paths[b] for b in bands]
        join = str(scratch / f"{recipe}-{phase.name}-cot")
        for rows, missing in examples.phase_rows(phase, paths, keep, cot_path, scratch=join):
            yield phase, rows, missing


def export_recipe(cfg: RaycatConfig, recipe: str, out: Path, scratch: Path) -> dict:
    """``out/<recipe>/<phase>/`` for every phase; returns rows exported and not, per phase."""
    files: dict[str, Files] = {}
    summary: dict[str, dict] = {}
    try:
        for phase, rows, missing in _phases(cfg, recipe, scratch):
            if phase.name not in files:
                files[phase.name] = Files(out / recipe / phase.name, ROWS)
                summary[phase.name] = {"target": phase.target, "bands": list(phase.bands), "not_exported": Counter()}
            if len(rows):
                files[phase.name].write(_table(rows, phase.target, ROWS))
            if len(missing):
                summary[phase.name]["not_exported"][NO_COT] += len(missing)
        # A phase with no rows at all (an empty band) still gets its files, empty.
        for phase in RECIPES[recipe]:
            if phase.name not in files:
                files[phase.name] = Files(out / recipe / phase.name, ROWS)
                summary[phase.name] = {"target": phase.target, "bands": list(phase.bands), "not_exported": Counter()}
    finally:
        for f in files.values():
            f.close()
    return {
        name: {**s, "rows": files[name].rows, "not_exported": dict(s["not_exported"])} for name, s in summary.items()
    }


def export_taught(cfg: RaycatConfig, out: Path) -> dict | None:
    """``out/taught/``: teach/cot.parquet's rows with their CoT conversation (None without a teach stage)."""
    path = rundir.join(cfg.run_dir, "teach", "cot.parquet")
    if not rundir.exists(path):
        return None
    present = set(rundir.parquet_columns(path))
    source = pa.schema([f for f in rundir.parquet_schema(path) if f.name in TAUGHT])
    schema = pa.schema([*source, ("messages", pa.list_(MESSAGE))])
    wanted = [c for c in TAUGHT if c in present] + ["question", "options"]
    files = Files(out / "taught", schema)
    statuses: Counter = Counter()
    try:
        for batch in rundir.iter_parquet(path, wanted, batch_rows=examples.BATCH_ROWS):
            statuses.update(batch["final_status"].astype(str) if "final_status" in batch else [])
            files.write(_table(batch, "cot", schema))
    finally:
        files.close()
    return {"rows": files.rows, "final_status": dict(statuses.most_common())}
