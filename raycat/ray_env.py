"""Connecting to Ray: an existing cluster (ray job submit sets RAY_ADDRESS) or a local one."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from raycat import progress
from raycat.config import RayConfig
from raycat.errors import RaycatError
from raycat.preflight import local_cpus, storage_problem


@contextmanager
def ray_session(cfg: RayConfig, run_dir: str | None = None) -> Iterator[None]:
    """A Ray session for one stage or a whole run. With ``run_dir``, a newly opened session first checks
    that every node can reach it (``preflight.storage_problem``)."""
    import ray

    started = False
    if not ray.is_initialized():
        # "local" rather than a bare init: a stale cluster file must not attach us to a dead head.
        address = cfg.address or os.environ.get("RAY_ADDRESS") or "local"
        kwargs = local_kwargs(cfg) if address == "local" else {}
        ray.init(address=address, include_dashboard=False if address == "local" else None, log_to_driver=True, **kwargs)
        started = True
    if started and run_dir is not None:
        problem = storage_problem(run_dir, ray.nodes(), ray.get_runtime_context().get_node_id(), os.getcwd())
        if problem:
            ray.shutdown()
            raise RaycatError(f"pre-flight: {problem}")
    if not progress.verbose():
        # Ray Data's per-dataset INFO lines; RAYCAT_VERBOSE=1 keeps them.
        logging.getLogger("ray.data").setLevel(logging.WARNING)
    # raycat draws one rich progress bar per stage instead.
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def local_kwargs(cfg: RayConfig) -> dict:
    """``ray.init`` arguments for a local Ray that raycat starts itself."""
    kwargs: dict = {"num_cpus": cfg.num_cpus} if cfg.num_cpus else {}
    if "RAY_num_workers_soft_limit" not in os.environ:
        # Ray's default keeps as many idle workers as the node has free CPUs and kills the rest after
        # 1 s; an engine holds nearly every CPU of a laptop, so each part write started a fresh Python
        # worker (~1 s of a core): the 2-core score pipeline took 1.7x as long (bench/score.py). A
        # fixed limit, with room for a stage's actors, keeps the task workers (idle ones stay for the
        # session, ~0.1-0.3 GB each; Ray's memory monitor can still end them).
        cpus = local_cpus(cfg)
        kwargs["_system_config"] = {"num_workers_soft_limit": max(2 * cpus, cpus + 8)}
    return kwargs


def get(ref):
    """``ray.get(ref)`` (one ref or a list, in order), with a raycat error raised in a task re-raised as
    itself (the user's one-line message, not a remote traceback)."""
    import ray

    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        cause = e.cause
        while cause is not None and not isinstance(cause, RaycatError):
            cause = getattr(cause, "cause", None) or cause.__cause__
        if isinstance(cause, RaycatError):
            raise cause from None
        raise


def remote_call(task, *args, **kwargs):
    """``get(task.remote(...))``: one task's result, its raycat error as itself."""
    return get(task.remote(*args, **kwargs))
