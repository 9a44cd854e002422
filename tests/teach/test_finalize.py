"""The streamed teach finalize (raycat/teach/results.py) against the whole-frame one it replaced
(tests/teach/reference_finalize.py): the same cot.parquet, skipped.parquet and metrics, on a cascade of
three teachers with retried failures, repeated parts, stale content, other runs' rows and pool rows
answered by earlier runs, with buckets and batches of a few rows so every boundary is crossed."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from raycat.config import validate_config
from raycat.engines.base import Sampling
from raycat.errors import RaycatError
from raycat.storage import rowkey, rundir
from raycat.teach import results
from raycat.teach import stage as teach
from tests.teach import reference_finalize

STATUSES = ["verified", "wrong", "truncated", "failed", "skipped", "hedged"]


def _plan(i: int) -> teach.TeachPlan:
    return teach.TeachPlan(
        name=f"org/teacher-{i}",
        model_path=f"/models/t{i}",
        revision=None,
        trust_remote_code=False,
        template_kwargs={},
        template_hash=f"tmpl{i}",
        cache_key=f"key{i}",
        schedule=(Sampling(0.0, 1.0, 64, 0),),
        max_prompt_tokens=512,
        gpus=0.0,
        backend="null",
        engine_kwargs={},
    )


def _questions(band: str, n: int, rng) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "id": [f"{band}-{i}" for i in range(n)],
            "question": [f"{band} question {i}" for i in range(n)],
            "options": [["1", "2", "3", "4"]] * n,
            "category": rng.choice(["math", "law"], n),
            "gold": rng.choice(list("ABCD"), n),
            "entropy": rng.random(n),
        }
    )
    return rowkey.add(frame)


def _answers(rows: pd.DataFrame, teacher: str, rng) -> pd.DataFrame:
    n = len(rows)
    status = rng.choice(STATUSES, n)
    return pd.DataFrame(
        {
            "id": rows["id"].to_numpy(),
            "row_hash": rows["row_hash"].to_numpy(),
            "teacher": teacher,
            "response": [f"{teacher} thinks [[{g}]]" for g in rng.choice(list("ABCD"), n)],
            "extracted": rng.choice(list("ABCD"), n),
            "status": status,
            "reason": np.where(status == "failed", "APIConnectionError: down", ""),
            "attempts": rng.integers(1, 4, n),
            "prompt_tokens": rng.integers(10, 100, n),
            "completion_tokens": rng.integers(0, 300, n),
            "engine_seconds": rng.random(n),
            "gpu_seconds": rng.random(n),
            "finish_reason": rng.choice(["stop", "length"], n),
        }
    )


def _run(tmp_path, seed: int, bands) -> tuple:
    rng = np.random.default_rng(seed)
    run = tmp_path / f"run{seed}"
    split = {band: _questions(band, n, rng) for band, n in (("easy", 23), ("medium", 41), ("hard", 37))}
    for band, frame in split.items():
        rundir.write_parquet(str(run / "split" / f"{band}.parquet"), frame)
    teachers = [{"model": {"path": _plan(i).name}} for i in range(3)]
    teachers[1]["price"] = {"prompt_per_mtok": 1.5, "completion_per_mtok": 6.0}
    tree = {
        "run_dir": str(run),
        "data": {"source": "synthetic"},
        "score": {"student": {"path": "unused"}},
        "teach": {"teachers": teachers, "bands": bands, "on_wrong": ["drop", "keep", "fallback_to_answer"][seed % 3]},
    }
    cfg = validate_config(tree)
    teach.prepare(cfg)
    taught = rundir.read_parquet(teach.rows_path(str(run)))
    pool = pd.concat(split.values(), ignore_index=True)
    plans = [_plan(i) for i in range(3)]
    for i, plan in enumerate(plans):
        directory = teach.parts_dir(cfg, plan)
        # Every taught row answered by the first teacher (else the run is unfinished); the later
        # teachers answer some, some of them twice (a failure, then an answer in a newer part).
        mine = taught if i == 0 else taught.sample(frac=0.6, random_state=seed + i)
        shuffled = mine.sample(frac=1.0, random_state=seed)
        for lo in range(0, len(shuffled), 6):
            rundir.write_part(_answers(shuffled.iloc[lo : lo + 6], plan.name, rng), directory)
        again = _answers(mine.head(9), plan.name, rng).assign(status="failed", reason="RateLimitError: 429")
        rundir.write_part(again, directory)
        # An earlier run's answers to pool rows not taught now, content that changed since, another corpus.
        rundir.write_part(_answers(pool.sample(20, random_state=seed + 10 * i), plan.name, rng), directory)
        stale = taught.head(5).assign(row_hash="old-content", id=lambda f: f["id"] + "-stale")
        rundir.write_part(_answers(stale, plan.name, rng), directory)
    return cfg, plans


def _close(a, b) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) or isinstance(b, float):
        return a == b or (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9))
    return a == b


@pytest.mark.parametrize("seed,bands", [(0, ["hard"]), (1, "all"), (2, ["medium", "hard"])])
def test_streamed_finalize_writes_what_the_whole_frame_one_wrote(tmp_path, monkeypatch, seed, bands):
    cfg, plans = _run(tmp_path, seed, bands)
    old_dir = str(tmp_path / f"old{seed}")
    want = reference_finalize.finalize(cfg, plans, old_dir)
    monkeypatch.setattr(results, "PART_BATCH_ROWS", 7)
    got = teach.finalize(cfg, plans)
    assert _close(got, want), (got, want)
    for name in ("cot.parquet", "skipped.parquet"):
        new = rundir.read_parquet(rundir.join(cfg.run_dir, "teach", name))
        old = rundir.read_parquet(rundir.join(old_dir, name))
        pd.testing.assert_frame_equal(new, old, check_dtype=False)
    assert got["accounting"]["per_teacher"]["org/teacher-1"]["cost"] > 0
    assert got["rows"] == len(rundir.read_parquet(teach.rows_path(cfg.run_dir)))


def test_a_row_without_any_teacher_result_stops_the_merge_and_publishes_nothing(tmp_path):
    cfg, plans = _run(tmp_path, 0, ["hard"])
    taught = rundir.read_parquet(teach.rows_path(cfg.run_dir))
    first = teach.parts_dir(cfg, plans[0])
    # The first teacher's answers to two rows lost; nobody else answered them.
    for f in rundir.list_files(first, ".parquet"):
        rundir.remove_file(f)
    others = [teach.parts_dir(cfg, p) for p in plans[1:]]
    answered = set()
    for directory in others:
        for f in rundir.list_files(directory, ".parquet"):
            answered |= set(rundir.read_parquet(f)["id"])
    lost = [i for i in taught["id"] if i not in answered]
    assert lost
    with pytest.raises(RaycatError, match=rf"{len(lost)} row\(s\) have no teacher result \(e.g. {lost[0]}\)"):
        teach.finalize(cfg, plans)
    assert not rundir.exists(rundir.join(cfg.run_dir, "teach", "cot.parquet"))


def test_nothing_to_teach_writes_empty_outputs_with_their_columns(tmp_path):
    cfg, plans = _run(tmp_path, 0, ["hard"])
    rundir.write_parquet(teach.rows_path(cfg.run_dir), rundir.read_parquet(teach.rows_path(cfg.run_dir)).head(0))
    for plan in plans:
        for f in rundir.list_files(teach.parts_dir(cfg, plan), ".parquet"):
            rundir.remove_file(f)
    got = teach.finalize(cfg, plans)
    assert got["rows"] == 0 and got["failure_ratio"] == 0.0
    cot = rundir.read_parquet(rundir.join(cfg.run_dir, "teach", "cot.parquet"))
    assert len(cot) == 0 and {"target", "final_status", "status", "response"} <= set(cot.columns)
