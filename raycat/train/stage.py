"""Train stage: the recipe's phases, DeepSpeed in Ray Train workers; consecutive phases left to train
share one ``TorchTrainer`` fit (one worker group: no second worker start, process group or imports).

Per phase, under ``train/<recipe>/<phase>/``:
  ``checkpoints/``  Ray Train storage (every rank's ZeRO shard merged per checkpoint) of the fits whose
                    last phase this is: a fit of phases 1-2 keeps both phases' checkpoints under
                    ``phase2/``, named after phase 2's hash, which chains phase 1's
  ``model/``        HF model dir (LoRA: adapter + tokenizer; full: weights + tokenizer)
  ``merged/``       LoRA merged into the base (train.lora.merge)
  ``skipped.parquet``, ``metrics.json`` (per step and per epoch), ``done.json`` (the phase's hash)

A phase is done when ``done.json`` holds the phase's hash (its rows, targets, hyper-parameters and the
previous phase's hash); rank 0 writes it when the phase ends, inside the fit, so a failure in phase 2
never redoes phase 1. Unfinished phases are refit under the same Ray Train run name (the last phase's)
and resume from the latest checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass

import pandas as pd

from raycat.config import RaycatConfig, save_config
from raycat.data.prompts import template_hash, train_template_hash
from raycat.errors import MissingInputError, RaycatError
from raycat.recipes import Phase, needs_cot, select
from raycat.storage import rundir
from raycat.train.batches import encode_rows, pad_to_world, stop_token_ids, total_steps
from raycat.train.loop import LoopConfig, recorded, train_loop
from raycat.train.memory import check_fit, estimate
from raycat.train.metrics import phase_info


@dataclass(frozen=True, eq=False)
class PhasePlan:
    """One phase of the recipe as planned on the driver: its rows, their encoded (shuffled) examples, and
    the hash that decides whether a finished phase can be reused."""

    phase: Phase
    rows: pd.DataFrame
    encoded: pd.DataFrame
    hash: str
    score_template_hash: str


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
    cfg: RaycatConfig, plan: PhasePlan, init: dict, total_steps: int, pad_id: int, phase_dir: str, info: dict
) -> LoopConfig:
    from raycat.storage import models

    tc, st = cfg.train, cfg.score.student
    return LoopConfig(
        student_path=models.portable(st.path),  # workers do not share the driver's working directory
        student_revision=st.revision,
        trust_remote_code=st.trust_remote_code,
        init_model=init["model"],
        init_adapter=init["adapter"],
        model_dir=rundir.absolute(rundir.join(phase_dir, "model")),
        phase_dir=rundir.absolute(phase_dir),
        phase_hash=plan.hash,
        info=info,
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
        tracking_uri=tracking_uri(cfg),
        tracking_project=tc.tracking_project,
    )


def tracking_uri(cfg: RaycatConfig) -> str | None:
    """The MLflow URI the workers log to: the configured one, else a file store in the run dir (a
    relative ./mlruns would land in each worker's own working directory and be lost with it)."""
    from pathlib import Path

    tc = cfg.train
    if tc.tracking != "mlflow":
        return tc.tracking_uri
    uri = tc.tracking_uri or rundir.join(cfg.run_dir, "mlruns")  # local run dir: config checks the rest
    # A plain path is a file store; absolute, or each worker would resolve it in its own cwd.
    return uri if ":" in uri.split("/", 1)[0] else Path(os.path.abspath(uri)).as_uri()


def fit_phases(cfg: RaycatConfig, group: list[tuple[PhasePlan, str, dict]], pad_id: int):
    """One TorchTrainer fit for consecutive phases ``(plan, phase dir, init)``, run in order by the same
    workers. Named after the last phase (its hash chains the others'), so a rerun of any tail of the
    group finds the same run and resumes from its latest checkpoint."""
    import time
    import uuid

    import pyarrow as pa
    import ray
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tc = cfg.train
    last, last_dir = group[-1][0], group[-1][1]
    storage, name = rundir.absolute(rundir.join(last_dir, "checkpoints")), f"{last.phase.name}-{last.hash}"
    loops, datasets = [], {}
    for plan, pdir, init in group:
        pc = tc.phase(plan.phase.name)
        frame, repeated = pad_to_world(plan.encoded, tc.num_workers, tc.seed)
        total = total_steps(
            len(frame), tc.num_workers, pc.micro_batch_size, pc.gradient_accumulation_steps, pc.epochs, pc.max_steps
        )
        table = pa.Table.from_pandas(frame[["input_ids", "labels"]], preserve_index=False)
        step = max(1, math.ceil(len(frame) / 8))
        datasets[plan.phase.name] = ray.data.from_arrow([table.slice(i, step) for i in range(0, len(frame), step)])
        info = phase_info(plan.phase, plan.rows, plan.encoded, plan.hash, repeated, total, rundir.join(storage, name))
        loops.append(_loop_config(cfg, plan, init, total, pad_id, pdir, info))
    trainer = TorchTrainer(
        train_loop,
        # Ray Train wants a dict here; the typed configs travel inside it.
        train_loop_config={"phases": loops, "fit_started": time.time(), "fit_id": uuid.uuid4().hex},
        scaling_config=ScalingConfig(
            num_workers=tc.num_workers, use_gpu=tc.device == "gpu", resources_per_worker={"CPU": tc.cpus_per_worker}
        ),
        datasets=datasets,
        # Ordered, equal shards: a resumed worker skips exactly the micro-batches it already trained on.
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=tc.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.num_to_keep),
        ),
    )
    return trainer.fit()


