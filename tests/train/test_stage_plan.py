"""Phase planning on the driver, without Ray or DeepSpeed: the phase hash that decides whether a finished
phase is reused."""

from __future__ import annotations

import pandas as pd

from raycat.config import validate_config


def _run_with_bands(tmp_path):
    from raycat.storage import rowkey

    split = tmp_path / "run" / "split"
    split.mkdir(parents=True)
    for band, start in (("easy", 0), ("medium", 3), ("hard", 6)):
        ids = [f"q{i}" for i in range(start, start + 3)]
        rows = pd.DataFrame(
            {"id": ids, "question": [f"What is {i}?" for i in ids], "options": [["a", "b"]] * 3, "gold": "A"}
        ).assign(category="c")
        rowkey.add(rows).to_parquet(split / f"{band}.parquet")
    return tmp_path / "run"


def test_the_phase_hash_holds_only_what_changes_the_trained_weights(tmp_path, tiny_model_dir, tiny_tokenizer):
    from raycat.train.stage import plan_phases

    run = _run_with_bands(tmp_path)

    def hashes(**overrides):
        tree = {
            "run_dir": str(run),
            "data": {"source": "synthetic"},
            "score": {"student": {"path": str(tiny_model_dir), **overrides.pop("student", {})}},
            "train": {"recipe": "sft_all", "method": "lora", **overrides},
        }
        plans, _ = plan_phases(validate_config(tree), tiny_tokenizer, str(tiny_model_dir))
        return [plan.hash for plan in plans]

    base = hashes()
    # A merge is its own step after training (train.lora.merge; a study's rescore_after sets it).
    assert hashes(lora={"merge": True}) == base
    # The scoring engine's settings do not change the trained weights.
    assert hashes(student={"max_model_len": 4096, "dtype": "float32"}) == base
    # How gradients travel between workers does not either (train.deepspeed's communication knobs).
    assert hashes(deepspeed={"overlap_comm": True, "reduce_scatter": False, "reduce_bucket_size": 10**6}) == base
    # What does change them still does.
    assert hashes(lora={"r": 4}) != base
    assert hashes(seed=7) != base
    assert hashes(student={"revision": "abc"}) != base


def test_eval_does_not_see_the_communication_knobs_as_other_training_settings(tiny_model_dir):
    from raycat.recipes import phase_settings

    def settings(**deepspeed):
        tree = {
            "run_dir": "run",
            "data": {"source": "synthetic"},
            "score": {"student": {"path": str(tiny_model_dir)}},
            "train": {"recipe": "sft_all", "deepspeed": deepspeed},
        }
        return phase_settings(validate_config(tree), "sft_all", "phase1")

    base = settings()
    assert settings(overlap_comm=True, reduce_scatter=False, allgather_bucket_size=10**6) == base
    assert settings(zero_stage=3) != base
