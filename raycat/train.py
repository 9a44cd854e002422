"""Train stage: the recipe's phases, one Ray Train ``TorchTrainer`` fit each, DeepSpeed in the workers.

Per phase, under ``train/<recipe>/<phase>/``:
  ``checkpoints/``  Ray Train storage (every rank's ZeRO shard merged per checkpoint)
  ``model/``        HF model dir (LoRA: adapter + tokenizer; full: weights + tokenizer)
  ``merged/``       LoRA merged into the base (train.lora.merge)
  ``skipped.parquet``, ``metrics.json`` (per step and per epoch), ``done.json`` (the phase's hash)

A phase is done when ``done.json`` holds the phase's hash (its rows, targets, hyper-parameters and the
previous phase's hash); a rerun skips it, so a failure in phase 2 never redoes phase 1. An unfinished
phase is refit under the same Ray Train run name and resumes from its latest checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import pandas as pd

from raycat import rundir
from raycat.config import RaycatConfig, save_config
from raycat.errors import MissingInputError, RaycatError
from raycat.prompts import template_hash, train_template_hash
from raycat.recipes import Phase, needs_cot, select
from raycat.train_data import encode_rows, pad_to_world, stop_token_ids, total_steps
from raycat.train_loop import LoopConfig, train_loop
from raycat.train_memory import check_fit, estimate


@dataclass(frozen=True, eq=False)
class PhasePlan:
    """One phase of the recipe as planned on the driver: its rows, their encoded (shuffled) examples, and
    the hash that decides whether a finished phase can be reused."""

    phase: Phase
    rows: pd.DataFrame
    encoded: pd.DataFrame
    hash: str
    score_template_hash: str


@dataclass(frozen=True)
class FitResult:
    """What one ``fit_phase`` produced: Ray Train's Result, and the step count it trained for."""

    result: Any  # ray.train.Result
    repeated_rows: int  # rows repeated so every worker gets an equal shard
    total_steps: int


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_inputs(cfg: RaycatConfig) -> tuple[dict[str, pd.DataFrame], pd.DataFrame | None]:
    split = rundir.join(cfg.run_dir, "split")
    bands = {}
    for band in ("easy", "medium", "hard"):
        path = rundir.join(split, f"{band}.parquet")
        if not rundir.exists(path):
            raise MissingInputError(f"{path} not found: run `raycat split` with this config first")
        bands[band] = rundir.read_parquet(path)
    cot_path = rundir.join(cfg.run_dir, "teach", "cot.parquet")
    cot = rundir.read_parquet(cot_path) if rundir.exists(cot_path) else None
    if cot is None and needs_cot(cfg.train.recipe):
        raise MissingInputError(
            f"{cot_path} not found: recipe '{cfg.train.recipe}' trains on teacher CoT; run "
            "`raycat teach` first (teach.bands=all for distill_all / random_split)"
        )
    return bands, cot


def check_template(cfg: RaycatConfig, tokenizer, bands: dict[str, pd.DataFrame]) -> str:
    """Training must render prompts with the chat template the rows were scored under."""
    mine = template_hash(tokenizer, cfg.score.prompt.preset, cfg.score.prompt.system_prompt)
    seen = set().union(*(set(b["template_hash"].dropna()) for b in bands.values() if "template_hash" in b))
    if seen and seen != {mine} and not cfg.train.allow_template_mismatch:
        raise RaycatError(
            f"the student's chat template (hash {mine}) differs from the one the rows were scored "
            f"with ({', '.join(sorted(seen))}): rescore with this student, or set "
            "train.allow_template_mismatch=true to train anyway"
        )
    return mine


