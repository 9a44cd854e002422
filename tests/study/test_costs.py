"""The cost plan: tokens from a reference run's measured rows, device-hours from bench records (measured
or extrapolated by FLOPs per token), memory per worker from the model config alone."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from raycat.config import validate_config
from raycat.study import costs
from tests.helpers import ROOT


def _rec(kind: str, params: float, rate: float, device: str = "cpu", **extra) -> dict:
    return {
        "bench": "bench/x.py",
        "kind": kind,
        "model": f"m{params:g}",
        "params": int(params),
        "device": device,
        "device_name": "test cpu",
        "devices": 2.0,
        "tokens": int(rate * 2 * 10),
        "seconds": 10.0,
        "tokens_per_s_per_device": rate,
        "measured_at": "2026-11-30",
        **extra,
    }


def test_rate_is_measured_for_the_benched_size_and_extrapolated_by_flops_otherwise():
    recs = [_rec("prefill", 1e9, 1000.0), _rec("prefill", 8e9, 200.0), _rec("decode", 1e9, 50.0)]
    r, basis = costs.rate(recs, "prefill", "cpu", int(1e9))
    assert r == 1000.0 and basis.startswith("measured: m1e+09")
    # 70B is nearest (in log size) to the 8B record: 200 tok/s x 8/70.
    r, basis = costs.rate(recs, "prefill", "cpu", int(70e9))
    assert r == pytest.approx(200.0 * 8 / 70) and basis.startswith("extrapolated by FLOPs per token from m8e+09")
    r, basis = costs.rate(recs, "prefill", "gpu", int(1e9))
    assert r is None and "no gpu prefill throughput measured" in basis
    # Training: a full-FT record scaled to LoRA without checkpointing (6N -> 4N per token) is not a
    # measurement of that work, even at the same size; LoRA with checkpointing costs what full FT does.
    t = [_rec("train", 1e9, 100.0, method="full")]
    r, basis = costs.rate(t, "train", "cpu", int(1e9), method="lora", ckpt=False)
    assert r == pytest.approx(100.0 * 6 / 4) and basis.startswith("extrapolated")
    r, basis = costs.rate(t, "train", "cpu", int(1e9), method="full", ckpt=True)
    assert r == pytest.approx(100.0 * 6 / 8) and basis.startswith("extrapolated")
    assert costs.rate(t, "train", "cpu", int(1e9), method="full")[1].startswith("measured")
    assert costs.flops_per_token("train", 10, "lora", True) == costs.flops_per_token("train", 10, "full", False)


def test_append_records_replaces_the_same_measurement_and_keeps_others(tmp_path):
    path = str(tmp_path / "r.json")
    costs.append_records(path, [_rec("prefill", 1e9, 1.0), _rec("decode", 1e9, 2.0)])
    costs.append_records(path, [_rec("prefill", 1e9, 3.0)])
    recs = json.loads((tmp_path / "r.json").read_text())
    assert sorted((r["kind"], r["tokens_per_s_per_device"]) for r in recs) == [("decode", 2.0), ("prefill", 3.0)]


def _reference_run(root) -> str:
    """A finished run's outputs with known token counts."""
    (root / "score").mkdir(parents=True)
    pd.DataFrame(
        {"status": ["scored", "scored", "scored", "skipped"], "prompt_tokens": [100, 200, 300, 5000]}
    ).to_parquet(root / "score" / "scores.parquet")
    (root / "teach").mkdir()
    acc = {"rows_taught": 4, "prompt_tokens": 800, "completion_tokens": 2000}
    (root / "teach" / "metrics.json").write_text(json.dumps({"accounting": acc}))
    for phase, examples, tokens in (("phase1", 10, 500), ("phase2", 4, 1200)):
        d = root / "train" / "complexity_aware" / phase
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"examples": examples, "tokens": tokens}))
    (root / "eval").mkdir()
    pd.DataFrame({"kind": ["answer", "answer", "cot"], "completion_tokens": [2, 4, 300]}).to_parquet(
        root / "eval" / "eval.parquet"
    )
    return str(root)


def test_reference_figures_are_the_measured_means_of_finished_rows(tmp_path):
    ref = costs.reference_figures(_reference_run(tmp_path / "ref"))
    assert ref["score"] == {"rows": 3, "prompt_tokens": 200.0}  # the skipped row is not a scored prompt
    assert ref["teach"] == {"rows": 4, "prompt_tokens": 200.0, "completion_tokens": 500.0, "verified_share": None}
    assert ref["train"] == {
        "complexity_aware/phase1": {"rows": 10, "tokens": 50.0},
        "complexity_aware/phase2": {"rows": 4, "tokens": 300.0},
    }
    assert ref["eval"]["answer"] == {"rows": 2, "completion_tokens": 3.0}


