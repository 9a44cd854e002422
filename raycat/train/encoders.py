"""Tokenizing a phase's training rows on Ray actors beside the preparation task.

The preparation task reads the rows (a streamed join) and keeps what must be sequential: the spool in
row order, the seeded shuffle, the hashes. Tokenizing is ~80% of its time (a tokenizer call per
example), so each batch goes to one of a few ``Encoder`` actors and comes back in the order it was sent,
with at most ``WINDOW`` batches per actor in flight: memory stays a few batches, the rows and the
skipped file stay in the same order as when encoded in place.

The actors take the CPUs free when the preparation starts (at most ``MAX_ENCODERS``); none free, or
none placed within ``READY_S``, and the batches are encoded in the task itself.
"""

from __future__ import annotations

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


class Encoder:
    """Runs a phase's ``encode`` on the batches sent to it; the function is fetched once per phase."""

    def __init__(self):
        self.key, self.fn = None, None

    def ready(self) -> bool:
        return True

    def run(self, key: str, boxed: list, batch):
        if key != self.key:
            import ray

            # Boxed so Ray does not fetch it for every call: the tokenizer can be megabytes.
            self.key, self.fn = key, ray.get(boxed[0])
        return self.fn(batch)


def _start(limit: int) -> list:
    import ray

    free = int(ray.available_resources().get("CPU", 0))
    actors = [ray.remote(num_cpus=1)(Encoder).remote() for _ in range(max(0, min(limit, free)))]
    if not actors:
        return []
    pings = {a.ready.remote(): a for a in actors}
    done, _ = ray.wait(list(pings), num_returns=len(pings), timeout=READY_S)
    placed = [pings[r] for r in done]
    for actor in set(actors) - set(placed):
        # Another job took the CPUs between the count and the placement.
        ray.kill(actor)
    return placed


def _ordered(actors: list, fn: Callable, batches: Iterable) -> Iterator:
    import ray

    key, boxed, inflight = uuid.uuid4().hex, [ray.put(fn)], deque()
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
