"""`raycat run` end to end on tiny local models (real vLLM, real Ray Train + DeepSpeed) and its resume
rules. The same job on a multi-node cluster through `ray job submit` is tests/e2e/test_cluster.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import days_ahead, tiny_config

# raycat.evaluate.stage.SINGLE_TOKEN_BASE
SINGLE = "base (single-token, from score)"
pytestmark = [pytest.mark.vllm, pytest.mark.integration, pytest.mark.filterwarnings("ignore")]


def write_corpus(path: Path, changed: tuple[str, ...] = ()) -> Path:
    """40 MCQs in JSON Lines without an id column, so their ids are row numbers ("0".."39"), as for
    GSM8K or the MMLU CSVs; rows listed in ``changed`` hold another question."""
    rows = []
    for i in range(40):
        k = 2 + i % 3
        q = f"Which choice is right for item {i}?" if str(i) not in changed else f"A new question in row {i}?"
        rows.append({"question": q, "options": [f"c{j}-{i}" for j in range(k)], "answer": "ABCD"[i % k], "topic": "t"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _raycat(cfg: Path, *args: str, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-m", "raycat.cli", "run", "--config", str(cfg), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-4000:]
    return r


def test_run_end_to_end_then_resume_rules(tmp_path, tiny_dated_dir, monkeypatch):
    # Student and teacher have a Llama-3.1-style template that writes today's date into every prompt.
    run = tmp_path / "run"
    cfg = tmp_path / "cfg.yaml"
    tree = tiny_config(run, tiny_dated_dir, data=write_corpus(tmp_path / "v1.jsonl"))
    tree["train"]["tracking"] = "mlflow"  # no URI: a file store in the run dir
    cfg.write_text(yaml.safe_dump(tree))
    _raycat(cfg, "--export")
    tracked_every_stage(run, monkeypatch)
    exported_for_other_tools(run, tiny_dated_dir)
    manifest = json.loads((run / "manifest.json").read_text())
    assert {s: e["status"] for s, e in manifest["stages"].items()} == {
        s: "done" for s in ("score", "split", "teach", "train", "eval", "report")
    }
    ev = json.loads((run / "eval/metrics.json").read_text())
    assert list(ev["models"]) == [SINGLE, "base", "complexity_aware/phase1", "complexity_aware/phase2"]
    assert ev["test_rows"] == 10 and all(m["overall"]["n"] == ev["compared_rows"] for m in ev["models"].values())
    assert ev["compared_rows"] + ev["excluded_rows"]["n"] == 10 and len(ev["paired"]) == 6
    assert (run / "report/report.html").stat().st_size > 10_000
    # LoRA phases are served by vLLM as adapters on the base student: no merged copy is written.
    assert ev["models"]["complexity_aware/phase2"]["adapter"] == str(run / "train/complexity_aware/phase2/model")
    assert not (run / "train/complexity_aware/phase2/merged").exists()
    # Same command again: nothing to do.
    again = _raycat(cfg)
    assert " ".join(again.stderr.split()).count("up to date") == 6
    # Every stage forced to run again the next day (the date its templates would render has moved):
    # each finds its rows and phases done under the same keys and hashes (issue 22 item 2).
    eval_parts = sorted(run.glob("eval/*/parts/*/part-*.parquet"))
    tomorrow = " ".join(_raycat(cfg, "--from", "score", env=days_ahead(1)).stderr.split())
    for stage in ("score", "teach"):
        assert json.loads((run / stage / "metrics.json").read_text())["rows_this_run"] == 0, stage
    assert "phase1: already trained" in tomorrow and "phase2: already trained" in tomorrow
    assert sorted(run.glob("eval/*/parts/*/part-*.parquet")) == eval_parts
    # One teacher parameter: teach, train, eval and report rerun; score and split do not.
    before = {s: e["hash"] for s, e in manifest["stages"].items()}
    changed = _raycat(cfg, "teach.sampling.max_tokens=12")
    after = json.loads((run / "manifest.json").read_text())["stages"]
    assert [s for s in before if after[s]["hash"] != before[s]] == ["teach", "train", "eval", "report"]
    text = " ".join(changed.stderr.split())
    assert "run: score: up to date" in text and "run: split: up to date" in text
    # A baseline next to it: scores and teacher outputs are shared, nothing is scored or taught again,
    # and the complexity-aware phases already trained are not retrained.
    both = _raycat(cfg, "teach.sampling.max_tokens=12", "--recipes", "complexity_aware,sft_all").stderr
    both = " ".join(both.split())
    for stage in ("score", "split", "teach"):
        assert f"run: {stage}: up to date" in both
    assert "phase1: already trained" in both and "phase2: already trained" in both
    ev = json.loads((run / "eval/metrics.json").read_text())
    models = ["base", "complexity_aware/phase1", "complexity_aware/phase2", "sft_all/phase1"]
    assert list(ev["models"]) == [SINGLE, *models]
    changed_data_path_recomputes_exactly_the_changed_rows(tmp_path, run, cfg, models)


def exported_for_other_tools(run: Path, model: Path) -> None:
    """`raycat run --export`: the recipe's phases as chat messages (phase 2's targets the verified CoTs
    of teach/cot.parquet) and the trained LoRA adapter naming the base it was trained from."""
    import pandas as pd

    out = run / "export"
    summary = json.loads((out / "export.json").read_text())
    phase2 = [json.loads(line) for line in (out / "complexity_aware/phase2/messages.jsonl").read_text().splitlines()]
    cot = pd.read_parquet(run / "teach/cot.parquet")
    assert sorted(m["messages"][-1]["content"] for m in phase2) == sorted(t.strip() for t in cot["target"])
    assert summary["recipes"]["complexity_aware"]["phase2"]["rows"] == len(phase2)
    adapter = json.loads((out / "models/complexity_aware/model/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(model)
    assert (out / "models/complexity_aware/model/README.md").exists() and (out / "README.md").exists()


def tracked_every_stage(run: Path, monkeypatch) -> None:
    """One MLflow run for the `raycat run`: a nested run per stage with its numbers, the training phases'
    own runs nested under it too, and the report as artifacts."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(run / "mlruns").as_uri())
    runs = client.search_runs([client.get_experiment_by_name("raycat").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert parent.info.status == "FINISHED" and parent.info.run_name == "raycat run run"
    nested = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    phases = {"train complexity_aware/phase1", "train complexity_aware/phase2"}
    assert set(nested) == {"score", "split", "teach", "train", "eval", "report"} | phases
    score = json.loads((run / "score/metrics.json").read_text())
    auc = nested["score"].data.metrics.get("roc_auc")
    assert auc == pytest.approx(score["roc_auc"]) if score["roc_auc"] is not None else auc is None
    assert "thresholds.0" in nested["split"].data.metrics and "accounting.total_tokens" in nested["teach"].data.metrics
    assert any(k.endswith("overall.ci95.1") for k in nested["eval"].data.metrics)
    # The phase's own run (its per-step loss every train.log_every_steps: tests/train/test_stage.py).
    phase2 = nested["train complexity_aware/phase2"]
    assert phase2.data.params["phase"] == "phase2" and phase2.info.status == "FINISHED"
    artifacts = [a.path for a in client.list_artifacts(nested["report"].info.run_id, "report")]
    assert "report/report.html" in artifacts


def changed_data_path_recomputes_exactly_the_changed_rows(tmp_path: Path, run: Path, cfg: Path, models) -> None:
    """A new data.path in the same run dir whose ids collide with the old ones (row numbers): two
    held-out and two training rows hold new questions. Only those are scored and evaluated again, and
    the teacher generates only for content it has not seen; every other row keeps its cached result."""
    import pandas as pd

    from raycat.storage import rowkey

    def keys(rel):
        return set(rowkey.keys(pd.read_parquet(run / rel)))

    def part_rows(pattern):
        return sum(len(pd.read_parquet(p)) for p in run.glob(pattern))

    def row(i):  # ids are "generic-<row number>"
        return str(i).rsplit("-", 1)[1]

    test_rows = sorted(map(row, pd.read_parquet(run / "split/test.parquet")["id"]), key=int)
    pool_rows = sorted(set(map(str, range(40))) - set(test_rows), key=int)
    changed = (*test_rows[:2], *pool_rows[:2])
    old_scores, old_taught = pd.read_parquet(run / "score/scores.parquet"), keys("teach/rows.parquet")
    eval_parts = {m: part_rows(f"eval/{m.replace('/', '__')}/parts/*/part-*.parquet") for m in models}
    data = write_corpus(tmp_path / "v2.jsonl", changed=changed)
    args = ("teach.sampling.max_tokens=12", "--recipes", "complexity_aware,sft_all", f"data.path={data}")

    _raycat(cfg, *args, "--only", "score")
    assert json.loads((run / "score/metrics.json").read_text())["rows_this_run"] == 4
    new_scores = pd.read_parquet(run / "score/scores.parquet")
    same = old_scores.merge(new_scores, on=["id", "row_hash"], suffixes=("_old", "_new"))
    assert len(same) == 36 and (same["entropy_old"] == same["entropy_new"]).all()  # reused, not recomputed
    assert set(map(row, set(new_scores["id"]) - set(same["id"]))) == set(changed)

    _raycat(cfg, *args, "--only", "split")
    _raycat(cfg, *args, "--only", "teach")
    taught = keys("teach/rows.parquet")
    assert json.loads((run / "teach/metrics.json").read_text())["rows_this_run"] == len(taught - old_taught)
    cot = pd.read_parquet(run / "teach/cot.parquet")
    assert set(rowkey.keys(cot)) <= taught  # no CoT of an old question under a reused id

    _raycat(cfg, *args, "--only", "eval")
    for m, before in eval_parts.items():  # the two rewritten held-out rows, per model, and nothing else
        assert part_rows(f"eval/{m.replace('/', '__')}/parts/*/part-*.parquet") == before + 2, m
    ev = pd.read_parquet(run / "eval/eval.parquet")
    assert set(rowkey.keys(ev)) == keys("eval/rows.parquet") and len(ev) == 10 * len(models)


def _outputs(run: Path) -> dict:
    import pandas as pd

    def frame(rel, cols):
        return pd.read_parquet(run / rel)[cols].sort_values("id").reset_index(drop=True)

    return {
        "scores": frame("score/scores.parquet", ["id", "entropy", "predicted"]),
        "hard": frame("split/hard.parquet", ["id"]),
        "test": frame("split/test.parquet", ["id"]),
    }


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, tiny_model_dir) -> Path:
    """One uninterrupted scoring and split, the yardstick for the interrupted run (the later stages are
    deterministic given these, and their own resume is tested where they live)."""
    root = tmp_path_factory.mktemp("reference")
    cfg = root / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(root / "run", tiny_model_dir)))
    _raycat(cfg, "--only", "score")
    _raycat(cfg, "--only", "split")
    return root / "run"


