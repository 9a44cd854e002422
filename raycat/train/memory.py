"""Will a training phase fit? The pre-flight memory estimate: parameters x bytes per state / workers.

Standard ZeRO accounting (Rajbhandari et al. 2020) with Adam: weights and gradients in the training
dtype, fp32 master weights when training in bf16, and two fp32 moments. Stage 1 shards the optimizer
states, stage 2 also the gradients, stage 3 also the weights; offload moves them to host RAM. LoRA
freezes the base: its weights are held (sharded under stage 3) but carry no grads or optimizer states.
Activations are a rough upper bound; the estimate exists to refuse a config that cannot fit, with
the numbers, before any accelerator is asked for.

The model's shape comes from its config.json alone (a meta-device model: no weights are read), so the
driver (``preflight``) and a study's cost plan (``raycat.study.costs``) can run this without a GPU.
"""

from __future__ import annotations

import importlib.util
import os

from raycat.config import RaycatConfig, TrainConfig
from raycat.errors import RaycatError
from raycat.recipes import Phase

GIB = 1024**3
# Share of a worker's memory the estimate may fill: the rest is CUDA context, allocator fragmentation,
# communication buckets and prefetch buffers, which the formula does not model.
USABLE = 0.9


def estimate(
    *,
    total_params: int,
    trainable_params: int,
    world: int,
    zero_stage: int,
    offload_optimizer: bool,
    offload_param: bool,
    bf16: bool,
    micro_batch_size: int,
    max_length: int,
    hidden_size: int,
    num_layers: int,
    vocab_size: int,
    gradient_checkpointing: bool,
) -> dict:
    dtype_bytes = 2 if bf16 else 4
    # Adam m, v (+ fp32 master copy when weights are bf16).
    opt_bytes = 8 + (4 if bf16 else 0)
    weights = total_params * dtype_bytes / (world if zero_stage == 3 else 1)
    grads = trainable_params * dtype_bytes / (world if zero_stage >= 2 else 1)
    optim = trainable_params * opt_bytes / (world if zero_stage >= 1 else 1)
    tokens = micro_batch_size * max_length
    # Per layer and token: ~17 saved hidden-size tensors without recomputation, 1 with it, plus one
    # layer recomputed; logits and their gradient in fp32.
    per_layer = hidden_size * dtype_bytes * (1 if gradient_checkpointing else 17)
    recomputed = hidden_size * dtype_bytes * 17 if gradient_checkpointing else 0
    acts = tokens * (per_layer * num_layers + recomputed)
    acts += tokens * vocab_size * 4 * 2
    device = {"weights": weights, "gradients": grads, "optimizer": optim, "activations": acts}
    host = {}
    if offload_optimizer:
        host["optimizer"] = device.pop("optimizer")
    if offload_param:
        host["weights"] = device.pop("weights")
    return {
        "device_gib_per_worker": sum(device.values()) / GIB,
        "host_gib_per_worker": sum(host.values()) / GIB,
        "device_breakdown_gib": {k: round(v / GIB, 3) for k, v in device.items()},
        "host_breakdown_gib": {k: round(v / GIB, 3) for k, v in host.items()},
        "bytes_per_weight": dtype_bytes,
        "optimizer_bytes_per_trainable_param": opt_bytes,
    }


def check_fit(est: dict, device_capacity_gib: float, host_capacity_gib: float, same_pool: bool) -> str | None:
    """None when it fits; otherwise the message that refuses the launch. ``same_pool``: CPU workers, where
    the 'device' is host RAM too, so both parts share one capacity."""
    device, host = est["device_gib_per_worker"], est["host_gib_per_worker"]
    device_capacity_gib, host_capacity_gib = device_capacity_gib * USABLE, host_capacity_gib * USABLE
    parts = ", ".join(f"{k} {v:.2f}" for k, v in est["device_breakdown_gib"].items())
    if same_pool:
        if device + host > device_capacity_gib:
            return (
                f"needs ~{device + host:.1f} GiB per worker ({parts}; offloaded {host:.2f}) but only "
                f"{device_capacity_gib:.1f} GiB is usable per worker ({USABLE:.0%} of its memory); use more "
                "workers, ZeRO-3, LoRA, gradient checkpointing or a smaller micro_batch_size/max_length"
            )
        return None
    if device > device_capacity_gib:
        return (
            f"needs ~{device:.1f} GiB of accelerator memory per worker ({parts}) but a worker has "
            f"{device_capacity_gib:.1f} GiB usable ({USABLE:.0%} of its memory); use more workers, ZeRO-3, "
            "offload, LoRA, gradient checkpointing or a smaller micro_batch_size/max_length "
            "(train.worker_memory_gib sets the capacity)"
        )
    if host > host_capacity_gib:
        return (
            f"offloaded states need ~{host:.1f} GiB of host RAM per worker but {host_capacity_gib:.1f} GiB is "
            f"usable (train.host_memory_per_worker_gib x {USABLE:.0%}); use more nodes or offload less"
        )
    return None


