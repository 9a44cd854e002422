"""The questions stage: questions.parquet in row groups, and a data file that cannot be parsed."""

from __future__ import annotations

import pytest

from raycat.config import validate_config
from raycat.data import questions
from raycat.errors import RaycatError
from raycat.storage import rundir


def test_questions_are_written_in_large_row_groups_that_read_back_in_order(tmp_path):
    cfg = validate_config(
        {
            "run_dir": str(tmp_path / "run"),
            "data": {"source": "synthetic", "synthetic": {"num_questions": 50}},
            "score": {"student": {"path": "unused"}, "engine": {"batch_size": 4}},
        }
    )
    summary = questions.build(cfg)
    assert summary["selected"] == 50 and summary["max_options"] == 4
    p = questions.path(cfg.run_dir)
    # Blocks of 16 rows are cut from row groups of GROUP_ROWS as they are read: a footer stays small.
    assert questions.block_rows(cfg) == 16 and rundir.row_group_rows(p) == [50]
    back = rundir.read_row_groups(p, [0])
    assert list(back["id"]) == list(rundir.read_parquet(p)["id"])
    assert "options" in rundir.parquet_columns(p)


def test_an_unparseable_data_file_names_the_file(tmp_path):
    # The questions stage's work (run as a Ray task by `raycat score`; tests/test_cli.py checks that
    # its errors reach the user as one line).
    bad = tmp_path / "corpus.jsonl"
    bad.write_text('{"question": "q", "options": ["a", "b"], "answer": "A"}\n{"question": \n')
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "data": {"source": "generic", "path": str(bad), "columns": {"question": "question"}},
        "score": {"student": {"path": "unused"}},
    }
    with pytest.raises(RaycatError, match=r"row corpus.jsonl line 2, field .\(line\).: not valid JSON"):
        questions.build(validate_config(cfg))
