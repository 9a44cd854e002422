"""One MLflow run per ``raycat run``, with a nested run per stage holding that stage's numbers, and the
report as artifacts; the training phases' own runs (logged by rank 0 of the workers, every step) are
nested under it too (``parent_tags``). W&B, which does not nest runs, gets a group per ``raycat run``
with a run per stage and per training phase in it. Pure apart from the MLflow calls: what a stage logs is every
number of the files it wrote (``numbers``), so a metric added to a stage reaches the tracker as is.

Which files: score/metrics.json (accuracy, ROC AUC, entropy, per category), split/thresholds.json
(thresholds, band sizes), teach/metrics.json (verified / wrong / failed per teacher, tokens, cost,
saving), train/<recipe>/<phase>/metrics.json (the phase's summary), eval/metrics.json (accuracy per
band with CIs, paired differences); report/ as artifacts.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager

from raycat import __version__
from raycat.recipes import RECIPES
from raycat.storage import rundir

# Lists of at most this many numbers are logged item by item (thresholds, CIs); longer ones (a
# phase's step history) are the training runs' own metrics.
MAX_LIST = 16
# MLflow's metric key alphabet and length.
_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")
MAX_KEY = 250
BATCH = 1000  # MLflow's limit of metrics per log_batch


def numbers(tree, prefix: str = "") -> dict[str, float]:
    """Every finite number of a JSON tree, keyed by its dotted path (list items by index)."""
    out: dict[str, float] = {}
    if isinstance(tree, bool):
        out[prefix] = float(tree)
    elif isinstance(tree, int | float):
        if math.isfinite(tree):
            out[prefix] = float(tree)
    elif isinstance(tree, dict):
        for key, value in tree.items():
            out.update(numbers(value, f"{prefix}.{key}" if prefix else str(key)))
    elif isinstance(tree, list) and len(tree) <= MAX_LIST:
        for i, value in enumerate(tree):
            out.update(numbers(value, f"{prefix}.{i}"))
    return {_KEY.sub("_", k)[:MAX_KEY]: v for k, v in out.items()}


def stage_files(run_dir: str, stage: str, recipes: list[str]) -> dict[str, str]:
    """(name in the tracker → path) of the metrics files a stage writes."""
    join = rundir.join
    if stage == "score":
        return {"score": join(run_dir, "score", "metrics.json")}
    if stage == "split":
        return {"split": join(run_dir, "split", "thresholds.json")}
    if stage == "teach":
        return {"teach": join(run_dir, "teach", "metrics.json")}
    if stage == "train":
        return {
            f"{recipe}/{phase.name}": join(run_dir, "train", recipe, phase.name, "metrics.json")
            for recipe in recipes
            for phase in RECIPES[recipe]
        }
    if stage == "eval":
        return {"eval": join(run_dir, "eval", "metrics.json")}
    return {}


def stage_numbers(run_dir: str, stage: str, recipes: list[str]) -> dict[str, float]:
    """Every number of the files a stage wrote, keyed by path (a file's name prefixes its keys, unless it
    is named after the stage): what both trackers log for the stage."""
    values: dict[str, float] = {}
    for name, path in stage_files(run_dir, stage, recipes).items():
        data = rundir.read_json_if_exists(path)
        if data is not None:
            values.update(numbers(data, "" if name == stage else name))
    return values


class Tracker:
    """The run's MLflow run (``open``); ``stage`` logs a finished stage as a nested run."""

    def __init__(self, client, run_id: str, experiment_id: str, run_dir: str, recipes: list[str]):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id
        self.run_dir, self.recipes = run_dir, recipes

    @property
    def parent_tags(self) -> dict[str, str]:
        """Tags that nest another run (a training phase's) under this one."""
        return {"mlflow.parentRunId": self.run_id, "raycat.run_dir": self.run_dir}

    def _log_numbers(self, run_id: str, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(1000 * time.time())
        items = [Metric(k, v, now, 0) for k, v in values.items()]
        for start in range(0, len(items), BATCH):
            self.client.log_batch(run_id, metrics=items[start : start + BATCH])

    def stage(self, stage: str, status: str) -> None:
        """A nested run named after the stage with every number of its files, or its report as artifacts."""
        client = self.client
        tags = {**self.parent_tags, "raycat.stage": stage, "raycat.status": status}
        run = client.create_run(self.experiment_id, run_name=stage, tags=tags)
        try:
            if stage == "report":
                self._artifacts(client, run.info.run_id)
            self._log_numbers(run.info.run_id, stage_numbers(self.run_dir, stage, self.recipes))
        finally:
            client.set_terminated(run.info.run_id)

    def _artifacts(self, client, run_id: str) -> None:
        """report/ (report.html, report.md, the plots) copied through a local dir (the run dir may be a URI)."""
        report = rundir.join(self.run_dir, "report")
        if rundir.file_type(report) != "dir":
            return
        with tempfile.TemporaryDirectory() as tmp:
            rundir.upload_dir(report, tmp)
            client.log_artifacts(run_id, tmp, "report")


class WandbTracker:
    """The ``raycat run``'s W&B group (W&B does not nest runs): one run per stage in the group, its
    job type the stage, every number of the stage's files as its summary, the run's config.yaml as its
    config and the report as a ``report`` artifact; the training phases' runs join the group
    (``parent_tags``)."""

    def __init__(self, project: str, group: str, run_dir: str, recipes: list[str], config: dict):
        self.project, self.group, self.run_dir, self.recipes, self.config = project, group, run_dir, recipes, config

    @property
    def parent_tags(self) -> dict[str, str]:
        return {"raycat.wandb_group": self.group, "raycat.run_dir": self.run_dir}

    def stage(self, stage: str, status: str) -> None:
        import wandb

        config = {**self.config, "raycat": {"run_dir": self.run_dir, "status": status, "version": __version__}}
        run = wandb.init(
            project=self.project, group=self.group, job_type=stage, name=stage, config=config, reinit="create_new"
        )
        try:
            run.summary.update(stage_numbers(self.run_dir, stage, self.recipes))
            report = rundir.join(self.run_dir, "report")
            if stage == "report" and rundir.file_type(report) == "dir":
                with tempfile.TemporaryDirectory() as tmp:
                    rundir.upload_dir(report, tmp)
                    artifact = wandb.Artifact("report", type="report")
                    artifact.add_dir(tmp)
                    run.log_artifact(artifact)  # add_dir staged a copy: the temporary dir may go
        finally:
            run.finish()


def _wandb_run(project: str, run_dir: str, recipes: list[str]) -> WandbTracker:
    import uuid

    import yaml

    config_path = rundir.join(run_dir, "config.yaml")
    config = yaml.safe_load(rundir.read_bytes(config_path)) if rundir.exists(config_path) else {}
    group = f"raycat-{os.path.basename(run_dir.rstrip('/'))}-{uuid.uuid4().hex[:8]}"
    return WandbTracker(project, group, run_dir, recipes, config or {})


@contextmanager
def open_run(
    tracking: str, uri: str | None, project: str, run_dir: str, recipes: list[str]
) -> Iterator[Tracker | WandbTracker | None]:
    """The ``raycat run``'s tracker: its MLflow run, ended when the block ends (FINISHED, or FAILED
    with the error), or its W&B group; None without a tracker."""
    if tracking == "wandb":
        yield _wandb_run(project, run_dir, recipes)
        return
    if tracking != "mlflow":
        yield None
        return
    import mlflow

    if (uri or "").startswith("file:"):
        # MLflow 3 refuses its file store unless opted in (as the training workers do).
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    if uri:
        mlflow.set_tracking_uri(uri)
    experiment = mlflow.set_experiment(project)
    client = mlflow.MlflowClient()
    tags = {"raycat.run_dir": run_dir, "raycat.recipes": ",".join(recipes), "raycat.version": __version__}
    run = client.create_run(
        experiment.experiment_id, run_name=f"raycat run {os.path.basename(run_dir.rstrip('/'))}", tags=tags
    )
    status = "FAILED"
    try:
        config = rundir.join(run_dir, "config.yaml")
        if rundir.exists(config):
            client.log_text(run.info.run_id, rundir.read_bytes(config).decode(), "config.yaml")
        yield Tracker(client, run.info.run_id, experiment.experiment_id, run_dir, recipes)
        status = "FINISHED"
    finally:
        client.set_terminated(run.info.run_id, status=status)
