"""What a run will cost before it runs: devices and memory per stage, tokens, and device-hours.

Each figure carries its basis. Devices come from the config; memory per training worker is the train
pre-flight estimate (model config only, no weights); tokens are the row counts the config implies times
tokens per row *measured* on the rows of a finished reference run on the same kind of data; device-hours
divide those tokens by throughput *measured* by raycat's benches (``bench/*.py --json``), taken as is when
the bench ran the same model size on the same kind of device, else *extrapolated* across model sizes by
FLOPs per token. Nothing is estimated where nothing was measured: the figure says what is missing.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from raycat.config import ConfigError, ModelConfig, RaycatConfig
from raycat.preflight import engine_ask, stage_asks
from raycat.recipes import RECIPES, Phase
from raycat.storage import models, rundir
from raycat.train.memory import check_fit, lora_trainable, model_shape, phase_estimate, worker_capacity

# Kind of work per stage: what a bench measures and what the FLOPs factor is (per parameter and token).
KINDS = {"score": "prefill", "teach": "decode", "train": "train", "eval": "decode", "eval_prompts": "prefill"}

# How a plan cell says a model config could not be read (the CLI finds these to suggest HF_HUB_OFFLINE).
UNREADABLE = "model config not readable"


# ---- throughput records (written by bench/*.py --json) --------------------------------------------


def device_name(device: str) -> str:
    """What ran the bench: the GPU model, or the CPU model with its thread count."""
    if device == "gpu":
        import torch

        return torch.cuda.get_device_name(0)
    model = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} CPUs)"


def record(
    *, bench: str, kind: str, model: str, params: int, device: str, devices: float, tokens: int, seconds: float, **extra
) -> dict:
    """One measurement: ``tokens`` of ``kind`` work in ``seconds`` on ``devices`` GPUs (or CPU engines)."""
    return {
        "bench": bench,
        "kind": kind,
        "model": model,
        "params": int(params),
        "device": device,
        "device_name": device_name(device),
        "devices": devices,
        "tokens": int(tokens),
        "seconds": float(seconds),
        "tokens_per_s_per_device": tokens / seconds / devices,
        "measured_at": datetime.now(UTC).strftime("%Y-%m-%d"),
        **extra,
    }


def append_records(path: str, new: list[dict]) -> None:
    """Add measurements to a JSON list file (a later one of the same bench, kind, model and device
    replaces the earlier)."""
    old = json.loads(rundir.read_bytes(path)) if rundir.exists(path) else []
    key = ("bench", "kind", "model", "device", "device_name", "method")
    keep = [r for r in old if all(tuple(r.get(k) for k in key) != tuple(n.get(k) for k in key) for n in new)]
    rundir.write_text(path, json.dumps(keep + new, indent=2) + "\n")


REQUIRED = ("kind", "model", "params", "device", "device_name", "tokens_per_s_per_device", "bench", "measured_at")


def load_records(paths: list[str]) -> list[dict]:
    """Bench records from JSON list files; a missing file or a record without a needed key is a config
    error naming the file."""
    out = []
    for path in paths:
        if not rundir.exists(path):
            raise ConfigError(f"study.scaling.throughput: {path} not found (a path is relative to the study file)")
        try:
            records = json.loads(rundir.read_bytes(path))
        except json.JSONDecodeError as e:
            raise ConfigError(f"study.scaling.throughput: {path} is not JSON: {e}") from None
        if not isinstance(records, list):
            raise ConfigError(f"study.scaling.throughput: {path} is not a JSON list of records (bench/*.py --json)")
        for i, record in enumerate(records):
            missing = [k for k in REQUIRED if k not in record]
            if missing:
                raise ConfigError(f"study.scaling.throughput: {path} record {i} lacks {missing} (bench/*.py --json)")
        out += [{**record, "file": path} for record in records]
    return out


def flops_per_token(kind: str, params: int, method: str = "full", checkpointing: bool = False) -> float:
    """2N forward; training adds 2N for activation gradients and 2N for weight gradients (not for a frozen
    LoRA base), plus 2N of recomputation under gradient checkpointing."""
    if kind != "train":
        return 2.0 * params
    return params * (4.0 + (2.0 if method == "full" else 0.0) + (2.0 if checkpointing else 0.0))


def rate(records: list[dict], kind: str, device: str, params: int, method: str = "full", ckpt: bool = False):
    """(tokens/s per device, basis) for this work, or (None, why not)."""
    mine = [r for r in records if r["kind"] == kind and r["device"] == device]
    if kind == "train":
        mine = [r for r in mine if r.get("method", "full") == method] or mine
    if not mine:
        return None, f"no {device} {kind} throughput measured (run bench/*.py --device {device} --json FILE)"
    best = min(mine, key=lambda r: abs(math.log(r["params"] / params)))
    source = (
        f"{best['model']} ({best['params'] / 1e9:.3g}B) on {best['device_name']}, {best['bench']} {best['measured_at']}"
    )
    its_flops = flops_per_token(kind, best["params"], best.get("method", "full"), best.get("checkpointing", False))
    scaled = best["tokens_per_s_per_device"] * its_flops / flops_per_token(kind, params, method, ckpt)
    same_work = best.get("method", "full") == method and bool(best.get("checkpointing", False)) == ckpt
    if abs(best["params"] / params - 1) < 0.02 and (kind != "train" or same_work):
        return scaled, f"measured: {source}"
    return scaled, (
        f"extrapolated by FLOPs per token from {source} at {best['tokens_per_s_per_device']:.4g} tok/s/device"
    )


# ---- tokens per row, measured on a finished run ---------------------------------------------------


def reference_figures(run_dir: str) -> dict:
    """Tokens per row as a finished run measured them (absent where that stage did not run)."""
    out: dict = {"run_dir": run_dir}
    scores = rundir.join(run_dir, "score", "scores.parquet")
    if rundir.exists(scores):
        scored = rundir.read_parquet_columns(scores, ["status", "prompt_tokens"])
        scored = scored[scored["status"] == "scored"]
        if len(scored):
            out["score"] = {"rows": len(scored), "prompt_tokens": float(scored["prompt_tokens"].mean())}
    teach = rundir.read_json_if_exists(rundir.join(run_dir, "teach", "metrics.json")) or {}
    accounting = teach.get("accounting") or {}
    if accounting.get("rows_taught"):
        taught = accounting["rows_taught"]
        status = teach.get("status") or {}
        out["teach"] = {
            "verified_share": status.get("verified", 0) / taught if status else None,
            "rows": taught,
            "prompt_tokens": accounting["prompt_tokens"] / taught,  # per taught row, retries included
            "completion_tokens": accounting["completion_tokens"] / taught,
        }
    train = rundir.join(run_dir, "train")
    for recipe in rundir.list_dirs(train):
        for phase in rundir.list_dirs(rundir.join(train, recipe)):
            metrics = rundir.read_json_if_exists(rundir.join(train, recipe, phase, "metrics.json")) or {}
            if metrics.get("examples"):
                out.setdefault("train", {})[f"{recipe}/{phase}"] = {
                    "rows": metrics["examples"],
                    "tokens": metrics["tokens"] / metrics["examples"],
                }
    answers_path = rundir.join(run_dir, "eval", "eval.parquet")
    if rundir.exists(answers_path):
        answers = rundir.read_parquet_columns(answers_path, ["kind", "completion_tokens"])
        out["eval"] = {
            kind: {"rows": len(group), "completion_tokens": float(group["completion_tokens"].mean())}
            for kind, group in answers.groupby("kind")
        }
    return out


# ---- the plan --------------------------------------------------------------------------------------


def first_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}"


def _fig(value, basis: str) -> dict:
    return {"value": value, "basis": basis}


def model_params(path: str, trust_remote_code: bool, method: str = "full", lora: dict | None = None) -> dict:
    """Total (and LoRA-trainable) parameters from the model's config alone (meta device, no weights).
    Cached per process: a study plans many variants of the same student."""
    key = json.dumps(lora, sort_keys=True) if method == "lora" and lora else None
    return dict(_model_params(path, trust_remote_code, key))


@functools.lru_cache(maxsize=32)
def _model_params(path: str, trust_remote_code: bool, lora_json: str | None) -> dict:
    # A fresh meta model: PEFT wraps it in place.
    shape = model_shape(models.resolve(path), trust_remote_code)
    out = {k: shape[k] for k in ("params", "hidden", "layers", "vocab")}
    out["trainable"] = lora_trainable(shape["model"], json.loads(lora_json)) if lora_json else shape["params"]
    return out


def _target(key: str) -> str | None:
    recipe, phase = key.split("/", 1)
    return next((p.target for p in RECIPES.get(recipe, ()) if p.name == phase), None)


def _tokens_per_example(ref: dict, recipe: str, phase: Phase) -> tuple[float | None, str]:
    """Tokens per training example of a phase: measured where the reference trained it; else, for a phase
    it did not train (e.g. an empty phase 2), prompt plus target from what it measured elsewhere."""
    trained = ref.get("train") or {}
    measured = trained.get(f"{recipe}/{phase.name}")
    if measured:
        return measured["tokens"], f"measured on {measured['rows']} examples by {ref['run_dir']}"
    # The same phase of another recipe, with the same kind of target.
    same = [m for k, m in trained.items() if k.endswith(f"/{phase.name}") and _target(k) == phase.target]
    scored, taught = ref.get("score"), ref.get("teach")
    if phase.target == "cot" and scored and taught:
        per = scored["prompt_tokens"] + taught["completion_tokens"]
        return per, "estimated: measured prompt + teacher completion tokens per taught row"
    if phase.target == "answer" and same:
        return same[0]["tokens"], f"measured on another recipe's {phase.name}"
    if phase.target == "answer" and scored:
        return scored["prompt_tokens"], "estimated: measured prompt tokens (the answer target is a few tokens)"
    return None, "no measured tokens per example"


def taught_total(cfg: RaycatConfig, band_rows: dict, test: float | None) -> float:
    bands = ["easy", "medium", "hard"] if cfg.teach is None or cfg.teach.bands == "all" else list(cfg.teach.bands)
    taught = sum({**band_rows, "test": test or 0.0}[b] for b in bands)
    return min(taught, cfg.teach.limit) if cfg.teach is not None and cfg.teach.limit else taught


def _cot_rows(cfg: RaycatConfig, rows: float, taught: float, ref: dict) -> tuple[float, str]:
    """A CoT phase trains only taught rows, and under on_wrong=drop only the verified share of them."""
    rows = min(rows, taught)
    measured = ref.get("teach") or {}
    if cfg.teach is not None and cfg.teach.on_wrong == "drop" and measured.get("verified_share") is not None:
        return rows * measured["verified_share"], (
            f"x {measured['verified_share']:.2f} verified (measured on {measured['rows']} taught rows, on_wrong=drop)"
        )
    if cfg.teach is not None and cfg.teach.on_wrong == "drop":
        return rows, "upper bound: on_wrong=drop removes the unverified rows, none measured"
    return rows, f"every taught row (on_wrong={cfg.teach.on_wrong if cfg.teach else '-'})"


def _tokenizer_note(ref_cfg: RaycatConfig | None, cfg: RaycatConfig) -> str:
    if ref_cfg is None or ref_cfg.score.student.path == cfg.score.student.path:
        return ""
    return f" (tokenized by that run's student {ref_cfg.score.student.path}, not {cfg.score.student.path})"


def _questions(cfg: RaycatConfig, ref_cfg: RaycatConfig | None, ref: dict) -> dict:
    n = min([x for x in (cfg.data.sample, cfg.data.limit) if x] or [0]) or None  # the loader applies both
    if n:
        return _fig(n, "config (data.sample / data.limit)")
    if ref_cfg is not None and ref_cfg.data == cfg.data and "score" in ref:
        return _fig(ref["score"]["rows"], f"measured: rows scored by {ref['run_dir']} (same data section)")
    return _fig(None, "unknown: the whole corpus; set data.limit or run a variant on this data first")


@dataclass(frozen=True)
class _ExpectedRows:
    """The rows one run of the config implies; None throughout where the number of questions is unknown."""

    questions: dict  # the figure: value and basis
    count: int | None
    bands: dict[str, float] | None  # training rows per band
    test: float | None


def _expected_rows(cfg: RaycatConfig, ref_cfg: RaycatConfig | None, ref: dict) -> _ExpectedRows:
    questions = _questions(cfg, ref_cfg, ref)
    n = questions["value"]
    low, high = cfg.split.quantiles
    pool = None if n is None else n * (1 - cfg.split.test_fraction)
    bands = None if pool is None else {"easy": pool * low, "medium": pool * (high - low), "hard": pool * (1 - high)}
    return _ExpectedRows(questions, n, bands, None if n is None else n * cfg.split.test_fraction)


class _ShapeCache:
    """Each model's parameters, read once per plan; a config that cannot be read is the reason, a str."""

    def __init__(self) -> None:
        self._by_path: dict[str, dict | str] = {}

    def get(self, model: ModelConfig) -> dict | str:
        if model.path not in self._by_path:
            try:
                # Parameters only: no LoRA on a teacher's config.
                self._by_path[model.path] = model_params(model.path, model.trust_remote_code)
            except Exception as e:  # noqa: BLE001 - any failure to read the config is reported, not raised
                self._by_path[model.path] = f"{UNREADABLE}: {first_line(e)}"
        return self._by_path[model.path]


