"""The teach stage on a local Ray with a real vLLM teacher (tiny random model) in a Ray Data actor."""

import json

import pandas as pd
import pytest
import yaml

from raycat.cli import main
from tests.helpers import kill_after_first_part, make_corpus

pytestmark = [pytest.mark.vllm, pytest.mark.integration]
N = 24


def config(tmp, model, **teach):
    tree = {
        "run_dir": str(tmp / "run"),
        "data": {
            "source": "generic",
            "path": str(make_corpus(tmp / "corpus.jsonl", N)),
            "columns": {
                "id": "qid",
                "question": "question",
                "options": "options",
                "answer": "answer",
                "category": "topic",
            },
        },
        "score": {
            "student": {"path": str(model), "dtype": "float32", "max_model_len": 512},
            "deviation_sample": 0,
            "engine": {"backend": "transformers"},
        },
        # Every row in the training pool: the accounting below counts all N + 1 of them.
        "split": {"test_fraction": 0},
        "teach": {
            "teachers": [
                {
                    "model": {"path": str(model), "dtype": "float32", "max_model_len": 512},
                    # the product's threading: 2 OpenMP threads in the engine actor (Ray Data calls it from
                    # another thread than the one that built the engine)
                    "engine": {"batch_size": 8, "kv_cache_gib": 0.25, "cpus_per_engine": 1.5},
                    "price": {"prompt_per_mtok": 1.0, "completion_per_mtok": 4.0},
                }
            ],
            "sampling": {"max_tokens": 12},
            "retries": 1,
            **teach,
        },
        "ray": {"num_cpus": 2},
    }
    p = tmp / "c.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


@pytest.fixture(scope="module")
def split_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("teach")
    cfg = config(tmp, tiny_model_dir)
    assert main(["score", "--config", str(cfg)]) == 0
    assert main(["split", "--config", str(cfg)]) == 0
    return tmp


def metrics(tmp):
    return json.loads((tmp / "run" / "teach" / "metrics.json").read_text())


def test_hard_band_then_all_bands_share_the_cache(split_run, tiny_model_dir):
    tmp = split_run
    hard = pd.read_parquet(tmp / "run" / "split" / "hard.parquet")
    cfg = config(tmp, tiny_model_dir)
    assert main(["teach", "--config", str(cfg)]) == 0
    teach_metrics = metrics(tmp)
    assert teach_metrics["rows"] == len(hard) and teach_metrics["rows_this_run"] == len(hard)
    # A random tiny model rambles to max_tokens: every row is retried once, then dropped, and says why
    # (a completion cut off by max_tokens is never verified).
    assert teach_metrics["status"] == {"dropped_truncated": len(hard)}
    skipped = pd.read_parquet(tmp / "run" / "teach" / "skipped.parquet")
    assert sorted(skipped.id) == sorted(hard.id) and (skipped.attempts == 2).all()
    assert skipped.reason.str.contains("cut off at teach.sampling.max_tokens").all()
    assert (skipped.finish_reason == "length").all()
    accounting = teach_metrics["accounting"]
    assert accounting["completion_tokens"] == int(skipped.completion_tokens.sum()) > 0
    assert accounting["per_teacher"][str(tiny_model_dir)]["cost"] == pytest.approx(
        (accounting["prompt_tokens"] * 1.0 + accounting["completion_tokens"] * 4.0) / 1e6
    )
    assert accounting["pool_rows"] == N + 1 and 0 < accounting["saving"]["saving_pct"] < 100
    assert accounting["per_band"]["hard"]["basis"] == "measured" and accounting["saving"]["basis"] == "estimate"

    cfg_all = config(tmp, tiny_model_dir, bands="all", on_wrong="fallback_to_answer")
    assert main(["teach", "--config", str(cfg_all)]) == 0
    teach_metrics = metrics(tmp)
    # The hard rows came from the cache.
    assert teach_metrics["rows"] == N + 1 and teach_metrics["rows_this_run"] == N + 1 - len(hard)
    cot = pd.read_parquet(tmp / "run" / "teach" / "cot.parquet")
    assert cot.id.is_unique and len(cot) == N + 1
    assert (cot.target == "[[" + cot.gold + "]]").all() and (cot.final_status == "fallback_to_answer").all()
    parts = pd.concat(pd.read_parquet(p) for p in (tmp / "run" / "teach" / "cache").glob("*/part-*.parquet"))
    assert parts.id.is_unique  # nothing generated twice

    assert main(["teach", "--config", str(cfg_all)]) == 0
    assert metrics(tmp)["rows_this_run"] == 0


