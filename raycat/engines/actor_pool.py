"""The Ray Data shell shared by every stage that runs a model: score, teach and eval.

rows (a Ray Dataset read on the workers, or a small pandas frame) → optionally, rows already done are
dropped (on a worker; done = their (id, row_hash) key has a part, ``raycat.storage.rowkey``) → optional
light CPU stages → a fixed-size actor pool, one engine per actor (``EngineActor`` subclasses) →
each finished block written by a worker as an atomic Parquet part (``rundir.write_part``: the
stage's resume state). The driver only counts rows for progress. The actor's constructor takes one
frozen plan holding everything it needs; the input columns it reads are declared
(``REQUIRED_COLUMNS``) and checked before any engine starts.
"""

from __future__ import annotations

import math
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd

from raycat.config import EngineConfig
from raycat.errors import RaycatError
from raycat.storage import rowkey, rundir


class EngineActor:
    """Base of a Ray Data engine stage: ``self.engine`` is closed when Ray ends the actor. A generation
    actor's ``__call__`` may run on several threads at once (``Pool.in_flight``): its own state is
    read-only, except what ``render_lock`` guards."""

    REQUIRED_COLUMNS: ClassVar[tuple[str, ...]] = ()
    engine: Any = None
    # A fast tokenizer is not safe to call from several threads ("Already borrowed"): prompts are
    # rendered one call at a time (cheap beside generation).
    render_lock = threading.Lock()

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()


@dataclass(frozen=True)
class Pool:
    """Ray resources of an engine actor pool: one engine per actor, ``size`` actors."""

    size: int
    batch_size: int
    num_gpus: float
    num_cpus: float
    # > 1: the engine spans this many GPUs (tensor x pipeline parallel), one placement-group bundle each.
    gpu_bundles: int = 0
    # Batches an actor works on at once (its engine streams: ``engines.stream``).
    in_flight: int = 1
    # Ray restarts of an actor whose process died (Ray Data's default is forever).
    max_restarts: int = 3

    @classmethod
    def of(cls, engine: EngineConfig, *, remote: bool = False, generate: bool = False) -> Pool:
        """An engine on GPU asks for tensor x pipeline parallel GPUs; a remote (HTTP) engine for a
        fraction of a CPU and no GPU: it only waits on the network. ``generate``: a teach or eval pool,
        whose vLLM engines stream (``streams``)."""
        common = dict(max_restarts=engine.max_restarts)
        if remote:
            return cls(engine.num_engines, engine.batch_size, 0, 0.25, **common)
        if generate and streams(engine.backend):
            common["in_flight"] = engine.batches_in_flight
        gpus = engine.tensor_parallel_size * engine.pipeline_parallel_size if engine.device == "gpu" else 0
        if gpus > 1:
            return cls(engine.num_engines, engine.batch_size, 0, engine.cpus_per_engine, gpu_bundles=gpus, **common)
        return cls(engine.num_engines, engine.batch_size, gpus, engine.cpus_per_engine, **common)

    def compute(self):
        """The actor pool: fixed size (vLLM start-up is long); a streaming engine takes several batches at
        once, each on its own thread of the actor. One batch at a time runs on the actor's main thread,
        the one that built the engine: by default Ray Data calls the actor from a thread of its own, and
        vLLM on CPU binds its OpenMP team to the building thread (a second team from the calling thread
        made the 2-core score pipeline 1.3x slower; bench/score.py)."""
        import ray

        return ray.data.ActorPoolStrategy(
            size=self.size,
            max_concurrent_calls_per_actor=self.in_flight,
            # One at a time: Ray Data's default, which queues the next block at the actor.
            max_tasks_in_flight_per_actor=self.in_flight if self.in_flight > 1 else None,
            enable_true_multi_threading=True,
        )

    def placement_bundles(self) -> list[dict[str, float]]:
        """One bundle per GPU of a multi-GPU engine; bundle 0 also holds the actor's CPUs."""
        return [{"GPU": 1, "CPU": self.num_cpus if i == 0 else 1} for i in range(self.gpu_bundles)]

    def remote_args(self, groups: list | None = None) -> dict[str, Any]:
        """``map_batches`` resource arguments. A multi-GPU engine's actor asks for no GPU itself: it runs
        in its own STRICT_PACK placement group (one node), and vLLM's Ray executor places its workers in
        the group's GPU bundles, as vLLM's Ray Data examples do. Every group made is appended to
        ``groups``: a group lives as long as the driver unless removed, so its GPUs would stay reserved
        for the next stage (``run`` removes them when the pool ends)."""
        if self.gpu_bundles <= 1:
            args: dict[str, Any] = {
                "num_gpus": self.num_gpus,
                "num_cpus": self.num_cpus,
                "max_restarts": self.max_restarts,
            }
            if not self.num_gpus:
                # A CPU engine computes with the CPUs it was given (rounded up). Set for the whole actor
                # process, not by the engine's constructor: a streaming engine steps on a thread of its
                # own, whose OpenMP thread count would stay at Ray's default, and vLLM's CPU attention
                # refuses a thread count that differs from the one its metadata was built with.
                args["runtime_env"] = {"env_vars": {"OMP_NUM_THREADS": str(math.ceil(self.num_cpus))}}
            return args
        bundles = self.placement_bundles()
        made = groups if groups is not None else []

        # Ray Data calls this on the driver for every actor it starts (restarts included).
        def in_placement_group() -> dict[str, Any]:
            import ray
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            group = ray.util.placement_group(bundles, strategy="STRICT_PACK")
            made.append(group)
            return {
                "scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
            }

        return {
            "num_gpus": 0,
            "num_cpus": self.num_cpus,
            "max_restarts": self.max_restarts,
            "ray_remote_args_fn": in_placement_group,
        }


