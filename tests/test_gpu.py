"""GPU checks (`make test-gpu`): skipped unless enough CUDA devices are visible (see tests/conftest.py)."""

from __future__ import annotations

import os
import socket

import pytest

from raycat.config import EngineConfig
from raycat.engines import actor_pool
from raycat.storage import rundir
from raycat.testing.tiny_models import build_tiny_model

pytestmark = pytest.mark.gpu


def _last_token_logprobs(model_dir, dtype, device):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Question: what is 12 + 13?\nA. 25\nB. 24"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, -1]
    assert logits.device.type == torch.device(device).type and logits.dtype == dtype
    return logits.float().log_softmax(-1).cpu()


def test_tiny_model_bf16_forward_on_cuda_matches_fp32_cpu(tmp_path):
    import torch

    model_dir = build_tiny_model(tmp_path / "tiny")
    ref = _last_token_logprobs(model_dir, torch.float32, "cpu")
    got = _last_token_logprobs(model_dir, torch.bfloat16, "cuda")
    assert torch.isfinite(got).all()
    # bf16 keeps ~3 significant digits and the tiny model's head is scaled x40: on CPU bf16 the largest
    # deviation is ~0.02 in probability and ~0.17 nats on tokens above 1e-3; allow a little over 2x that.
    p, q = ref.exp(), got.exp()
    assert (p - q).abs().max() < 0.05
    likely = p > 1e-2
    assert (ref - got)[likely].abs().max() < 0.5
    assert int(ref.argmax()) == int(got.argmax())


def _all_reduce_worker(rank: int, world_size: int, port: int) -> None:
    import datetime

    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=120))
    try:
        t = torch.full((1024,), float(rank + 1), device=f"cuda:{rank}")
        dist.all_reduce(t)
        torch.cuda.synchronize()
        assert t.device.type == "cuda"
        expected = world_size * (world_size + 1) / 2
        assert torch.equal(t.cpu(), torch.full((1024,), expected)), t[:4]
        # raycat's per-step metrics reduction, as the Ray Train workers call it on GPU
        from raycat.train.loop import all_reduce_step

        assert all_reduce_step([float(rank + 1), 1.0, 10.0], torch.device(f"cuda:{rank}")) == [expected, 2.0, 20.0]
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu(count=2)
def test_nccl_all_reduce_sums_device_tensors_across_two_processes():
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # A failed assertion in a worker re-raises here (ProcessRaisedException) and fails the test.
    mp.spawn(_all_reduce_worker, args=(2, port), nprocs=2, join=True)


class _Greedy:
    """A tiny engine stage for the TP check: greedy tokens of a fixed prompt per row."""

    REQUIRED_COLUMNS = ("id",)

    def __init__(self, plan):
        from raycat.engines.base import make_engine

        self.engine = make_engine("vllm", plan["model"], **plan["kw"])

    def __call__(self, batch):
        from raycat.engines.base import Sampling

        gens = self.engine.generate([[5, 6, 7, 8]] * len(batch), Sampling(0.0, 1.0, 8, 0, 1))
        return batch.assign(text=[g.text for g in gens])


@pytest.mark.vllm
@pytest.mark.gpu(count=2)
def test_tensor_parallel_engine_runs_in_its_placement_group(tmp_path):
    """A TP=2 engine inside the Ray Data actor pool (STRICT_PACK placement group, vLLM's Ray executor)
    answers as a TP=1 engine does."""
    import pandas as pd
    import ray

    model = str(build_tiny_model(tmp_path / "m"))
    rows = pd.DataFrame({"id": ["a", "b"]})
    texts = {}
    ray.init(address="local", num_gpus=2, include_dashboard=False)
    try:
        for tp_size in (1, 2):
            e = EngineConfig(device="gpu", tensor_parallel_size=tp_size, batch_size=2)
            kw = {"dtype": "float32", "device": "gpu", "max_model_len": 256, "tensor_parallel_size": tp_size}
            parts = str(tmp_path / f"tp{tp_size}")
            n = actor_pool.run("gpu", rows, _Greedy, {"model": model, "kw": kw}, actor_pool.Pool.of(e), parts)
            assert n == 2
            texts[tp_size] = sorted(rundir.read_parts(parts, ["id", "text"])["text"])
    finally:
        ray.shutdown()
    assert texts[1] == texts[2] and texts[1][0]
