"""The ``raycat run`` tracker run: every stage's numbers in a nested run, the report as artifacts, and
the parent's status; against a real MLflow file store."""

from __future__ import annotations

import json

import pytest

from raycat.tracking import numbers, open_run
from tests.helpers import wandb_records


def test_numbers_are_every_finite_number_by_its_dotted_path():
    tree = {
        "roc_auc": 0.73,
        "ok": True,
        "n": 10,
        "label": "text",
        "nan": float("nan"),
        "per_band": {"hard": {"accuracy": 0.5, "ci95": [0.4, 0.6]}},
        "history": list(range(100)),
        "odd key (x)": 1,
    }
    assert numbers(tree) == {
        "roc_auc": 0.73,
        "ok": 1.0,
        "n": 10.0,
        "per_band.hard.accuracy": 0.5,
        "per_band.hard.ci95.0": 0.4,
        "per_band.hard.ci95.1": 0.6,
        "odd key _x_": 1.0,
    }
    assert numbers({"a": 1}, "score") == {"score.a": 1.0}


def write_metrics(run):
    files = {
        "score/metrics.json": {
            "accuracy": 0.41,
            "roc_auc": {"incorrect_positive": 0.7},
            "per_category": {"math": {"accuracy": 0.3}},
        },
        "split/thresholds.json": {"thresholds": [0.4, 1.1], "counts": {"easy": 5, "medium": 10, "hard": 5}},
        "teach/metrics.json": {"status": {"verified": 4, "dropped_wrong": 1}, "accounting": {"total_tokens": 900}},
        "train/complexity_aware/phase1/metrics.json": {"steps": 3, "last_loss": 1.5, "history": [{"loss": 2.0}] * 20},
        "train/complexity_aware/phase2/metrics.json": {"steps": 2, "last_loss": 0.9},
        "eval/metrics.json": {"models": {"base": {"per_band": {"hard": {"accuracy": 0.2, "ci95": [0.1, 0.3]}}}}},
    }
    for name, data in files.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(json.dumps(data))
    (run / "report").mkdir()
    (run / "report" / "report.html").write_text("<html>report</html>")
    (run / "report" / "plots").mkdir()
    (run / "report" / "plots" / "entropy.png").write_bytes(b"\x89PNG")
    (run / "config.yaml").write_text("run_dir: x\n")


def client_for(run, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=(run / "mlruns").as_uri())


