"""A corpus checked shard by shard, and the rules only the whole corpus decides, as aggregates.

A shard is one data file (or a hub split). ``adapters.check_rows`` runs every per-row rule on a shard by
itself; what needs the whole corpus is computed from small per-shard results, never from the rows
gathered in one place:

- the MedMCQA ``cop`` convention, from the union of each shard's set of ``cop`` values;
- duplicate ids, from (id, place) pairs partitioned by a hash of the id (``id_partitions``), so that
  one partition holds every copy of its ids, whichever shards they are in (``duplicates``);
- data.limit / data.sample, from the count of valid rows (``adapters.selected``).

``resolve`` then settles one shard: later copies of an id and ambiguous golds are quarantined, and the
kept rows get their ``row_hash``. ``load_questions`` runs it all in this process (one file, a hub split,
unit tests); ``raycat.data.parallel`` runs the same functions as Ray tasks, one per file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

from raycat.config import DataConfig
from raycat.data import sources
from raycat.data.adapters import (
    COLUMNS,
    ORDER_BITS,
    BadRowError,
    _read_hub,
    bad_record,
    check_rows,
    cop_base,
    cop_values,
    json_safe,
    read_file,
)
from raycat.data.files import BadLine
from raycat.data.synthetic import generate_arithmetic
from raycat.errors import RaycatError
from raycat.storage import rowkey

PLACES = ["id", "_order", "_label"]
DUPLICATE_FIX = "Ids must be unique; fix the source or drop the duplicate"
REPEATED_RULE = "kept: two options read the same (case and spacing ignored), but not the gold one"


@dataclass
class Resolved:
    """One shard settled: its kept rows (``COLUMNS`` + ``row_hash``) and its quarantine records (with
    ``_order`` and ``_fix``), both in corpus order, and the kept rows whose options repeat a text."""

    good: pd.DataFrame
    bad: list[dict]
    repeated_ids: list[str]  # the first 20
    repeated: int


def shard_names(files: list[str]) -> list[str]:
    """The name each file's rows are labelled with: none for a single file (rows are ``0``, ``1``, ...)."""
    return sources.labels(files) if len(files) > 1 else [""]


def decide_cop_base(cfg: DataConfig, values: set[int]) -> tuple[DataConfig, dict]:
    """``cfg`` with the MedMCQA ``cop`` base every shard is checked with, and the summary's note on it."""
    base, how = cop_base(cfg, values)
    return cfg.model_copy(update={"medmcqa_cop_base": base}), {"medmcqa_cop": how}


def id_partitions(valid: pd.DataFrame, n: int) -> list[pd.DataFrame]:
    """A shard's (id, place) pairs split into ``n`` partitions by a hash of the id (stable across
    processes), so that partition k of every shard together holds every copy of its ids."""
    places = valid[PLACES]
    if n == 1:
        return [places]
    part = pd.util.hash_pandas_object(places["id"], index=False).to_numpy() % n
    return [places[part == k] for k in range(n)]


def duplicates(places: list[pd.DataFrame]) -> pd.DataFrame:
    """The ids found more than once in these partitions, each with its first copy's place
    (``first_order``, ``first_label``): the copy that is kept."""
    frame = pd.concat(places, ignore_index=True) if places else pd.DataFrame(columns=PLACES)
    copies = frame[frame["id"].duplicated(keep=False)]
    first = copies.sort_values("_order", kind="stable").drop_duplicates("id")
    return first.rename(columns={"_order": "first_order", "_label": "first_label"}).reset_index(drop=True)


