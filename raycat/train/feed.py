"""A training worker's data feed: its Ray Data shard as micro-batches of torch tensors, and the first
fetch started early so that Ray Data's start (read tasks, the split across workers) overlaps the model
load and DeepSpeed init instead of following them."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterable, Iterator

from raycat.train.batches import collate, length_groups, pack


def micro_batches(shard, batching: str, micro_batch_size: int, pad_id: int, seed: int, epoch: int):
    """This worker's micro-batches for an epoch as torch tensors, in ``train.batching``'s form.

    Deterministic for a given epoch (Ray Data's seeded local shuffle, seeded grouping), so a resumed
    run skips exactly the micro-batches it had consumed."""
    import torch

    size = micro_batch_size
    # Micro-batches sorted together.
    group = 8 if batching == "grouped" else 1
    batches = shard.iter_batches(
        batch_size=size * group,
        batch_format="numpy",
        local_shuffle_buffer_size=size * 8,
        local_shuffle_seed=seed + epoch,
        prefetch_batches=1,
    )
    for k, batch in enumerate(batches):
        ids, labels = list(batch["input_ids"]), list(batch["labels"])
        order = list(range(len(ids)))
        if group > 1:
            order = length_groups([len(x) for x in ids], size, seed=seed + 7919 * epoch + k)
        for i in range(0, len(order), size):
            chosen = order[i : i + size]
            x, y = [ids[j] for j in chosen], [labels[j] for j in chosen]
            arrays = pack(x, y) if batching == "packed" else collate(x, y, pad_id)
            yield {name: torch.from_numpy(v) for name, v in arrays.items()}


# Bumped whenever micro_batches orders the same shard differently (buffer sizes, grouping, seeds).
FEED_VERSION = 1


def layout(spans: list[tuple[int, int]], world: int) -> dict:
    """What, besides the phase hash, fixes an epoch's micro-batch sequence on each worker: the read
    tasks' row-group spans (Ray's equal split deals whole blocks; the local shuffle mixes what one
    buffer holds), the worker count and this module's ordering. A checkpoint's state.json records it."""
    digest = hashlib.sha256(json.dumps([list(span) for span in spans]).encode()).hexdigest()[:16]
    return {"version": FEED_VERSION, "read_tasks": len(spans), "read_spans": digest, "world": world}


class FeedMismatch(RuntimeError):
    """A mid-epoch checkpoint cannot resume under this fit's feed layout (``resume_refusal`` says why)."""


def check_resumable(saved: dict, current: dict, phase: str, checkpoints: str) -> None:
    """Raise ``FeedMismatch`` where ``resume_refusal`` refuses."""
    refusal = resume_refusal(saved, current, phase, checkpoints)
    if refusal is not None:
        raise FeedMismatch(refusal)


def resume_refusal(saved: dict, current: dict, phase: str, checkpoints: str) -> str | None:
    """Why the checkpoint state ``saved`` cannot resume under the feed layout ``current`` (None: it can).

    Only a checkpoint written mid-epoch depends on the layout: the resumed worker skips the micro-batches
    it had trained on, which are other examples under another layout, so some of that epoch's examples
    would be seen twice and others never. One without a recorded layout (before raycat recorded it) is
    refused mid-epoch too: its layout is unknown."""
    if saved.get("batch", 0) == 0:
        return None
    was = saved.get("feed")
    if was == current:
        return None
    if was is None:
        differs = "a layout it did not record (written by an older raycat)"
    else:
        keys = sorted(k for k in set(was) | set(current) if was.get(k) != current.get(k))
        differs = ", ".join(f"{k} {was.get(k)} then, {current.get(k)} now" for k in keys)
    hint = ""
    if was is not None and was.get("world") != current.get("world"):
        hint = f"rerun with train.num_workers: {was.get('world')}, or "
    return (
        f"{phase}: the latest checkpoint stopped mid-epoch (epoch {saved.get('epoch')}, after "
        f"{saved['batch']} micro-batches per worker) under another data feed ({differs}); resuming would "
        f"train on some of that epoch's examples twice and skip others. To go on: {hint}remove the fit's "
        f"checkpoints, {checkpoints}, and rerun to train the phase again"
    )


class Started(Iterable):
    """``items`` with its first item fetched in a background thread from construction on; iterating
    waits for that fetch, then goes on in the caller's thread (the thread never touches ``items`` again).
    A fetch error is raised where the items are iterated, as it would have been without the thread."""

    def __init__(self, items: Iterator) -> None:
        self._items = items
        self._first: list = []
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fetch, name="raycat-first-batch", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            self._first = [next(self._items)]
        except StopIteration:
            pass
        except BaseException as e:  # handed to the iterating thread
            self._error = e

    def __iter__(self) -> Iterator:
        self._thread.join()
        if self._error is not None:
            raise self._error
        yield from self._first
        yield from self._items
