"""GPUs come back between stages: every placement group a multi-GPU engine pool makes is removed when the
pool ends, so the next stage (or eval target, or Ray Train) can have them.

Ray is started with 4 logical GPUs (a resource count: nothing touches CUDA) and the engines are the null
backend (no model), at tensor_parallel_size=2: each engine actor runs in a STRICT_PACK group of two GPU
bundles, as a vLLM TP engine does. Before the fix the first pool's groups stayed reserved for the whole
session and the next stage waited for GPUs forever.
"""

from __future__ import annotations

import json
import shutil
import time

import pyarrow.parquet as pq
import pytest

from tests.helpers import tiny_config

pytestmark = pytest.mark.integration

GPUS = 4


def _all_gpus_back(what: str) -> None:
    import ray

    deadline = time.time() + 30
    while True:
        # Removal is asynchronous: the resource view catches up within a heartbeat or two.
        live = [g for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
        free = ray.available_resources().get("GPU", 0)
        if not live and free == GPUS:
            return
        if time.time() > deadline:
            raise AssertionError(f"after {what}: {free} of {GPUS} GPUs free, placement groups left: {live}")
        time.sleep(0.5)


def _fake_trained_phases(run_dir) -> None:
    """Two finished LoRA phases for eval to serve as targets (the null engine loads no weights; only the
    files eval reads to build its targets are there)."""
    for phase in ("phase1", "phase2"):
        pdir = run_dir / "train" / "complexity_aware" / phase
        (pdir / "model").mkdir(parents=True)
        (pdir / "model" / "adapter_config.json").write_text(json.dumps({"r": 4, "phase": phase}))
        (pdir / "done.json").write_text(json.dumps({"hash": phase}))


def test_tensor_parallel_pools_give_every_gpu_back_between_stages(tmp_path, tiny_model_dir):
    import ray

    from raycat.config import validate_config
    from raycat.data.questions import stage_questions
    from raycat.evaluate import stage as eval_stage
    from raycat.score import stage as score_stage
    from raycat.split import stage as split_stage
    from raycat.teach import stage as teach_stage

    tree = tiny_config(tmp_path / "run", tiny_model_dir)
    engine = {"backend": "null", "device": "gpu", "tensor_parallel_size": 2, "num_engines": 2, "batch_size": 8}
    tree["score"]["engine"] = engine
    tree["teach"]["teachers"][0]["engine"] = engine
    tree["eval"]["engine"] = engine
    tree["ray"] = {"num_cpus": 8}
    cfg = validate_config(tree)

    ray.init(address="local", num_cpus=8, num_gpus=GPUS, include_dashboard=False)
    try:
        stage_questions(cfg)
        score_stage.run(cfg)
        _all_gpus_back("score")
        # questions.parquet is one row group; the engines still get blocks of 4 batches (32 rows), so
        # both engines work and parts land every block: 40 rows -> 2 parts.
        parts = sorted((tmp_path / "run" / "score" / "parts").rglob("*.parquet"))
        assert [pq.ParquetFile(p).metadata.num_rows for p in parts] in ([32, 8], [8, 32])
        split_stage.run(cfg)
        teach_stage.run(cfg)
        _all_gpus_back("teach")
        _fake_trained_phases(tmp_path / "run")
        metrics = eval_stage.run(cfg, ["complexity_aware"])
        _all_gpus_back("eval of three targets")
    finally:
        ray.shutdown()
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
    # Every target ran on the held-out rows (null answers are empty, so none is right).
    assert {"base", "complexity_aware/phase1", "complexity_aware/phase2"} <= set(metrics["models"])
