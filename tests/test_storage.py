"""Run dirs on shared storage: the pre-flight that refuses a local run_dir where work lands on other
nodes, and eval targets read through the run-dir URI."""

from __future__ import annotations

import json

import pytest

from raycat.preflight import storage_problem


def _node(node_id: str, cpu: float = 2, gpu: float = 0, alive: bool = True) -> dict:
    return {"NodeID": node_id, "Alive": alive, "Resources": {"CPU": cpu, "GPU": gpu} if cpu or gpu else {}}


@pytest.mark.parametrize(
    ("run_dir", "nodes", "cwd", "refused"),
    [
        ("s3://bucket/run", [_node("head", 0), _node("w1"), _node("w2")], "/home/u", None),
        ("file:///mnt/shared/run", [_node("head", 0), _node("w1")], "/home/u", None),
        # One machine: local Ray, or a one-node cluster
        ("/data/run", [_node("head")], "/home/u", None),
        ("/data/run", [_node("head"), _node("w1", alive=False)], "/home/u", None),  # a dead node runs nothing
        ("/data/run", [_node("head"), _node("w1")], "/home/u", "1 other node(s)"),
        ("/data/run", [_node("head", 0)], "/home/u", "this one has no CPUs"),  # autoscaler adds the workers
        ("runs/x", [_node("head")], "/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_ab", "uploaded"),
    ],
)
def test_storage_preflight(run_dir, nodes, cwd, refused):
    problem = storage_problem(run_dir, nodes, "head", cwd)
    if refused is None:
        assert problem is None
    else:
        assert refused in problem and "s3://" in problem and repr(run_dir) in problem


def test_eval_targets_serve_lora_phases_as_adapters_and_load_full_phases(tmp_path):
    from raycat.config import validate_config
    from raycat.evaluate.stage import make_plans

    run = tmp_path / "run"
    for recipe, adapter in (("sft_all", True), ("distill_all", False)):
        pdir = run / "train" / recipe / "phase1"
        (pdir / "model").mkdir(parents=True)
        (pdir / "done.json").write_text(json.dumps({"hash": recipe}))
        (pdir / "model" / ("adapter_config.json" if adapter else "config.json")).write_text('{"r": 4}')
    cfg = validate_config(
        {"run_dir": f"file://{run}", "data": {"source": "synthetic"}, "score": {"student": {"path": "org/student"}}}
    )
    got = {t.name: t for t in make_plans(cfg, ["sft_all", "distill_all"])}
    lora, full = got["sft_all/phase1"], got["distill_all/phase1"]
    assert (lora.model_path, lora.adapter) == ("org/student", f"file://{run}/train/sft_all/phase1/model")
    assert (full.model_path, full.adapter) == (f"file://{run}/train/distill_all/phase1/model", None)
    # The cache key follows the model dir's content: a retrained adapter is evaluated again.
    (run / "train/sft_all/phase1/model/adapter_config.json").write_text('{"r": 8}')
    assert {t.name: t for t in make_plans(cfg, ["sft_all"])}["sft_all/phase1"].cache_key != lora.cache_key
