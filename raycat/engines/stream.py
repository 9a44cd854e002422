"""One vLLM engine fed continuously by many callers (continuous batching across Ray Data batches).

``LLM.generate`` takes a list and returns when its slowest request ends: with chain-of-thought lengths
that vary tenfold, the engine decodes a handful of long tails while the next batch waits. Here one
thread owns the engine: it admits requests whenever callers submit them (``add_request``) and steps
it, so a new batch's rows join the running ones at the next step. Callers (the actor's concurrent
``__call__``s) only submit and wait on futures; nothing else touches the engine.

The thread also builds the engine: vLLM's CPU backend binds the OpenMP threads of the thread that
built it, and stepping it from another thread decoded 1.35x slower (measured, SmolLM2-135M bf16).

Each step's wall time is shared among the requests the engine holds (running or queued in it), so
the requests' ``seconds`` sum to the engine's busy time across callers (a per-call wall clock would
count overlapping calls twice).
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from raycat.errors import RaycatError


@dataclass
class _Request:
    prompt: Any
    params: Any
    lora: Any
    future: Future
    seconds: float = 0.0
    key: str = field(default="")


class EngineDied(RaycatError):
    """The engine failed while stepping; every request it held failed with it."""


class StreamingEngine:
    """``build()`` (run in the stepping thread) returns the owner of the engine, ``engine_of(owner)`` a
    vLLM ``LLMEngine`` (``add_request``, ``step``, ``has_unfinished_requests``); ``built`` is the owner.
    The constructor returns once it is built, or raises what building raised. ``on_death(exc)`` runs in
    the stepping thread when the engine fails, before any waiting caller hears of it (in an actor it
    exits the process, so Ray restarts it with a fresh engine)."""

    def __init__(
        self,
        build: Callable[[], Any],
        on_death: Callable[[BaseException], None] | None = None,
        engine_of: Callable[[Any], Any] = lambda owner: owner,
    ):
        self._build, self._engine_of = build, engine_of
        self.built: Any = None
        self._engine: Any = None
        self._ready = threading.Event()
        self._build_error: BaseException | None = None
        self._on_death = on_death
        self._inbox: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._running: dict[str, _Request] = {}
        self._ids = itertools.count()
        self._wake = threading.Event()
        # Held across submit's check-and-put and the loop's final drain: no request is put after the drain.
        self._gate = threading.Lock()
        self._ended = False
        self._stopped = False
        self.died: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="raycat-engine-step", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._build_error is not None:
            self._thread.join()
            raise self._build_error

    def _run(self) -> None:
        try:
            self.built = self._build()
            self._engine = self._engine_of(self.built)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the constructor's thread
            self._build_error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop()

    def submit(self, prompt: Any, params: Any, lora: Any = None) -> Future:
        """A future of ``(RequestOutput, engine seconds)`` for one request."""
        future: Future = Future()
        with self._gate:
            if self._ended or self._stopped:
                future.set_exception(EngineDied(f"engine is not running: {self.died!r}"))
                return future
            self._inbox.put(_Request(prompt, params, lora, future))
        self._wake.set()
        return future

    def close(self) -> None:
        """Stop stepping; requests still waiting fail."""
        self._stopped = True
        self._inbox.put(None)
        self._wake.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def _admit(self) -> None:
        while True:
            try:
                request = self._inbox.get_nowait()
            except queue.Empty:
                return
            if request is None:  # close()
                self._stopped = True
                return
            if not request.future.set_running_or_notify_cancel():
                continue
            request.key = str(next(self._ids))
            try:
                self._engine.add_request(request.key, request.prompt, request.params, lora_request=request.lora)
            except Exception as exc:
                if type(exc).__name__ == "EngineDeadError":  # the engine core is gone, not this request
                    self._running[request.key] = request  # fails with the others
                    raise
                # This request is refused (e.g. too long); the others go on.
                request.future.set_exception(exc)
                continue
            self._running[request.key] = request

    def _step(self) -> None:
        began = time.perf_counter()
        outputs = self._engine.step()
        share = (time.perf_counter() - began) / max(len(self._running), 1)
        for request in self._running.values():
            request.seconds += share
        for output in outputs:
            if not output.finished:
                continue
            request = self._running.pop(output.request_id, None)
            if request is not None:
                request.future.set_result((output, request.seconds))

    def _loop(self) -> None:
        try:
            while not self._stopped:
                # Cleared before admitting: a submit after the admit sets it again, so no wake is lost.
                self._wake.clear()
                self._admit()
                if self._stopped:
                    break
                if self._running and self._engine.has_unfinished_requests():
                    self._step()
                elif not self._running:
                    self._wake.wait()
                else:
                    # The engine holds none of our requests yet reports none finished: fail them, never hang.
                    self._fail(EngineDied(f"engine lost {len(self._running)} request(s) without output"))
        except BaseException as exc:  # noqa: BLE001 - the engine is gone; its callers must hear why
            self.died = exc
            if self._on_death is not None:
                # First: a caller woken by the failure below must not report an error from this process
                # before it exits (Ray would not retry an application error on a new actor).
                self._on_death(exc)
            self._end(EngineDied(f"engine failed while generating: {exc!r}"))
            return
        self._end(EngineDied("engine closed"))

    def _end(self, error: BaseException) -> None:
        with self._gate:
            self._ended = True
        self._fail(error)

    def _fail(self, error: BaseException) -> None:
        waiting = list(self._running.values())
        self._running.clear()
        while True:
            try:
                request = self._inbox.get_nowait()
            except queue.Empty:
                break
            if request is not None and request.future.set_running_or_notify_cancel():
                waiting.append(request)
        for request in waiting:
            if not request.future.done():
                request.future.set_exception(error)
