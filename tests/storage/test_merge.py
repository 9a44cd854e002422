"""Parts merged into the corpus order through buckets on disk (raycat.storage.merge)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from raycat.storage import merge, rundir


def _questions(tmp_path, n: int) -> str:
    path = str(tmp_path / "questions.parquet")
    ids = [f"q{i:03d}" for i in range(n)]
    rundir.write_parquet(path, pd.DataFrame({"id": ids, "row_hash": [f"h{i}" for i in range(n)]}), row_group_size=7)
    return path


def test_rows_come_back_in_the_corpus_order_once_each_first_part_file_winning(tmp_path):
    questions, parts = _questions(tmp_path, 25), str(tmp_path / "parts")

    def part(name: str, numbers: list[int], value: str, row_hash=None) -> None:
        ids = [f"q{i:03d}" for i in numbers]
        hashes = row_hash or [f"h{i}" for i in numbers]
        frame = pd.DataFrame({"id": ids, "row_hash": hashes, "value": value, "n": numbers})
        rundir.write_parquet(f"{parts}/{name}.parquet", frame)

    # Finished in no particular order; q005 twice in part-a (a retried block) and again in part-b.
    part("part-b", [24, 3, 5, 17, 9, 11], "b")
    part("part-a", [20, 5, 0, 5, 12, 1], "a")
    part("part-c", [2, 4, 6, 7, 8, 10, 13, 14, 15, 16, 18, 19], "c")
    part("part-d", [21], "stale", row_hash=["old-content"])  # q021's id with other content: not this corpus
    merged = merge.OrderedParts(parts, questions, bucket_rows=4, tmp_root=str(tmp_path / "scratch"))
    (tmp_path / "scratch" / "raycat-merge-x").mkdir(parents=True)  # another merge's: left alone
    out = pd.concat(list(merged), ignore_index=True)
    want = [i for i in range(25) if i not in (21, 22, 23)]
    assert out["n"].tolist() == want
    assert out.set_index("n").loc[5, "value"] == "a"  # part-a sorts first
    assert (merged.rows, merged.duplicates, merged.missing) == (22, 2, 3)
    assert list(out.columns) == ["id", "row_hash", "value", "n"]
    assert [p.name for p in (tmp_path / "scratch").iterdir()] == ["raycat-merge-x"]
    # A retried merge (its worker died) finds its own leftovers and starts from an empty dir.
    dead = iter(merge.OrderedParts(parts, questions, bucket_rows=4, tmp_root=str(tmp_path / "scratch")))
    assert len(next(dead)) == 4 and len(list((tmp_path / "scratch").iterdir())) == 2  # stopped mid-merge
    again = merge.OrderedParts(parts, questions, bucket_rows=4, tmp_root=str(tmp_path / "scratch"))
    assert pd.concat(list(again), ignore_index=True)["n"].tolist() == want
    assert [p.name for p in (tmp_path / "scratch").iterdir()] == ["raycat-merge-x"]


def test_two_corpus_rows_with_one_64_bit_key_are_refused(tmp_path, monkeypatch):
    from raycat.errors import RaycatError
    from raycat.storage import rowkey

    questions = _questions(tmp_path, 5)
    monkeypatch.setattr(rowkey, "key64", lambda rows: np.zeros(len(rows), dtype=np.uint64))
    with pytest.raises(RaycatError, match="two rows share a 64-bit"):
        list(merge.OrderedParts(str(tmp_path / "parts"), questions))


def test_no_parts_and_an_empty_corpus_give_nothing(tmp_path):
    merged = merge.OrderedParts(str(tmp_path / "none"), _questions(tmp_path, 3))
    assert list(merged) == [] and (merged.rows, merged.missing) == (0, 3)
    assert merge.part_schema(str(tmp_path / "none")) is None


def test_the_sink_takes_one_schema_for_all_parts_and_publishes_only_a_finished_file(tmp_path):
    parts = str(tmp_path / "parts")
    # A part where every row was scored has no skip reason: that column is all null there.
    rundir.write_parquet(f"{parts}/part-1.parquet", pd.DataFrame({"id": ["a"], "skip_reason": [None], "x": [1]}))
    rundir.write_parquet(f"{parts}/part-2.parquet", pd.DataFrame({"id": ["b"], "skip_reason": ["long"], "x": [2.5]}))
    schema = merge.part_schema(parts, {"model": pa.string()})
    text = (pa.string(), pa.large_string())
    assert schema.field("skip_reason").type in text and schema.field("x").type == pa.float64()
    out = str(tmp_path / "out.parquet")
    with merge.ParquetSink(out, schema) as sink:
        sink.write(pd.DataFrame({"x": [1], "id": ["a"], "skip_reason": [None], "model": "m"}))
        sink.write(pd.DataFrame({"id": ["b"], "skip_reason": ["long"], "x": [2.5], "model": "m"}))
    got = rundir.read_parquet(out)
    assert got["id"].tolist() == ["a", "b"] and got["x"].tolist() == [1.0, 2.5] and got["model"].tolist() == ["m", "m"]
    assert got["skip_reason"].isna().tolist() == [True, False]
    # Frames smaller than a row group are held until they fill one; a column a frame lacks is null.
    grouped = str(tmp_path / "grouped.parquet")
    with merge.ParquetSink(grouped, schema, row_group_size=4) as sink:
        for i in range(10):
            sink.write(pd.DataFrame({"id": [f"r{i}"], "x": [i]}))
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(grouped).metadata
    assert [meta.row_group(g).num_rows for g in range(meta.num_row_groups)] == [4, 4, 2] and sink.rows == 10
    assert rundir.read_parquet(grouped)["model"].isna().all()
    with pytest.raises(RuntimeError), merge.ParquetSink(str(tmp_path / "half.parquet"), schema) as sink:
        sink.write(pd.DataFrame({"id": ["a"], "skip_reason": [None], "x": [1], "model": "m"}))
        raise RuntimeError("killed mid-merge")
    assert not (tmp_path / "half.parquet").exists() and not list(tmp_path.glob(".tmp-*"))


def test_flushing_rows_a_multiple_of_the_group_leaves_nothing_for_the_last_flush(tmp_path):
    import pyarrow.parquet as pq

    table = pa.table({"x": list(range(8))})
    with pq.ParquetWriter(tmp_path / "f.parquet", table.schema) as writer:
        pending = merge.flush_groups(writer, [table], 4, final=False)
        assert pending == []
        assert merge.flush_groups(writer, pending, 4, final=True) == []
    assert pq.read_table(tmp_path / "f.parquet")["x"].to_pylist() == list(range(8))
    assert pq.ParquetFile(tmp_path / "f.parquet").num_row_groups == 2
