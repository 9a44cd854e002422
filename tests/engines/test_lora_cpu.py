"""raycat.engines.lora_cpu: the grouped LoRA products write what vLLM-CPU's per-token ops write, for
the shapes, dtypes and indices vLLM's CPU punica wrapper passes (several adapters in a batch, 3-D and
4-D stacked weights, a float32 shrink buffer under bfloat16 weights); a row without a LoRA (vLLM's -1)
gets nothing, as from vLLM's ops given an all-zero adapter in that slot."""

from __future__ import annotations

import pytest
import torch

from raycat.engines import lora_cpu

lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")


class _Vllm:
    """vLLM's own ops, even after an engine in this process installed raycat's."""

    def __getattr__(self, name):
        return lora_cpu.vllm_op(name)


vllm = _Vllm()


def test_the_reference_is_vllms_own_op():
    assert vllm.bgmv_shrink is not lora_cpu.bgmv_shrink and vllm.bgmv_shrink.__module__.startswith("vllm.")


TOKENS, HIDDEN, RANK, SLOTS = 37, 64, 8, 3


def _reference(weights: torch.Tensor) -> torch.Tensor:
    """The weights with an all-zero adapter last: vLLM's ops then give -1 (no LoRA) nothing."""
    return torch.cat([weights, torch.zeros_like(weights[:1])])


def _indices(kind: str) -> torch.Tensor:
    if kind == "one":
        return torch.full((TOKENS,), 1)
    if kind == "mixed":
        return torch.randint(0, SLOTS, (TOKENS,))
    return torch.randint(-1, SLOTS, (TOKENS,))  # with vLLM's -1


@pytest.mark.parametrize("kind", ["one", "mixed", "with-minus-one"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shrink_writes_what_vllms_op_writes(kind, dtype):
    torch.manual_seed(0)
    x = torch.randn(TOKENS, HIDDEN, dtype=dtype)
    weights = torch.randn(SLOTS, 1, RANK, HIDDEN, dtype=dtype)
    indices = _indices(kind)
    want, got = (torch.zeros(TOKENS, RANK, dtype=torch.float32) for _ in range(2))
    vllm.bgmv_shrink(x, _reference(weights), want, indices, 0.5)
    lora_cpu.bgmv_shrink(x, weights, got, indices, 0.5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["one", "mixed", "with-minus-one"])
@pytest.mark.parametrize("add", [True, False])
def test_expand_and_expand_slice_write_what_vllms_ops_write(kind, add):
    torch.manual_seed(1)
    buffer = torch.randn(TOKENS, RANK, dtype=torch.float32)
    weights = torch.randn(SLOTS, 1, HIDDEN, RANK, dtype=torch.bfloat16)
    indices = _indices(kind)
    base = torch.randn(TOKENS, 3 * HIDDEN, dtype=torch.bfloat16)
    want, got = base.clone(), base.clone()
    # Rows without a LoRA keep what they held (vLLM's ops, given the zero adapter, write zeros there).
    kept = indices < 0
    vllm.bgmv_expand(buffer, _reference(weights), want, indices, add)
    lora_cpu.bgmv_expand(buffer, weights, got, indices, add)
    torch.testing.assert_close(got[~kept], want[~kept])
    assert torch.equal(got[kept], want[kept] if add else base[kept])
    want, got = base.clone(), base.clone()
    vllm.bgmv_expand_slice(buffer, _reference(weights[:, 0]), want, indices, HIDDEN, HIDDEN, add)
    lora_cpu.bgmv_expand_slice(buffer, weights[:, 0], got, indices, HIDDEN, HIDDEN, add)
    torch.testing.assert_close(got[~kept], want[~kept])
    assert torch.equal(got[kept], want[kept] if add else base[kept])


def test_a_row_without_a_lora_is_left_as_it_was():
    x = torch.randn(4, HIDDEN)
    weights = torch.randn(SLOTS, RANK, HIDDEN)
    out = torch.zeros(4, RANK)
    lora_cpu.bgmv_shrink(x, weights, out, torch.tensor([-1, 0, -1, 2]), 1.0)
    assert torch.equal(out[[0, 2]], torch.zeros(2, RANK)) and out[[1, 3]].abs().sum() > 0
    # vLLM-CPU's own op applies the last adapter there.
    vllm_out = torch.zeros(4, RANK)
    vllm.bgmv_shrink(x, weights, vllm_out, torch.tensor([-1, 0, -1, 2]), 1.0)
    torch.testing.assert_close(vllm_out[0], x[0] @ weights[-1].T)
    one = torch.ones(3, HIDDEN)
    lora_cpu.bgmv_expand(torch.randn(1, RANK), torch.randn(SLOTS, HIDDEN, RANK), one, torch.tensor([-1]), True)
    assert torch.equal(one, torch.ones(3, HIDDEN))


@pytest.mark.parametrize("rows,indices", [(1, 5), (5, 1)])
def test_one_row_or_one_index_broadcasts_over_the_other_as_vllms_einsum_does(rows, indices):
    x = torch.randn(rows, HIDDEN)
    weights = torch.randn(SLOTS, RANK, HIDDEN)
    index = torch.randint(0, SLOTS, (indices,))
    want, got = torch.zeros(5, RANK), torch.zeros(5, RANK)
    vllm.bgmv_shrink(x, weights, want, index, 1.0)
    lora_cpu.bgmv_shrink(x, weights, got, index, 1.0)
    torch.testing.assert_close(got, want)


def test_a_single_row_output_broadcasts_as_vllms_does():
    # One input row against a longer output (vLLM's expand keeps only the first row's product).
    buffer = torch.randn(1, RANK)
    weights = torch.randn(SLOTS, HIDDEN, RANK)
    want, got = torch.zeros(4, HIDDEN), torch.zeros(4, HIDDEN)
    vllm.bgmv_expand(buffer, weights, want, torch.tensor([2]), True)
    lora_cpu.bgmv_expand(buffer, weights, got, torch.tensor([2]), True)
    torch.testing.assert_close(got, want)


def test_install_swaps_the_ops_where_the_cpu_wrapper_and_the_sgmv_ops_look_them_up(monkeypatch):
    punica_cpu = pytest.importorskip("vllm.lora.punica_wrapper.punica_cpu")
    for module in (lora_ops, punica_cpu):
        for name in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice"):
            monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
    assert lora_cpu.install()
    assert punica_cpu.bgmv_shrink is lora_cpu.bgmv_shrink and lora_ops.bgmv_expand is lora_cpu.bgmv_expand
    # Idempotent.
    assert lora_cpu.install()


def test_install_leaves_ops_of_another_shape_alone(monkeypatch):
    def other(inputs, weights, out):  # not the signature these replace
        raise AssertionError

    monkeypatch.setattr(lora_ops, "bgmv_shrink", other)
    assert not lora_cpu.install()
    assert lora_ops.bgmv_shrink is other
