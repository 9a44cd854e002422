"""The vLLM engine's settings that need no engine running (the engine itself: tests/engines/test_parity.py)."""

from __future__ import annotations

import json

import pytest

from raycat.engines.vllm_engine import _lora_rank_slot


def test_lora_rank_slot(tmp_path):
    for r, slot in ((4, 8), (8, 8), (9, 16), (64, 64), (300, 320)):
        (tmp_path / "adapter_config.json").write_text(json.dumps({"r": r}))
        assert _lora_rank_slot(str(tmp_path)) == slot


def test_engine_arguments_are_vllm_engine_args_without_loading_bars(tiny_model_dir):
    """Every keyword raycat passes to vllm.LLM is an EngineArgs field (a renamed one fails here, not in
    an actor on a cluster); the safetensors loading bars stay out of job logs; statistics are computed
    only when they are exported (vllm.LLM's own default is off)."""
    pytest.importorskip("vllm")
    from vllm.engine.arg_utils import EngineArgs

    from raycat.engines.vllm_engine import _llm_args

    for in_process, device, log_stats in ((True, "cpu", True), (True, "cpu", False), (False, "gpu", True)):
        kwargs = _llm_args(
            str(tiny_model_dir),
            revision=None,
            dtype="float32",
            device=device,
            max_model_len=512,
            tensor_parallel_size=1 if in_process else 2,
            pipeline_parallel_size=1,
            kv_cache_gib=0.25,
            gpu_memory_utilization=0.9,
            enforce_eager=True,
            seed=0,
            trust_remote_code=False,
            need_full=True,
            lora_adapters=[],
            in_process=in_process,
            log_stats=log_stats,
        )
        assert kwargs["use_tqdm_on_load"] is False and kwargs["disable_log_stats"] is not log_stats
        if in_process:  # a multi-process engine's args look the model up on the hub when built
            args = EngineArgs(**kwargs)
            assert args.use_tqdm_on_load is False and args.disable_log_stats is not log_stats
