"""An OpenAI-compatible teacher for hosted models and vLLM servers: ``generate`` and ``close``, like an engine.

The openai client does the retrying: exponential backoff with jitter on 429, 5xx, 408/409 and
timeouts, honouring Retry-After. This module adds what it lacks: a concurrency cap, client-side
request and token rate limits, and turning a request that failed for good into a row-level error.
The API key is read from the environment variable the config names and never leaves this object.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time

from raycat.engines.base import Generation, Sampling
from raycat.errors import RaycatError


class RateLimiter:
    """Token buckets for requests/s and tokens/min; ``acquire`` waits until both allow a request."""

    def __init__(self, requests_per_second: float | None, tokens_per_minute: int | None, clock=time.monotonic):
        self.rps, self.tpm, self.clock = requests_per_second, tokens_per_minute, clock
        now = clock()
        self.req_tokens, self.tok_tokens, self.last = (requests_per_second or 0.0), float(tokens_per_minute or 0), now
        self.lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self.clock()
        elapsed, self.last = now - self.last, now
        if self.rps:
            self.req_tokens = min(self.rps, self.req_tokens + elapsed * self.rps)
        if self.tpm:
            self.tok_tokens = min(self.tpm, self.tok_tokens + elapsed * self.tpm / 60)

    def wait_time(self, tokens: int) -> float:
        self._refill()
        waits = [0.0]
        if self.rps and self.req_tokens < 1:
            waits.append((1 - self.req_tokens) / self.rps)
        if self.tpm:
            # A request bigger than the bucket still goes, once the bucket is full.
            need = min(tokens, self.tpm)
            if self.tok_tokens < need:
                waits.append((need - self.tok_tokens) * 60 / self.tpm)
        return max(waits)

    def take(self, tokens: int) -> None:
        if self.rps:
            self.req_tokens -= 1
        if self.tpm:
            self.tok_tokens -= min(tokens, self.tpm)

    async def acquire(self, tokens: int) -> None:
        async with self.lock:
            while (wait := self.wait_time(tokens)) > 0:
                await asyncio.sleep(wait)
            self.take(tokens)


class BadResponse(Exception):
    """The server answered, but not with a usable chat completion."""


class OpenAITeacher:
    """A teacher behind an OpenAI-compatible chat endpoint: ``generate(prompts, sampling)`` and ``close()``.

    One client, one concurrency cap and one rate limiter live as long as the object (one per Ray actor):
    ``requests_per_second`` and ``tokens_per_minute`` are limits *per actor*, carried across batches, so
    a pool of N actors may send up to N times them; divide the provider's limit by the pool size. The
    async client is bound to an event loop, so the object keeps its own loop and runs each batch on it.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: str | None,
        max_concurrency: int = 16,
        requests_per_second: float | None = None,
        tokens_per_minute: int | None = None,
        timeout_s: float = 120.0,
        max_retries: int = 5,
    ):
        import openai

        key = "EMPTY"
        if api_key_env:
            key = os.environ.get(api_key_env, "")
            if not key:
                raise RaycatError(
                    f"environment variable {api_key_env} (teach api.api_key_env) is not set where the "
                    "teacher runs; export it before `raycat teach` (on a cluster: in the job's env)"
                )
        self._key = key
        self.base_url, self.model = base_url, model
        self.max_concurrency, self.timeout_s, self.max_retries = max_concurrency, timeout_s, max_retries
        self._loop = asyncio.new_event_loop()
        self._lock = threading.Lock()  # one batch at a time on the loop
        self._client = openai.AsyncOpenAI(base_url=base_url, api_key=key, timeout=timeout_s, max_retries=max_retries)
        self._sem = asyncio.Semaphore(max_concurrency)
        self._limiter = RateLimiter(requests_per_second, tokens_per_minute)
        # What a request that failed for good raises (after the client's retries): the API's own errors, a
        # body that is not JSON, a completion without choices. Anything else is a bug and propagates.
        self._request_errors = (openai.APIError, json.JSONDecodeError, BadResponse)

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key not in ("", "EMPTY") else text

    @staticmethod
    def _text(message) -> tuple[str, int]:
        """(text, where its answer part starts)."""
        content = message.content or ""
        # Reasoning models (vLLM's reasoning parsers, DeepSeek-R1 style APIs) return the chain of thought
        # apart from the answer. It is the CoT we distil: keep it, ahead of the answer, so the training
        # target has it; verification reads the answer part only (the trace may weigh other options).
        extra = getattr(message, "model_extra", None) or {}
        reasoning = (
            getattr(message, "reasoning_content", None) or extra.get("reasoning_content") or extra.get("reasoning")
        )
        if isinstance(reasoning, str) and reasoning.strip():
            head = f"{reasoning.strip()}\n\n"
            return head + content, len(head)
        return content, 0

    async def _one(self, messages, sampling: Sampling) -> list[Generation]:
        estimate = sum(len(m["content"]) for m in messages) // 4 + sampling.max_tokens
        async with self._sem:
            await self._limiter.acquire(estimate)
            try:
                response = await self._client.chat.completions.create(
                    model=self.model,
                    messages=messages,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    max_tokens=sampling.max_tokens,
                    seed=sampling.seed,
                    **({"n": sampling.n} if sampling.n > 1 else {}),
                )
                choices = list(getattr(response, "choices", None) or [])[: sampling.n]
                if len(choices) < sampling.n:
                    raise BadResponse(f"server returned {len(choices)} choices for n={sampling.n}")
                if any(c.message is None for c in choices):
                    raise BadResponse("server returned a choice without a message")
            except self._request_errors as e:
                # After the client's own retries: record it, never crash the batch.
                err = self._scrub(f"{type(e).__name__}: {e}")[:500]
                return [Generation("", 0, 0, "error", error=err) for _ in range(sampling.n)]
        usage = response.usage
        # Usage is per request: book it on the first sample so totals stay exact.
        out = []
        for j, choice in enumerate(choices):
            text, start = self._text(choice.message)
            out.append(
                Generation(
                    text=text,
                    prompt_tokens=(usage.prompt_tokens if usage else 0) if j == 0 else 0,
                    completion_tokens=(usage.completion_tokens if usage else 0) if j == 0 else 0,
                    finish_reason="length" if choice.finish_reason == "length" else "stop",
                    answer_start=start,
                )
            )
        return out

    async def _all(self, prompts: list[list[dict]], sampling: Sampling) -> list[Generation]:
        per_prompt = await asyncio.gather(*(self._one(m, sampling) for m in prompts))
        return [g for gens in per_prompt for g in gens]

    def generate(self, prompts: list[list[dict]], sampling: Sampling) -> list[Generation]:
        with self._lock:
            if self._loop.is_closed():
                raise RuntimeError("OpenAITeacher.generate after close()")
            return self._loop.run_until_complete(self._all(prompts, sampling))

    def close(self) -> None:
        """Close the client and the loop; safe to call twice."""
        with self._lock:
            if not self._loop.is_closed():
                try:
                    self._loop.run_until_complete(self._client.close())
                finally:
                    self._loop.close()
            self._key = ""