@pytest.mark.slow
# Killed mid-train: tests/e2e/test_cluster.py (driver SIGKILL in phase 2, resumed from S3) and
# tests/train/test_stage.py (a worker killed in phase 2) cover it; each case here costs a full run.
@pytest.mark.parametrize("stage", ["score"])
def test_killed_run_resumes_to_the_same_outputs(tmp_path, tiny_model_dir, reference_run, stage):
    import pandas as pd

    run, cfg = tmp_path / "run", tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(run, tiny_model_dir)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "raycat.cli", "run", "--config", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 600
        while time.time() < deadline:
            assert proc.poll() is None, f"raycat run finished before stage {stage} was seen running"
            try:
                m = json.loads((run / "manifest.json").read_text())
            except (OSError, ValueError):
                m = {"stages": {}}
            if m["stages"].get(stage, {}).get("status") == "running":
                time.sleep(3 if stage != "score" else 5)  # well inside the stage
                break
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # driver, Ray and engines: the session this test started
        proc.wait()
    assert json.loads((run / "manifest.json").read_text())["stages"][stage]["status"] == "running"
    _raycat(cfg)  # the same command again finishes the run
    stages = json.loads((run / "manifest.json").read_text())["stages"]
    assert {s: e["status"] for s, e in stages.items()} == {
        s: "done" for s in ("score", "split", "teach", "train", "eval", "report")
    }
    a, b = _outputs(reference_run), _outputs(run)
    assert b["scores"]["id"].is_unique and len(b["scores"]) == 40  # nothing lost or doubled
    pd.testing.assert_frame_equal(a["scores"], b["scores"], atol=1e-5, rtol=0)
    for k in ("hard", "test"):
        pd.testing.assert_frame_equal(a[k], b[k])