def streams(backend: str) -> bool:
    """Whether a backend's engine takes concurrent ``generate`` calls into one running batch."""
    return backend == "vllm"


def remove_groups(groups: list) -> None:
    """Remove a pool's placement groups (their actors and vLLM's workers in them end with them)."""
    import ray

    while groups:
        group = groups.pop()
        try:
            ray.util.remove_placement_group(group)
        except Exception:  # noqa: BLE001 - already gone (e.g. the session ended); nothing left to free
            pass


@dataclass(frozen=True)
class Prestage:
    """A light CPU stage before the engines (e.g. chat-template rendering), one small actor."""

    cls: type
    plan: Any
    num_cpus: float = 0.25


def check_columns(stage: str, rows: pd.DataFrame | Sequence[str], required: Sequence[str]) -> None:
    """``rows``: a frame, or the column names of a dataset."""
    have = list(rows.columns) if isinstance(rows, pd.DataFrame) else list(rows)
    missing = [c for c in required if c not in have]
    if missing:
        raise RaycatError(
            f"{stage}: input rows lack column(s) {', '.join(missing)} (they have "
            f"{', '.join(map(str, have))}); rerun the upstream stage with this raycat version"
        )


# A resume rule: (parts dir, required status, "!status" for any other, or None). A row is done when its
# (id, row_hash) key has a part there (with that status): its own stage's parts, or e.g. an earlier
# teacher's verified rows.
Done = tuple[str, "str | None"]


def done_keys(done: Sequence[Done]) -> list[rowkey.KeySet]:
    return [rundir.part_keys(d, status) for d, status in done]


class SkipDone:
    """Ray Data stage: drops rows already done (read once, here on a worker, so the driver never holds
    the done keys; 8 bytes a done row)."""

    def __init__(self, done: Sequence[Done]):
        self.done = rowkey.KeySet.union(done_keys(done))

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return batch[~self.done.contains(rowkey.key64(batch))] if len(self.done) else batch


def todo_count(rows_path: str, done: Sequence[Done]) -> dict:
    """On a worker: the rows of ``rows_path``, how many each rule marks done (each rule counting only
    rows no earlier rule took) and how many are left."""
    rules = done_keys(done)
    rows, counts = 0, [0] * len(rules)
    # The rows file is streamed: memory is the done keys (8 bytes a row) plus one batch.
    for batch in rundir.iter_parquet(rows_path, ["id", "row_hash"]):
        left = rowkey.key64(batch)
        rows += len(left)
        for i, rule_keys in enumerate(rules):
            hit = rule_keys.contains(left)
            counts[i] += int(hit.sum())
            left = left[~hit]
    return {"rows": rows, "done": counts, "todo": rows - sum(counts)}


