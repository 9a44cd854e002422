"""The streamed eval finalize (raycat/evaluate/tally.py) against the whole-frame one it replaced
(tests/evaluate/reference_finalize.py): the same metrics and eval.parquet, with three models, rows a
model could not be asked, rows without an answer, answers given twice, stale content and other
corpora's rows in the caches, read in batches of a few rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raycat.config import load_config
from raycat.evaluate import stage
from raycat.storage import rowkey, rundir
from tests.evaluate import reference_finalize
from tests.helpers import DEMO


def _plan(name: str) -> stage.EvalPlan:
    return stage.EvalPlan(name, "m", None, "answer", name, 8, 100, 0, "vllm", {})


def _answers(rows: pd.DataFrame, name: str, rng, skip: float) -> pd.DataFrame:
    n = len(rows)
    extracted = rng.choice(["A", "B", None], n)
    return rows[["id", "row_hash", "band", "category"]].assign(
        model=name,
        kind="answer",
        text=[f"answer {x}" for x in extracted],
        extracted=extracted,
        correct=[x == "A" for x in extracted],
        completion_tokens=rng.integers(1, 40, n),
        finish_reason="stop",
        skip_reason=np.where(rng.random(n) < skip, "prompt has 999 tokens > eval.max_model_len - max_tokens", ""),
    )


def _setup(tmp_path, seed: int, base: bool):
    rng = np.random.default_rng(seed)
    cfg = load_config(DEMO, [f"run_dir={tmp_path / 'run'}", f"eval.include_base={str(base).lower()}"])
    n = 60
    rows = rowkey.add(
        pd.DataFrame(
            {
                "id": [f"q{i}" for i in range(n)],
                "question": [f"question {i}" for i in range(n)],
                "options": [["a", "b", "c"]] * n,
                "gold": "A",
                "category": rng.choice(["law", "math", "bio"], n, p=[0.5, 0.3, 0.2]),
                "band": rng.choice(["easy", "medium", "hard"], n),
                "correct": rng.random(n) < 0.5,
                "predicted": rng.choice(["A", "B", None], n),
            }
        )
    )
    rundir.write_parquet(stage.rows_path(cfg.run_dir), rows)
    plans = [_plan("base"), _plan("sft_all/phase1"), _plan("complexity_aware/phase2")]
    for i, plan in enumerate(plans):
        directory = stage.parts_dir(cfg, plan)
        # Model 1 never answered a few rows (an interrupted run); the others answered every row.
        mine = rows.sample(frac=0.9 if i == 1 else 1.0, random_state=seed + i)
        for lo in range(0, len(mine), 9):
            rundir.write_part(_answers(mine.iloc[lo : lo + 9], plan.name, rng, skip=0.05 * i), directory)
        # The same rows answered again (a retried task: the first copy read counts), stale content, others.
        rundir.write_part(_answers(mine.head(7), plan.name, rng, skip=0.5), directory)
        stale = rows.head(4).assign(row_hash="old")
        rundir.write_part(_answers(stale, plan.name, rng, 0.0), directory)
        other = rows.head(3).assign(id=lambda f: f["id"] + "-other", row_hash="x")
        rundir.write_part(_answers(other, plan.name, rng, 0.0), directory)
    return cfg, plans


@pytest.mark.parametrize("seed,base", [(0, True), (1, False), (2, True)])
def test_streamed_eval_finalize_matches_the_whole_frame_one(tmp_path, monkeypatch, seed, base):
    cfg, plans = _setup(tmp_path, seed, base)
    out_dir = str(tmp_path / "old")
    want = reference_finalize.finalize(cfg, plans, out_dir)
    real = rundir.iter_parquet
    monkeypatch.setattr(rundir, "iter_parquet", lambda path, columns=None, batch_rows=5: real(path, columns, 5))
    monkeypatch.setattr(rundir, "read_parquet", lambda path: pytest.fail(f"read whole: {path}"))
    got = stage.finalize(cfg, plans)
    assert got == want
    assert got["excluded_rows"]["n"] > 0 and got["compared_rows"] > 0
    new = pd.read_parquet(rundir.join(cfg.run_dir, "eval", "eval.parquet"))
    old = pd.read_parquet(rundir.join(out_dir, "eval.parquet"))
    pd.testing.assert_frame_equal(new, old, check_dtype=False)


def test_a_row_counts_in_the_current_splits_band_not_the_band_its_cached_answer_was_given_in(tmp_path):
    """An answer cached by a run whose split put the row in another band (same content, other
    thresholds) is tallied in the row's band now."""
    cfg, plans = _setup(tmp_path, 0, False)
    rows = rundir.read_parquet(stage.rows_path(cfg.run_dir))
    moved = rows.assign(band="hard")
    rundir.write_parquet(stage.rows_path(cfg.run_dir), moved)
    got = stage.finalize(cfg, plans)
    for model in got["models"].values():
        assert model["per_band"]["hard"]["n"] == got["compared_rows"] and model["per_band"]["easy"]["n"] == 0
