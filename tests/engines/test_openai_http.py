"""The HTTP teacher against a fault-injecting server and a real vLLM OpenAI server on loopback."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from raycat.cli import main
from raycat.engines.base import Sampling
from raycat.engines.openai_http import OpenAITeacher, RateLimiter
from raycat.errors import RaycatError
from raycat.storage import rowkey, rundir
from raycat.teach.core import attempt_schedule, teach_rows
from tests.helpers import wait_http
from tests.http_fault_server import FaultServer

SECRET = "sk-raycat-test-DO-NOT-LOG-7f3a9c"


def rows_for(modes):
    return [
        {"prompt": [{"role": "user", "content": f"Q{i} mode={m}"}], "n_options": 4, "gold": "A", "skip_reason": ""}
        for i, m in enumerate(modes)
    ]


def test_faults_are_retried_or_recorded_never_hung(monkeypatch):
    monkeypatch.setenv("RAYCAT_TEST_KEY", SECRET)
    modes = ["ok", "429", "500", "timeout", "garbage", "empty"]
    with FaultServer() as srv:
        teacher = OpenAITeacher(srv.url, "teacher", "RAYCAT_TEST_KEY", timeout_s=0.5, max_retries=2)
        started = time.monotonic()
        res = teach_rows(teacher, rows_for(modes), attempt_schedule(Sampling(0.0, 1.0, 64, 0), 1, [0.7]))
        elapsed = time.monotonic() - started
    got = {m: r for m, r in zip(modes, res, strict=True)}
    assert got["ok"]["status"] == got["429"]["status"] == got["500"]["status"] == "verified"
    assert got["ok"]["completion_tokens"] == 7 and got["ok"]["prompt_tokens"] == 11
    assert got["timeout"]["status"] == "failed" and "Timeout" in got["timeout"]["reason"]
    assert got["garbage"]["status"] == "failed" and got["garbage"]["reason"]
    assert got["empty"]["status"] == "no_answer" and got["empty"]["attempts"] == 2  # retried at teach level
    calls = srv.calls
    t429 = calls["Q1 mode=429"]
    assert len(t429) == 2 and t429[1] - t429[0] >= 0.95  # Retry-After: 1 honoured
    assert len(calls["Q3 mode=timeout"]) == 3  # first try + 2 client retries
    assert srv.auth == {f"Bearer {SECRET}"}
    assert elapsed < 30
    assert all(SECRET not in (r["reason"] or "") for r in res)


def test_n_samples_over_http_book_usage_once():
    with FaultServer() as srv:
        teacher = OpenAITeacher(srv.url, "teacher", None, timeout_s=5, max_retries=0)
        gens = teacher.generate([[{"role": "user", "content": "Q mode=ok"}]], Sampling(0.7, 1.0, 16, 0, n=3))
    assert len(gens) == 3 and all(g.text.endswith("[[A]]") for g in gens)
    assert [g.completion_tokens for g in gens] == [7, 0, 0] and [g.prompt_tokens for g in gens] == [11, 0, 0]


def test_rate_limiter_is_shared_across_generate_calls():
    # 6000 tokens/min (100/s). Each request books 10 // 4 + 3048 = 3050 tokens: one call fits in a full
    # bucket, two calls in a row fit only if the bucket is not refilled between them (a new limiter per
    # call would start full again): the second must wait (2 * 3050 - 6000) / 100 = 1 s.
    sampling = Sampling(0.0, 1.0, 3048, 0)
    with FaultServer() as srv:
        teacher = OpenAITeacher(srv.url, "teacher", None, tokens_per_minute=6000, timeout_s=5, max_retries=0)
        try:
            started = time.monotonic()
            first = teacher.generate([[{"role": "user", "content": "Q1 mode=ok"}]], sampling)
            second = teacher.generate([[{"role": "user", "content": "Q2 mode=ok"}]], sampling)
        finally:
            teacher.close()
    assert first[0].error is None and second[0].error is None
    assert srv.calls["Q1 mode=ok"][0] - started < 0.8
    assert srv.calls["Q2 mode=ok"][0] - srv.calls["Q1 mode=ok"][0] >= 0.9


def test_a_bug_propagates_but_api_errors_become_failed_rows(monkeypatch):
    import httpx
    import openai

    teacher = OpenAITeacher("http://127.0.0.1:9/v1", "m", None, max_retries=0)
    prompt = [[{"role": "user", "content": "Q"}]]

    async def bug(**kw):
        raise TypeError("create() got an unexpected keyword argument 'nope'")

    monkeypatch.setattr(teacher._client.chat.completions, "create", bug)
    with pytest.raises(TypeError, match="nope"):
        teacher.generate(prompt, Sampling(0.0, 1.0, 8, 0))

    async def down(**kw):
        raise openai.APIConnectionError(request=httpx.Request("POST", "http://127.0.0.1:9/v1"))

    monkeypatch.setattr(teacher._client.chat.completions, "create", down)
    gens = teacher.generate(prompt, Sampling(0.0, 1.0, 8, 0, n=2))  # the same loop and client, still usable
    assert [g.finish_reason for g in gens] == ["error", "error"] and "APIConnectionError" in gens[0].error
    teacher.close()
    teacher.close()  # twice is fine
    with pytest.raises(RuntimeError, match="after close"):
        teacher.generate(prompt, Sampling(0.0, 1.0, 8, 0))


def test_reasoning_content_is_kept_ahead_of_the_answer():
    with FaultServer() as srv:
        teacher = OpenAITeacher(srv.url, "teacher", None, timeout_s=5, max_retries=0)
        rows = [
            {
                "prompt": [{"role": "user", "content": "Q mode=reasoning"}],
                "n_options": 4,
                "gold": "A",
                "skip_reason": "",
            }
        ]
        res = teach_rows(teacher, rows, attempt_schedule(Sampling(0.0, 1.0, 64, 0), 0, [0.7]))
        teacher.close()
    assert res[0]["response"] == "Option B looks tempting: [[B]]? No, the first one.\n\n[[A]]"
    assert res[0]["status"] == "verified" and res[0]["extracted"] == "A"  # the final answer, not the CoT's


def test_missing_key_env_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("RAYCAT_NO_SUCH_KEY", raising=False)
    with pytest.raises(RaycatError, match="RAYCAT_NO_SUCH_KEY"):
        OpenAITeacher("http://127.0.0.1:9/v1", "m", "RAYCAT_NO_SUCH_KEY")


def test_rate_limiter_spaces_requests_and_tokens():
    now = [0.0]
    lim = RateLimiter(requests_per_second=2, tokens_per_minute=600, clock=lambda: now[0])
    assert lim.wait_time(100) == 0
    lim.take(100)
    lim.take(100)
    assert lim.wait_time(100) == pytest.approx(0.5)  # the request bucket (2/s) is empty
    now[0] += 0.5
    assert lim.wait_time(100) == 0
    # 600 - 200 - 400 + 5 refilled = 5 tokens left
    lim.take(400)
    assert lim.wait_time(100) == pytest.approx(9.5)


def write_split(run: Path, n: int = 6):
    for band, k in (("easy", 2), ("medium", 2), ("hard", n)):
        rows = pd.DataFrame(
            {
                "id": [f"{band}{i}" for i in range(k)],
                "question": [f"Q {band}{i} mode=ok" for i in range(k)],
                "options": [["x", "y"]] * k,
                "gold": "A",
                "category": "",
                "source": "t",
                "entropy": 1.0,
                "band": band,
            }
        )
        rundir.write_parquet(str(run / "split" / f"{band}.parquet"), rowkey.add(rows))


def write_teach_config(tmp_path, teachers: list[dict], **teach) -> Path:
    """A `raycat teach` config over write_split's run dir with these (HTTP) teachers."""
    tree = {
        "run_dir": str(tmp_path / "run"),
        "data": {"source": "synthetic"},
        "score": {"student": {"path": "unused"}},
        "ray": {"num_cpus": 2},
        "teach": {"teachers": teachers, **teach},
    }
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


