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
import platform
from datetime import UTC, datetime

from raycat.config import RaycatConfig
from raycat.recipes import RECIPES
from raycat.storage import rundir

# Kind of work per stage: what a bench measures and what the FLOPs factor is (per parameter and token).
KINDS = {"score": "prefill", "teach": "decode", "train": "train", "eval": "decode", "eval_prompts": "prefill"}


# ---- throughput records (written by bench/*.py --json) --------------------------------------------


def device_name(device: str) -> str:
    """What ran the bench: the GPU model, or the CPU model with its thread count."""
    import os

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
    from raycat.config import ConfigError

    out = []
    for p in paths:
        if not rundir.exists(p):
            raise ConfigError(f"study.scaling.throughput: {p} not found (a path is relative to the study file)")
        try:
            recs = json.loads(rundir.read_bytes(p))
        except json.JSONDecodeError as e:
            raise ConfigError(f"study.scaling.throughput: {p} is not JSON: {e}") from None
        if not isinstance(recs, list):
            raise ConfigError(f"study.scaling.throughput: {p} is not a JSON list of records (bench/*.py --json)")
        for i, r in enumerate(recs):
            missing = [k for k in REQUIRED if k not in r]
            if missing:
                raise ConfigError(f"study.scaling.throughput: {p} record {i} lacks {missing} (bench/*.py --json)")
        out += [{**r, "file": p} for r in recs]
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
    src = (
        f"{best['model']} ({best['params'] / 1e9:.3g}B) on {best['device_name']}, {best['bench']} {best['measured_at']}"
    )
    own = flops_per_token(kind, best["params"], best.get("method", "full"), best.get("checkpointing", False))
    scaled = best["tokens_per_s_per_device"] * own / flops_per_token(kind, params, method, ckpt)
    same_work = best.get("method", "full") == method and bool(best.get("checkpointing", False)) == ckpt
    if abs(best["params"] / params - 1) < 0.02 and (kind != "train" or same_work):
        return scaled, f"measured: {src}"
    return scaled, f"extrapolated by FLOPs per token from {src} at {best['tokens_per_s_per_device']:.4g} tok/s/device"


# ---- tokens per row, measured on a finished run ---------------------------------------------------