def costs(cfg: RaycatConfig, recipes: list[str], ref: dict, ref_cfg: RaycatConfig | None, records: list[dict]) -> dict:
    """Per stage: devices, tokens, FLOPs and device-hours of one run of ``cfg``, each with its basis."""
    rows = _expected_rows(cfg, ref_cfg, ref)
    asks, student, train = stage_asks(cfg), cfg.score.student, cfg.train
    cost = functools.partial(_stage_cost, shapes=_ShapeCache(), records=records)
    stages = {"score": cost("score", student, _score_tokens(cfg, rows, ref, ref_cfg), asks["score"])}
    if cfg.teach is not None:
        stages["teach"] = _teach_cost(cfg, _teach_tokens(cfg, rows, ref), cost)
    train_tokens = _train_tokens(cfg, recipes, rows, ref)
    stages["train"] = cost("train", student, train_tokens, asks["train"], train.method, train.gradient_checkpointing)
    stages["eval"] = cost("eval", student, _eval_tokens(cfg, recipes, rows, ref), asks["eval"])
    # Short answers make eval prefill-bound: its prompts at the prefill rate, on the eval engines.
    stages["eval_prompts"] = cost("eval_prompts", student, _eval_prompt_tokens(cfg, recipes, rows, ref), asks["eval"])
    return {"questions": rows.questions, "bands": rows.bands, "stages": stages, "device_hours_total": _total(stages)}


