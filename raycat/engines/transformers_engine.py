"""The transformers reference engine: one unpadded forward pass per prompt, log-softmax in float64.

It checks vLLM's numbers (tests/engines/test_parity.py) and serves where vLLM cannot run."""

from __future__ import annotations

import numpy as np

from raycat import entropy
from raycat.engines.base import Generation, Sampling, ScoreRequest, ScoreResult, resolve_dtype


class TransformersEngine:
    """Reference engine: one unpadded forward pass per prompt, log-softmax in float64."""

    def __init__(
        self,
        model: str,
        *,
        revision: str | None = None,
        dtype: str = "auto",
        device: str = "cpu",
        trust_remote_code: bool = False,
        need_full: bool = True,
        lora_adapter: str | None = None,
    ):
        # need_full is always honoured: every forward pass has the full-vocabulary logits. vLLM-only
        # settings (parallelism, KV cache, eager mode) are refused by EngineConfig, not swallowed here.
        del need_full
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.device = "cuda" if device == "gpu" else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
        self.model = (
            AutoModelForCausalLM.from_pretrained(
                model,
                revision=revision,
                dtype=getattr(torch, resolve_dtype(dtype, device)),
                trust_remote_code=trust_remote_code,
            )
            .to(self.device)
            .eval()
        )
        if lora_adapter is not None:
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, lora_adapter).merge_and_unload().eval()
        # Generate as vLLM does with explicit sampling parameters: the model's stop ids, none of its
        # generation-config processors (e.g. Qwen's repetition_penalty 1.05 would change the text).
        from transformers import GenerationConfig

        loaded = self.model.generation_config
        self.model.generation_config = GenerationConfig(
            bos_token_id=loaded.bos_token_id, eos_token_id=loaded.eos_token_id, pad_token_id=loaded.pad_token_id
        )
        self.vocab_size = self.model.config.vocab_size

    def first_token_logprobs(self, prompt_ids: list[int]) -> np.ndarray:
        with self.torch.no_grad():
            ids = self.torch.tensor([prompt_ids], device=self.device)
            logits = self.model(input_ids=ids).logits[0, -1]
        return entropy.log_softmax(logits.float().cpu().numpy())

    def _greedy_text(self, prompt_ids: list[int], max_tokens: int) -> str:
        with self.torch.no_grad():
            ids = self.torch.tensor([prompt_ids], device=self.device)
            out = self.model.generate(
                input_ids=ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False
            )
        return self.tokenizer.decode(out[0, len(prompt_ids) :], skip_special_tokens=True)

    def score(
        self, requests: list[ScoreRequest], mode: str, top_k: int, free_form_max_tokens: int
    ) -> list[ScoreResult]:
        results = []
        for request in requests:
            logprobs = self.first_token_logprobs(request.prompt_ids)
            result = ScoreResult(greedy_token_id=int(logprobs.argmax()))
            if request.option_groups:
                result.option_logprobs = entropy.group_logprobs(
                    dict(enumerate(logprobs)), request.option_groups
                ).tolist()
                result.greedy_text = self.tokenizer.decode([result.greedy_token_id])
            else:
                result.greedy_text = self._greedy_text(request.prompt_ids, free_form_max_tokens)
            if mode == "full" or request.want_full:
                result.entropy_full = entropy.entropy_full(logprobs)
            if mode in ("full", "topk") or request.want_full:
                result.entropy_topk, result.entropy_topk_bound = entropy.entropy_topk(
                    np.sort(logprobs)[-top_k:], self.vocab_size
                )
            results.append(result)
        return results

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Generation]:
        out = []
        for i, prompt in enumerate([p for p in prompts for _ in range(sampling.n)]):
            self.torch.manual_seed(sampling.seed + i)
            ids = self.torch.tensor([prompt], device=self.device)
            kwargs = (
                {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p}
                if sampling.temperature > 0
                else {"do_sample": False}
            )
            with self.torch.no_grad():
                seq = self.model.generate(
                    input_ids=ids,
                    attention_mask=self.torch.ones_like(ids),
                    max_new_tokens=sampling.max_tokens,
                    **kwargs,
                )[0, len(prompt) :]
            eos = self.tokenizer.eos_token_id
            stopped = eos is not None and len(seq) and int(seq[-1]) == eos
            out.append(
                Generation(
                    text=self.tokenizer.decode(seq, skip_special_tokens=True),
                    prompt_tokens=len(prompt),
                    completion_tokens=len(seq),
                    finish_reason="stop" if stopped or len(seq) < sampling.max_tokens else "length",
                )
            )
        return out

    def close(self) -> None:
        del self.model
