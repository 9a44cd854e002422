"""A corpus of several files read by one Ray task per file writes what the one-process build writes."""

from __future__ import annotations

import gzip
import json

import pandas as pd
import pytest

from raycat.config import validate_config
from raycat.data import questions
from raycat.data.adapters import BadRowError
from raycat.storage import rundir

pytestmark = pytest.mark.integration


def row(i, **kw):
    return {"qid": f"q{i}", "question": f"Q{i}?", "options": ["a", "b", "c", "d"][: 2 + i % 3], "answer": "B", **kw}


def corpus(tmp_path):
    root = tmp_path / "corpus"
    (root / "more").mkdir(parents=True, exist_ok=True)
    a = [row(i) for i in range(0, 40)] + [row(40, answer="Z")]
    b = [row(i) for i in range(41, 80)] + [row(5, question="a second q5")]
    (root / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in a))
    (root / "more" / "b.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in b).encode()))
    pd.DataFrame([row(i) for i in range(81, 120)] + [row(120, question="")]).to_parquet(root / "c.parquet")
    return root


def config(tmp_path, run, **data):
    columns = {"id": "qid", "question": "question", "options": "options", "answer": "answer"}
    tree = {
        "run_dir": str(tmp_path / run),
        "data": {"source": "generic", "path": str(corpus(tmp_path)), "columns": columns, **data},
        "score": {"student": {"path": "unused"}, "engine": {"batch_size": 4}},
        "ray": {"num_cpus": 2},
    }
    return validate_config(tree)


def test_the_parallel_build_writes_the_same_questions_quarantine_and_summary(tmp_path):
    from raycat.ray_env import ray_session

    data = {"on_bad_rows": "quarantine", "sample": 70, "seed": 3}
    one = config(tmp_path, "one", **data)
    expected = questions.build(one)
    many = config(tmp_path, "many", **data)
    # An interrupted run's settled file: cleared, never read into this run.
    leftover = tmp_path / "many" / "questions" / "parts" / "000009.parquet"
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"not parquet")
    with ray_session(many.ray):
        summary = questions.stage_questions(many)
        with pytest.raises(BadRowError, match=r"row a.jsonl:40, field 'answer'"):
            questions.stage_questions(config(tmp_path, "err"))
    assert {**summary, "path": None} == {**expected, "path": None}
    assert summary["rows_read"] == 121 and summary["valid"] == 118 and summary["selected"] == 70
    gold = "answer: gold 'Z' is not among the option letters 'ABC'"
    reasons = [gold, "question: empty text", "id: duplicate id 'q5'"]
    assert summary["quarantine_reasons"] == dict.fromkeys(reasons, 1)
    got, want = (questions.path(str(tmp_path / run)) for run in ("many", "one"))
    pd.testing.assert_frame_equal(rundir.read_parquet(got), rundir.read_parquet(want))
    assert rundir.row_group_rows(got) == [70]  # row groups of GROUP_ROWS, not of a block (16 rows)
    # The settled files the writer streamed from are gone once questions.parquet is written.
    assert not leftover.parent.exists()
    quarantine = (tmp_path / "many" / "questions" / "quarantine.jsonl").read_text()
    assert quarantine == (tmp_path / "one" / "questions" / "quarantine.jsonl").read_text()
    # Files in path order (a.jsonl, c.parquet, more/b.jsonl.gz), rows in file order.
    rows = [json.loads(line)["row"] for line in quarantine.splitlines()]
    assert rows == ["a.jsonl:40", "c.parquet:39", "b.jsonl.gz:39"]
