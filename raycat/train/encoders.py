"""Tokenizing a phase's training rows on Ray actors beside the preparation task.

The preparation task reads the rows (a streamed join) and keeps what must be sequential: the spool in
row order, the seeded shuffle, the hashes. Tokenizing is ~80% of its time (a tokenizer call per
example), so each batch goes to one of a few ``Encoder`` actors and comes back in the order it was sent,
with at most ``WINDOW`` batches per actor in flight: memory stays a few batches, the rows and the
skipped file stay in the same order as when encoded in place.

The actors take the CPUs free when the preparation starts (at most ``MAX_ENCODERS``), one tokenizer
thread each (the fast tokenizer's batch call would otherwise use every core of the node per actor).
None free, none placed within ``READY_S``, or the phase's ``encode`` not loadable on them (a remote-code
tokenizer whose module only the preparation task has), and the batches are encoded in the task itself.
"""

from __future__ import annotations

import logging
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from raycat.ray_env import get

# Past ~8 the preparation task's own sequential share (hashing, shuffling, writing) is the limit.
MAX_ENCODERS = 8
WINDOW = 2
READY_S = 60.0

MapBatches = Callable[[Callable, Iterable], Iterator]
ONE_THREAD = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "RAYON_NUM_THREADS": "1"}}
log = logging.getLogger(__name__)


class Encoder:
    """Runs a phase's ``encode`` on the batches sent to it; the function is fetched once per phase."""

    def __init__(self):
        self.key, self.fn = None, None

    def ready(self) -> bool:
        return True

    def load(self, key: str, boxed: list) -> None:
        if key != self.key:
            import ray

            # Boxed so Ray does not fetch it for every call: the tokenizer can be megabytes.
            self.key, self.fn = key, ray.get(boxed[0])

    def run(self, key: str, boxed: list, batch):
        self.load(key, boxed)
        return self.fn(batch)


def _start(limit: int) -> list:
    import ray

    free = int(ray.available_resources().get("CPU", 0))
    remote = ray.remote(num_cpus=1)(Encoder).options(runtime_env=ONE_THREAD)
    actors = [remote.remote() for _ in range(max(0, min(limit, free)))]
    if not actors:
        return []
    pings = {a.ready.remote(): a for a in actors}
    done, _ = ray.wait(list(pings), num_returns=len(pings), timeout=READY_S)
    placed = []
    for ref in done:
        try:
            ray.get(ref)
            placed.append(pings[ref])
        except ray.exceptions.RayError:
            pass
    for actor in set(actors) - set(placed):
        # Not placed (another job took the CPUs between the count and the placement) or not started.
        ray.kill(actor)
    return placed


def _ordered(actors: list, fn: Callable, batches: Iterable) -> Iterator:
    import ray

    key, boxed, inflight = uuid.uuid4().hex, [ray.put(fn)], deque()
    try:
        ray.get([a.load.remote(key, boxed) for a in actors])
    except ray.exceptions.RayError as e:
        reason = str(e).splitlines()[0]
        log.warning("tokenizing in the preparation task: its encode does not load on the Encoder actors (%s)", reason)
        yield from map(fn, batches)
        return
    for i, batch in enumerate(batches):
        inflight.append(actors[i % len(actors)].run.remote(key, boxed, batch))
        if len(inflight) >= WINDOW * len(actors):
            yield get(inflight.popleft())
    while inflight:
        yield get(inflight.popleft())


@contextmanager
def pool(limit: int = MAX_ENCODERS) -> Iterator[MapBatches]:
    """``map_batches(fn, batches)``: ``fn`` of each batch, in order, on Encoder actors (or in place)."""
    import ray

    actors = _start(limit) if ray.is_initialized() else []
    try:
        yield (lambda fn, batches: _ordered(actors, fn, batches)) if actors else map
    finally:
        for actor in actors:
            ray.kill(actor)
