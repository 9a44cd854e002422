"""The streaming engine's wiring against a scripted stand-in for vLLM's ``LLMEngine`` (the real engine:
tests/engines/test_vllm_stream.py)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import pytest

from raycat.engines.stream import EngineDied, StreamingEngine


@dataclass
class _Out:
    request_id: str
    finished: bool
    steps: int


@dataclass
class ScriptedEngine:
    """A request's prompt is the number of steps it takes; each step sleeps ``step_s``."""

    step_s: float = 0.002
    fail_at_step: int | None = None
    refuse: set = field(default_factory=set)
    left: dict = field(default_factory=dict)
    steps: int = 0
    busy: float = 0.0

    def add_request(self, key, prompt, params, lora_request=None):
        if prompt in self.refuse:
            raise ValueError(f"prompt {prompt} refused")
        self.left[key] = [prompt, 0]

    def has_unfinished_requests(self):
        return bool(self.left)

    def step(self):
        began = time.perf_counter()
        self.steps += 1
        if self.fail_at_step is not None and self.steps >= self.fail_at_step:
            raise RuntimeError("engine core died")
        time.sleep(self.step_s)
        out = []
        for key, state in list(self.left.items()):
            state[1] += 1
            if state[1] >= state[0]:
                del self.left[key]
                out.append(_Out(key, True, state[1]))
        self.busy += time.perf_counter() - began
        return out


def test_a_short_request_is_not_held_back_by_a_long_one():
    engine = ScriptedEngine()
    stream = StreamingEngine(lambda: engine)
    long = stream.submit(400, None)
    time.sleep(0.05)  # the long one is decoding
    short = stream.submit(3, None)
    out, _ = short.result(timeout=10)
    assert out.steps == 3
    # The short request joined the running batch and finished while the long one decodes.
    assert not long.done()
    assert long.result(timeout=10)[0].steps == 400
    stream.close()


def test_many_callers_get_their_own_outputs_and_the_engine_seconds_add_up():
    engine = ScriptedEngine(step_s=0.001)
    stream = StreamingEngine(lambda: engine)
    results: dict[int, list] = {}

    def caller(c: int) -> None:
        futures = [stream.submit(1 + (c * 7 + i) % 20, None) for i in range(10)]
        results[c] = [f.result(timeout=30) for f in futures]

    threads = [threading.Thread(target=caller, args=(c,)) for c in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stream.close()
    for c, got in results.items():
        assert [out.steps for out, _ in got] == [1 + (c * 7 + i) % 20 for i in range(10)]
    # Each step's time is shared among the requests in it: together they are the engine's busy time,
    # not the sum of the callers' overlapping walls.
    total = sum(seconds for got in results.values() for _, seconds in got)
    assert total == pytest.approx(engine.busy, rel=0.05)


def test_an_engine_that_dies_fails_every_waiting_request_and_says_so():
    died, futures = [], []

    def on_death(exc):
        # Before any caller hears of it: in an actor this exits the process, so no caller can report an
        # application error (which Ray would not retry on a restarted actor) first.
        assert not any(f.done() for f in futures)
        died.append(exc)

    engine = ScriptedEngine(fail_at_step=5)
    stream = StreamingEngine(lambda: engine, on_death=on_death)
    futures.extend(stream.submit(50, None) for _ in range(3))
    for f in futures:
        with pytest.raises(EngineDied, match="engine core died"):
            f.result(timeout=10)
    assert len(died) == 1 and isinstance(died[0], RuntimeError)
    # Nothing waits on a dead engine: a later request fails at once.
    with pytest.raises(EngineDied, match="not running"):
        stream.submit(1, None).result(timeout=1)


def test_a_refused_request_fails_alone():
    engine = ScriptedEngine(refuse={7})
    stream = StreamingEngine(lambda: engine)
    bad, good = stream.submit(7, None), stream.submit(2, None)
    with pytest.raises(ValueError, match="prompt 7 refused"):
        bad.result(timeout=10)
    assert good.result(timeout=10)[0].steps == 2
    stream.close()


def test_close_fails_what_is_still_waiting():
    engine = ScriptedEngine(step_s=0.01)
    stream = StreamingEngine(lambda: engine)
    waiting = stream.submit(10_000, None)
    time.sleep(0.05)
    stream.close()
    with pytest.raises(EngineDied, match="closed"):
        waiting.result(timeout=10)


def test_an_engine_core_that_died_while_idle_is_a_death_not_a_refused_request():
    class EngineDeadError(Exception):  # vLLM's name (vllm.v1.engine.exceptions)
        pass

    class Dead(ScriptedEngine):
        def add_request(self, *args, **kwargs):
            raise EngineDeadError("core gone")

    died = []
    stream = StreamingEngine(lambda: Dead(), on_death=died.append)
    with pytest.raises(EngineDied, match="core gone"):
        stream.submit(1, None).result(timeout=10)
    assert len(died) == 1


def test_close_right_after_start_and_when_idle_returns():
    for _ in range(50):
        StreamingEngine(lambda: ScriptedEngine()).close()


def test_the_engine_is_built_in_the_stepping_thread_and_a_failed_build_raises_in_the_caller():
    built_in = []

    def build():
        built_in.append(threading.current_thread().name)
        return ScriptedEngine()

    stream = StreamingEngine(build)
    assert built_in == ["raycat-engine-step"] and isinstance(stream.built, ScriptedEngine)
    stream.close()

    def fail():
        raise MemoryError("no room for the KV cache")

    with pytest.raises(MemoryError, match="KV cache"):
        StreamingEngine(fail)