def test_teach_needs_a_teach_section(split_run, tmp_path, capsys):
    tree = yaml.safe_load((split_run / "c.yaml").read_text())
    del tree["teach"]
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tree))
    assert main(["teach", "--config", str(p)]) == 1
    assert "no teach: section" in capsys.readouterr().err


def test_killed_teach_resumes_without_losing_or_duplicating_rows(tmp_path, tiny_model_dir):
    cfg = config(tmp_path, tiny_model_dir)
    assert main(["score", "--config", str(cfg)]) == 0
    assert main(["split", "--config", str(cfg)]) == 0
    # batch_size=1: many small parts, so the kill lands mid-run.
    tree = yaml.safe_load(cfg.read_text())
    tree["teach"].update(bands="all", retries=0)
    tree["teach"]["teachers"][0]["engine"]["batch_size"] = 1
    cfg.write_text(yaml.safe_dump(tree))
    cache = tmp_path / "run" / "teach" / "cache"
    written = kill_after_first_part("teach", cfg, cache)
    assert 0 < written < N + 1, "the kill must land mid-run"
    assert main(["teach", "--config", str(cfg)]) == 0
    m = metrics(tmp_path)
    assert m["rows_this_run"] == N + 1 - written
    parts = pd.concat(pd.read_parquet(p) for p in cache.glob("*/part-*.parquet"))
    assert parts.id.is_unique and len(parts) == N + 1
    out = pd.concat([pd.read_parquet(tmp_path / "run" / "teach" / f) for f in ("cot.parquet", "skipped.parquet")])
    split = pd.concat(pd.read_parquet(tmp_path / "run" / "split" / f"{b}.parquet") for b in ("easy", "medium", "hard"))
    assert sorted(out.id) == sorted(split.id)


def test_an_engine_actor_killed_mid_teach_is_restarted_and_every_row_is_taught_once(
    split_run, tmp_path, tiny_model_dir
):
    """The engine's process dies (SIGKILL, as an OOM kill would): Ray starts the actor again
    (engine.max_restarts), its unfinished batches are retried there, and the stage ends with every row
    once; the run itself is never stopped."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import time

    import psutil

    # The module's scored and split run, without its teach outputs.
    shutil.copytree(split_run / "run", tmp_path / "run", ignore=shutil.ignore_patterns("teach"))
    tree = yaml.safe_load(config(split_run, tiny_model_dir).read_text())
    tree["run_dir"] = str(tmp_path / "run")
    cfg = tmp_path / "c.yaml"
    tree["teach"].update(bands="all", retries=0)
    tree["teach"]["teachers"][0]["engine"]["batch_size"] = 1
    tree["teach"]["sampling"]["max_tokens"] = 48
    cfg.write_text(yaml.safe_dump(tree))
    cache = tmp_path / "run" / "teach" / "cache"
    proc = subprocess.Popen(
        [sys.executable, "-m", "raycat.cli", "teach", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    killed = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not list(cache.glob("*/part-*.parquet")):
            assert proc.poll() is None, f"raycat teach exited early: {proc.stderr.read().decode()[-2000:]}"
            time.sleep(0.05)
        for child in psutil.Process(proc.pid).children(recursive=True):
            try:
                if "TeachBatch" in " ".join(child.cmdline()):
                    killed = child.pid
                    os.kill(killed, signal.SIGKILL)  # a process of the session this test started
                    break
            except psutil.Error:
                continue
        before = sum(len(pd.read_parquet(p)) for p in cache.glob("*/part-*.parquet"))
        _, err = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert killed is not None, "no engine actor process found"
    assert proc.returncode == 0, err.decode()[-3000:]
    assert before < N + 1, "the kill must land mid-run"
    parts = pd.concat(pd.read_parquet(p) for p in cache.glob("*/part-*.parquet"))
    assert parts.id.is_unique and len(parts) == N + 1
    assert metrics(tmp_path)["rows_this_run"] == N + 1
