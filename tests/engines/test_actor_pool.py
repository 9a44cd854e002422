"""The engine actor pool (the Ray Data shell of score, teach and eval): input columns checked before any
engine starts, and the Ray resources and placement groups of a pool."""

from __future__ import annotations

import pandas as pd
import pytest

from raycat.config import EngineConfig
from raycat.engines import actor_pool
from raycat.errors import RaycatError


class _NeverStarts(actor_pool.EngineActor):
    REQUIRED_COLUMNS = ("id", "question", "gold")

    def __init__(self, plan):
        raise AssertionError("an engine started although the input was invalid")


def test_missing_input_column_is_reported_with_the_stage_before_any_engine():
    import ray

    rows = pd.DataFrame({"id": ["a"], "question": ["q?"]})
    pool = actor_pool.Pool.of(EngineConfig())
    with pytest.raises(RaycatError, match=r"teach: input rows lack column\(s\) gold"):
        actor_pool.run("teach", rows, _NeverStarts, plan=None, pool=pool, parts_dir="/nonexistent")
    assert not ray.is_initialized()


def test_pool_resources_follow_the_engine_config():
    gpu = actor_pool.Pool.of(
        EngineConfig(device="gpu", tensor_parallel_size=2, pipeline_parallel_size=2, num_engines=3, cpus_per_engine=4)
    )
    # A 4-GPU engine (TP 2 x PP 2): its actor asks for no GPU itself; each engine gets a STRICT_PACK
    # placement group of 4 GPU bundles (vLLM's Ray executor fills them), the first holding the actor's CPUs.
    assert (gpu.size, gpu.num_gpus, gpu.num_cpus, gpu.gpu_bundles) == (3, 0, 4, 4)
    assert gpu.placement_bundles() == [{"GPU": 1, "CPU": 4}] + [{"GPU": 1, "CPU": 1}] * 3
    args = gpu.remote_args()
    assert (args["num_gpus"], args["num_cpus"], args["max_restarts"]) == (0, 4, 3)
    assert callable(args["ray_remote_args_fn"])
    one = actor_pool.Pool.of(EngineConfig(device="gpu", cpus_per_engine=2))
    # One GPU: a plain actor, no placement group
    # Ray restarts a dead engine actor at most engine.max_restarts times (Ray Data's default: forever).
    assert one.remote_args() == {"num_gpus": 1, "num_cpus": 2, "max_restarts": 3}
    assert actor_pool.Pool.of(EngineConfig(device="gpu"), remote=True).num_gpus == 0
    # a CPU engine: its process computes with the CPUs it was given, rounded up (every thread of it)
    cpu = actor_pool.Pool.of(EngineConfig(device="cpu", cpus_per_engine=1.5)).remote_args()
    assert cpu == {
        "num_gpus": 0,
        "num_cpus": 1.5,
        "max_restarts": 3,
        "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "2"}},
    }
    # A teach or eval pool of vLLM engines takes batches_in_flight batches an actor, on its threads; scoring
    # and other backends one.
    assert actor_pool.Pool.of(EngineConfig(batches_in_flight=3), generate=True).in_flight == 3
    assert actor_pool.Pool.of(EngineConfig(batches_in_flight=3)).in_flight == 1
    assert actor_pool.Pool.of(EngineConfig(backend="null"), generate=True).in_flight == 1
    assert actor_pool.Pool.of(EngineConfig(max_restarts=0)).remote_args()["max_restarts"] == 0


def test_multi_gpu_engine_placement_group_is_strict_pack(monkeypatch):
    import ray

    made = {}

    # Records the request; the real call needs a cluster with GPUs
    def fake_pg(bundles, strategy):
        made.update(bundles=bundles, strategy=strategy)
        return object()

    monkeypatch.setattr(ray.util, "placement_group", fake_pg)
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pool = actor_pool.Pool.of(EngineConfig(device="gpu", tensor_parallel_size=2))
    groups: list = []
    got = pool.remote_args(groups)["ray_remote_args_fn"]()
    assert made == {"bundles": [{"GPU": 1, "CPU": 1}] * 2, "strategy": "STRICT_PACK"}
    # Recorded, so the pool removes it when it ends (tests/engines/test_gpu_lifecycle.py)
    assert len(groups) == 1
    strategy = got["scheduling_strategy"]
    assert isinstance(strategy, PlacementGroupSchedulingStrategy)
    assert strategy.placement_group_capture_child_tasks  # vLLM's workers land in the same group


def test_a_row_answered_after_a_failed_request_is_not_counted_as_retried_again(tmp_path):
    # A teacher's parts after two runs: the first failed rows a and b (one part), the second answered
    # a in a part of its own; the failed part is still there.
    from raycat.storage import rundir

    rows_path = str(tmp_path / "rows.parquet")
    rundir.write_parquet(rows_path, pd.DataFrame({"id": ["a", "b", "c"], "row_hash": ["h", "h", "h"]}))
    parts = str(tmp_path / "parts")
    rundir.write_part(pd.DataFrame({"id": ["a", "b"], "row_hash": "h", "status": "failed"}), parts)
    rundir.write_part(pd.DataFrame({"id": ["a"], "row_hash": "h", "status": "verified"}), parts)
    counts = actor_pool.todo_count(rows_path, [(parts, "!failed"), (parts, "failed")])
    # a: answered (cached); b: failed earlier, to retry; c: never sent.
    assert counts == {"rows": 3, "done": [1, 1], "todo": 1}
