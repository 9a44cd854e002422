"""Row identity: every row-level cache is keyed by id *and* content (issue: ids that are row numbers)."""

import os

import pandas as pd

from raycat.engines import actor_pool
from raycat.storage import rowkey, rundir
from raycat.teach.stage import _cascade


def frame(ids, questions, gold="A"):
    return rowkey.add(
        pd.DataFrame(
            {"id": ids, "question": questions, "options": [["x", "y"]] * len(ids), "gold": gold, "category": "c"}
        )
    )


def test_row_hash_covers_what_the_model_sees_and_is_graded_against():
    base = rowkey.row_hash("Q?", ["x", "y"], "A", "c")
    # Lists from Parquet arrive as arrays/tuples
    assert base == rowkey.row_hash("Q?", ("x", "y"), "A", "c")
    changed = [
        rowkey.row_hash("Q!", ["x", "y"], "A", "c"),
        rowkey.row_hash("Q?", ["y", "x"], "A", "c"),
        rowkey.row_hash("Q?", ["x", "y"], "B", "c"),
        rowkey.row_hash("Q?", ["x", "y"], "A", "d"),
    ]
    assert base not in changed and len(set(changed)) == 4


def test_parts_count_as_done_only_for_the_same_id_and_content(tmp_path):
    parts = str(tmp_path / "parts")
    old = frame(["0", "1", "2"], ["what is 1+1?", "what is 2+2?", "what is 3+3?"])
    rundir.write_part(old.assign(status=["verified", "wrong", "verified"]), parts)
    # A new data.path: the same row-number ids, row 1 now holds another question.
    new = frame(["0", "1", "2", "3"], ["what is 1+1?", "capital of France?", "what is 3+3?", "new row"])
    path = str(tmp_path / "rows.parquet")
    rundir.write_parquet(path, new)
    assert actor_pool.todo_count(path, [(parts, None)]) == {"rows": 4, "done": [2], "todo": 2}
    assert actor_pool.todo_count(path, [(parts, "verified")]) == {"rows": 4, "done": [2], "todo": 2}
    left = actor_pool.SkipDone([(parts, None)])(new)
    assert list(left["id"]) == ["1", "3"]
    # Parts written by an older raycat (no row_hash) are computed again, not trusted.
    legacy = str(tmp_path / "legacy")
    rundir.write_part(old.drop(columns=["row_hash"]), legacy)
    assert actor_pool.todo_count(path, [(legacy, None)])["todo"] == 4


def test_cascade_takes_the_first_verified_else_the_last_answer_per_content():
    rows = frame(["a", "b", "c"], ["qa", "qb", "qc"])
    rows["_key"] = rowkey.keys(rows)

    def res(teacher, statuses, rows=rows):
        out = rows[["id", "row_hash"]].assign(_key=rowkey.keys(rows), teacher=teacher, response=teacher)
        out["status"] = statuses
        return out[out["status"].notna()]

    t1 = res("t1", ["verified", "wrong", "wrong"])
    t2 = res("t2", [None, "verified", "missing"])
    t3 = res("t3", [None, None, "wrong"])
    got = _cascade(rows, [t1, t2, t3])
    assert list(got["teacher"]) == ["t1", "t2", "t3"] and list(got["status"]) == ["verified", "verified", "wrong"]
    # A teacher's result for the same id but other content is not this row's result.
    stale = res("t1", ["verified", "verified", "verified"], rows=frame(["a", "b", "c"], ["qa", "OLD", "qc"]))
    try:
        _cascade(rows, [stale[stale["_key"].isin(set(rows["_key"]))]])
    except Exception as e:
        assert "1 row(s) have no teacher result (e.g. b)" in str(e)
    else:
        raise AssertionError("a row without a result for its content was accepted")


def test_fingerprint_changes_when_a_file_is_rewritten_in_place(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"w" * 64)
    (model_dir / "config.json").write_text("{}")
    before = rundir.fingerprint(str(model_dir))
    assert before == rundir.fingerprint(str(model_dir)) and before != ""
    # Same size, new mtime: weights retrained in place
    os.utime(model_dir / "model.safetensors", ns=(1, 1))
    assert rundir.fingerprint(str(model_dir)) != before
    assert rundir.fingerprint("Org/hub-model") == "" and rundir.fingerprint("registry:smollm2") == ""
