"""Pre-flight memory estimate: the 70B configs, a config that cannot fit, and the DeepSpeed config."""

from __future__ import annotations

import pytest

from raycat.config import ConfigError, load_config
from raycat.errors import RaycatError
from raycat.recipes import RECIPES
from raycat.train.loop import deepspeed_config, scheduler_factory
from raycat.train.memory import describe, estimate, preflight
from tests.helpers import ROOT


def _cfg(name: str, *overrides: str):
    return load_config(ROOT / "jobs" / "configs" / name, list(overrides))


def test_70b_lora_zero3_fits_and_reports_its_numbers(llama70b_dir):
    cfg = _cfg("llama-3.1-70b-mmlu-pro-lora.yaml")
    pre = preflight(cfg, str(llama70b_dir), list(RECIPES[cfg.train.recipe]))
    assert 70.0e9 < pre["params"] < 71.0e9  # Llama-3.1-70B: 70.6B
    # r=64 on all 7 projections of 80 layers: 0.83B.
    assert 0.5e9 < pre["trainable_params"] < 1.0e9
    p2 = pre["phases"]["phase2"]
    assert p2["device_breakdown_gib"]["weights"] == pytest.approx(pre["params"] * 2 / 16 / 1024**3, rel=1e-3)
    assert p2["device_gib_per_worker"] < 80


def test_70b_full_fits_only_with_offload(llama70b_dir):
    cfg = _cfg("llama-3.1-70b-mmlu-pro-full.yaml")
    pre = preflight(cfg, str(llama70b_dir), list(RECIPES[cfg.train.recipe]))
    p2 = pre["phases"]["phase2"]
    assert p2["device_gib_per_worker"] < 80 and 40 < p2["host_gib_per_worker"] < 240
    no_offload = _cfg(
        "llama-3.1-70b-mmlu-pro-full.yaml",
        "train.deepspeed.offload_optimizer=false",
        "train.deepspeed.offload_param=false",
    )
    with pytest.raises(
        RaycatError,
        match=r"train pre-flight, phase2: needs ~\d+\.\d GiB of accelerator memory per "
        r"worker \(weights .*optimizer.*\) but a worker has 72\.0 GiB usable",
    ):
        preflight(no_offload, str(llama70b_dir), list(RECIPES["complexity_aware"]))


def test_estimate_follows_zero_stage_sharding():
    kw = dict(
        total_params=1_000_000_000,
        trainable_params=1_000_000_000,
        world=8,
        offload_optimizer=False,
        offload_param=False,
        bf16=True,
        micro_batch_size=1,
        max_length=16,
        hidden_size=16,
        num_layers=1,
        vocab_size=16,
        gradient_checkpointing=True,
    )
    gib = 1024**3
    z0, z2, z3 = (estimate(zero_stage=s, **kw)["device_breakdown_gib"] for s in (0, 2, 3))
    assert z0["weights"] == z2["weights"] == pytest.approx(2e9 / gib, rel=1e-3)
    assert z3["weights"] == pytest.approx(2e9 / 8 / gib, rel=1e-3)
    assert z0["optimizer"] == pytest.approx(12e9 / gib, rel=1e-3)
    assert z2["optimizer"] == pytest.approx(12e9 / 8 / gib, rel=1e-3)
    assert z0["gradients"] == pytest.approx(2e9 / gib, rel=1e-3)
    assert z2["gradients"] == pytest.approx(2e9 / 8 / gib, rel=1e-3)


def test_deepspeed_config_uses_ds_optimizer_only_with_offload():
    kw = dict(
        bf16=False, micro_batch_size=4, accumulation=2, world=2, clipping=1.0, lr=1e-4, weight_decay=0.0, gpu=False
    )
    plain = deepspeed_config(zero_stage=2, offload_optimizer=False, offload_param=False, **kw)
    assert plain["train_batch_size"] == 16 and "optimizer" not in plain and plain["gradient_clipping"] == 1.0
    off = deepspeed_config(zero_stage=3, offload_optimizer=True, offload_param=True, **kw)
    assert off["optimizer"]["type"] == "AdamW" and off["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert off["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_the_set_communication_knobs_reach_zero_optimization_and_the_rest_stay_deepspeeds():
    from raycat.config import DeepSpeedSettings

    settings = DeepSpeedSettings(zero_stage=2, reduce_scatter=False, reduce_bucket_size=10**7)
    assert settings.comm == {"reduce_scatter": False, "reduce_bucket_size": 10**7}
    kw = dict(
        bf16=False, micro_batch_size=4, accumulation=1, world=2, clipping=0.0, lr=1e-4, weight_decay=0.0, gpu=False
    )
    zero = deepspeed_config(zero_stage=2, offload_optimizer=False, offload_param=False, comm=settings.comm, **kw)
    assert zero["zero_optimization"] == {"stage": 2, "reduce_scatter": False, "reduce_bucket_size": 10**7}
    assert DeepSpeedSettings().comm == {}
    with pytest.raises(ValueError, match="reduce_bucket_size"):
        DeepSpeedSettings(reduce_bucket_size=0)


def _lrs(kind: str, total: int, warmup: int) -> list[float]:
    """The learning rate each optimizer step 0..total runs with (peak 1.0), as DeepSpeed steps the schedule."""
    import torch

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = scheduler_factory(kind, total, warmup)(opt)
    out = []
    for _ in range(total + 1):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_lr_schedules_warm_up_then_hold_or_decay():
    assert _lrs("constant", 10, 0) == [1.0] * 11
    assert _lrs("constant", 10, 4)[:6] == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0, 1.0])  # linear ramp
    assert _lrs("constant", 10, 4)[6:] == [1.0] * 5
    lin = _lrs("linear", 10, 0)
    assert lin[0] == 1.0 and lin[5] == pytest.approx(0.5) and lin[10] == 0.0  # decays to 0 at total_steps
    assert lin == sorted(lin, reverse=True)
    warm = _lrs("linear", 10, 2)
    assert warm[:3] == pytest.approx([0.0, 0.5, 1.0]) and warm[6] == pytest.approx(0.5) and warm[10] == 0.0
    cos = _lrs("cosine", 10, 0)
    assert cos[0] == 1.0 and cos[5] == pytest.approx(0.5) and cos[10] == pytest.approx(0.0)  # half at mid
    assert cos[2] > lin[2] and cos[8] < lin[8]  # the cosine shape: slow start and end


