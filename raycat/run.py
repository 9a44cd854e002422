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

from raycat import rundir
from raycat.config import RaycatConfig
from raycat.recipes import needs_cot

STAGES = ("score", "split", "teach", "train", "eval", "report")


def _section(cfg: RaycatConfig, stage: str, recipes: list[str]):
    if stage == "score":
        return {"data": cfg.data.model_dump(mode="json"), "score": cfg.score.model_dump(mode="json")}
    if stage == "split":
        return cfg.split.model_dump(mode="json")
    if stage == "teach":
        return cfg.teach.model_dump(mode="json") if cfg.teach else None
    if stage == "train":
        return {"train": cfg.train.model_dump(mode="json", exclude={"recipe"}), "recipes": recipes}
    if stage == "eval":
        return {"eval": cfg.eval.model_dump(mode="json"), "recipes": recipes}
    return {"report": 1}


def stage_hashes(cfg: RaycatConfig, recipes: list[str]) -> dict[str, str]:
    out, up = {}, ""
    for stage in STAGES:
        up = hashlib.sha256(json.dumps([up, stage, _section(cfg, stage, recipes)], sort_keys=True,
                                       default=str).encode()).hexdigest()[:16]
        out[stage] = up
    return out


def plan(cfg: RaycatConfig, recipes: list[str], manifest: dict, start: str | None, only: str | None) -> list[tuple]:
    """(stage, hash, action) with action 'run', 'skip' (done, same hash) or 'off' (not configured)."""
    hashes = stage_hashes(cfg, recipes)
    forced = set()
    if start:
        forced = set(STAGES[STAGES.index(start):])
    if only:
        forced = {only}
    steps = []
    for stage in STAGES:
        done = manifest.get("stages", {}).get(stage, {})
        if stage == "teach" and cfg.teach is None:
            if any(needs_cot(r) for r in recipes):
                raise ValueError(f"recipes {recipes} train on teacher CoT but the config has no teach: section")
            steps.append((stage, hashes[stage], "off"))
            continue
        if only and stage != only:
            action = "skip"
        elif stage in forced or done.get("hash") != hashes[stage] or done.get("status") != "done":
            action = "run"
        else:
            action = "skip"
        steps.append((stage, hashes[stage], action))
    return steps


def read_manifest(cfg: RaycatConfig) -> dict:
    path = rundir.join(cfg.run_dir, "manifest.json")
    return rundir.read_json(path) if rundir.exists(path) else {"stages": {}}


def run(cfg: RaycatConfig, recipes: list[str], stages: dict[str, Callable], start: str | None = None,
        only: str | None = None, say=print) -> dict:
    """Run the stage graph; ``stages`` maps a stage name to ``fn(cfg, recipes)``."""
    from raycat.preflight import resource_problems, version_problems
    from raycat.ray_env import ray_session

    manifest = read_manifest(cfg)
    steps = plan(cfg, recipes, manifest, start, only)
    errors, warnings = version_problems(cfg)
    for w in warnings:
        say(f"pre-flight warning: {w}")
    if errors:
        raise RuntimeError("pre-flight: " + "; ".join(errors))
    path = rundir.join(cfg.run_dir, "manifest.json")
    manifest.update({"recipes": recipes, "config": rundir.join(cfg.run_dir, "config.yaml")})
    # One Ray session for the whole job; each stage's actors end with its pipeline or fit.
    with ray_session(cfg.ray):
        import ray

        available = ray.cluster_resources()
        problems = resource_problems(cfg, available)
        if problems and cfg.ray.address is None and "RAY_ADDRESS" not in os.environ:
            # A local Ray cannot grow: refuse now rather than wait forever for resources.
            raise RuntimeError("pre-flight: " + "; ".join(problems))
        for p in problems:  # a cluster may autoscale up to it
            say(f"pre-flight warning: {p} right now (waiting for the autoscaler if there is one)")
        for stage, h, action in steps:
            entry = manifest["stages"].setdefault(stage, {})
            if action == "off":
                entry.clear()
                entry.update({"hash": h, "status": "not configured"})
            if action != "run":
                say(f"{stage}: {'not configured' if action == 'off' else 'up to date (hash ' + h + '), skipping'}")
                continue
            entry.update({"hash": h, "status": "running", "started": time.time()})
            rundir.write_json(path, manifest)
            t0 = time.time()
            try:
                stages[stage](cfg, recipes)
            except BaseException:
                entry["status"] = "failed"
                rundir.write_json(path, manifest)
                raise
            entry.update({"status": "done", "wall_s": round(time.time() - t0, 2), "finished": time.time()})
            rundir.write_json(path, manifest)
    return manifest