def test_one_run_with_a_nested_run_per_stage_and_the_report(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    run = tmp_path / "run"
    write_metrics(run)
    uri = (run / "mlruns").as_uri()
    with open_run("mlflow", uri, "raycat-test", str(run), ["complexity_aware"]) as tracker:
        for stage in ("score", "split", "teach", "train", "eval", "report"):
            tracker.stage(stage, "done" if stage != "score" else "up to date")
        parent_tags = tracker.parent_tags
    client = client_for(run, monkeypatch)
    exp = client.get_experiment_by_name("raycat-test")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    assert parent.info.run_name == "raycat run run" and parent_tags["mlflow.parentRunId"] == parent.info.run_id
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["config.yaml"]
    stages = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(stages) == {"score", "split", "teach", "train", "eval", "report"}
    assert stages["score"].data.tags["raycat.status"] == "up to date"
    assert stages["score"].data.metrics == {
        "accuracy": 0.41,
        "roc_auc.incorrect_positive": 0.7,
        "per_category.math.accuracy": 0.3,
    }
    assert stages["split"].data.metrics["thresholds.1"] == 1.1 and stages["split"].data.metrics["counts.hard"] == 5
    assert (
        stages["teach"].data.metrics["status.dropped_wrong"] == 1
        and stages["teach"].data.metrics["accounting.total_tokens"] == 900
    )
    assert stages["train"].data.metrics == {
        "complexity_aware/phase1.steps": 3,
        "complexity_aware/phase1.last_loss": 1.5,
        "complexity_aware/phase2.steps": 2,
        "complexity_aware/phase2.last_loss": 0.9,
    }
    assert stages["eval"].data.metrics["models.base.per_band.hard.ci95.0"] == 0.1
    report = [a.path for a in client.list_artifacts(stages["report"].info.run_id, "report")]
    assert report == ["report/plots", "report/report.html"]


def test_a_failed_run_is_marked_failed_and_none_tracks_nothing(tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(RuntimeError), open_run("mlflow", (run / "mlruns").as_uri(), "raycat-test", str(run), []):
        raise RuntimeError("a stage failed")
    client = client_for(run, monkeypatch)
    (only,) = client.search_runs([client.get_experiment_by_name("raycat-test").experiment_id])
    assert only.info.status == "FAILED"
    with open_run("none", None, "x", str(tmp_path / "other"), []) as tracker:
        assert tracker is None
    assert not (tmp_path / "other").exists()


def _wandb_runs(root) -> dict[str, dict]:
    """Per job type: the group, config, summary and artifact files of every offline run under ``root``."""
    runs = {}
    for path in sorted(root.glob("wandb/offline-run-*/run-*.wandb")):
        seen: dict = {"summary": {}, "artifacts": {}}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                seen["group"], seen["job_type"] = record.run.run_group, record.run.job_type
                seen["config"] = {i.key: json.loads(i.value_json) for i in record.run.config.update}
            elif kind == "summary":
                seen["summary"].update({i.key: json.loads(i.value_json) for i in record.summary.update})
            elif kind == "artifact":
                seen["artifacts"][record.artifact.name] = sorted(e.path for e in record.artifact.manifest.contents)
        runs[seen["job_type"]] = seen
    return runs


def test_wandb_gets_a_group_with_a_run_per_stage_its_numbers_and_the_report(tmp_path, monkeypatch):
    """W&B in offline mode (what it writes is what it would upload), read back from its run files."""
    wandb = pytest.importorskip("wandb")
    run = tmp_path / "run"
    write_metrics(run)
    for key, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(key, value)
    stages = ("score", "split", "teach", "train", "eval", "report")
    try:
        with open_run("wandb", None, "raycat-test", str(run), ["complexity_aware"]) as tracker:
            for stage in stages:
                tracker.stage(stage, "done")
            tags = tracker.parent_tags
    finally:
        wandb.teardown()  # its service process
    runs = _wandb_runs(tmp_path)
    assert set(runs) == set(stages)
    assert {r["group"] for r in runs.values()} == {tags["raycat.wandb_group"]}
    assert runs["score"]["config"]["run_dir"] == "x" and runs["score"]["config"]["raycat"]["status"] == "done"
    assert runs["score"]["summary"]["accuracy"] == 0.41
    assert runs["score"]["summary"]["roc_auc.incorrect_positive"] == 0.7
    assert runs["split"]["summary"]["thresholds.1"] == 1.1 and runs["teach"]["summary"]["status.verified"] == 4
    assert runs["train"]["summary"]["complexity_aware/phase1.last_loss"] == 1.5
    assert runs["eval"]["summary"]["models.base.per_band.hard.ci95.0"] == 0.1
    assert runs["report"]["artifacts"] == {"report": ["plots/entropy.png", "report.html"]}


def test_a_training_phase_joins_the_runs_wandb_group(monkeypatch):
    """The phase's W&B run (rank 0 of the workers, through Ray's setup_wandb) is put in the group."""
    from types import SimpleNamespace

    import ray.air.integrations.wandb as ray_wandb

    from raycat.train.loop import _tracker

    calls = []
    monkeypatch.setattr(
        ray_wandb, "setup_wandb", lambda config, **kw: calls.append(kw) or SimpleNamespace(log=None, finish=None)
    )
    cfg = SimpleNamespace(
        tracking="wandb", tracking_tags={"raycat.wandb_group": "g-1"}, hparams={}, tracking_project="p",
        recipe="complexity_aware", phase_name="phase2",
    )  # fmt: skip
    _tracker(cfg)
    assert calls == [
        {
            "project": "p",
            "rank_zero_only": True,
            "group": "g-1",
            "job_type": "train",
            "name": "train complexity_aware/phase2",
        }
    ]