def resolve(
    valid: pd.DataFrame, bad: list[dict], dups: pd.DataFrame, records: Callable[[], list[dict | BadLine]]
) -> Resolved:
    """Settle one shard (``adapters.check_rows``' output) once the corpus' duplicate ids are known.
    ``records``: the shard's raw rows, called only when a duplicate needs its raw row for the quarantine."""
    by_id = dups.set_index("id")
    first = valid["id"].map(by_id["first_order"])
    duplicate = first.notna() & (valid["_order"] != first)
    # As the rule has always read: a later copy is a duplicate even where its gold is also ambiguous.
    ambiguous = ~duplicate & (valid["_ambiguous"] != "")
    out = list(bad)
    if duplicate.any():
        raws = records()
        copies = valid[duplicate].assign(seen=valid["id"].map(by_id["first_label"]))
        for row in copies.to_dict("records"):
            reason = f"duplicate id {row['id']!r} (first seen at row {row['seen']})"
            raw = json_safe(raws[row["_order"] & ((1 << ORDER_BITS) - 1)])
            out.append(bad_record(int(row["_order"]), row["_label"], "id", reason, raw, DUPLICATE_FIX))
    for row in valid[ambiguous].to_dict("records"):
        out.append(bad_record(int(row["_order"]), row["_label"], "options", row["_ambiguous"], row["_raw"]))
    out.sort(key=lambda b: b["_order"])
    good = valid[~duplicate & ~ambiguous]
    repeated = good.loc[good["_repeated"], "id"]
    return Resolved(rowkey.add(good[COLUMNS].reset_index(drop=True)), out, repeated.head(20).tolist(), len(repeated))


def raise_first_bad(firsts: list[dict | None]) -> None:
    """data.on_bad_rows=error: the corpus' first bad row (by place, of each shard's first) as the error."""
    found = [b for b in firsts if b is not None]
    if found:
        b = min(found, key=lambda b: b["_order"])
        raise BadRowError(b["row"], b["field"], b["reason"], b["_fix"])


def public(record: dict) -> dict:
    """A quarantine record as quarantine.jsonl holds it: row, field, reason, raw."""
    return {k: record[k] for k in ("row", "field", "reason", "raw")}


def reason_counts(bad: list[dict]) -> Counter:
    """Quarantined rows per ``field: reason`` (without the reason's details in parentheses)."""
    return Counter(b["field"] + ": " + b["reason"].split(" (")[0] for b in bad)


def repeated_note(resolved: list[tuple[list[str], int]]) -> dict:
    """The summary's note on kept rows whose options repeat a text, from each shard's (ids, count)."""
    total = sum(n for _, n in resolved)
    if not total:
        return {}
    ids = [i for shard_ids, _ in resolved for i in shard_ids][:20]
    return {"duplicate_option_texts": {"rows": total, "ids": ids, "rule": REPEATED_RULE}}


def no_rows(cfg: DataConfig) -> RaycatError:
    return RaycatError(f"data.path {cfg.path}: no rows (an empty file); point data.path at the questions")


def load_questions(cfg: DataConfig) -> tuple[pd.DataFrame, list[dict], int]:
    """Return (valid questions, quarantined rows with reasons, rows read), all in this process.
    ``df.attrs["notes"]`` holds what the summary should state: conventions detected, rows flagged but kept."""
    if cfg.source == "synthetic":
        rows = generate_arithmetic(**cfg.synthetic.model_dump())
        return pd.DataFrame(rows, columns=COLUMNS), [], len(rows)
    assert cfg.path is not None
    files = sources.resolve(cfg.path)
    if files is None:
        shards = [("", [row for _, row in _read_hub(cfg)])]
    else:
        shards = [(name, read_file(cfg, f)) for name, f in zip(shard_names(files), files, strict=True)]
    n_read = sum(len(records) for _, records in shards)
    if not n_read:
        raise no_rows(cfg)
    notes: dict = {}
    if cfg.source == "medmcqa":
        cfg, notes = decide_cop_base(cfg, set().union(*(cop_values(records) for _, records in shards)))
    checked = [check_rows(cfg, records, i, name) for i, (name, records) in enumerate(shards)]
    dups = duplicates([valid[PLACES] for valid, _ in checked])
    resolved = [
        resolve(valid, bad, dups, lambda records=records: records)
        for (valid, bad), (_, records) in zip(checked, shards, strict=True)
    ]
    if cfg.on_bad_rows == "error":
        raise_first_bad([r.bad[0] if r.bad else None for r in resolved])
    notes.update(repeated_note([(r.repeated_ids, r.repeated) for r in resolved]))
    questions = pd.concat([r.good[COLUMNS] for r in resolved], ignore_index=True)
    questions.attrs["notes"] = notes
    return questions, [public(b) for r in resolved for b in r.bad], n_read