# `raycat teach` runs the HTTP teacher in Ray Data
@pytest.mark.integration
def test_api_key_never_reaches_outputs_or_logs(tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("RAYCAT_TEST_KEY", SECRET)
    write_split(tmp_path / "run")
    with FaultServer() as srv:
        teacher = {
            "model": {"path": "hosted-teacher"},
            "api": {"base_url": srv.url, "api_key_env": "RAYCAT_TEST_KEY"},
            "price": {"prompt_per_mtok": 3, "completion_per_mtok": 15},
        }
        p = write_teach_config(tmp_path, [teacher])
        assert main(["teach", "--config", str(p)]) == 0
    assert srv.auth == {f"Bearer {SECRET}"}
    m = json.loads((tmp_path / "run" / "teach" / "metrics.json").read_text())
    assert m["status"] == {"verified": 6}
    assert m["accounting"]["per_teacher"]["hosted-teacher"]["cost"] == pytest.approx((6 * 11 * 3 + 6 * 7 * 15) / 1e6)
    out, err = capfd.readouterr()
    assert SECRET not in out + err
    for f in (tmp_path / "run").rglob("*"):
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f


# The user's path: a hosted teacher is down for a while, `raycat teach` fails; rerun once it is back.
@pytest.mark.integration
def test_rows_that_failed_during_an_outage_are_retried_by_the_next_run(tmp_path, capfd):
    write_split(tmp_path / "run")
    with FaultServer() as srv:
        teacher = {"model": {"path": "hosted-teacher"}, "api": {"base_url": srv.url, "max_retries": 0}}
        p = write_teach_config(tmp_path, [teacher])
        srv.down = True
        assert main(["teach", "--config", str(p)]) == 1  # every row failed: over teach.max_failure_ratio
        first = json.loads((tmp_path / "run" / "teach" / "metrics.json").read_text())
        assert first["status"] == {"failed": 6} and first["failed_rows_retried"] == 0
        calls = sum(len(times) for times in srv.calls.values())
        srv.down = False
        capfd.readouterr()
        assert main(["teach", "--config", str(p)]) == 0
        again = json.loads((tmp_path / "run" / "teach" / "metrics.json").read_text())
        assert sum(len(times) for times in srv.calls.values()) == calls + 6  # each failed row sent once more
    assert again["status"] == {"verified": 6} and again["failed_rows_retried"] == 6
    printed = capfd.readouterr()
    out = " ".join((printed.out + printed.err).split())
    assert "6 failed in an earlier run: retried" in out and "failed rows of an earlier run, retried" in out
    # A third run has nothing left to send.
    assert main(["teach", "--config", str(p)]) == 0
    third = json.loads((tmp_path / "run" / "teach" / "metrics.json").read_text())
    assert third["status"] == {"verified": 6} and third["rows_this_run"] == 0 and third["failed_rows_retried"] == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.vllm
@pytest.mark.integration
def test_real_vllm_openai_server_on_loopback(tmp_path, tiny_model_dir):
    port = free_port()
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(tiny_model_dir),
            "--served-model-name",
            "tiny",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--dtype",
            "float32",
            "--max-model-len",
            "512",
            "--enforce-eager",
            "--kv-cache-memory-bytes",
            str(256 << 20),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
    )
    try:
        wait_http(
            f"http://127.0.0.1:{port}/health",
            server,
            240,
            "vLLM server",
            log=lambda: (tmp_path / "server.log").read_text()[-3000:],
        )
        teacher = OpenAITeacher(f"http://127.0.0.1:{port}/v1", "tiny", None, timeout_s=60, max_retries=1)
        rows = [
            {
                "prompt": [{"role": "user", "content": f"Question {i}? A. yes B. no"}],
                "n_options": 2,
                "gold": "A",
                "skip_reason": "",
            }
            for i in range(4)
        ]
        res = teach_rows(teacher, rows, attempt_schedule(Sampling(0.0, 1.0, 8, 0), 1, [0.7]))
        assert all(r["status"] in ("verified", "wrong", "no_answer", "truncated") for r in res)
        # A completion the server cut at max_tokens is never verified, whatever it contains.
        assert all((r["status"] == "truncated") == (r["finish_reason"] == "length") for r in res)
        assert all(r["completion_tokens"] > 0 and r["prompt_tokens"] > 0 for r in res)
        assert all(r["response"] for r in res)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


