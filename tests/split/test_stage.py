"""The split stage over run-dir files: the same files as the in-memory split it replaced
(``tests/split/reference.py``), streamed in batches, and its refusals."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from raycat.errors import MissingInputError, RaycatError
from raycat.split import stage
from raycat.storage import rowkey, rundir
from tests.helpers import DEMO
from tests.split import reference


def write_run(run, n=400, seed=0, greedy=True):
    """questions.parquet, scores.parquet (shuffled, not in questions order) and score/skipped.parquet,
    with ties, duplicate questions, idk answers, categories (some none) and set-aside rows."""
    rng = np.random.default_rng(seed)
    questions = rowkey.add(
        pd.DataFrame(
            {
                "id": [f"q{i}" for i in rng.permutation(n * 2)[:n]],
                "question": [f"dup {i % 15}" if i % 9 == 0 else f"question {i}" for i in range(n)],
                "options": [list(rng.permutation(["a", "b", "c", "d"])) for _ in range(n)],
                "gold": rng.choice(list("ABCD"), n),
                "category": rng.choice(["law", "math", None], n),
            }
        )
    )
    rundir.write_parquet(str(run / "questions" / "questions.parquet"), questions)
    aside = rng.random(n) < 0.05
    scores = questions[~aside][["id", "row_hash"]].copy()
    m = len(scores)
    scores["entropy"] = rng.choice([0.0, 0.0, 0.3, 0.7, 1.1], m) + (rng.random(m) < 0.5) * rng.random(m)
    scores["predicted"] = rng.choice(list("ABCD"), m)
    scores["correct"] = rng.random(m) < 0.5
    scores["idk"] = rng.random(m) < 0.05
    scores["option_mass"] = rng.random(m)
    scores["template_hash"] = "t1"
    scores["entropy_mode"] = "options"
    if greedy:
        scores["predicted_greedy"], scores["correct_greedy"] = scores["predicted"], scores["correct"]
    rundir.write_parquet(str(run / "score" / "scores.parquet"), scores.sample(frac=1, random_state=seed))
    skipped = questions[aside].assign(skip_reason="bad options")
    rundir.write_parquet(str(run / "score" / "skipped.parquet"), skipped)


def config(run, **split):
    from raycat.config import load_config

    return load_config(DEMO, [f"run_dir={run}", *(f"split.{k}={json.dumps(v)}" for k, v in split.items())])


def read(path):
    return pd.read_parquet(path) if path.exists() else None


SETTINGS = [
    {"test_fraction": 0.2},
    {"test_fraction": 0.0},
    {"test_fraction": 0.3, "test_balance": True, "seed": 3},
    {"test_fraction": 0.1, "per_category": True, "balance_per_band": 40},
    {"test_fraction": 0.2, "thresholds": [0.3, 0.9]},
]


@pytest.mark.parametrize("settings", SETTINGS, ids=[json.dumps(s) for s in SETTINGS])
def test_streamed_split_writes_what_the_in_memory_split_wrote(tmp_path, monkeypatch, settings):
    old, new = tmp_path / "old", tmp_path / "new"
    write_run(old, greedy="thresholds" not in settings)
    shutil.copytree(old, new)
    expected = reference.split_files(config(old, **settings))
    # Small batches and buckets: many of each, as at corpus size.
    monkeypatch.setattr(stage, "ROW_GROUP", 37)
    monkeypatch.setattr(stage, "BUCKET_ROWS", 50)
    assert stage.split_files(config(new, **settings)) == expected
    for name in ("easy", "medium", "hard", "test"):
        a, b = read(old / "split" / f"{name}.parquet"), read(new / "split" / f"{name}.parquet")
        if a is None:
            assert b is None
            continue
        pd.testing.assert_frame_equal(a, b)
        assert len(a) > 0 or name != "test"
    # skipped.parquet: the same rows and reasons, now in questions order.
    a, b = read(old / "split/skipped.parquet"), read(new / "split/skipped.parquet")
    order = list(pd.read_parquet(new / "questions/questions.parquet")["id"])
    assert list(b["id"]) == [i for i in order if i in set(b["id"])]
    pd.testing.assert_frame_equal(a.sort_values("id", ignore_index=True), b.sort_values("id", ignore_index=True))


def test_split_never_reads_a_whole_file(tmp_path, monkeypatch):
    write_run(tmp_path, n=300)
    monkeypatch.setattr(rundir, "read_parquet", lambda path: pytest.fail(f"read whole: {path}"))
    monkeypatch.setattr(rundir, "read_parquet_columns", lambda path, c: pytest.fail(f"read whole: {path}"))
    info = stage.split_files(config(tmp_path))
    assert info["pool_rows"] + info["test_rows"] + sum(info["skipped"].values()) == len(
        pd.read_parquet(tmp_path / "score/scores.parquet")
    )


def test_a_test_set_no_longer_drawn_is_removed(tmp_path):
    write_run(tmp_path)
    stage.split_files(config(tmp_path, test_fraction=0.2))
    assert (tmp_path / "split/test.parquet").exists()
    stage.split_files(config(tmp_path, test_fraction=0.0))
    assert not (tmp_path / "split/test.parquet").exists()


def test_a_question_without_a_score_for_its_content_is_refused(tmp_path):
    write_run(tmp_path)
    questions = pd.read_parquet(tmp_path / "questions/questions.parquet")
    questions.loc[3, "question"] = "edited since it was scored"
    rundir.write_parquet(str(tmp_path / "questions/questions.parquet"), rowkey.add(questions.drop(columns="row_hash")))
    with pytest.raises(MissingInputError, match="1 question.*no score for their current content"):
        stage.split_files(config(tmp_path))


def test_a_scored_row_without_entropy_is_refused_by_id(tmp_path):
    write_run(tmp_path)
    scores = pd.read_parquet(tmp_path / "score/scores.parquet")
    row = scores.index[~scores["idk"]][0]
    scores.loc[row, "entropy"] = np.nan
    rundir.write_parquet(str(tmp_path / "score/scores.parquet"), scores)
    with pytest.raises(RaycatError, match=f"1 scored row.*{scores.loc[row, 'id']}"):
        stage.split_files(config(tmp_path))


def test_a_run_whose_every_question_was_set_aside(tmp_path):
    write_run(tmp_path, n=30)
    questions = pd.read_parquet(tmp_path / "questions/questions.parquet")
    scores = pd.read_parquet(tmp_path / "score/scores.parquet")
    rundir.write_parquet(str(tmp_path / "score/scores.parquet"), scores.iloc[:0])
    rundir.write_parquet(str(tmp_path / "score/skipped.parquet"), questions.assign(skip_reason="bad options"))
    info = stage.split_files(config(tmp_path, thresholds=[0.3, 0.9]))
    assert info["counts"] == {"easy": 0, "medium": 0, "hard": 0}
    assert len(pd.read_parquet(tmp_path / "split/hard.parquet")) == 0
    with pytest.raises(RaycatError, match="no scored row left to take quantiles of"):
        stage.split_files(config(tmp_path))
