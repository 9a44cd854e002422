"""`raycat run`'s whole-run pre-flight through the CLI: every problem of every stage listed at once before
any stage (or Ray) starts, and `raycat run --plan` on the shipped configs on a machine without GPUs."""

from __future__ import annotations

import socket
from contextlib import contextmanager

import pytest
import ray

from raycat import pipeline
from raycat.cli import main
from raycat.config import load_config
from tests.helpers import ROOT, write_config

CONFIGS = sorted((ROOT / "jobs" / "configs").glob("*.yaml"))
LARGE = [ROOT / "jobs/configs/llama-3.1-70b-mmlu-pro-lora.yaml", ROOT / "jobs/configs/llama-3.1-70b-mmlu-pro-full.yaml"]


class StageStarted(Exception):
    """Raised where the run would start Ray and its first stage: the pre-flight let it through."""


@pytest.fixture
def no_stage(monkeypatch):
    """No Ray and no stage in these tests: reaching either raises StageStarted."""

    @contextmanager
    def session(*args, **kwargs):
        raise StageStarted
        yield

    def stage(*args, **kwargs):
        raise StageStarted

    monkeypatch.setattr(pipeline, "ray_session", session)
    monkeypatch.setattr(pipeline, "run_stage", stage)
    # A local Ray here: 2 CPUs as configured or counted, no GPU, on any test machine.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listed(err: str) -> list[str]:
    """The refusal's problem lines (``  - ...``), each rejoined if the console wrapped it."""
    text = " ".join(err.split())
    assert "pre-flight found" in text, err
    return [p.strip() for p in text.split("no stage has started:", 1)[1].split(" - ") if p.strip()]


def test_two_problems_at_once_and_nothing_runs(tmp_path, capsys, monkeypatch, no_stage):
    """A missing API key and no held-out set with eval in the recipe: both lines, exit 1, and neither
    Ray nor any stage started (no manifest, no stage folder in the run dir)."""
    monkeypatch.delenv("RAYCAT_TEST_TEACHER_KEY", raising=False)
    run = tmp_path / "run"
    teacher = {"model": {"path": "hosted/teacher"}, "api": {"base_url": "http://127.0.0.1:9/v1"}}
    teacher["api"]["api_key_env"] = "RAYCAT_TEST_TEACHER_KEY"
    tree = {
        "run_dir": str(run),
        "data": {"source": "synthetic"},
        "score": {"student": {"path": "org/student"}},
        "split": {"test_fraction": 0},
        "teach": {"teachers": [teacher]},
    }
    assert main(["run", "--config", str(write_config(tmp_path, tree))]) == 1
    err = capsys.readouterr().err
    problems = _listed(err)
    assert len(problems) == 2, problems
    assert problems[0].startswith("teach.teachers.0.api.api_key_env: environment variable RAYCAT_TEST_TEACHER_KEY")
    assert problems[1].startswith("split.test_fraction is 0: no held-out set")
    assert "Traceback" not in err and not ray.is_initialized()
    assert not run.exists()
    # With the key set and a held-out set the same config gets past the pre-flight.
    monkeypatch.setenv("RAYCAT_TEST_TEACHER_KEY", "dummy")
    with pytest.raises(StageStarted):
        main(["run", "--config", str(write_config(tmp_path, tree)), "split.test_fraction=0.1"])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_passes_preflight_or_is_refused_with_every_problem(path, tmp_path, capsys, no_stage):
    """On this machine (no GPU, no hub, no API key), each shipped config either gets past the pre-flight
    or is refused before Ray or any stage starts, listing every problem the pre-flight finds."""
    run = tmp_path / "run"
    argv = ["run", "--config", str(path), f"run_dir={run}"]
    try:
        code = main(argv)
    except StageStarted:
        return
    assert code == 1
    cfg = load_config(path, [f"run_dir={run}"])
    _, checks = pipeline.check(pipeline.effective_config(cfg, [cfg.train.recipe]), [cfg.train.recipe], None, None)
    expected = [" ".join(c.text.split()) for c in checks if c.status == "problem"]
    assert expected and _listed(capsys.readouterr().err) == expected
    assert not run.exists() and not ray.is_initialized()


@pytest.mark.parametrize("path", LARGE, ids=lambda p: p.name)
def test_70b_plan_prints_on_a_cpu_machine_and_its_checks_pass(path, tmp_path, capsys, monkeypatch, no_stage):
    """`raycat run --plan` needs no GPU, Ray or hub: every stage with its engines and GPUs, the hosted
    teacher, the run dir, and checks that pass (the API key reported while it is missing)."""
    run = tmp_path / "run"
    argv = ["run", "--plan", "--config", str(path), f"run_dir={run}"]
    monkeypatch.delenv("OPENROUTER_API_KEY", raising=False)
    assert main(argv) == 1
    out = " ".join(capsys.readouterr().err.split())
    assert "PROBLEM api key: teach.teachers.0.api.api_key_env: environment variable OPENROUTER_API_KEY" in out
    monkeypatch.setenv("OPENROUTER_API_KEY", "dummy")
    assert main(argv) == 0
    out = " ".join(capsys.readouterr().err.split())
    for stage in ("score", "eval"):
        assert f"{stage} run: " in out and "4 vllm engine(s) x TP 4 = 16 GPU" in out.split(f"{stage} run: ")[1]
    assert "teach run: bands hard; deepseek/deepseek-chat-v3-0324 via https://openrouter.ai/api/v1" in out
    assert "train run: complexity_aware" in out and "16 worker(s) x 1 GPU, ZeRO-3" in out
    assert f"run dir: {run}" in out and "ok run dir:" in out
    assert "the run needs 16 GPU at its largest stage (score, eval, train)" in out
    # The hub ids cannot be checked here (tests run with HF_HUB_OFFLINE=1): said, not failed.
    assert "not checked model: score.student.path meta-llama/Llama-3.1-70B-Instruct" in out
    assert "PROBLEM" not in out and "0 problem(s): ready to run" in out
    assert not run.exists() and not ray.is_initialized()


def test_70b_configs_are_whole_runs_with_their_own_run_dirs():
    cfgs = {p.name: load_config(p) for p in CONFIGS}
    for path in LARGE:
        cfg = cfgs[path.name]
        assert cfg.teach is not None and cfg.split.test_fraction > 0 and cfg.eval.engine.device == "gpu"
        assert cfg.run_dir.startswith("s3://") and cfg.run_dir.endswith(path.stem)
    run_dirs = [cfg.run_dir for cfg in cfgs.values()]
    assert len(set(run_dirs)) == len(run_dirs)


def test_unreachable_s3_run_dir_is_one_line_with_the_fix(tmp_path, capsys, monkeypatch, no_stage):
    """An S3 endpoint on a closed loopback port: the run dir's own line, not a pyarrow traceback."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    tree = {"run_dir": "s3://raycat-no-such-bucket/run", "data": {"source": "synthetic"}}
    tree["score"] = {"student": {"path": "org/student"}}
    assert main(["run", "--config", str(write_config(tmp_path, tree)), "train.recipe=sft_all"]) == 1
    err = capsys.readouterr().err
    [problem] = _listed(err)
    assert problem.startswith("run_dir 's3://raycat-no-such-bucket/run' cannot be listed or written from here (")
    assert "fix: set run_dir=s3://<bucket>/<prefix>" in problem and "AWS_ENDPOINT_URL" in problem
    assert "Traceback" not in err and "pyarrow" not in err
