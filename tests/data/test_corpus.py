"""A corpus of many files: data.path resolution (URI, prefix, glob, compression), and the rules that
need the whole corpus decided from per-shard results (duplicate ids, MedMCQA's cop convention, selection)."""

from __future__ import annotations

import gzip
import json

import pandas as pd
import pyarrow as pa
import pytest

from raycat.config import ColumnMap, DataConfig
from raycat.data import sources
from raycat.data.adapters import BadRowError, check_rows, read_file, selected
from raycat.data.corpus import PLACES, duplicates, id_partitions, load_questions, resolve
from raycat.errors import MissingInputError, RaycatError

COLS = ColumnMap(id="qid", question="question", options="options", answer="answer")


def row(i, qid=None, **kw):
    return {"qid": qid or f"q{i}", "question": f"Q{i}?", "options": ["a", "b", "c"], "answer": "B", **kw}


def lines(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_a_prefix_lists_data_files_at_any_depth_in_order_and_a_glob_matches_per_segment(tmp_path):
    for rel in ("b/2.jsonl.gz", "a/1.parquet", "a/0.csv", "a/notes.txt", "a/x.parquet.gz", "top.json"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    root = str(tmp_path)
    assert sources.resolve(root) == [
        f"{root}/a/0.csv",
        f"{root}/a/1.parquet",
        f"{root}/b/2.jsonl.gz",
        f"{root}/top.json",
    ]
    # file:// URIs name files the same way, as URIs (what a worker opens).
    assert sources.resolve(f"file://{root}/a/") == [f"file://{root}/a/0.csv", f"file://{root}/a/1.parquet"]
    # `*` stays within one segment: a/* does not reach b/, */* does not reach top.json.
    assert sources.resolve(f"{root}/*/*.jsonl.gz") == [f"{root}/b/2.jsonl.gz"]
    assert sources.resolve(f"file://{root}/a/[01].*") == [f"file://{root}/a/0.csv", f"file://{root}/a/1.parquet"]
    # Not there: a URI or a glob is an error, a bare name is a hub id.
    with pytest.raises(MissingInputError, match="no such file or prefix"):
        sources.resolve(f"file://{root}/missing/")
    with pytest.raises(MissingInputError, match="no data files found"):
        sources.resolve(f"{root}/*/*.xml")
    assert sources.resolve("TIGER-Lab/MMLU-Pro") is None


def test_file_names_split_into_stem_format_and_compression():
    assert sources.split_name("part-0.jsonl.gz") == ("part-0", ".jsonl", "gzip")
    assert sources.split_name("anatomy_test.CSV.zst") == ("anatomy_test", ".csv", "zstd")
    assert sources.split_name("x.parquet") == ("x", ".parquet", None)
    assert sources.split_name("x.parquet.gz")[1] == "" and sources.split_name("README.md")[1] == ""


def test_rows_are_named_by_base_name_unless_two_files_share_it():
    assert sources.labels(["s3://b/c/p-0.jsonl", "s3://b/c/p-1.jsonl"]) == ["p-0.jsonl", "p-1.jsonl"]
    assert sources.labels(["/d/train/p-0.jsonl", "/d/test/p-0.jsonl"]) == ["train/p-0.jsonl", "test/p-0.jsonl"]


@pytest.mark.parametrize("suffix", [".jsonl.gz", ".jsonl.zst", ".csv.gz"])
def test_compressed_text_files_read_as_their_plain_form(tmp_path, suffix):
    rows = [row(0), row(1)]
    plain = tmp_path / ("plain" + suffix.rsplit(".", 1)[0])
    if suffix.startswith(".csv"):
        pd.DataFrame(rows).assign(options=None).to_csv(plain, index=False)
    else:
        plain.write_bytes(lines(rows))
    packed = tmp_path / ("packed" + suffix)
    codec = "gzip" if suffix.endswith(".gz") else "zstd"
    with pa.CompressedOutputStream(str(packed), codec) as out:
        out.write(plain.read_bytes())
    cfg = DataConfig(source="generic", path=str(packed), columns=COLS)
    assert read_file(cfg, str(packed)) == read_file(cfg, str(plain))


def test_a_corrupt_gzip_names_the_file(tmp_path):
    bad = tmp_path / "p.jsonl.gz"
    bad.write_bytes(gzip.compress(lines([row(0)]))[:-12])
    with pytest.raises(RaycatError, match=r"p.jsonl.gz cannot be read"):
        read_file(DataConfig(source="generic", path=str(bad), columns=COLS), str(bad))


def two_shards(tmp_path, a, b):
    (tmp_path / "c").mkdir(parents=True)
    (tmp_path / "c" / "part-0.jsonl").write_bytes(lines(a))
    (tmp_path / "c" / "part-1.jsonl.gz").write_bytes(gzip.compress(lines(b)))
    return str(tmp_path / "c")


def test_a_duplicate_id_split_over_two_files_is_found_and_the_first_copy_kept(tmp_path):
    path = two_shards(tmp_path, [row(0), row(1), row(2, qid="dup")], [row(3), row(4, qid="dup", question="other")])
    cfg = DataConfig(source="generic", path=path, columns=COLS, on_bad_rows="quarantine")
    questions, bad, n = load_questions(cfg)
    assert n == 5 and list(questions.id) == ["q0", "q1", "dup", "q3"] and questions.iloc[2].question == "Q2?"
    assert [b["row"] for b in bad] == ["part-1.jsonl.gz:1"]
    assert (
        bad[0]["reason"] == "duplicate id 'dup' (first seen at row part-0.jsonl:2)"
        and bad[0]["raw"]["question"] == "other"
    )
    with pytest.raises(BadRowError, match=r"row part-1.jsonl.gz:1, field 'id': duplicate id 'dup'"):
        load_questions(cfg.model_copy(update={"on_bad_rows": "error"}))


def test_duplicates_are_found_across_hash_partitions_of_many_shards(tmp_path):
    # As the Ray tasks run it: each shard checked alone, its ids split into 3 partitions, each partition
    # reduced alone; the copy in the later shard is quarantined, the one in the earlier shard kept.
    cfg = DataConfig(source="generic", path="unused", columns=COLS)
    shards = [[row(i + 10 * s, qid=f"id{(i + 10 * s) % 13}") for i in range(10)] for s in range(3)]
    checked = [check_rows(cfg, records, s, f"s{s}") for s, records in enumerate(shards)]
    parts = [id_partitions(valid, 3) for valid, _ in checked]
    assert all(sum(len(p) for p in shard) == 10 for shard in parts)
    dups = pd.concat([duplicates([shard[k] for shard in parts]) for k in range(3)], ignore_index=True)
    assert len(dups) == 13 and set(dups.columns) == {"id", "first_order", "first_label"}
    assert dict(zip(dups.id, dups.first_label, strict=True))["id0"] == "s0:0"
    settled = [resolve(v, b, dups, lambda r=r: r) for (v, b), r in zip(checked, shards, strict=True)]
    kept = [i for s in settled for i in s.good.id]
    assert sorted(kept) == sorted(f"id{k}" for k in range(13)) and len(kept) == 13
    assert sum(len(s.bad) for s in settled) == 30 - 13
    assert all(s.good["row_hash"].str.len().eq(16).all() for s in settled)
    # Every place of every id lands in exactly one partition.
    assert sorted(pd.concat([p for shard in parts for p in shard])["_order"]) == sorted(
        pd.concat([v[PLACES] for v, _ in checked])["_order"]
    )


def medmcqa(i, cop):
    return {"id": f"m{i}", "question": f"Q{i}", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": cop}


def test_the_medmcqa_cop_convention_is_decided_from_every_shard(tmp_path):
    # part-0 alone (1..3) fits both conventions; part-1's 4 says 1-based, for part-0's rows too.
    path = two_shards(tmp_path, [medmcqa(0, 1), medmcqa(1, 3)], [medmcqa(2, 4), medmcqa(3, 2)])
    questions, _, _ = load_questions(DataConfig(source="medmcqa", path=path))
    assert list(questions.gold) == ["A", "C", "D", "B"] and "1-based" in questions.attrs["notes"]["medmcqa_cop"]
    # A 0 in one shard and a 4 in the other: neither convention fits, whichever shard says which.
    path = two_shards(tmp_path / "x", [medmcqa(0, 0)], [medmcqa(1, 4)])
    with pytest.raises(RaycatError, match="takes both 0 and 4"):
        load_questions(DataConfig(source="medmcqa", path=path))


def test_bad_rows_of_every_shard_are_quarantined_in_corpus_order_and_error_names_the_first(tmp_path):
    path = two_shards(tmp_path, [row(0), row(1, answer="Z")], [row(2, question=""), row(3)])
    cfg = DataConfig(source="generic", path=path, columns=COLS, on_bad_rows="quarantine")
    questions, bad, _ = load_questions(cfg)
    assert list(questions.id) == ["q0", "q3"]
    assert [(b["row"], b["field"]) for b in bad] == [("part-0.jsonl:1", "answer"), ("part-1.jsonl.gz:0", "question")]
    with pytest.raises(BadRowError, match=r"row part-0.jsonl:1, field 'answer'"):
        load_questions(cfg.model_copy(update={"on_bad_rows": "error"}))


@pytest.mark.parametrize("n,sample,limit", [(50, 10, None), (50, 10, 4), (50, None, 7), (10, 20, None), (0, 5, 3)])
def test_the_selection_is_pandas_sample_from_the_count_alone(n, sample, limit):
    frame = pd.DataFrame({"i": range(n)})
    expect = frame.sample(n=sample, random_state=3).sort_index() if sample is not None and sample < n else frame
    expect = expect.head(limit) if limit is not None else expect
    assert list(selected(n, limit, sample, 3)) == list(expect["i"])