def model_shape(model_dir: str, trust_remote_code: bool) -> dict:
    """Parameter count and sizes from config.json alone (meta device: no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "hidden": text.hidden_size,
        "layers": text.num_hidden_layers,
        "vocab": text.vocab_size,
        "model": model,
    }


def lora_trainable(meta_model, lora: dict) -> int:
    """The parameters LoRA trains on ``meta_model`` (which PEFT wraps in place)."""
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(
        meta_model,
        LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], target_modules=lora["target_modules"], task_type="CAUSAL_LM"),
    )
    return sum(p.numel() for p in peft.parameters() if p.requires_grad)


def zero_stage(train: TrainConfig) -> int:
    """The ZeRO stage the workers run: the configured one, but 0 for a single worker without offload.
    ZeRO partitions state across ranks, so one rank saves no memory and only pays the bookkeeping
    (flat-buffer copies, bucketing): bench/train.py measured 0.80x of a bare loop at ZeRO-2 against
    0.97x at stage 0 on the same model and batches."""
    ds = train.deepspeed
    if train.num_workers == 1 and not (ds.offload_optimizer or ds.offload_param):
        return 0
    return ds.zero_stage


def zero_comm(train: TrainConfig) -> dict:
    """The ``zero_optimization`` communication entries the workers run: those configured, and on CPU at
    ZeRO-1/2 all-reduce for the gradients unless ``reduce_scatter`` is set. Gloo has no reduce-scatter, so
    DeepSpeed reduces each rank's partition separately: bench/train.py (512x4, 2 workers) measured 1 -> 2
    workers at 0.83x with it and 1.32x with all-reduce."""
    comm = train.deepspeed.comm
    if train.device == "cpu" and zero_stage(train) in (1, 2) and "reduce_scatter" not in comm:
        return {"reduce_scatter": False, **comm}
    return comm


def uses_bf16(cfg: RaycatConfig) -> bool:
    """The workers train in bf16: configured, or ``auto`` on GPUs."""
    precision = cfg.train.precision
    return precision == "bf16" or (precision == "auto" and cfg.train.device == "gpu")


def worker_capacity(train: TrainConfig) -> tuple[float, float]:
    """(device, host) GiB per worker: the configured ones, else 80 GB per GPU / this machine's RAM shared
    by the workers."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    device_cap = train.worker_memory_gib or (80.0 if train.device == "gpu" else ram / train.num_workers)
    return device_cap, train.host_memory_per_worker_gib or ram / train.num_workers


def phase_estimate(cfg: RaycatConfig, shape: dict, trainable: int, phase: str) -> dict:
    """The memory estimate of one phase for a model of this shape (params, hidden, layers, vocab)."""
    train, hp = cfg.train, cfg.train.phase(phase)
    return estimate(
        total_params=shape["params"],
        trainable_params=trainable,
        world=train.num_workers,
        zero_stage=zero_stage(train),
        offload_optimizer=train.deepspeed.offload_optimizer,
        offload_param=train.deepspeed.offload_param,
        bf16=uses_bf16(cfg),
        micro_batch_size=hp.micro_batch_size,
        max_length=hp.max_length,
        hidden_size=shape["hidden"],
        num_layers=shape["layers"],
        vocab_size=shape["vocab"],
        gradient_checkpointing=train.gradient_checkpointing,
    )


def preflight(cfg: RaycatConfig, model_dir: str, phases: list[Phase]) -> dict:
    """Memory estimate per phase; raises with the numbers when a phase cannot fit. Runs on the driver,
    before Ray or any accelerator."""
    train = cfg.train
    if train.tracking != "none" and importlib.util.find_spec(train.tracking) is None:
        raise RaycatError(
            f"train.tracking={train.tracking} needs the {train.tracking} package: pip install {train.tracking}, "
            "or set train.tracking=none"
        )
    shape = model_shape(model_dir, cfg.score.student.trust_remote_code)
    trainable = lora_trainable(shape["model"], train.lora.model_dump()) if train.method == "lora" else shape["params"]
    device_cap, host_cap = worker_capacity(train)
    out = {
        "params": shape["params"],
        "trainable_params": trainable,
        "device_capacity_gib": device_cap,
        "host_capacity_gib": host_cap,
        "phases": {},
    }
    for phase in phases:
        needs = phase_estimate(cfg, shape, trainable, phase.name)
        out["phases"][phase.name] = needs
        problem = check_fit(needs, device_cap, host_cap, same_pool=train.device == "cpu")
        if problem:
            raise RaycatError(f"train pre-flight, {phase.name}: {problem}")
    return out


def describe(preflight_result: dict) -> str:
    """The pre-flight's line for the user: parameters, then each phase's memory per worker."""
    phases = []
    for name, needs in preflight_result["phases"].items():
        host = f" + {needs['host_gib_per_worker']:.2f} GiB host" if needs["host_gib_per_worker"] else ""
        phases.append(f"{name}: ~{needs['device_gib_per_worker']:.2f} GiB/worker on device{host}")
    params, trainable = preflight_result["params"] / 1e6, preflight_result["trainable_params"] / 1e6
    return (
        f"pre-flight: {params:.1f}M parameters ({trainable:.2f}M trainable), "
        + "; ".join(phases)
        + f" (capacity {preflight_result['device_capacity_gib']:.1f} GiB)"
    )