def _stage_cost(
    name: str,
    model: ModelConfig,
    tokens: dict,
    ask: dict[str, float],
    method: str = "full",
    checkpointing: bool = False,
    *,
    shapes: _ShapeCache,
    records: list[dict],
) -> dict:
    """One stage: the devices it asks for, its tokens, and device-hours at the measured (or extrapolated)
    rate of its kind of work; where a figure is missing, why."""
    device = "gpu" if ask["GPU"] else "cpu"
    devices = ask["GPU"] or ask["CPU"]
    shape = shapes.get(model)
    row = {"model": model.path, "device": device, "devices": devices, "tokens": tokens}
    if isinstance(shape, str):
        return {**row, "params": None, "device_hours": _fig(None, shape)}
    kind = KINDS[name]
    row["params"] = shape["params"]
    if tokens["value"] is None:
        return {**row, "device_hours": _fig(None, "tokens unknown")}
    row["flops"] = tokens["value"] * flops_per_token(kind, shape["params"], method, checkpointing)
    per_device, basis = rate(records, kind, device, shape["params"], method, checkpointing)
    if per_device is None:
        return {**row, "device_hours": _fig(None, basis)}
    hours = tokens["value"] / per_device / 3600
    row["tokens_per_s_per_device"] = per_device
    row["device_hours"] = _fig(hours, basis)
    row["wall_hours"] = _fig(hours / devices, f"device-hours / {devices:g} devices (assumes linear scaling)")
    return row


