"""The engine interfaces: a ``Scorer`` (the student's first-token distribution) and a ``Generator``
(completions; the teacher and eval), their request/result types, and the choice of backend.

Both local engines (``vllm_engine``, ``transformers_engine``) play both roles; an HTTP teacher
(``openai_http``) is only a ``Generator``. ``score`` looks at the first answer token of each prompt and
returns raw log-probabilities of the option tokens plus whichever entropies were asked for; the maths
lives in ``raycat.entropy``. Engines take token ids, so they see exactly the prompt that was rendered
and hashed.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from raycat.progress import vllm_log_level

if TYPE_CHECKING:
    from raycat.engines.oracle import OracleEngine
    from raycat.engines.transformers_engine import TransformersEngine
    from raycat.engines.vllm_engine import VLLMEngine


@dataclass
class ScoreRequest:
    prompt_ids: list[int]
    option_groups: list[list[int]]  # empty for free-form questions
    # Also compute full-vocab (and top-k from it) statistics: the row is in the deviation sample.
    want_full: bool = False


@dataclass
class ScoreResult:
    # Raw log p per option (its single-token spellings summed).
    option_logprobs: list[float] = field(default_factory=list)
    greedy_token_id: int = -1
    # The first token, or the short free-form answer.
    greedy_text: str = ""
    entropy_full: float | None = None
    entropy_topk: float | None = None
    entropy_topk_bound: float | None = None


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop", "length" or "error"
    # Set when the request failed for good (after the client's retries).
    error: str | None = None
    # Where the answer part of ``text`` starts: after a reasoning model's separate reasoning trace, which
    # is kept in ``text`` (it is the CoT we distil) but may weigh options before the final answer.
    answer_start: int = 0
    # The engine's busy time spent on this prompt (its share of every step it ran in), from a streaming
    # engine; None: the caller apportions its own wall clock.
    engine_seconds: float | None = None

    @property
    def answer_text(self) -> str:
        return self.text[self.answer_start :]


@dataclass(frozen=True)
class Sampling:
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    # Samples per prompt; generate returns them prompt-major (n per prompt, in order).
    n: int = 1


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


def engine_kwargs(model, engine) -> dict:
    """Engine constructor arguments from a ModelConfig and an EngineConfig, for ``engine.backend``.

    Revision and trust_remote_code come from the model config too, so every loader gets them."""
    common = dict(
        revision=model.revision, trust_remote_code=model.trust_remote_code, dtype=model.dtype, device=engine.device
    )
    if engine.backend in ("transformers", "null", "oracle"):
        return common
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
        metrics=engine.metrics,
    )


class NullEngine:
    """No model: every option gets the same log-probability (entropy log k) and every generation is
    empty. It measures what raycat's data plane costs around an engine (bench/corpus.py) and lets the
    resource lifecycle be tested without GPUs; it says nothing about a model."""

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
        # An empty answer: teach counts it failed (no answer), eval wrong; only the plumbing runs.
        return [
            Generation("", len(p) if isinstance(p, list) else 0, 0, "stop") for p in prompts for _ in range(sampling.n)
        ]

    def close(self) -> None:
        pass


def generation_kwargs(backend: str) -> dict:
    """Extra engine arguments of a teach or eval actor: a vLLM engine streams (its actor calls
    ``generate`` from several threads; ``actor_pool.Pool.in_flight``)."""
    return {"stream": True} if backend == "vllm" else {}


def make_engine(backend: str, model: str, **kwargs) -> VLLMEngine | TransformersEngine | NullEngine | OracleEngine:
    # Threads: a CPU engine's actor process starts with OMP_NUM_THREADS = its CPUs (actor_pool.Pool).
    # The backends import this module's types, so they are imported here, when one is chosen.
    if backend == "vllm":
        from raycat.engines.vllm_engine import VLLMEngine

        return VLLMEngine(model, **kwargs)
    if backend == "null":
        return NullEngine(model, **kwargs)
    if backend == "oracle":
        from raycat.engines.oracle import OracleEngine

        return OracleEngine(model, **kwargs)
    from raycat.engines.transformers_engine import TransformersEngine

    return TransformersEngine(model, **kwargs)