def model_shape(model_dir: str, trust_remote_code: bool) -> dict:
    """Parameter count and sizes from config.json alone (meta device: no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    conf = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(conf, trust_remote_code=trust_remote_code)
    text = conf.get_text_config() if hasattr(conf, "get_text_config") else conf
    return {
        "params": sum(p.numel() for p in m.parameters()),
        "hidden": text.hidden_size,
        "layers": text.num_hidden_layers,
        "vocab": text.vocab_size,
        "model": m,
    }


def lora_trainable(meta_model, lora: dict) -> int:
    from peft import LoraConfig, get_peft_model

    peft = get_peft_model(
        meta_model,
        LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], target_modules=lora["target_modules"], task_type="CAUSAL_LM"),
    )
    return sum(p.numel() for p in peft.parameters() if p.requires_grad)


def preflight(cfg: RaycatConfig, model_dir: str, phases: list[Phase]) -> dict:
    """Memory estimate per phase; raises with the numbers when a phase cannot fit."""
    import importlib.util

    tc = cfg.train
    if tc.tracking != "none" and importlib.util.find_spec(tc.tracking) is None:
        raise RaycatError(
            f"train.tracking={tc.tracking} needs the {tc.tracking} package: pip install {tc.tracking}, "
            "or set train.tracking=none"
        )
    shape = model_shape(model_dir, cfg.score.student.trust_remote_code)
    trainable = lora_trainable(shape["model"], tc.lora.model_dump()) if tc.method == "lora" else shape["params"]
    device_cap, host_cap = worker_capacity(tc)
    out = {
        "params": shape["params"],
        "trainable_params": trainable,
        "device_capacity_gib": device_cap,
        "host_capacity_gib": host_cap,
        "phases": {},
    }
    for ph in phases:
        est = phase_estimate(cfg, shape, trainable, ph.name)
        out["phases"][ph.name] = est
        problem = check_fit(est, device_cap, host_cap, same_pool=tc.device == "cpu")
        if problem:
            raise RaycatError(f"train pre-flight, {ph.name}: {problem}")
    return out


def worker_capacity(tc) -> tuple[float, float]:
    """(device, host) GiB per worker: the configured ones, else 80 GB per GPU / this machine's RAM shared
    by the workers."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    device_cap = tc.worker_memory_gib or (80.0 if tc.device == "gpu" else ram / tc.num_workers)
    return device_cap, tc.host_memory_per_worker_gib or ram / tc.num_workers


def phase_estimate(cfg: RaycatConfig, shape: dict, trainable: int, phase: str) -> dict:
    """The memory estimate of one phase for a model of this shape (params, hidden, layers, vocab)."""
    tc, pc = cfg.train, cfg.train.phase(phase)
    return estimate(
        total_params=shape["params"],
        trainable_params=trainable,
        world=tc.num_workers,
        zero_stage=zero_stage(tc),
        offload_optimizer=tc.deepspeed.offload_optimizer,
        offload_param=tc.deepspeed.offload_param,
        bf16=_bf16(cfg),
        micro_batch_size=pc.micro_batch_size,
        max_length=pc.max_length,
        hidden_size=shape["hidden"],
        num_layers=shape["layers"],
        vocab_size=shape["vocab"],
        gradient_checkpointing=tc.gradient_checkpointing,
    )


def _bf16(cfg: RaycatConfig) -> bool:
    p = cfg.train.precision
    return p == "bf16" or (p == "auto" and cfg.train.device == "gpu")


def plan_phases(cfg: RaycatConfig, tokenizer, model_dir: str) -> tuple[list[PhasePlan], pd.DataFrame]:
    """Rows, encoded examples and hash for every phase of the recipe; plus every skipped row."""
    tc = cfg.train
    bands, cot = load_inputs(cfg)
    th = check_template(cfg, tokenizer, bands)
    selected, skipped = select(tc.recipe, bands, cot, tc.seed)
    stops = stop_token_ids(tokenizer, model_dir, revision=cfg.score.student.revision)
    plans, prev = [], None
    skipped_frames = [skipped]
    for phase, rows in selected:
        pc = tc.phase(phase.name)
        enc, skip = encode_rows(tokenizer, rows, phase.target, stops, pc.max_length, tc.overlong)
        skipped_frames.append(skip.assign(phase=phase.name))
        enc = enc.sample(frac=1.0, random_state=tc.seed).reset_index(drop=True)  # one seeded shuffle
        # Everything that changes the trained weights (not save/log cadence): rows, tokens, labels,
        # hyper-parameters, parallel layout, the student, and the previous phase's hash.
        h = _hash(
            {
                "prev": prev,
                "phase": phase.name,
                "target": phase.target,
                "rows": enc["id"].tolist(),
                "inputs": _hash(enc["input_ids"].map(list).tolist()),
                "labels": _hash(enc["labels"].map(list).tolist()),
                "hp": pc.model_dump(),
                "method": tc.method,
                "lora": tc.lora.model_dump() if tc.method == "lora" else None,
                "deepspeed": tc.deepspeed.model_dump(),
                "batching": tc.batching,  # 'grouped' composes steps differently
                "precision": _bf16(cfg),
                "workers": tc.num_workers,
                "student": cfg.score.student.model_dump(),
                "template": train_template_hash(tokenizer),
                "seed": tc.seed,
            }
        )
        plans.append(PhasePlan(phase=phase, rows=rows, encoded=enc, hash=h, score_template_hash=th))
        prev = h
    return plans, pd.concat(skipped_frames, ignore_index=True)


