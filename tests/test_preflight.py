"""The pre-flight checks before any stage starts: a run dir every node can reach, resources and versions."""

from __future__ import annotations

import socket

import pytest

from raycat.config import load_config
from raycat.preflight import storage_problem
from tests.helpers import DEMO, ROOT, moto_s3


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


def test_model_and_data_paths_are_checked_without_the_hub(tmp_path, monkeypatch):
    """Local paths must exist (a model dir with config.json); a hub id is never a failure offline or
    when the hub cannot be reached: it is reported as not checked."""
    from raycat.config import DataConfig
    from raycat.preflight import data_check, model_check

    env = {"HF_HUB_OFFLINE": "1"}
    assert model_check("k", "org/model", env).status == "unchecked"
    assert "HF_HUB_OFFLINE=1" in model_check("k", "org/model", env).text
    # Online, but nothing answers (a closed loopback port): still one "not checked" line, no traceback.
    import huggingface_hub.constants

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{closed}")
    online = model_check("k", "org/model", {})
    assert online.status == "unchecked" and "hub not reachable from here" in online.text
    assert model_check("k", str(tmp_path / "missing"), env).status == "problem"
    assert model_check("k", str(tmp_path), env).text.endswith("without config.json (not an HF model dir)")
    (tmp_path / "config.json").write_text("{}")
    assert model_check("k", str(tmp_path), env).status == "ok"
    assert model_check("k", "registry:nope", env).status == "problem"

    def data(path):
        cfg = load_config(DEMO).model_copy(update={"data": DataConfig(source="mmlu_pro", path=path)})
        return data_check(cfg, env)

    assert data("TIGER-Lab/MMLU-Pro").status == "unchecked"
    assert data(str(tmp_path / "nope" / "q.jsonl")).status == "problem"
    assert data("package:raycat_no_such_pkg/q.jsonl").status == "problem"
    (tmp_path / "q.jsonl").write_text('{"question": "q"}\n')
    assert data(str(tmp_path / "q.jsonl")).status == "ok"


def test_gpu_checks_against_the_config_or_the_cluster():
    from raycat.preflight import gpu_checks

    gpu = load_config(ROOT / "jobs/configs/llama-3.1-70b-mmlu-pro-lora.yaml")
    [declared] = gpu_checks(gpu, ["score", "teach", "train"], None, "no cluster")
    assert declared.status == "ok" and "16 GPU at its largest stage (score, train)" in declared.text
    # Only the stages that run are asked about: eval is not in this run.
    got = gpu_checks(gpu, ["score", "train"], {"CPU": 256.0, "GPU": 8.0}, "here")
    assert [c.text for c in got] == [
        "score asks for 16 GPU but the cluster has 8 (here)",
        "train asks for 16 GPU but the cluster has 8 (here)",
    ]
    wide = load_config(ROOT / "jobs/configs/llama-3.1-70b-mmlu-pro-lora.yaml", ["score.engine.tensor_parallel_size=16"])
    assert "one engine spans 16 GPUs" in gpu_checks(wide, ["score"], None, "no cluster")[0].text


def test_a_cot_recipe_without_a_teach_section_is_one_of_the_problems():
    from raycat.preflight import refusal, whole_run

    cfg = load_config(DEMO, ["split.test_fraction=0"]).model_copy(update={"teach": None})
    checks = whole_run(cfg, ["complexity_aware"], ["score", "split", "train", "eval"], None, "-", {})
    message = refusal(checks)
    assert "no teach: section" in message and "split.test_fraction is 0" in message
    assert refusal(whole_run(cfg, ["sft_all"], ["train"], None, "-", {})) is None


def test_s3_run_dir_is_probed_for_list_and_write(monkeypatch, tmp_path):
    """Against moto's S3 server on loopback: an existing bucket passes and keeps no probe object (only
    the run dir's folder marker); a bucket that does not exist is one line naming the run dir."""
    import boto3

    from raycat.preflight import run_dir_check

    with moto_s3(tmp_path / "s3.log") as aws:
        for key, value in aws.items():
            monkeypatch.setenv(key, value)
        s3 = boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"])
        s3.create_bucket(Bucket="raycat-runs")
        ok = run_dir_check("s3://raycat-runs/a/run")
        assert ok.status == "ok", ok.text
        # pyarrow keeps the emptied prefix as a folder marker; the probe itself is gone.
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="raycat-runs").get("Contents", [])]
        assert keys == ["a/run/"]
        missing = run_dir_check("s3://raycat-missing/run")
        assert missing.status == "problem" and "'s3://raycat-missing/run' cannot be listed or written" in missing.text
        assert "\n" not in missing.text