def test_costs_multiply_config_rows_by_measured_tokens_and_divide_by_measured_rates(tmp_path, tiny_model_dir):
    ref = costs.reference_figures(_reference_run(tmp_path / "ref"))
    cfg = validate_config(
        {
            "run_dir": str(tmp_path / "run"),
            "data": {"source": "synthetic", "sample": 1000},
            "score": {"student": {"path": str(tiny_model_dir)}, "engine": {"cpus_per_engine": 2}},
            "split": {"quantiles": [0.25, 0.75], "test_fraction": 0.2},
            "teach": {"teachers": [{"model": {"path": str(tiny_model_dir)}}]},
            "train": {"method": "full", "phase1": {"epochs": 2}, "phase2": {"epochs": 3}},
        }
    )
    params = costs.model_params(str(tiny_model_dir), False)["params"]
    recs = [_rec("prefill", params, 400.0), _rec("train", params, 50.0, method="full")]
    c = costs.costs(cfg, ["complexity_aware"], ref, None, recs)
    assert c["questions"]["value"] == 1000
    score = c["stages"]["score"]
    assert score["tokens"]["value"] == pytest.approx(1000 * 200.0)
    assert score["device_hours"]["value"] == pytest.approx(1000 * 200.0 / 400.0 / 3600)
    assert score["device_hours"]["basis"].startswith("measured")
    assert score["wall_hours"]["value"] == pytest.approx(score["device_hours"]["value"] / 2)
    # 800 pool rows: 200 hard taught x 500 completion tokens; no decode record -> no hours, and why.
    teach = c["stages"]["teach"]
    assert teach["tokens"]["value"] == pytest.approx(200 * 500.0)
    assert teach["device_hours"]["value"] is None and "no cpu decode throughput" in teach["device_hours"]["basis"]
    # phase1: 600 easy+medium x 2 epochs x 50 tokens; phase2: 200 hard x 3 epochs x 300 tokens.
    train = c["stages"]["train"]
    assert train["tokens"]["value"] == pytest.approx(600 * 2 * 50.0 + 200 * 3 * 300.0)
    assert train["device_hours"]["value"] == pytest.approx(train["tokens"]["value"] / 50.0 / 3600)
    # eval: 200 test rows x 3 models (base + 2 phases) x the mean generated tokens (2 + 4 + 300) / 3.
    assert c["stages"]["eval"]["tokens"]["value"] == pytest.approx(200 * 3 * 102.0)
    # ...and its prompts at the prefill rate: 200 x 3 x 200 prompt tokens / 400 tok/s.
    prompts = c["stages"]["eval_prompts"]
    assert prompts["tokens"]["value"] == pytest.approx(200 * 3 * 200.0)
    assert prompts["device_hours"]["value"] == pytest.approx(200 * 3 * 200.0 / 400.0 / 3600)
    assert c["device_hours_total"]["value"] is None  # teach and eval have no measured rate


def test_no_reference_means_unknown_tokens_not_a_guess(tmp_path, tiny_model_dir):
    cfg = validate_config(
        {"run_dir": str(tmp_path), "data": {"source": "synthetic"}, "score": {"student": {"path": str(tiny_model_dir)}}}
    )
    c = costs.costs(cfg, ["sft_all"], {"run_dir": None}, None, [])
    assert c["questions"]["value"] is None and "unknown" in c["questions"]["basis"]
    assert all(s["tokens"]["value"] is None for s in c["stages"].values())


