"""Helpers shared by several test modules (test modules import these, never each other or conftest)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]  # the repository
DEMO = ROOT / "jobs" / "configs" / "demo-cpu.yaml"


def days_ahead(days: int) -> dict[str, str]:
    """The environment of a subprocess (and the Ray workers it starts) whose chat templates see the
    clock ``days`` ahead (tests/clock/sitecustomize.py)."""
    path = os.pathsep.join(p for p in (str(ROOT / "tests" / "clock"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "RAYCAT_TEST_DAYS_AHEAD": str(days)}


N_QUESTIONS = 300  # make_corpus's default size


def question_rows(n: int, rng, categories: list) -> pd.DataFrame:
    """``n`` four-option questions as the split writes them (with ``row_hash``): ids q0.., a seeded
    gold letter and a category drawn from ``categories``."""
    from raycat.storage import rowkey

    return rowkey.add(
        pd.DataFrame(
            {
                "id": [f"q{i}" for i in range(n)],
                "question": [f"What is {i} plus {i}?" for i in range(n)],
                "options": [["one", "two", "three", "four"]] * n,
                "gold": rng.choice(list("ABCD"), n),
                "category": rng.choice(categories, n),
            }
        )
    )


def make_corpus(path: Path, n: int = N_QUESTIONS) -> Path:
    """A generic-adapter JSONL of ``n`` MCQs with 2-5 options (two topics) plus one ten-option row."""
    rows = []
    for i in range(n):
        k = 2 + i % 4
        rows.append(
            {
                "qid": f"q{i:03d}",
                "question": f"Question number {i}: which option is right?",
                "options": [f"choice {j} for {i}" for j in range(k)],
                "answer": "ABCDE"[i % k],
                "topic": "alpha" if i % 2 else "beta",
            }
        )
    rows.append(
        {
            "qid": "ten",
            "question": "Ten options?",
            "options": [f"o{j}" for j in range(10)],
            "answer": "J",
            "topic": "alpha",
        }
    )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def kill_after_first_part(stage: str, config: Path, parts_root: Path, timeout_s: float = 240) -> int:
    """Run `raycat <stage>` in its own session, SIGKILL the whole session (driver, Ray, engines) as soon
    as the first part file appears, and return the rows the parts hold once no more appear (workers
    write parts, and one that had a block in hand may finish its atomic write after the kill)."""
    import pandas as pd

    proc = subprocess.Popen(
        [sys.executable, "-m", "raycat.cli", stage, "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline and not list(parts_root.glob("*/part-*.parquet")):
            assert proc.poll() is None, f"raycat {stage} exited before writing any part"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # only the session this helper started
        proc.wait()
    seen, stable_since = None, time.time()
    while time.time() - stable_since < 5 and time.time() < deadline + 60:
        now = sorted(parts_root.glob("*/part-*.parquet"))
        if now != seen:
            seen, stable_since = now, time.time()
        time.sleep(0.2)
    return sum(len(pd.read_parquet(p)) for p in parts_root.glob("*/part-*.parquet"))


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float, what: str, log=None) -> None:
    """Poll ``url`` until it answers; fail early (with ``log()``) if ``proc`` dies first."""
    import urllib.request

    deadline = time.time() + timeout_s
    while True:
        assert proc.poll() is None, f"{what} exited" + (f": {log()}" if log else "")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert time.time() < deadline, f"{what} did not come up in {timeout_s:.0f} s"
            time.sleep(1)


@contextlib.contextmanager
def moto_s3(log: Path):
    """moto's S3 server in its own process on a free loopback port, stopped by PID; yields the AWS_*
    environment that points clients at it. Never `moto.server` in this process: it imports flask,
    and vLLM's in-process engine start scans sys.modules and trips over flask's context proxies."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url, proc, 60, "moto's S3 server", lambda: log.read_text()[-3000:])
        yield {
            "AWS_ENDPOINT_URL": url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
    finally:
        stop_group(proc, 30)


def stop_group(proc: subprocess.Popen, timeout_s: float) -> None:
    """Stop a process started with ``start_new_session=True`` and everything it started: SIGTERM to
    its group, SIGKILL after ``timeout_s``."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def write_config(tmp_path: Path, tree: dict) -> Path:
    """A config tree as YAML in tmp_path (tmp_path/c.yaml)."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def tiny_config(run_dir: Path, model: Path, *, teach: bool = True, data: Path | None = None) -> dict:
    """A whole-run config on the tiny model: every stage, minutes on 2 CPUs (the end-to-end tests)."""
    engine = {"backend": "vllm", "device": "cpu", "batch_size": 40, "kv_cache_gib": 0.25}
    lm = {"path": str(model), "dtype": "float32", "max_model_len": 512}
    columns = {"question": "question", "options": "options", "answer": "answer", "category": "topic"}
    tree = {
        "run_dir": str(run_dir),
        "data": (
            {"source": "synthetic", "synthetic": {"num_questions": 40, "seed": 0}}
            if data is None
            else {"source": "generic", "path": str(data), "columns": columns}
        ),
        "score": {"student": lm, "entropy_mode": "options", "deviation_sample": 0, "engine": engine},
        "split": {"test_fraction": 0.25},
        "train": {
            "recipe": "complexity_aware" if teach else "sft_all",
            "method": "lora",
            "num_workers": 1,
            "deepspeed": {"zero_stage": 0},
            "save_steps": 100,
            "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
            "phase1": {"epochs": 1, "max_steps": 2, "micro_batch_size": 4, "max_length": 256, "lr": 0.003},
            "phase2": {"epochs": 1, "max_steps": 2, "micro_batch_size": 2, "max_length": 256, "lr": 0.003},
        },
        "eval": {
            "dtype": "float32",
            "max_model_len": 512,
            "max_tokens_answer": 8,
            "max_tokens_cot": 16,
            "include_base": teach,
            "bootstrap_resamples": 200,
            "engine": engine,
        },
        "ray": {"num_cpus": 2},
    }
    if teach:
        # The tiny teacher is random, so its answers are wrong: fall back to the gold answer as the target.
        tree["teach"] = {
            "teachers": [{"model": lm, "engine": {**engine, "batch_size": 16}}],
            "sampling": {"max_tokens": 16},
            "retries": 0,
            "on_wrong": "fallback_to_answer",
            "max_failure_ratio": 1.0,
        }
    return tree


def write_run(run: Path, n: int = 40, seed: int = 1, held_out: int = 6):
    """Band files, a held-out split/test.parquet and a teach/cot.parquet as the stages write them: the
    hard band taught, all but two of its rows verified (one has no CoT, one a CoT of another content
    under its id). Returns (the band rows with their band, the verified CoT rows)."""
    import numpy as np

    from raycat.recipes import BANDS
    from raycat.storage import rundir

    rng = np.random.default_rng(seed)
    rows = question_rows(n + held_out, rng, ["math", None])
    test, rows = rows.iloc[n:].assign(band=np.array(BANDS)[np.arange(held_out) % 3]), rows.iloc[:n]
    rundir.write_parquet(str(run / "split" / "test.parquet"), test)
    band = np.array(BANDS)[np.arange(n) % 3]
    for name in BANDS:
        rundir.write_parquet(str(run / "split" / f"{name}.parquet"), rows[band == name].assign(band=name))
    hard = rows[band == "hard"].assign(band="hard")
    taught = hard.iloc[2:].assign(
        teacher="teacher-x",
        final_status="verified",
        prompt_tokens=50,
        completion_tokens=20,
        target=[
            f" Step by step for {i}.\n[[{g}]]" for i, g in zip(hard["id"].iloc[2:], hard["gold"].iloc[2:], strict=True)
        ],
    )
    other = hard.iloc[[1]].assign(row_hash="0" * 16, teacher="teacher-x", final_status="verified", target="[[A]]")
    rundir.write_parquet(str(run / "teach" / "cot.parquet"), pd.concat([taught, other], ignore_index=True))
    thresholds = {"method": "quantiles", "quantiles": [0.25, 0.75], "thresholds": [0.5, 1.2], "counts": {"hard": 13}}
    rundir.write_json(str(run / "split" / "thresholds.json"), thresholds)
    accounting = {
        "prompt_tokens": 600,
        "completion_tokens": 240,
        "rows_taught": 12,
        "saving": {"saving_pct": 70.0, "label": "measured: x"},
    }
    teach = {
        "accounting": accounting,
        "provenance": {"on_wrong": "drop", "teachers": [{"model": "teacher-x", "revision": None}]},
    }
    rundir.write_json(str(run / "teach" / "metrics.json"), teach)
    return rows.assign(band=band), taught


def wandb_records(path: Path):
    """The records of a W&B offline run file (``run-*.wandb``), parsed with wandb's own protobuf: its
    reader left the Python package for wandb-core, the format (a LevelDB log) did not."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, block = Path(path).read_bytes(), 32768
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            return
        pending = chunk if kind in (1, 2) else pending + chunk  # full, first / middle, last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record