def _write(batch: pd.DataFrame, directory: str | dict[str, str]) -> pd.DataFrame:
    """One part per block; with a directory per model (an engine serving several), one per model."""
    if isinstance(directory, str):
        return pd.DataFrame({"rows": [rundir.write_part(batch, directory)]})
    written = sum(rundir.write_part(rows, directory[name]) for name, rows in batch.groupby("model", sort=False))
    return pd.DataFrame({"rows": [written]})


def run(
    stage: str,
    rows: Any,
    actor: type[EngineActor],
    plan: Any,
    pool: Pool,
    parts_dir: str | dict[str, str],
    on_rows: Callable[[int], None] = lambda n: None,
    pre: Sequence[Prestage] = (),
    skip: Sequence[Done] = (),
) -> int:
    """Run ``actor`` over ``rows`` (a ``ray.data.Dataset`` or a pandas frame); every finished block
    becomes a part in ``parts_dir``, written by a worker (a dict: the actor's rows go by their ``model``
    column, a part per model). ``skip``: leave out rows those rules mark done (see ``Done``). Returns
    rows written."""
    import ray

    # Written by workers, which do not share the driver's cwd.
    if isinstance(parts_dir, str):
        parts_dir = rundir.absolute(parts_dir)
    else:
        parts_dir = {name: rundir.absolute(d) for name, d in parts_dir.items()}
    # Blocks of a few batches: parts (the resume state) and progress arrive every few batches, and the
    # engines share the rows block by block (Ray Data gives a whole block to one actor, whose batches
    # follow one another). A streaming engine takes a block per batch: its in_flight tasks are then
    # in_flight batches, none waiting for the one before it in its block.
    block = pool.batch_size if pool.in_flight > 1 else 4 * pool.batch_size
    if isinstance(rows, pd.DataFrame):
        check_columns(stage, rows, actor.REQUIRED_COLUMNS)
        if not len(rows):
            return 0
        # A frame from the driver (benches, tests). Stages read their rows on the workers
        # (``rundir.parquet_dataset``).
        dataset = ray.data.from_pandas([rows.iloc[i : i + block] for i in range(0, len(rows), block)])
    else:
        # A Dataset's columns are checked by the caller, from its source's schema (no execution).
        dataset = rows
    if skip:
        dataset = dataset.map_batches(
            SkipDone,
            fn_constructor_kwargs={"done": [(rundir.absolute(d), status) for d, status in skip]},
            batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=0.1,
        )
    for prestage in pre:
        dataset = dataset.map_batches(
            prestage.cls,
            fn_constructor_kwargs={"plan": prestage.plan},
            batch_format="pandas",
            batch_size=pool.batch_size,
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=prestage.num_cpus,
        )
    # Cut after every map above (one fused with the read would merge its blocks again), before the
    # engines (an actor op does not fuse after the cut).
    dataset = rundir.cut_blocks(dataset, block, num_cpus=0.1)
    groups: list = []
    with warnings.catch_warnings():
        # max_restarts has no named map_batches parameter (Ray 2.60): passed as a Ray remote argument,
        # which Ray deprecates for Ray 2.64 with no replacement yet; without it Ray restarts forever.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        # vLLM start-up is long, so the pool is fixed-size: one engine per GPU or TP group.
        dataset = dataset.map_batches(
            actor,
            fn_constructor_kwargs={"plan": plan},
            batch_format="pandas",
            batch_size=pool.batch_size,
            compute=pool.compute(),
            **pool.remote_args(groups),
        )
    # Parts are written where the block was made: rows never travel through the driver.
    dataset = dataset.map_batches(
        _write, fn_kwargs={"directory": parts_dir}, batch_size=None, batch_format="pandas", num_cpus=0.1
    )
    written = 0
    try:
        for counts in dataset.iter_batches(batch_size=None, batch_format="pandas"):
            n = int(counts["rows"].sum())
            if n:
                written += n
                on_rows(n)
    finally:
        # Also on failure and Ctrl-C: the next stage (or target) gets every GPU back.
        remove_groups(groups)
    return written
