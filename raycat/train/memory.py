"""Pre-flight memory estimate for a training phase: parameters x bytes per state / workers.

Standard ZeRO accounting (Rajbhandari et al. 2020) with Adam: weights and gradients in the training
dtype, fp32 master weights when training in bf16, and two fp32 moments. Stage 1 shards the optimizer
states, stage 2 also the gradients, stage 3 also the weights; offload moves them to host RAM. LoRA
freezes the base: its weights are held (sharded under stage 3) but carry no grads or optimizer states.
Activations are a rough upper bound; the estimate exists to refuse a config that cannot fit, with
the numbers, before any accelerator is asked for.
"""

from __future__ import annotations

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
    w = 2 if bf16 else 4
    opt_bytes = 8 + (4 if bf16 else 0)  # Adam m, v (+ fp32 master copy when weights are bf16)
    weights = total_params * w / (world if zero_stage == 3 else 1)
    grads = trainable_params * w / (world if zero_stage >= 2 else 1)
    optim = trainable_params * opt_bytes / (world if zero_stage >= 1 else 1)
    tokens = micro_batch_size * max_length
    # Per layer and token: ~17 saved hidden-size tensors without recomputation, 1 with it, plus one
    # layer recomputed; logits and their gradient in fp32.
    per_layer = hidden_size * w * (1 if gradient_checkpointing else 17)
    acts = tokens * (per_layer * num_layers + (hidden_size * w * 17 if gradient_checkpointing else 0))
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
        "bytes_per_weight": w,
        "optimizer_bytes_per_trainable_param": opt_bytes,
    }


def check_fit(est: dict, device_capacity_gib: float, host_capacity_gib: float, same_pool: bool) -> str | None:
    """None when it fits; otherwise the message that refuses the launch. ``same_pool``: CPU workers, where
    the 'device' is host RAM too, so both parts share one capacity."""
    dev, host = est["device_gib_per_worker"], est["host_gib_per_worker"]
    device_capacity_gib, host_capacity_gib = device_capacity_gib * USABLE, host_capacity_gib * USABLE
    parts = ", ".join(f"{k} {v:.2f}" for k, v in est["device_breakdown_gib"].items())
    if same_pool:
        if dev + host > device_capacity_gib:
            return (
                f"needs ~{dev + host:.1f} GiB per worker ({parts}; offloaded {host:.2f}) but only "
                f"{device_capacity_gib:.1f} GiB is usable per worker ({USABLE:.0%} of its memory); use more "
                "workers, ZeRO-3, LoRA, gradient checkpointing or a smaller micro_batch_size/max_length"
            )
        return None
    if dev > device_capacity_gib:
        return (
            f"needs ~{dev:.1f} GiB of accelerator memory per worker ({parts}) but a worker has "
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