def _score_tokens(cfg: RaycatConfig, rows: _ExpectedRows, ref: dict, ref_cfg: RaycatConfig | None) -> dict:
    scored = ref.get("score")
    if rows.count is None or not scored:
        return _fig(None, "needs tokens per question measured by a finished run on this data")
    return _fig(
        rows.count * scored["prompt_tokens"],
        f"{rows.count} questions x {scored['prompt_tokens']:.1f} prompt tokens, the mean of {scored['rows']} rows "
        f"scored by {ref['run_dir']}" + _tokenizer_note(ref_cfg, cfg),
    )


def _teach_cost(cfg: RaycatConfig, tokens: dict, cost: Callable[..., dict]) -> dict:
    """Charged to the first teacher: later teachers only see the first one's failures."""
    teacher = cfg.teach.teachers[0]
    if teacher.api is not None:
        return {
            "model": teacher.model.path,
            "device": "api",
            "tokens": tokens,
            "device_hours": _fig(None, "an HTTP teacher: its server's cost, not this cluster's"),
        }
    return cost("teach", teacher.model, tokens, engine_ask(teacher.engine))


def _teach_tokens(cfg: RaycatConfig, rows: _ExpectedRows, ref: dict) -> dict:
    """Completion tokens only: the bench's decode rate already includes its prompts' prefill."""
    bands = ["easy", "medium", "hard"] if cfg.teach.bands == "all" else list(cfg.teach.bands)
    taught = None if rows.bands is None else sum({**rows.bands, "test": rows.test}[b] for b in bands)
    if cfg.teach.limit:
        taught = cfg.teach.limit if taught is None else min(taught, cfg.teach.limit)
    measured = ref.get("teach")
    if not measured or taught is None:
        return _fig(None, "needs tokens per taught row measured by a finished run")
    return _fig(
        taught * measured["completion_tokens"],
        f"{taught:.0f} taught rows x {measured['completion_tokens']:.1f} completion tokens per taught row "
        f"(retries included), measured on {measured['rows']} rows taught by {ref['run_dir']}",
    )