def reference_figures(run_dir: str) -> dict:
    """Tokens per row as a finished run measured them (absent where that stage did not run)."""
    out: dict = {"run_dir": run_dir}
    scores = rundir.join(run_dir, "score", "scores.parquet")
    if rundir.exists(scores):
        s = rundir.read_parquet_columns(scores, ["status", "prompt_tokens"])
        s = s[s["status"] == "scored"]
        if len(s):
            out["score"] = {"rows": len(s), "prompt_tokens": float(s["prompt_tokens"].mean())}
    teach = rundir.read_json_if_exists(rundir.join(run_dir, "teach", "metrics.json")) or {}
    acc = teach.get("accounting") or {}
    if acc.get("rows_taught"):
        n = acc["rows_taught"]
        status = teach.get("status") or {}
        out["teach"] = {
            "verified_share": status.get("verified", 0) / n if status else None,
            "rows": n,
            "prompt_tokens": acc["prompt_tokens"] / n,  # per taught row, retries included
            "completion_tokens": acc["completion_tokens"] / n,
        }
    train = rundir.join(run_dir, "train")
    for recipe in rundir.list_dirs(train):
        for phase in rundir.list_dirs(rundir.join(train, recipe)):
            m = rundir.read_json_if_exists(rundir.join(train, recipe, phase, "metrics.json")) or {}
            if m.get("examples"):
                out.setdefault("train", {})[f"{recipe}/{phase}"] = {
                    "rows": m["examples"],
                    "tokens": m["tokens"] / m["examples"],
                }
    ev = rundir.join(run_dir, "eval", "eval.parquet")
    if rundir.exists(ev):
        e = rundir.read_parquet_columns(ev, ["kind", "completion_tokens"])
        out["eval"] = {
            k: {"rows": len(g), "completion_tokens": float(g["completion_tokens"].mean())} for k, g in e.groupby("kind")
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
    from raycat.storage import models
    from raycat.train.stage import lora_trainable, model_shape

    shape = model_shape(models.resolve(path), trust_remote_code)  # a fresh meta model: PEFT wraps it in place
    out = {k: shape[k] for k in ("params", "hidden", "layers", "vocab")}
    out["trainable"] = lora_trainable(shape["model"], json.loads(lora_json)) if lora_json else shape["params"]
    return out


def _target(key: str) -> str | None:
    recipe, phase = key.split("/", 1)
    return next((p.target for p in RECIPES.get(recipe, ()) if p.name == phase), None)


def _tokens_per_example(ref: dict, recipe: str, ph) -> tuple[float | None, str]:
    """Tokens per training example of a phase: measured where the reference trained it; else, for a phase
    it did not train (e.g. an empty phase 2), prompt plus target from what it measured elsewhere."""
    measured = (ref.get("train") or {}).get(f"{recipe}/{ph.name}")
    if measured:
        return measured["tokens"], f"measured on {measured['rows']} examples by {ref['run_dir']}"
    same = [  # the same phase of another recipe, with the same kind of target
        m for k, m in (ref.get("train") or {}).items() if k.endswith(f"/{ph.name}") and _target(k) == ph.target
    ]
    sref, tref = ref.get("score"), ref.get("teach")
    if ph.target == "cot" and sref and tref:
        per = sref["prompt_tokens"] + tref["completion_tokens"]
        return per, "estimated: measured prompt + teacher completion tokens per taught row"
    if ph.target == "answer" and same:
        return same[0]["tokens"], f"measured on another recipe's {ph.name}"
    if ph.target == "answer" and sref:
        return sref["prompt_tokens"], "estimated: measured prompt tokens (the answer target is a few tokens)"
    return None, "no measured tokens per example"


def taught_total(cfg: RaycatConfig, band_rows: dict, test: float | None) -> float:
    bands = ["easy", "medium", "hard"] if cfg.teach is None or cfg.teach.bands == "all" else list(cfg.teach.bands)
    taught = sum({**band_rows, "test": test or 0.0}[b] for b in bands)
    return min(taught, cfg.teach.limit) if cfg.teach is not None and cfg.teach.limit else taught


def _cot_rows(cfg: RaycatConfig, rows: float, taught: float, ref: dict) -> tuple[float, str]:
    """A CoT phase trains only taught rows, and under on_wrong=drop only the verified share of them."""
    rows = min(rows, taught)
    tref = ref.get("teach") or {}
    if cfg.teach is not None and cfg.teach.on_wrong == "drop" and tref.get("verified_share") is not None:
        return rows * tref["verified_share"], (
            f"x {tref['verified_share']:.2f} verified (measured on {tref['rows']} taught rows, on_wrong=drop)"
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


def costs(cfg: RaycatConfig, recipes: list[str], ref: dict, ref_cfg: RaycatConfig | None, records: list[dict]) -> dict:
    """Per stage: devices, tokens, FLOPs and device-hours of one run of ``cfg``, each with its basis."""
    from raycat.preflight import stage_asks

    q = _questions(cfg, ref_cfg, ref)
    n = q["value"]
    sp = cfg.split
    lo, hi = sp.quantiles
    pool = None if n is None else n * (1 - sp.test_fraction)
    band_rows = None if pool is None else {"easy": pool * lo, "medium": pool * (hi - lo), "hard": pool * (1 - hi)}
    test = None if n is None else n * sp.test_fraction
    asks = stage_asks(cfg)
    st = cfg.score.student
    shapes: dict[str, dict | str] = {}

    def shape(path: str, trust: bool) -> dict | str:
        if path not in shapes:
            try:
                shapes[path] = model_params(path, trust)  # parameters only: no LoRA on a teacher's config
            except Exception as e:  # noqa: BLE001 - any failure to read the config is reported, not raised
                shapes[path] = f"model config not readable: {first_line(e)}"
        return shapes[path]

    def stage(name, model, trust, tokens, tok_basis, method="full", ckpt=False, ask=None):
        ask = ask or asks[name.split("_")[0]]  # eval_prompts runs on the eval engines
        dev = "gpu" if ask["GPU"] else "cpu"
        devices = ask["GPU"] or ask["CPU"]
        s = shape(model, trust)
        row = {"model": model, "device": dev, "devices": devices, "tokens": _fig(tokens, tok_basis)}
        if isinstance(s, str):
            return {**row, "params": None, "device_hours": _fig(None, s)}
        kind = KINDS[name]
        row["params"] = s["params"]
        if tokens is None:
            return {**row, "device_hours": _fig(None, "tokens unknown")}
        row["flops"] = tokens * flops_per_token(kind, s["params"], method, ckpt)
        r, basis = rate(records, kind, dev, s["params"], method, ckpt)
        if r is None:
            return {**row, "device_hours": _fig(None, basis)}
        hours = tokens / r / 3600
        row["tokens_per_s_per_device"] = r
        row["device_hours"] = _fig(hours, basis)
        row["wall_hours"] = _fig(hours / devices, f"device-hours / {devices:g} devices (assumes linear scaling)")
        return row

    out = {"questions": q, "bands": band_rows, "stages": {}}
    sref = ref.get("score")
    tokens = None if n is None or not sref else n * sref["prompt_tokens"]
    basis = (
        f"{n} questions x {sref['prompt_tokens']:.1f} prompt tokens, the mean of {sref['rows']} rows scored by "
        f"{ref['run_dir']}" + _tokenizer_note(ref_cfg, cfg)
        if tokens is not None
        else "needs tokens per question measured by a finished run on this data"
    )
    out["stages"]["score"] = stage("score", st.path, st.trust_remote_code, tokens, basis)

    if cfg.teach is not None:
        bands = ["easy", "medium", "hard"] if cfg.teach.bands == "all" else list(cfg.teach.bands)
        taught = None if band_rows is None else sum({**band_rows, "test": test}[b] for b in bands)
        if cfg.teach.limit:
            taught = cfg.teach.limit if taught is None else min(taught, cfg.teach.limit)
        tref = ref.get("teach")
        t = cfg.teach.teachers[0]  # later teachers only see the first one's failures; charged to the first
        # Completion tokens over a measured completion rate: the bench's rate includes its prompts' prefill.
        tok = None if not tref or taught is None else taught * tref["completion_tokens"]
        b = (
            f"{taught:.0f} taught rows x {tref['completion_tokens']:.1f} completion tokens per taught row "
            f"(retries included), measured on {tref['rows']} rows taught by {ref['run_dir']}"
            if tok is not None
            else "needs tokens per taught row measured by a finished run"
        )
        if t.api is not None:
            out["stages"]["teach"] = {
                "model": t.model.path,
                "device": "api",
                "tokens": _fig(tok, b),
                "device_hours": _fig(None, "an HTTP teacher: its server's cost, not this cluster's"),
            }
        else:
            from raycat.preflight import engine_ask

            ask = engine_ask(t.engine)
            out["stages"]["teach"] = stage("teach", t.model.path, t.model.trust_remote_code, tok, b, ask=ask)

    tc = cfg.train
    tokens, parts = 0.0, []
    for recipe in recipes:
        for ph in RECIPES[recipe]:
            per, how = _tokens_per_example(ref, recipe, ph)
            rows = None if band_rows is None else sum(band_rows[b] for b in ph.bands)
            if ph.target == "cot" and rows is not None:
                rows, note = _cot_rows(cfg, rows, taught_total(cfg, band_rows, test), ref)
                how = f"{how}; {note}"
            if rows is None or per is None:
                tokens = None
                parts.append(f"{recipe}/{ph.name}: {how}")
                break
            pc = tc.phase(ph.name)
            seen = rows * pc.epochs
            if pc.max_steps:
                seen = min(seen, pc.max_steps * pc.micro_batch_size * pc.gradient_accumulation_steps * tc.num_workers)
            tokens += seen * per
            parts.append(f"{recipe}/{ph.name} {seen:.0f} examples x {per:.1f} tokens ({how})")
        if tokens is None:
            break
    tb = "; ".join(parts)
    out["stages"]["train"] = stage(
        "train", st.path, st.trust_remote_code, tokens, tb, tc.method, tc.gradient_checkpointing
    )

    eref = ref.get("eval") or {}
    models = (1 if cfg.eval.include_base else 0) + sum(len(RECIPES[r]) for r in recipes)
    if test is not None and eref and sref:
        gen = sum(v["completion_tokens"] * v["rows"] for v in eref.values()) / sum(v["rows"] for v in eref.values())
        tok = test * models * gen
        b = (
            f"{test:.0f} test rows x {models} models (upper bound: every phase trained) x {gen:.1f} generated "
            f"tokens (mean of {ref['run_dir']}'s eval; the decode rate includes its bench's prompts, so with "
            "eval_prompts this is an upper bound)"
        )
    else:
        tok, b = None, "needs eval tokens measured by a finished run"
    out["stages"]["eval"] = stage("eval", st.path, st.trust_remote_code, tok, b)
    # Short answers make eval prefill-bound: its prompts at the prefill rate (scoring's prompts, measured).
    tok = None if test is None or not sref else test * models * sref["prompt_tokens"]
    b = (
        f"{test:.0f} test rows x {models} models x {sref['prompt_tokens']:.1f} prompt tokens (scored prompts' mean)"
        if tok is not None
        else "needs prompt tokens measured by a finished run"
    )
    out["stages"]["eval_prompts"] = stage("eval_prompts", st.path, st.trust_remote_code, tok, b)
    known = [s["device_hours"]["value"] for s in out["stages"].values() if s["device"] != "api"]
    ok = bool(known) and all(h is not None for h in known)
    api = (
        " (an HTTP teacher's tokens are not cluster hours)"
        if any(x["device"] == "api" for x in out["stages"].values())
        else ""
    )
    out["device_hours_total"] = _fig(
        sum(known) if ok else None, ("sum of the stages" if ok else "some stage has no estimate") + api
    )
    return out


def memory(cfg: RaycatConfig, recipes: list[str]) -> dict:
    """Device memory per training worker for each phase (the train pre-flight's estimate), and whether it fits."""
    from raycat.train.memory import check_fit
    from raycat.train.stage import phase_estimate, worker_capacity

    tc = cfg.train
    try:
        s = model_params(cfg.score.student.path, cfg.score.student.trust_remote_code, tc.method, tc.lora.model_dump())
    except Exception as e:  # noqa: BLE001
        return {"error": f"model config not readable: {first_line(e)}"}
    cap, host = worker_capacity(tc)
    if tc.worker_memory_gib:
        basis = "train.worker_memory_gib"
    elif tc.device == "gpu":
        basis = "assumed 80 GiB per GPU (set train.worker_memory_gib)"
    else:
        basis = "this machine's RAM / train.num_workers"
    out = {
        "params": s["params"],
        "trainable_params": s["trainable"],
        "worker_memory_gib": _fig(cap, basis),
        "phases": {},
    }
    for name in sorted({ph.name for r in recipes for ph in RECIPES[r]}):
        est = phase_estimate(cfg, s, s["trainable"], name)
        problem = check_fit(est, cap, host, same_pool=tc.device == "cpu")
        out["phases"][name] = {
            "device_gib_per_worker": est["device_gib_per_worker"],
            "host_gib_per_worker": est["host_gib_per_worker"],
            "fits": problem is None,
            "problem": problem,
        }
    return out