def zero_stage(tc) -> int:
    """The ZeRO stage the workers run: the configured one, but 0 for a single worker without offload.
    ZeRO partitions state across ranks, so one rank saves no memory and only pays the bookkeeping
    (flat-buffer copies, bucketing): bench/train.py measured 0.80x of a bare loop at ZeRO-2 against
    0.97x at stage 0 on the same model and batches."""
    ds = tc.deepspeed
    if tc.num_workers == 1 and not (ds.offload_optimizer or ds.offload_param):
        return 0
    return ds.zero_stage


def _loop_config(
    cfg: RaycatConfig, plan: PhasePlan, init: dict, total_steps: int, pad_id: int, phase_dir: str
) -> LoopConfig:
    from raycat import models

    tc, st = cfg.train, cfg.score.student
    return LoopConfig(
        student_path=models.portable(st.path),  # workers do not share the driver's working directory
        student_revision=st.revision,
        trust_remote_code=st.trust_remote_code,
        init_model=init["model"],
        init_adapter=init["adapter"],
        model_dir=rundir.absolute(rundir.join(phase_dir, "model")),
        method=tc.method,
        lora=tc.lora.model_copy(),
        zero_stage=zero_stage(tc),
        offload_optimizer=tc.deepspeed.offload_optimizer,
        offload_param=tc.deepspeed.offload_param,
        bf16=_bf16(cfg),
        device=tc.device,
        threads=max(1, int(tc.cpus_per_worker)),
        batching=tc.batching,
        gradient_checkpointing=tc.gradient_checkpointing,
        recipe=tc.recipe,
        phase_name=plan.phase.name,
        phase=tc.phase(plan.phase.name).model_copy(),
        total_steps=total_steps,
        pad_id=pad_id,
        seed=tc.seed,
        save_steps=tc.save_steps,
        log_every_steps=tc.log_every_steps,
        tracking=tc.tracking,
        tracking_uri=tc.tracking_uri,
        tracking_project=tc.tracking_project,
    )


def fit_phase(cfg: RaycatConfig, plan: PhasePlan, init: dict, pad_id: int, phase_dir: str) -> FitResult:
    """One TorchTrainer fit (resumes a half-done phase by run name)."""
    import pyarrow as pa
    import ray
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tc = cfg.train
    pc = tc.phase(plan.phase.name)
    frame, repeated = pad_to_world(plan.encoded, tc.num_workers, tc.seed)
    total = total_steps(
        len(frame), tc.num_workers, pc.micro_batch_size, pc.gradient_accumulation_steps, pc.epochs, pc.max_steps
    )
    table = pa.Table.from_pandas(frame[["input_ids", "labels"]], preserve_index=False)
    step = max(1, math.ceil(len(frame) / 8))
    ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, len(frame), step)])
    trainer = TorchTrainer(
        train_loop,
        # Ray Train wants a dict here; the typed config travels inside it.
        train_loop_config={"loop": _loop_config(cfg, plan, init, total, pad_id, phase_dir)},
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.device == "gpu", resources_per_worker={"CPU": tc.cpus_per_worker}
        ),
        datasets={"train": ds},
        # Ordered, equal shards: a resumed worker skips exactly the micro-batches it already trained on.
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(
            name=f"{plan.phase.name}-{plan.hash}",
            storage_path=rundir.absolute(rundir.join(phase_dir, "checkpoints")),
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.num_to_keep),
        ),
    )
    return FitResult(result=trainer.fit(), repeated_rows=repeated, total_steps=total)


def export(cfg: RaycatConfig, result, phase_dir: str, params: int) -> dict:
    """The phase's outputs after a fit: rank 0 already wrote the HF dir to ``model/``; the loop state is
    read from the final checkpoint (one small file, not the whole checkpoint); LoRA is merged into
    ``merged/`` on request, as a Ray task on a node with room for it."""
    ckpt = result.checkpoint
    with ckpt.filesystem.open_input_stream(f"{ckpt.path}/state.json") as f:
        state = json.loads(f.read())
    model_dir = rundir.join(phase_dir, "model")
    out = {"model": model_dir, "state": state}
    if cfg.train.method == "lora" and cfg.train.lora.merge:
        from raycat.lora_merge import merge_remote

        st = cfg.score.student
        out["merged"] = merge_remote(
            st.path,
            rundir.absolute(model_dir),
            rundir.absolute(rundir.join(phase_dir, "merged")),
            revision=st.revision,
            trust_remote_code=st.trust_remote_code,
            dtype="bfloat16" if _bf16(cfg) else "float32",
            params=params,
            num_cpus=cfg.train.cpus_per_worker,
        )
    return out


