"""The pre-flight checks before any stage starts: a run dir every node can reach, resources and versions."""

from __future__ import annotations

import pytest

from raycat.config import load_config
from raycat.preflight import storage_problem
from tests.helpers import DEMO, ROOT


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


def test_preflight_resources_and_versions():
    from raycat.preflight import resource_problems, stage_asks, version_problems

    cfg = load_config(DEMO)
    assert stage_asks(cfg)["train"] == {"CPU": 2, "GPU": 0}
    assert resource_problems(cfg, {"CPU": 2.0}) == []
    gpu = load_config(ROOT / "jobs/configs/qwen2.5-3b-mmlu-pro.yaml")
    problems = resource_problems(gpu, {"CPU": 64.0, "GPU": 2.0})
    assert "score asks for 4 GPU but the cluster has 2" in problems
    assert "teach asks for 4 GPU but the cluster has 2" in problems  # one TP-4 engine for the 72B teacher
    errors, _ = version_problems(cfg)
    assert errors == []  # this environment has everything the demo needs


def test_gpu_scoring_with_cpu_training_or_a_cpu_teacher_is_warned_key_by_key():
    """Review §3: everything defaults to CPU, so score.engine.device=gpu alone left training and the
    teacher on CPUs without a word."""
    from raycat.preflight import device_mix_warnings

    gpu = ["score.engine.device=gpu", "eval.engine.device=gpu"]
    assert device_mix_warnings(load_config(DEMO)) == []  # all CPU: meant
    got = device_mix_warnings(load_config(DEMO, gpu))
    assert len(got) == 2 and "set train.device=gpu" in got[0] and "set teach.teachers.0.engine.device=gpu" in got[1]
    every = [*gpu, "train.device=gpu", "teach.teachers.0.engine.device=gpu"]
    assert device_mix_warnings(load_config(DEMO, every)) == []