@pytest.mark.slow
def test_an_empty_cot_phase_is_skipped_and_eval_and_report_say_so(tmp_path, tiny_model_dir):
    """The user's path from the issue: `raycat run` with teach.limit=1; the (random) teacher verifies
    nothing, so phase 2 has no rows. The run finishes: phase 1 is evaluated and the report says why
    phase 2 is missing."""
    run, cfg = tmp_path / "run", tmp_path / "cfg.yaml"
    tree = tiny_config(run, tiny_model_dir)
    for section in (tree["score"], tree["eval"], tree["teach"]["teachers"][0]):
        section["engine"] = {"backend": "transformers", "batch_size": 16}
    tree["teach"].update(limit=1, on_wrong="drop")
    cfg.write_text(yaml.safe_dump(tree))
    err = " ".join(_raycat(cfg).stderr.split())
    assert "pre-flight warning: teach.limit=1" in err
    assert "phase2: skipped, no rows to train on (cot target, bands hard)" in err
    phases = json.loads((run / "train/complexity_aware/metrics.json").read_text())["phases"]
    assert phases["phase1"]["status"] == "trained" and phases["phase2"]["status"] == "empty"
    ev = json.loads((run / "eval/metrics.json").read_text())
    assert list(ev["models"]) == [SINGLE, "base", "complexity_aware/phase1"]
    assert "no rows to train on" in ev["not_trained"]["complexity_aware/phase2"]
    report = (run / "report/report.md").read_text()
    assert "| complexity_aware/phase2 | not trained: no rows to train on" in report
