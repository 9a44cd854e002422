"""Where an engine actor computes (real Ray): on the thread that built its engine, in a local Ray that
keeps its task workers (part writes) between blocks while the engine holds the CPUs."""

from __future__ import annotations

import os
import threading
import time

import pandas as pd
import pyarrow.parquet as pq
import pytest

from raycat.config import EngineConfig, RayConfig
from raycat.engines import actor_pool
from raycat.ray_env import local_kwargs, ray_session

pytestmark = pytest.mark.integration


class _ThreadProbe(actor_pool.EngineActor):
    REQUIRED_COLUMNS = ("id",)

    def __init__(self, plan):
        self.built_on = threading.get_ident()

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        return batch.assign(same_thread=threading.get_ident() == self.built_on)


def test_a_one_batch_engine_is_called_on_the_thread_that_built_it(tmp_path, monkeypatch):
    # vLLM on CPU binds its OpenMP team to the thread that built the engine; Ray Data calls a map actor
    # from another thread unless told otherwise.
    rows = pd.DataFrame({"id": [f"r{i}" for i in range(24)]})
    pool = actor_pool.Pool.of(EngineConfig(batch_size=4))
    assert pool.in_flight == 1
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with ray_session(RayConfig(num_cpus=2)):
        written = actor_pool.run("score", rows, _ThreadProbe, None, pool, str(tmp_path / "parts"))
    assert written == 24
    out = pd.concat(pq.read_table(p).to_pandas() for p in (tmp_path / "parts").rglob("*.parquet"))
    assert sorted(out["id"]) == sorted(rows["id"]) and out["same_thread"].all()


def test_a_local_ray_keeps_its_idle_task_workers_while_an_engine_holds_the_cpus(monkeypatch):
    import ray

    monkeypatch.delenv("RAY_num_workers_soft_limit", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert not ray.is_initialized()
    assert local_kwargs(RayConfig(num_cpus=2))["_system_config"] == {"num_workers_soft_limit": 10}

    # Actors holding nearly every CPU, as a CPU engine does (the demo's asks for 1.5 of 2).
    @ray.remote(num_cpus=0.9)
    class Holder:
        def ready(self):
            return True

    @ray.remote(num_cpus=0.1)
    def pid():
        return os.getpid()

    with ray_session(RayConfig(num_cpus=2)):
        holders = [Holder.remote() for _ in range(2)]
        ray.get([h.ready.remote() for h in holders])
        first = ray.get(pid.remote())
        # Ray's default keeps as many idle workers as the node has free CPUs (none here) and kills the
        # rest after 1 s: the next task would start a fresh Python process.
        time.sleep(2.5)
        assert ray.get(pid.remote()) == first
