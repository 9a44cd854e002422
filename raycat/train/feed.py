"""A training worker's data feed: its Ray Data shard as micro-batches of torch tensors, and the first
fetch started early so that Ray Data's start (read tasks, the split across workers) overlaps the model
load and DeepSpeed init instead of following them."""

from __future__ import annotations

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
