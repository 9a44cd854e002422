"""An OpenAI-compatible teacher behind the engine interface, for hosted models and vLLM servers.

The openai client does the retrying: exponential backoff with jitter on 429, 5xx, 408/409 and
timeouts, honouring Retry-After. This module adds what it lacks: a concurrency cap, client-side
request and token rate limits, and turning a request that failed for good into a row-level error.
The API key is read from the environment variable the config names and never leaves this object.
"""

from __future__ import annotations

import asyncio
import os
import time

from raycat.engine import Generation, Sampling


class RateLimiter:
    """Token buckets for requests/s and tokens/min; ``acquire`` waits until both allow a request."""

    def __init__(self, requests_per_second: float | None, tokens_per_minute: int | None, clock=time.monotonic):
        self.rps, self.tpm, self.clock = requests_per_second, tokens_per_minute, clock
        now = clock()
        self.req_tokens, self.tok_tokens, self.last = (requests_per_second or 0.0), float(tokens_per_minute or 0), now
        self.lock = asyncio.Lock()

    def _refill(self) -> None:
        now = self.clock()
        dt, self.last = now - self.last, now
        if self.rps:
            self.req_tokens = min(self.rps, self.req_tokens + dt * self.rps)
        if self.tpm:
            self.tok_tokens = min(self.tpm, self.tok_tokens + dt * self.tpm / 60)

    def wait_time(self, tokens: int) -> float:
        self._refill()
        waits = [0.0]
        if self.rps and self.req_tokens < 1:
            waits.append((1 - self.req_tokens) / self.rps)
        if self.tpm:
            need = min(tokens, self.tpm)  # a request bigger than the bucket still goes, once it is full
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
            while (w := self.wait_time(tokens)) > 0:
                await asyncio.sleep(w)
            self.take(tokens)


class OpenAITeacher:
    vocab_size = 0

    def __init__(self, base_url: str, model: str, api_key_env: str | None, max_concurrency: int = 16,
                 requests_per_second: float | None = None, tokens_per_minute: int | None = None,
                 timeout_s: float = 120.0, max_retries: int = 5):
        key = "EMPTY"
        if api_key_env:
            key = os.environ.get(api_key_env, "")
            if not key:
                raise RuntimeError(f"environment variable {api_key_env} (teach api.api_key_env) is not set where the "
                                   "teacher runs; export it before `raycat teach` (on a cluster: in the job's env)")
        self._key = key
        self.base_url, self.model = base_url, model
        self.max_concurrency, self.timeout_s, self.max_retries = max_concurrency, timeout_s, max_retries
        self.limits = (requests_per_second, tokens_per_minute)

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key not in ("", "EMPTY") else text

    async def _one(self, client, sem, limiter, messages, sampling: Sampling) -> list[Generation]:
        est = sum(len(m["content"]) for m in messages) // 4 + sampling.max_tokens
        async with sem:
            await limiter.acquire(est)
            try:
                r = await client.chat.completions.create(
                    model=self.model, messages=messages, temperature=sampling.temperature, top_p=sampling.top_p,
                    max_tokens=sampling.max_tokens, seed=sampling.seed,
                    **({"n": sampling.n} if sampling.n > 1 else {}))
                usage = r.usage
                choices = list(r.choices)[: sampling.n]
                if len(choices) < sampling.n:
                    raise ValueError(f"server returned {len(choices)} choices for n={sampling.n}")
                # Usage is per request: book it on the first sample so totals stay exact.
                return [Generation(text=c.message.content or "",
                                   prompt_tokens=(usage.prompt_tokens if usage else 0) if j == 0 else 0,
                                   completion_tokens=(usage.completion_tokens if usage else 0) if j == 0 else 0,
                                   finish_reason="length" if c.finish_reason == "length" else "stop")
                        for j, c in enumerate(choices)]
            except Exception as e:  # after the client's own retries: record, never crash the batch
                err = self._scrub(f"{type(e).__name__}: {e}")[:500]
                return [Generation("", 0, 0, "error", error=err) for _ in range(sampling.n)]

    async def _all(self, prompts: list[list[dict]], sampling: Sampling) -> list[Generation]:
        import openai

        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=self._key, timeout=self.timeout_s,
                                    max_retries=self.max_retries)
        sem, limiter = asyncio.Semaphore(self.max_concurrency), RateLimiter(*self.limits)
        try:
            per_prompt = await asyncio.gather(*(self._one(client, sem, limiter, m, sampling) for m in prompts))
            return [g for gens in per_prompt for g in gens]
        finally:
            await client.close()

    def generate(self, prompts: list[list[dict]], sampling: Sampling) -> list[Generation]:
        return asyncio.run(self._all(prompts, sampling))

    def close(self) -> None:
        self._key = ""