def _train_tokens(cfg: RaycatConfig, recipes: list[str], rows: _ExpectedRows, ref: dict) -> dict:
    """Every phase of every recipe; the first phase without an estimate ends the sum and says why."""
    tokens, parts = 0.0, []
    for recipe in recipes:
        for phase in RECIPES[recipe]:
            phase_tokens, part = _phase_tokens(cfg, recipe, phase, rows, ref)
            parts.append(part)
            if phase_tokens is None:
                return _fig(None, "; ".join(parts))
            tokens += phase_tokens
    return _fig(tokens, "; ".join(parts))


def _phase_tokens(cfg: RaycatConfig, recipe: str, phase: Phase, rows: _ExpectedRows, ref: dict):
    """(tokens, how): the examples a phase sees (rows x epochs, at most max_steps' worth) x tokens per example;
    (None, why) where either is unknown."""
    per, how = _tokens_per_example(ref, recipe, phase)
    examples = None if rows.bands is None else sum(rows.bands[b] for b in phase.bands)
    if phase.target == "cot" and examples is not None:
        examples, note = _cot_rows(cfg, examples, taught_total(cfg, rows.bands, rows.test), ref)
        how = f"{how}; {note}"
    if examples is None or per is None:
        return None, f"{recipe}/{phase.name}: {how}"
    train = cfg.train
    hp = train.phase(phase.name)
    seen = examples * hp.epochs
    if hp.max_steps:
        seen = min(seen, hp.max_steps * hp.micro_batch_size * hp.gradient_accumulation_steps * train.num_workers)
    return seen * per, f"{recipe}/{phase.name} {seen:.0f} examples x {per:.1f} tokens ({how})"