def test_memory_per_worker_for_a_70b_lora_student_from_its_config_alone(tmp_path, llama70b_dir):
    model = str(llama70b_dir)
    tree = {
        "run_dir": str(tmp_path / "run"),
        "data": {"source": "synthetic"},
        "score": {"student": {"path": model}},
        "train": {
            "method": "lora",
            "device": "gpu",
            "precision": "bf16",
            "num_workers": 16,
            "deepspeed": {"zero_stage": 3},
            "gradient_checkpointing": True,
            "worker_memory_gib": 80,
            "lora": {"r": 64, "alpha": 128, "target_modules": ["q_proj", "v_proj"]},
            "phase1": {"micro_batch_size": 1, "max_length": 1024},
            "phase2": {"micro_batch_size": 1, "max_length": 4096},
        },
    }
    m = costs.memory(validate_config(tree), ["complexity_aware"])
    assert m["params"] == pytest.approx(70.55e9, rel=0.01)
    assert m["trainable_params"] < 0.01 * m["params"]
    # bf16 weights sharded 16 ways: ~8.2 GiB of the per-worker figure; fits in 80 GB.
    assert 8 < m["phases"]["phase1"]["device_gib_per_worker"] < 80 and m["phases"]["phase1"]["fits"]
    tree["train"]["num_workers"] = 1  # the whole 141 GB of weights on one 80 GB GPU: refused, with the numbers
    one = costs.memory(validate_config(tree), ["complexity_aware"])["phases"]["phase1"]
    assert one["fits"] is False and one["device_gib_per_worker"] > 130 and "GiB" in one["problem"]
    # Optimizer offload on GPU workers: their host RAM is the cluster's, not this machine's (review m18).
    tree["train"].update(num_workers=16, deepspeed={"zero_stage": 3, "offload_optimizer": True})
    offload = costs.memory(validate_config(tree), ["complexity_aware"])["phases"]["phase1"]
    assert (
        offload["host_gib_per_worker"] > 0
        and offload["fits"] is None
        and "host_memory_per_worker_gib" in offload["problem"]
    )
    tree["train"]["host_memory_per_worker_gib"] = 1e-3
    assert costs.memory(validate_config(tree), ["complexity_aware"])["phases"]["phase1"]["fits"] is False
    tree["train"]["host_memory_per_worker_gib"] = 200
    assert costs.memory(validate_config(tree), ["complexity_aware"])["phases"]["phase1"]["fits"] is True


def test_the_shipped_70b_config_plans_16_gpus_per_stage_and_extrapolates_a_benched_8b_rate(tmp_path, llama70b_dir):
    import yaml

    tree = yaml.safe_load((ROOT / "jobs/configs/llama-3.1-70b-mmlu-pro-lora.yaml").read_text())
    tree["run_dir"] = str(tmp_path / "run")
    tree["data"]["limit"] = 1000
    tree["score"]["student"]["path"] = str(llama70b_dir)  # its config.json only
    cfg = validate_config(tree)
    ref = costs.reference_figures(_reference_run(tmp_path / "ref"))
    gpu = [_rec("prefill", 8.03e9, 5000.0, device="gpu"), _rec("train", 8.03e9, 900.0, device="gpu", method="lora")]
    c = costs.costs(cfg, ["complexity_aware"], ref, None, gpu)
    score, train = c["stages"]["score"], c["stages"]["train"]
    assert (score["device"], score["devices"]) == ("gpu", 16)  # 4 engines x tensor parallel 4
    assert (train["device"], train["devices"]) == ("gpu", 16)  # 16 workers
    assert score["device_hours"]["basis"].startswith("extrapolated by FLOPs per token from m8.03e+09")
    assert score["tokens_per_s_per_device"] == pytest.approx(5000.0 * 8.03e9 / score["params"])
    # LoRA with gradient checkpointing (the config's) against a LoRA record without: 4N vs 6N per token.
    assert train["tokens_per_s_per_device"] == pytest.approx(900.0 * 8.03e9 * 4 / (score["params"] * 6))
    assert c["stages"]["eval"]["device_hours"]["value"] is None  # no GPU decode record: says so
    m = costs.memory(cfg, ["complexity_aware"])
    assert all(p["fits"] for p in m["phases"].values())


def test_a_missing_or_incomplete_throughput_file_is_a_config_error_naming_it(tmp_path):
    from raycat.config import ConfigError

    with pytest.raises(ConfigError, match="nope.json not found"):
        costs.load_records([str(tmp_path / "nope.json")])
    (tmp_path / "bad.json").write_text(json.dumps([{"kind": "prefill"}]))
    with pytest.raises(ConfigError, match="bad.json record 0 lacks"):
        costs.load_records([str(tmp_path / "bad.json")])


def test_an_unmeasured_phase_borrows_tokens_only_from_a_phase_with_the_same_target(tmp_path):
    from raycat.recipes import RECIPES

    ref = costs.reference_figures(_reference_run(tmp_path / "ref"))  # complexity_aware phase1/phase2
    curriculum_phase2 = RECIPES["curriculum"][1]  # an answer target; complexity_aware/phase2 is CoT
    per, how = costs._tokens_per_example(ref, "curriculum", curriculum_phase2)
    assert per == 200.0 and how.startswith("estimated: measured prompt tokens")
    per, how = costs._tokens_per_example(ref, "sft_all", RECIPES["sft_all"][0])  # phase1, answer
    assert per == 50.0 and "another recipe's phase1" in how