def test_phase_lookup_names_the_known_phases():
    cfg = _cfg("demo-cpu.yaml")
    assert cfg.train.phase("phase2") is cfg.train.phase2
    with pytest.raises(
        ConfigError, match="train.phase4: no such training phase; the config has phase1, phase2, phase3"
    ):
        cfg.train.phase("phase4")


def test_train_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="train.deepspeed.offload_param: parameter offload needs zero_stage 3"):
        _cfg("demo-cpu.yaml", "train.deepspeed.offload_param=true")
    with pytest.raises(ConfigError, match="train.recipe"):
        _cfg("demo-cpu.yaml", "train.recipe=everything")


def test_step_totals_are_reduced_on_the_engines_device(monkeypatch):
    # NCCL reduces CUDA tensors only: the step totals must be built on the engine's device.
    import torch
    import torch.distributed as dist

    from raycat.train.loop import all_reduce_step

    seen = []

    def fake_all_reduce(t):
        seen.append(t.device)
        t.mul_(2)  # two ranks with equal totals

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    assert all_reduce_step([1.5, 2.0, 10.0], torch.device("cpu")) == [3.0, 4.0, 20.0]
    assert seen == [torch.device("cpu")]


@pytest.mark.parametrize("tracker", ["mlflow", "wandb"])
def test_a_tracker_that_is_not_installed_is_named_before_anything_runs(llama70b_dir, monkeypatch, tracker):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == tracker else real(name, *a))
    cfg = _cfg("llama-3.1-70b-mmlu-pro-lora.yaml", f"train.tracking={tracker}", "train.tracking_uri=http://m:5000")
    with pytest.raises(RaycatError, match=f"pip install {tracker}, or set train.tracking=none"):
        preflight(cfg, str(llama70b_dir), list(RECIPES[cfg.train.recipe]))


def test_the_preflight_line_names_each_phase_and_its_host_share_only_when_offloaded():
    phase = {"device_gib_per_worker": 1.234, "host_gib_per_worker": 0.0}
    offloaded = {"device_gib_per_worker": 2.5, "host_gib_per_worker": 10.0}
    result = {
        "params": 494_032_768,
        "trainable_params": 1_081_344,
        "device_capacity_gib": 80.0,
        "phases": {"phase1": phase, "phase2": offloaded},
    }
    assert describe(result) == (
        "pre-flight: 494.0M parameters (1.08M trainable), phase1: ~1.23 GiB/worker on device; "
        "phase2: ~2.50 GiB/worker on device + 10.00 GiB host (capacity 80.0 GiB)"
    )


def test_cpu_workers_all_reduce_gradients_at_zero_1_and_2_unless_configured():
    from raycat.train.memory import zero_comm

    def comm(*overrides: str) -> dict:
        return zero_comm(_cfg("demo-cpu.yaml", *overrides).train)

    # Gloo has no reduce-scatter: two CPU workers at ZeRO-2 all-reduce.
    assert comm("train.num_workers=2", "train.deepspeed.zero_stage=2") == {"reduce_scatter": False}
    assert comm("train.num_workers=2", "train.deepspeed.zero_stage=1")["reduce_scatter"] is False
    # Configured wins; stage 0 (one worker runs it) and 3 have no such choice.
    assert comm("train.num_workers=2", "train.deepspeed.reduce_scatter=true") == {"reduce_scatter": True}
    assert comm("train.num_workers=1") == {}
    assert comm("train.num_workers=2", "train.deepspeed.zero_stage=3", "train.deepspeed.overlap_comm=false") == {
        "overlap_comm": False
    }
    # GPUs keep DeepSpeed's default (NCCL reduce-scatter).
    assert _cfg("llama-3.1-70b-mmlu-pro-full.yaml").train.deepspeed.comm == zero_comm(
        _cfg("llama-3.1-70b-mmlu-pro-full.yaml").train
    )
