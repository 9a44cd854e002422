"""Row identity: every row-level cache is keyed by id *and* content (issue: ids that are row numbers)."""

import os

import numpy as np
import pandas as pd

from raycat.engines import actor_pool
from raycat.storage import merge, rowkey, rundir
from raycat.teach import results


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


def test_cascade_takes_the_first_verified_else_the_last_answer_per_content(tmp_path):
    rows = frame(["a", "b", "c"], ["qa", "qb", "qc"])
    path = str(tmp_path / "rows.parquet")
    rundir.write_parquet(path, rows)

    def res(teacher, statuses, rows=rows):
        out = rows[["id", "row_hash"]].assign(teacher=teacher, response=teacher, status=statuses)
        out = out.assign(attempts=1, prompt_tokens=1, completion_tokens=1, engine_seconds=0.0, gpu_seconds=0.0)
        return out[out["status"].notna()]

    def merged(*teachers):
        dirs = []
        for i, answers in enumerate(teachers):
            dirs.append(str(tmp_path / f"{len(teachers)}-{i}"))
            rundir.write_part(answers, dirs[-1])
        empty = results.PoolTokens(np.empty(0, np.uint64), np.empty(0, np.int64), len(dirs))
        buckets, counts = merge.Buckets(tmp_path / f"buckets-{len(teachers)}"), results.Merged()
        (tmp_path / f"buckets-{len(teachers)}").mkdir()
        results.spread(path, dirs, empty, buckets)
        return pd.concat(results.walk(path, buckets, len(dirs), counts)), counts

    t1 = res("t1", ["verified", "wrong", "wrong"])
    t2 = res("t2", [None, "verified", "missing"])
    t3 = res("t3", [None, None, "wrong"])
    got, _ = merged(t1, t2, t3)
    assert list(got["teacher"]) == ["t1", "t2", "t3"] and list(got["status"]) == ["verified", "verified", "wrong"]
    # A teacher's result for the same id but other content is not this row's result.
    stale = res("t1", ["verified", "verified", "verified"], rows=frame(["a", "b", "c"], ["qa", "OLD", "qc"]))
    got, counts = merged(stale)
    assert list(got["id"]) == ["a", "c"] and counts.missing == 1 and counts.missing_example == "b"


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


def test_key64_is_the_same_in_every_process_and_keysets_answer_membership_by_batch():
    import subprocess
    import sys

    import numpy as np

    rows = pd.DataFrame({"id": [f"q{i}" for i in range(5000)], "row_hash": [f"h{i % 7}" for i in range(5000)]})
    mine = rowkey.key64(rows)
    code = (
        "import pandas as pd, sys; from raycat.storage import rowkey; "
        "r = pd.DataFrame({'id': ['q0', 'q4999'], 'row_hash': ['h0', 'h1']}); print(rowkey.key64(r).tolist())"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert other.strip() == str([int(mine[0]), int(mine[-1])])  # not salted per process, like hash()
    assert mine.dtype == np.uint64 and len(set(mine.tolist())) == 5000
    # The key covers the content: the same id with another row_hash is another key.
    assert rowkey.key64(rows.assign(row_hash="x"))[0] != mine[0]
    evens, odds = rowkey.KeySet(mine[::2]), rowkey.KeySet(mine[1::2])
    assert evens.contains(mine).tolist() == [i % 2 == 0 for i in range(5000)]
    both = rowkey.KeySet.union([evens, odds, rowkey.KeySet()])
    assert len(both) == 5000 and both.contains(mine).all()
    assert not rowkey.KeySet().contains(mine).any() and len(rowkey.key64(rows.iloc[:0])) == 0