def startup(timing: dict | None, fit_started: float, wall_s: float, hist: list, resumed: int | None) -> dict | None:
    """Where a phase's wall time went besides its steps (the last attempt, if it was resumed): worker
    group start (Ray Train placing the workers and the process group), model load + DeepSpeed init,
    the first step (lazy allocation), and what followed the last step (final checkpoint, export).
    Times are wall clocks of the driver and the workers: on one machine exact, on a cluster as
    close as the nodes' clocks."""
    if not timing or timing.get("first_step_done") is None:
        return None
    hist = [h for h in hist if h["step"] > (resumed or 0)]  # this attempt's steps
    steps_after_first = sum(step_seconds(h) for h in hist[1:])
    first_done = timing["first_step_done"]
    return {
        "worker_group_s": round(timing["entered"] - fit_started, 2),
        "model_and_deepspeed_s": round(timing["ready"] - timing["entered"], 2),
        "first_step_s": round(first_done - timing["ready"], 2),
        "after_last_step_s": round(fit_started + wall_s - first_done - steps_after_first, 2),
    }


def step_seconds(h: dict) -> float:
    """A history entry's step time (recomputed for entries logged before ``step_s`` was recorded)."""
    if "step_s" in h:
        return h["step_s"]
    return h["tokens"] / h["tokens_per_s"] if h["tokens_per_s"] > 0 else 0.0


def phase_metrics(plan: PhasePlan, fit: FitResult, state: dict, wall_s: float, fit_started: float) -> dict:
    hist = state["history"]
    epochs: dict[int, list[float]] = {}
    for h in hist:
        epochs.setdefault(h["epoch"], []).append(h["loss"])
    enc = plan.encoded
    padded = state["padded_tokens"]
    return {
        "phase": plan.phase.name,
        "target": plan.phase.target,
        "bands": list(plan.phase.bands),
        "hash": plan.hash,
        "rows": int(len(plan.rows)),
        "examples": int(len(enc)),
        "repeated_rows_for_equal_shards": fit.repeated_rows,
        "truncated": int(enc["truncated"].sum()) if len(enc) else 0,
        "tokens": int(enc["num_tokens"].sum()) if len(enc) else 0,
        "target_tokens": int(enc["num_target_tokens"].sum()) if len(enc) else 0,
        "steps": len(hist),
        "total_steps": fit.total_steps,
        "first_loss": hist[0]["loss"] if hist else None,
        "last_loss": hist[-1]["loss"] if hist else None,
        "per_epoch": [{"epoch": e, "mean_loss": sum(v) / len(v), "steps": len(v)} for e, v in sorted(epochs.items())],
        "mean_tokens_per_s": (
            sum(h["tokens"] for h in hist) / sum(map(step_seconds, hist))
            if hist and sum(map(step_seconds, hist)) > 0
            else None
        ),
        "padding_waste": 1 - state["real_tokens"] / padded if padded else None,
        # Share of step time spent waiting for micro-batches from the Ray Data shard, after the first
        # step (whose wait for the dataset to start executing is start-up, see "startup").
        "data_feed_share": (
            sum(h.get("fetch_s", 0.0) for h in hist[1:]) / sum(map(step_seconds, hist[1:]))
            if len(hist) > 1 and sum(map(step_seconds, hist[1:])) > 0
            else None
        ),
        "resumed_from_step": state.get("resumed_from_step"),
        "init_fingerprint": state.get("init_fingerprint"),
        "checkpoints": str(fit.result.path),
        "wall_s": round(wall_s, 2),
        "startup": startup(state.get("timing"), fit_started, wall_s, hist, state.get("resumed_from_step")),
        "history": hist,
    }


