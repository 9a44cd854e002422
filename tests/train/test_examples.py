"""Training examples prepared in batches (raycat.train.examples): the same examples.parquet, counts,
skipped rows and phase hashes as the whole-frame preparation it replaced (tests/train/reference_prep.py),
for every recipe and worker count, with many batches and buckets; and never a whole file read."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from transformers import AutoTokenizer

from raycat.config import load_config
from raycat.recipes import BANDS, RECIPES, phase_sources
from raycat.storage import rundir
from raycat.train import examples, stage
from tests.helpers import DEMO, question_rows
from tests.train import reference_prep


def write_run(run, n=60, seed=0):
    """Band files (with row_hash) and a teach/cot.parquet covering some rows, one of them twice (the
    first copy counts), one under another row_hash (not this row's), one of an unknown row, and CoTs of
    very different lengths (some over phase2's max_length)."""
    rng = np.random.default_rng(seed)
    rows = question_rows(n, rng, ["math", ""])
    band = rng.choice(BANDS, n, p=[0.3, 0.4, 0.3])
    for name in BANDS:
        rundir.write_parquet(str(run / "split" / f"{name}.parquet"), rows[band == name].assign(band=name))
    taught = rows[rng.random(n) < 0.7]
    cot = taught[["id", "row_hash"]].assign(
        target=[f"{'step ' * int(rng.integers(1, 120))}so the answer is [[{g}]]" for g in taught["gold"]]
    )
    extra = pd.DataFrame(
        {
            "id": [cot["id"].iloc[0], cot["id"].iloc[1], "q-unknown"],
            "row_hash": [cot["row_hash"].iloc[0], "0" * 16, "1" * 16],
            "target": ["a later copy [[A]]", "another question's CoT [[B]]", "no such row [[C]]"],
        }
    )
    rundir.write_parquet(str(run / "teach" / "cot.parquet"), pd.concat([cot, extra], ignore_index=True))


def config(run, recipe, workers):
    overrides = {"train.recipe": recipe, "train.num_workers": workers, "train.phase2.max_length": 120}
    return load_config(DEMO, [f"run_dir={run}", *(f"{k}={json.dumps(v)}" for k, v in overrides.items())])


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_batches_reproduce_the_whole_frame_preparation(
    tmp_path, monkeypatch, tokenizer, tiny_model_dir, recipe, workers
):
    old, new = tmp_path / "old", tmp_path / "new"
    write_run(old)
    shutil.copytree(old, new)
    expected, expected_skipped = reference_prep.plan_phases(
        config(old, recipe, workers), tokenizer, str(tiny_model_dir)
    )
    # Many batches and buckets, as at corpus size.
    monkeypatch.setattr(examples, "BATCH_ROWS", 7)
    monkeypatch.setattr(examples, "BUCKET_ROWS", 11)
    monkeypatch.setattr(examples, "SPOOL_ROWS", 10)
    plans, skipped = stage.plan_phases(config(new, recipe, workers), tokenizer, str(tiny_model_dir))
    assert [(p.phase, p.stats, p.hash) for p in plans] == [(p.phase, p.stats, p.hash) for p in expected]
    for plan in expected:
        path = stage.examples_path(config(new, recipe, workers), plan.phase.name)
        if not plan.stats["examples"]:
            continue
        a, b = pd.read_parquet(plan.examples), pd.read_parquet(path)
        assert len(a) == len(b) == plan.stats["examples"] + plan.stats["repeated"]
        for column in ("input_ids", "labels"):
            assert [list(x) for x in a[column]] == [list(x) for x in b[column]]
    counts = expected_skipped.groupby(["phase", "skip_reason"]).size().reset_index(name="n").to_dict("records")
    assert skipped == [{**c, "n": int(c["n"])} for c in counts]
    written = pd.read_parquet(new / "train" / recipe / "skipped.parquet")
    key = ["phase", "id", "skip_reason"]
    pd.testing.assert_frame_equal(
        written.sort_values(key, ignore_index=True),
        expected_skipped[written.columns].sort_values(key, ignore_index=True),
        check_dtype=False,
    )
    if recipe in ("complexity_aware", "distill_all"):
        assert any(s["skip_reason"].startswith("no teacher CoT") for s in skipped)
        assert any(s["skip_reason"].startswith("over max_length") for s in skipped)


def test_a_trained_phase_gets_no_examples_file(tmp_path, tokenizer, tiny_model_dir):
    write_run(tmp_path)
    cfg = config(tmp_path, "complexity_aware", 1)
    plans, _ = stage.plan_phases(cfg, tokenizer, str(tiny_model_dir))
    assert (tmp_path / "train/complexity_aware/phase1/examples.parquet").is_file()
    for plan in plans:
        rundir.write_json(str(tmp_path / "train/complexity_aware" / plan.phase.name / "done.json"), {"hash": plan.hash})
        (tmp_path / "train/complexity_aware" / plan.phase.name / "examples.parquet").unlink(missing_ok=True)
    again, _ = stage.plan_phases(cfg, tokenizer, str(tiny_model_dir))
    assert [p.hash for p in again] == [p.hash for p in plans]
    assert not list((tmp_path / "train").rglob("examples.parquet"))


def test_preparation_never_reads_a_whole_file(tmp_path, monkeypatch, tokenizer, tiny_model_dir):
    write_run(tmp_path)
    monkeypatch.setattr(rundir, "read_parquet", lambda path: pytest.fail(f"read whole: {path}"))
    monkeypatch.setattr(rundir, "read_parquet_columns", lambda path, c: pytest.fail(f"read whole: {path}"))
    plans, _ = stage.plan_phases(config(tmp_path, "distill_all", 2), tokenizer, str(tiny_model_dir))
    assert plans[0].stats["examples"] > 0


def test_random_split_draws_disjoint_seeded_rows_of_the_band_sizes():
    sizes = {"easy": 3, "medium": 6, "hard": 3}
    (p1, bands1, keep1), (p2, bands2, keep2) = phase_sources("random_split", sizes, seed=1)
    assert bands1 == bands2 == BANDS and len(keep1) == 9 and len(keep2) == 3
    assert sorted([*keep1, *keep2]) == list(range(12)) and list(keep2) != [9, 10, 11]
    assert [list(k) for _, _, k in phase_sources("random_split", sizes, seed=1)] == [list(keep1), list(keep2)]
    assert [(p.name, b, k) for p, b, k in phase_sources("curriculum", sizes, 0)] == [
        ("phase1", ("easy",), None),
        ("phase2", ("medium",), None),
        ("phase3", ("hard",), None),
    ]


def test_streamed_hashes_equal_hashing_the_whole_list():
    import hashlib

    whole = [[1, 2], [3], [], [4, 5, 6]]
    expected = hashlib.sha256(json.dumps(whole).encode()).hexdigest()[:16]
    streamed = examples.JsonList()
    for items in (whole[:1], [], whole[1:3], whole[3:]):
        streamed.add(items)
    assert streamed.close().hexdigest()[:16] == expected
    fields = {"b": 1, "z": [1, "x"], "a": {"k": None}}
    ids = ["q1", 'q"2', "é"]
    expected = hashlib.sha256(json.dumps({**fields, "rows": ids}, sort_keys=True).encode()).hexdigest()[:16]
    assert examples.dict_hash(fields, "rows", iter([ids[:2], ids[2:]])) == expected