def _eval_models(cfg: RaycatConfig, recipes: list[str]) -> int:
    """The base (if evaluated) and every phase: an upper bound, as a phase may be empty and not trained."""
    return (1 if cfg.eval.include_base else 0) + sum(len(RECIPES[r]) for r in recipes)


def _eval_tokens(cfg: RaycatConfig, recipes: list[str], rows: _ExpectedRows, ref: dict) -> dict:
    measured = ref.get("eval") or {}
    if rows.test is None or not measured or not ref.get("score"):
        return _fig(None, "needs eval tokens measured by a finished run")
    models = _eval_models(cfg, recipes)
    generated = sum(v["completion_tokens"] * v["rows"] for v in measured.values()) / sum(
        v["rows"] for v in measured.values()
    )
    return _fig(
        rows.test * models * generated,
        f"{rows.test:.0f} test rows x {models} models (upper bound: every phase trained) x {generated:.1f} generated "
        f"tokens (mean of {ref['run_dir']}'s eval; the decode rate includes its bench's prompts, so with "
        "eval_prompts this is an upper bound)",
    )


def _eval_prompt_tokens(cfg: RaycatConfig, recipes: list[str], rows: _ExpectedRows, ref: dict) -> dict:
    """Eval's prompts, as long as the scored prompts (measured)."""
    scored = ref.get("score")
    if rows.test is None or not scored:
        return _fig(None, "needs prompt tokens measured by a finished run")
    models = _eval_models(cfg, recipes)
    return _fig(
        rows.test * models * scored["prompt_tokens"],
        f"{rows.test:.0f} test rows x {models} models x {scored['prompt_tokens']:.1f} prompt tokens "
        "(scored prompts' mean)",
    )


def _total(stages: dict[str, dict]) -> dict:
    """Device-hours of the stages that run on the cluster, where every one of them has a figure."""
    known = [stage["device_hours"]["value"] for stage in stages.values() if stage["device"] != "api"]
    ok = bool(known) and all(hours is not None for hours in known)
    api = any(stage["device"] == "api" for stage in stages.values())
    note = " (an HTTP teacher's tokens are not cluster hours)" if api else ""
    return _fig(sum(known) if ok else None, ("sum of the stages" if ok else "some stage has no estimate") + note)


def memory(cfg: RaycatConfig, recipes: list[str]) -> dict:
    """Device memory per training worker for each phase (the train pre-flight's estimate), and whether it fits."""
    train, student = cfg.train, cfg.score.student
    try:
        shape = model_params(student.path, student.trust_remote_code, train.method, train.lora.model_dump())
    except Exception as e:  # noqa: BLE001
        return {"error": f"{UNREADABLE}: {first_line(e)}"}
    capacity, host = worker_capacity(train)
    if train.worker_memory_gib:
        basis = "train.worker_memory_gib"
    elif train.device == "gpu":
        basis = "assumed 80 GiB per GPU (set train.worker_memory_gib)"
    else:
        basis = "this machine's RAM / train.num_workers"
    out = {
        "params": shape["params"],
        "trainable_params": shape["trainable"],
        "worker_memory_gib": _fig(capacity, basis),
        "phases": {},
    }
    # GPU workers' host RAM is the cluster's, not this planning machine's: unknown unless configured.
    host_known = train.device == "cpu" or train.host_memory_per_worker_gib is not None
    for name in sorted({phase.name for r in recipes for phase in RECIPES[r]}):
        estimate = phase_estimate(cfg, shape, shape["trainable"], name)
        problem = check_fit(estimate, capacity, host if host_known else math.inf, same_pool=train.device == "cpu")
        fits: bool | None = problem is None
        if fits and not host_known and estimate["host_gib_per_worker"] > 0:
            fits = None
            problem = (
                f"offloaded states need ~{estimate['host_gib_per_worker']:.1f} GiB of host RAM per worker; "
                "the workers' host RAM is unknown here (set train.host_memory_per_worker_gib)"
            )
        out["phases"][name] = {
            "device_gib_per_worker": estimate["device_gib_per_worker"],
            "host_gib_per_worker": estimate["host_gib_per_worker"],
            "fits": fits,
            "problem": problem,
        }
    return out