def run_train(cfg: RaycatConfig, say=print) -> dict:
    """Every phase of ``train.recipe`` in order; finished phases (same hash) are skipped."""
    import time
    from contextlib import ExitStack

    from raycat import models
    from raycat.ray_env import ray_session
    from raycat.recipes import RECIPES

    tc, st = cfg.train, cfg.score.student
    base_dir = models.resolve(st.path)
    pre = preflight(cfg, base_dir, list(RECIPES[tc.recipe]))  # before Ray or any accelerator
    say(
        f"pre-flight: {pre['params'] / 1e6:.1f}M parameters ({pre['trainable_params'] / 1e6:.2f}M trainable), "
        + "; ".join(
            f"{k}: ~{v['device_gib_per_worker']:.2f} GiB/worker on device"
            + (f" + {v['host_gib_per_worker']:.2f} GiB host" if v["host_gib_per_worker"] else "")
            for k, v in pre["phases"].items()
        )
        + f" (capacity {pre['device_capacity_gib']:.1f} GiB)"
    )
    tok = models.load_tokenizer(
        base_dir, revision=st.revision, trust_remote_code=st.trust_remote_code, key="score.student.path"
    )
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    plans, skipped = plan_phases(cfg, tok, base_dir)
    root = rundir.join(cfg.run_dir, "train", tc.recipe)
    rundir.write_parquet(rundir.join(root, "skipped.parquet"), skipped)
    summary = {
        "recipe": tc.recipe,
        "method": tc.method,
        "zero_stage": zero_stage(tc),  # what ran (0 for one worker without offload)
        "zero_stage_configured": tc.deepspeed.zero_stage,
        "num_workers": tc.num_workers,
        "preflight": pre,
        "skipped": skipped.groupby(["phase", "skip_reason"]).size().reset_index(name="n").to_dict("records")
        if len(skipped)
        else [],
        "phases": {},
    }
    empty = {
        p.phase.name: f"no rows to train on ({p.phase.target} target, bands {'+'.join(p.phase.bands)}); "
        f"see {root}/skipped.parquet"
        for p in plans
        if len(p.encoded) == 0
    }
    if empty and tc.on_empty_phase == "error":  # before any phase trains
        raise RaycatError(
            "; ".join(f"{k}: {v}" for k, v in empty.items()) + ". Set train.on_empty_phase=skip to go on without it"
        )
    init: dict = {"model": None, "adapter": None}
    ray_started = False
    with ExitStack() as stack:
        for plan in plans:
            name = plan.phase.name
            pdir = rundir.join(root, name)
            done_path = rundir.join(pdir, "done.json")
            if name in empty:  # nothing to train: no model; the next phase starts from the last one
                why = empty[name]
                say(f"{name}: skipped, {why} (train.on_empty_phase=skip)")
                rundir.write_json(rundir.join(pdir, "metrics.json"), {"status": "empty", "reason": why})
                rundir.write_json(done_path, {"hash": plan.hash, "empty": why})
                summary["phases"][name] = {"status": "empty", "reason": why, "examples": 0}
                continue
            if rundir.exists(done_path) and rundir.read_json(done_path).get("hash") == plan.hash:
                m = rundir.read_json(rundir.join(pdir, "metrics.json"))
                say(f"{name}: already trained (hash {plan.hash}), skipping")
                status = "cached"
            else:
                if not ray_started:  # only when something is left to train
                    stack.enter_context(ray_session(cfg.ray, cfg.run_dir))
                    ray_started = True
                stage = zero_stage(tc)
                say(
                    f"{name}: {len(plan.encoded)} examples ({plan.phase.target} target), "
                    f"{tc.num_workers} worker(s), ZeRO-{stage}"
                    + (
                        f" (configured {tc.deepspeed.zero_stage}: one worker has nothing to partition)"
                        if stage != tc.deepspeed.zero_stage
                        else ""
                    )
                    + f", {tc.method}"
                )
                t0 = time.time()
                from ray.train import TrainingFailedError

                try:
                    fit = fit_phase(cfg, plan, init, pad_id, pdir)
                    if getattr(fit.result, "error", None) is not None:
                        raise fit.result.error
                except TrainingFailedError as e:  # the workers failed train.max_failures + 1 times
                    raise RaycatError(
                        f"{name} failed (after up to {tc.max_failures} restarts from its latest "
                        f"checkpoint; rerun the command to resume): {type(e).__name__}: {e}"
                    ) from e
                exp = export(cfg, fit.result, pdir, pre["params"])
                m = phase_metrics(plan, fit, exp["state"], time.time() - t0, t0)
                if "merged" in exp:
                    m["merged"] = exp["merged"]
                rundir.write_json(rundir.join(pdir, "metrics.json"), m)
                rundir.write_json(done_path, {"hash": plan.hash})
                status = "trained"
            summary["phases"][name] = {
                **{k: v for k, v in m.items() if k != "history"},
                "status": status,
                "model": rundir.join(pdir, "model"),
            }
            model_dir = rundir.absolute(rundir.join(pdir, "model"))  # workers have their own cwd
            lora = tc.method == "lora"
            init = {"model": None if lora else model_dir, "adapter": model_dir if lora else None}
    rundir.write_json(rundir.join(root, "metrics.json"), summary)
    return summary


def run(cfg: RaycatConfig) -> dict:
    """The train stage as the CLI and ``raycat run`` call it: ``run_train`` reporting through
    ``progress``, then the resolved config saved next to the outputs."""
    from raycat import progress

    summary = run_train(cfg, say=lambda msg: progress.say("train", msg))
    save_config(cfg, "train")
    return summary