# `raycat teach` runs the HTTP teacher in Ray Data
@pytest.mark.integration
def test_teacher_down_stops_with_a_clear_error_and_keeps_outputs(tmp_path, capsys):
    write_split(tmp_path / "run")
    # A port nobody listens on: connection refused at once
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    tree = {
        "run_dir": str(tmp_path / "run"),
        "data": {"source": "synthetic"},
        "score": {"student": {"path": "unused"}},
        "ray": {"num_cpus": 2},
        "teach": {
            "teachers": [
                {"model": {"path": "t"}, "api": {"base_url": f"http://127.0.0.1:{dead}/v1", "max_retries": 0}}
            ],
            "max_failure_ratio": 0.5,
        },
    }
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tree))
    assert main(["teach", "--config", str(p)]) == 1
    assert "6 of 6 rows failed" in capsys.readouterr().err.replace("\n", " ")
    skipped = pd.read_parquet(tmp_path / "run" / "teach" / "skipped.parquet")
    assert len(skipped) == 6 and (skipped.final_status == "failed").all()
    assert skipped.reason.str.contains("APIConnectionError").all()


# `raycat teach` runs the HTTP teacher in Ray Data
@pytest.mark.integration
def test_cascade_asks_the_next_teacher_only_for_unsolved_rows(tmp_path):
    run = tmp_path / "run"
    write_split(run)
    hard = rundir.read_parquet(str(run / "split" / "hard.parquet"))
    # The first teacher always answers A, the second always B
    hard["gold"] = ["A", "B"] * 3
    rundir.write_parquet(str(run / "split" / "hard.parquet"), rowkey.add(hard))
    with FaultServer() as srv:
        teachers = [{"model": {"path": f"answers-{x}"}, "api": {"base_url": srv.url}} for x in "AB"]
        tree = {
            "run_dir": str(run),
            "data": {"source": "synthetic"},
            "score": {"student": {"path": "unused"}},
            "ray": {"num_cpus": 2},
            "teach": {"teachers": teachers, "retries": 0},
        }
        p = tmp_path / "c.yaml"
        p.write_text(yaml.safe_dump(tree))
        assert main(["teach", "--config", str(p)]) == 0
    assert srv.models.count("answers-A") == 6 and srv.models.count("answers-B") == 3
    cot = pd.read_parquet(run / "teach" / "cot.parquet").set_index("id")
    assert (cot.final_status == "verified").all() and len(cot) == 6
    assert (cot.teacher == cot.gold.map({"A": "answers-A", "B": "answers-B"})).all()
    m = json.loads((run / "teach" / "metrics.json").read_text())
    assert m["accounting"]["per_teacher"]["answers-A"]["rows"] == 6
    assert m["accounting"]["per_teacher"]["answers-B"]["rows"] == 3