def merge_lora(cfg: RaycatConfig, phase_dir: str, params: int) -> str:
    """``train.lora.merge``: the phase's adapter merged into the base student under ``merged/``, as a
    Ray task on a node with room for it."""
    from raycat.train.lora_merge import merge_remote

    st = cfg.score.student
    return merge_remote(
        st.path,
        rundir.absolute(rundir.join(phase_dir, "model")),
        rundir.absolute(rundir.join(phase_dir, "merged")),
        revision=st.revision,
        trust_remote_code=st.trust_remote_code,
        dtype="bfloat16" if _bf16(cfg) else "float32",
        params=params,
        num_cpus=cfg.train.cpus_per_worker,
    )


def run_train(cfg: RaycatConfig, say=print) -> dict:
    """Every phase of ``train.recipe`` in order; finished phases (same hash) are skipped."""
    from raycat.recipes import RECIPES
    from raycat.storage import models

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
    lora, merge = tc.method == "lora", tc.method == "lora" and tc.lora.merge
    init: dict = {"model": None, "adapter": None}
    groups: list[list[tuple[PhasePlan, str, dict]]] = []  # consecutive phases left to train: one fit each
    group = None
    for plan in plans:
        name = plan.phase.name
        pdir = rundir.join(root, name)
        if name in empty:  # nothing to train: no model; the next phase starts from the last one
            why = empty[name]
            say(f"{name}: skipped, {why} (train.on_empty_phase=skip)")
            rundir.write_json(rundir.join(pdir, "metrics.json"), {"status": "empty", "reason": why})
            rundir.write_json(rundir.join(pdir, "done.json"), {"hash": plan.hash, "empty": why})
            summary["phases"][name] = {"status": "empty", "reason": why, "examples": 0}
            continue  # the group goes on: the next phase starts from the last trained one
        if recorded(pdir, plan.hash):
            say(f"{name}: already trained (hash {plan.hash}), skipping")
            summary["phases"][name] = {"status": "cached"}
            group = None
        else:
            if group is None:
                group = []
                groups.append(group)
            stage = zero_stage(tc)
            say(
                f"{name}: {len(plan.encoded)} examples ({plan.phase.target} target), "
                + (
                    f"{tc.num_workers} worker(s), ZeRO-{stage}"
                    + (
                        f" (configured {tc.deepspeed.zero_stage}: one worker has nothing to partition)"
                        if stage != tc.deepspeed.zero_stage
                        else ""
                    )
                    + f", {tc.method}"
                    if not group
                    else f"same workers, after {group[-1][0].phase.name}"
                )
            )
            group.append((plan, pdir, init))
            summary["phases"][name] = {"status": "trained"}
        model_dir = rundir.absolute(rundir.join(pdir, "model"))  # workers have their own cwd
        init = {"model": None if lora else model_dir, "adapter": model_dir if lora else None}
    trained = [(plan, rundir.join(root, plan.phase.name)) for plan in plans if plan.phase.name not in empty]
    unmerged = merge and any(
        "merged" not in (rundir.read_json_if_exists(rundir.join(pdir, "metrics.json")) or {}) for _, pdir in trained
    )
    if groups or unmerged:
        from ray.train import TrainingFailedError

        from raycat.ray_env import ray_session

        with ray_session(cfg.ray, cfg.run_dir):  # only when something is left to train or merge
            for group in groups:
                names = "+".join(plan.phase.name for plan, _, _ in group)
                try:
                    result = fit_phases(cfg, group, pad_id)
                    if getattr(result, "error", None) is not None:
                        raise result.error
                except TrainingFailedError as e:  # the workers failed train.max_failures + 1 times
                    raise RaycatError(
                        f"{names} failed (after up to {tc.max_failures} restarts from the latest "
                        f"checkpoint; rerun the command to resume): {type(e).__name__}: {e}"
                    ) from e
                for plan, pdir, _ in group:  # rank 0 records each phase as it ends
                    if not recorded(pdir, plan.hash):
                        last = group[-1][0]
                        ckpts = rundir.join(group[-1][1], "checkpoints", f"{last.phase.name}-{last.hash}")
                        raise RaycatError(
                            f"{plan.phase.name} was not recorded as trained by the fit of {names} (its "
                            f"done.json is missing or stale): remove this fit's checkpoints, "
                            f"{ckpts}, "
                            f"and rerun to train {names} again"
                        )
            for _, pdir in trained if merge else []:  # also a phase a killed run finished but did not merge
                m = rundir.read_json(rundir.join(pdir, "metrics.json"))
                if "merged" not in m:
                    m["merged"] = merge_lora(cfg, pdir, pre["params"])
                    rundir.write_json(rundir.join(pdir, "metrics.json"), m)
    for plan, pdir in trained:  # what the workers wrote, in the recipe's order
        name = plan.phase.name
        m = rundir.read_json(rundir.join(pdir, "metrics.json"))
        summary["phases"][name] = {
            **{k: v for k, v in m.items() if k != "history"},
            "status": summary["phases"][name]["status"],
            "model": rundir.join(pdir, "model"),
        }
    rundir.write_json(rundir.join(root, "metrics.json"), summary)
    return summary


def run(cfg: RaycatConfig) -> dict:
    """The train stage as the CLI and ``raycat run`` call it: ``run_train`` reporting through
    ``progress``, then the resolved config saved next to the outputs."""
    from raycat import progress

    summary = run_train(cfg, say=lambda msg: progress.say("train", msg))
    save_config(cfg, "train")
    return summary
