"""``raycat run``: score → split → teach → train → eval → report, with a manifest for resume and provenance.

Each stage's hash covers the config section it reads plus the hash of the stage before it, so a
changed parameter reruns exactly that stage and everything downstream; a finished stage whose hash
matches is skipped. Stages keep their own row-level caches as well (score parts, teacher cache,
phase ``done.json``), so even a rerun stage recomputes only what actually changed. The manifest
(``<run_dir>/manifest.json``) records every stage's hash, status and wall time, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable

from raycat import preflight, progress, report, tracking
from raycat.config import RaycatConfig
from raycat.data import sources
from raycat.data.adapters import resolve_data_path
from raycat.errors import RaycatError
from raycat.evaluate import stage as evaluate
from raycat.ray_env import ray_session
from raycat.recipes import RECIPES, needs_cot
from raycat.score import stage as score
from raycat.split import stage as split
from raycat.storage import rundir
from raycat.teach import stage as teach
from raycat.train import stage as train

# The one list of stages, in order: the CLI's subcommands and --from/--only choices come from it.
STAGES = ("score", "split", "teach", "train", "eval", "report")

# (stage, its result) → the CLI's table
Show = Callable[[str, dict], None]


def run_stage(
    stage: str,
    cfg: RaycatConfig,
    recipes: list[str] | None = None,
    show: Show = lambda stage, result: None,
    tracker: tracking.Tracker | tracking.WandbTracker | None = None,
) -> None:
    """Run one stage's driver; ``recipes`` (default: ``train.recipe``) for train and eval; ``tracker``:
    the ``raycat run``'s tracker run, which the training phases' runs nest under."""
    recipes = recipes or [cfg.train.recipe]
    if stage == "score":
        show(stage, score.run(cfg))
    elif stage == "split":
        show(stage, split.run(cfg))
    elif stage == "teach":
        show(stage, teach.run(cfg))
    elif stage == "train":
        for recipe in recipes:
            recipe_cfg = cfg.model_copy(deep=True)
            recipe_cfg.train.recipe = recipe
            show(stage, train.run(recipe_cfg, tracking_tags=tracker.parent_tags if tracker else None))
    elif stage == "eval":
        show(stage, evaluate.run(cfg, recipes))
    elif stage == "report":
        show(stage, report.build(cfg.run_dir))
    else:
        raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")


def check_recipes(recipes: list[str]) -> list[str]:
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise RaycatError(f"--recipes: unknown {unknown}; choose from {', '.join(RECIPES)}")
    return recipes


def effective_config(cfg: RaycatConfig, recipes: list[str]) -> RaycatConfig:
    """The config `raycat run` executes: CoT for every band when a recipe trains on CoT beyond hard
    (the teacher cache is shared, so hard rows are still taught once)."""
    cfg = cfg.model_copy(deep=True)
    if cfg.teach is not None and {"distill_all", "random_split"} & set(recipes) and cfg.teach.bands != "all":
        cfg.teach.bands = "all"
    return cfg


def bands_note(cfg: RaycatConfig, widened: RaycatConfig, recipes: list[str]) -> str | None:
    """What the user reads when --recipes widened teach.bands (``widened``: effective_config's result):
    teacher rows cost money, and every band is about four times the hard band's rows."""
    if cfg.teach is None or widened.teach.bands == cfg.teach.bands:
        return None
    return (
        f"teach.bands {cfg.teach.bands} -> all: --recipes {','.join(recipes)} trains on teacher CoT for every "
        "band, so the teacher writes CoT for every training row, about 4x the hard band's (hard rows are "
        "taught once and shared)"
    )


def data_fingerprint(cfg: RaycatConfig) -> str:
    """The input files' fingerprint (names, sizes, mtimes): a data file edited in place, or a shard
    added to, replaced in or removed from a prefix or glob, reruns score. A hub id gives "" (pin
    ``data.revision``)."""
    if cfg.data.path is None:  # synthetic data: the config is the whole input
        return ""
    local = resolve_data_path(cfg.data.path)
    if local is not None:
        return rundir.fingerprint(str(local))
    # Listings only, never a read or a request per shard: cheap for thousands of shards.
    files = sources.resolve(cfg.data.path)
    if files is None:
        return ""
    if len(files) == 1:
        return rundir.fingerprint(files[0])
    return rundir.fingerprint(sources.common_root(files), only=set(files))


# Settings that change what an operator sees or how fast rows come, never a stage's rows: changing
# them reruns nothing.
_OBSERVABILITY_ONLY = {"engine": {"metrics", "batches_in_flight", "max_restarts"}}


def _section(cfg: RaycatConfig, stage: str, recipes: list[str]):
    """What a stage reads: its config section, and the fingerprints of the files and model dirs it reads
    (a model retrained in place, or a data file edited in place, is a new input)."""
    if stage == "score":
        return {
            "data": _without_new_defaults(cfg.data.model_dump(mode="json"), {"synthetic": {"kinds": None}}),
            "score": _without_new_defaults(
                cfg.score.model_dump(mode="json", exclude=_OBSERVABILITY_ONLY), {"prompt": {"answer_prefix": ""}}
            ),
            "inputs": [data_fingerprint(cfg), rundir.fingerprint(cfg.score.student.path)],
        }
    if stage == "split":
        return cfg.split.model_dump(mode="json")
    if stage == "teach":
        if cfg.teach is None:
            return None
        return {
            "teach": cfg.teach.model_dump(mode="json", exclude={"teachers": {"__all__": _OBSERVABILITY_ONLY}}),
            "inputs": [rundir.fingerprint(t.model.path) for t in cfg.teach.teachers if t.api is None],
        }
    if stage == "train":
        return {"train": cfg.train.model_dump(mode="json", exclude={"recipe"}), "recipes": recipes}
    if stage == "eval":
        # How many models share an engine changes no answer.
        exclude = {**_OBSERVABILITY_ONLY, "max_loras": True}
        return {"eval": cfg.eval.model_dump(mode="json", exclude=exclude), "recipes": recipes}
    return {"report": 1}


def _without_new_defaults(tree: dict, new: dict) -> dict:
    """``tree`` without the keys added after runs existed (``new``: their defaults) where they hold their
    default: a run made before a key existed keeps its stage hash."""
    for key, default in new.items():
        if isinstance(default, dict) and isinstance(tree.get(key), dict):
            tree[key] = _without_new_defaults(tree[key], default)
        elif key in tree and tree[key] == default:
            del tree[key]
    return tree


def stage_hashes(cfg: RaycatConfig, recipes: list[str]) -> dict[str, str]:
    """Each stage's hash: what it reads and the hash of the stage before it."""
    out, upstream = {}, ""
    for stage in STAGES:
        upstream = hashlib.sha256(
            json.dumps([upstream, stage, _section(cfg, stage, recipes)], sort_keys=True, default=str).encode()
        ).hexdigest()[:16]
        out[stage] = upstream
    return out


def plan(
    cfg: RaycatConfig,
    recipes: list[str],
    manifest: dict,
    start: str | None,
    only: str | None,
    strict: bool = True,
) -> list[tuple]:
    """(stage, hash, action) with action 'run', 'skip' (done, same hash), 'off' (not configured), or for
    a stage ``only`` leaves out 'not run' / 'not run, stale' (its outputs are missing or from another
    hash). ``strict=False``: a CoT recipe without a teach section plans teach 'off' (the pre-flight then
    lists it among the other problems) instead of raising."""
    hashes = stage_hashes(cfg, recipes)
    forced = set()
    if start:
        forced = set(STAGES[STAGES.index(start) :])
    if only:
        forced = {only}
    steps = []
    for stage in STAGES:
        done = manifest.get("stages", {}).get(stage, {})
        if stage == "teach" and cfg.teach is None:
            if strict and any(needs_cot(r) for r in recipes):
                raise RaycatError(f"recipes {recipes} train on teacher CoT but the config has no teach: section")
            steps.append((stage, hashes[stage], "off"))
            continue
        stale = done.get("hash") != hashes[stage] or done.get("status") != "done"
        if only and stage != only:
            action = "not run, stale" if stale else "not run"
        elif stage in forced or stale:
            action = "run"
        else:
            action = "skip"
        steps.append((stage, hashes[stage], action))
    return steps


def not_run_reason(action: str, stage_hash: str, only: str | None) -> str:
    """Why a stage of the plan does not run, as the run prints it."""
    if action == "off":
        return "not configured"
    if action == "not run":
        return f"not run (--only {only}); up to date (hash {stage_hash})"
    if action == "not run, stale":
        return f"not run (--only {only}); NOT up to date: its outputs are missing or from another config"
    return f"up to date (hash {stage_hash}), skipping"


def _tracker(cfg: RaycatConfig, recipes: list[str]):
    """The run's experiment tracker: its MLflow run or W&B group (None without one)."""
    uri = train.tracking_uri(cfg)
    return tracking.open_run(cfg.train.tracking, uri, cfg.train.tracking_project, cfg.run_dir, recipes)


def read_manifest(cfg: RaycatConfig) -> dict:
    path = rundir.join(cfg.run_dir, "manifest.json")
    return rundir.read_json(path) if rundir.exists(path) else {"stages": {}}


def check(
    cfg: RaycatConfig, recipes: list[str], start: str | None, only: str | None, plan_only: bool = False
) -> tuple[list[tuple], list[preflight.Check]]:
    """The run's plan and its whole pre-flight, before Ray starts. Resources are checked against the local
    Ray a run without an address starts here; against a cluster only once `run` has connected (a cluster
    may autoscale), so here against the config's own sizes. ``plan_only`` (``--plan``) never counts this
    machine as the cluster: it checks a config meant for one."""
    reached = preflight.run_dir_check(cfg.run_dir)
    # An unreachable run dir has no manifest to read: its pre-flight line says why, with the fix.
    manifest = read_manifest(cfg) if reached.status == "ok" else {"stages": {}}
    steps = plan(cfg, recipes, manifest, start, only, strict=False)
    stages = [stage for stage, _, action in steps if action == "run"]
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        available, where = None, f"the cluster at {address} is checked once `raycat run` connects"
    else:
        here = preflight.local_resources(cfg, os.environ)
        available = None if plan_only else here
        where = f"a local Ray here: {here['CPU']:g} CPU, {here['GPU']:g} GPU"
        if plan_only:
            where = f"no ray.address / RAY_ADDRESS; {where}"
    return steps, preflight.whole_run(cfg, recipes, stages, available, where, run_dir=reached)


def run(
    cfg: RaycatConfig,
    recipes: list[str],
    start: str | None = None,
    only: str | None = None,
    show: Show = lambda stage, result: None,
) -> dict:
    """Run the stage graph for ``recipes``: every stage whose hash changed (or ``start`` onwards, or
    ``only``), in one Ray session. Returns the manifest."""

    def say(msg: str) -> None:
        progress.say("run", msg)

    started = time.time()
    widened = effective_config(cfg, check_recipes(recipes))
    note = bands_note(cfg, widened, recipes)
    if note:
        say(note)
    cfg = widened
    # Every stage's problems at once, before Ray starts: not a missing key after hours of scoring.
    steps, checks = check(cfg, recipes, start, only)
    refused = preflight.refusal(checks)
    if refused:
        raise RaycatError(refused)
    for c in checks:
        if c.status in ("warning", "unchecked"):
            say(f"pre-flight {'warning' if c.status == 'warning' else 'not checked'}: {c.text}")
    manifest = read_manifest(cfg)
    path = rundir.join(cfg.run_dir, "manifest.json")
    manifest.update({"recipes": recipes, "config": rundir.join(cfg.run_dir, "config.yaml")})
    # One Ray session for the whole job; each stage's actors end with its pipeline or fit.
    with ray_session(cfg.ray, cfg.run_dir), _tracker(cfg, recipes) as tracker:
        import ray

        available = ray.cluster_resources()
        problems = preflight.resource_problems(cfg, available, [s for s, _, a in steps if a == "run"])
        if problems and cfg.ray.address is None and "RAY_ADDRESS" not in os.environ:
            # A local Ray cannot grow: refuse now rather than wait forever for resources.
            raise RaycatError("pre-flight: " + "; ".join(problems))
        # A cluster may autoscale up to it.
        for problem in problems:
            say(f"pre-flight warning: {problem} right now (waiting for the autoscaler if there is one)")
        for stage, stage_hash, action in steps:
            entry = manifest["stages"].setdefault(stage, {})
            if action == "off":
                entry.clear()
                entry.update({"hash": stage_hash, "status": "not configured"})
            if action != "run":
                say(f"{stage}: {not_run_reason(action, stage_hash, only)}")
                if tracker is not None and action != "off":
                    tracker.stage(stage, "up to date" if action in ("skip", "not run") else action)
                continue
            entry.update({"hash": stage_hash, "status": "running", "started": time.time()})
            rundir.write_json(path, manifest)
            stage_started = time.time()
            try:
                run_stage(stage, cfg, recipes, show, tracker)
            except BaseException:
                entry["status"] = "failed"
                rundir.write_json(path, manifest)
                raise
            entry.update({"status": "done", "wall_s": round(time.time() - stage_started, 2), "finished": time.time()})
            rundir.write_json(path, manifest)
            if tracker is not None:
                tracker.stage(stage, "done")
    say(f"finished in {time.time() - started:.0f} s; report: {rundir.join(cfg.run_dir, 'report', 'report.md')}")
    return manifest
