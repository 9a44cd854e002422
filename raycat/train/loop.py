"""The Ray Train worker loop: one DeepSpeed engine per worker and phase, LoRA or full, resumable per phase.

Runs inside a ``TorchTrainer`` worker (rank = data-parallel rank). One worker group runs a recipe's
consecutive phases one after another (each from the model the one before exported), so a phase after
the first pays no worker-group start. Rows come from this worker's Ray Data shard of the phase
(``get_dataset_shard(phase)``), already tokenized and masked by the driver (``train_data``).
Checkpoints: every rank writes its DeepSpeed shard and reports it (Ray Train merges the rank
directories; a checkpoint reported by rank 0 alone loses the other ranks' ZeRO shards); each names its
phase. A restart (worker failure, or a rerun of the same command) resumes the phase of the latest one
via ``ray.train.get_checkpoint()``, skipping the micro-batches already consumed in that epoch and the
phases before it. A phase ends with its HF export, which rank 0 writes straight into the phase's
``model/`` dir in the run dir (ZeRO-3 weights gathered to rank 0), then its final checkpoint, then its
``metrics.json`` and ``done.json``: nothing travels through the driver.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

from raycat.config import LoraSettings, PhaseConfig
from raycat.storage import rundir


@dataclass(frozen=True)
class LoopConfig:
    """Everything a Ray Train worker needs for one phase, built by the driver (``train._loop_config``).

    Paths are absolute or URIs: workers do not share the driver's working directory."""

    student_path: str  # hub id, absolute local dir, URI or registry:<name>; fetched on the worker's node
    student_revision: str | None
    trust_remote_code: bool
    init_model: str | None  # full fine-tuning: the previous phase's model dir
    init_adapter: str | None  # LoRA: the previous phase's adapter dir
    model_dir: str  # where rank 0 writes this phase's HF export (a run-dir path or URI)
    phase_dir: str  # where rank 0 writes metrics.json and done.json when the phase ends
    phase_hash: str  # what done.json records: the driver skips a phase whose done.json holds its hash
    info: dict  # the driver's half of metrics.json (train_metrics.phase_info)
    method: Literal["lora", "full"]
    lora: LoraSettings
    zero_stage: int
    offload_optimizer: bool
    offload_param: bool
    bf16: bool
    device: Literal["cpu", "gpu"]
    threads: int  # torch threads per CPU worker
    batching: Literal["packed", "grouped", "padded"]
    gradient_checkpointing: bool
    recipe: str
    phase_name: str
    phase: PhaseConfig
    total_steps: int
    pad_id: int
    seed: int
    save_steps: int
    log_every_steps: int
    tracking: Literal["none", "mlflow", "wandb"]
    tracking_uri: str | None
    tracking_project: str

    @property
    def hparams(self) -> dict:
        """What the experiment tracker records for the run."""
        return {"recipe": self.recipe, "phase": self.phase_name, **self.phase.model_dump()}


def deepspeed_config(
    *,
    zero_stage: int,
    offload_optimizer: bool,
    offload_param: bool,
    bf16: bool,
    micro_batch_size: int,
    accumulation: int,
    world: int,
    clipping: float,
    lr: float,
    weight_decay: float,
    gpu: bool,
) -> dict:
    zero: dict = {"stage": zero_stage}
    if zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # export gathers full weights on rank 0
    cfg: dict = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": micro_batch_size * accumulation * world,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        # A client torch AdamW needs no compiled op; DeepSpeed only vouches for its own optimizers.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }
    if clipping > 0:
        cfg["gradient_clipping"] = clipping
    if offload_optimizer:
        # Offload refuses a client optimizer: DeepSpeedCPUAdam comes from the DS config instead.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay}}
    if offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": gpu}
    return cfg


def scheduler_factory(kind: str, total_steps: int, warmup_steps: int):
    """``optimizer -> LR scheduler`` (what ``deepspeed.initialize`` takes, as DeepSpeed may build the
    optimizer itself): transformers' schedules, warmup ramping linearly from 0 over ``warmup_steps``,
    then ``constant``, ``linear`` decay to 0 at ``total_steps``, or half a ``cosine`` wave to 0."""
    from transformers import get_scheduler

    name = "constant_with_warmup" if kind == "constant" and warmup_steps > 0 else kind
    return lambda optimizer: get_scheduler(
        name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps
    )


def _no_shm_build() -> None:
    # On the CPU accelerator DeepSpeed JIT-compiles a shared-memory op (60-80 s, ~3 GB) that only
    # inference all-reduce uses. Patch through sys.modules: `deepspeed.comm.torch` as an attribute is
    # the real torch module (deepspeed.comm re-exports it).
    import deepspeed.comm.torch  # noqa: F401

    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None


def _load_model(c: LoopConfig, ds_config: dict):
    import torch
    from transformers import AutoModelForCausalLM

    from raycat.storage import models

    dtype = torch.bfloat16 if c.bf16 else torch.float32
    base = models.local(c.student_path)
    src = models.local(c.init_model) if c.init_model else base
    keep = None
    if ds_config["zero_optimization"]["stage"] == 3:
        # Under an active HfDeepSpeedConfig, from_pretrained loads straight into ZeRO-3 partitions
        # (deepspeed.zero.Init), so a 70B model never materializes whole on one worker.
        from transformers.integrations import HfDeepSpeedConfig

        keep = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_pretrained(
        src, dtype=dtype, revision=None if c.init_model else c.student_revision, trust_remote_code=c.trust_remote_code
    )
    model.config.use_cache = False
    if c.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if c.method == "lora":
        from peft import LoraConfig, PeftModel, get_peft_model

        if c.init_adapter:
            model = PeftModel.from_pretrained(model, models.local(c.init_adapter), is_trainable=True)
        else:
            lc = c.lora
            model = get_peft_model(
                model,
                LoraConfig(
                    r=lc.r,
                    lora_alpha=lc.alpha,
                    lora_dropout=lc.dropout,
                    target_modules=lc.target_modules,
                    bias="none",
                    task_type="CAUSAL_LM",
                ),
            )
        if c.gradient_checkpointing:
            model.enable_input_require_grads()
    return model, base, keep


def fingerprint(model, zero_stage: int) -> dict[str, float]:
    """Sums of the first and last two trainable tensors as loaded: lets a test (or a user) check that a
    phase started from the previous phase's weights, without gathering a whole ZeRO-3 model."""
    import contextlib

    import torch

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    picked = named[:2] + named[-2:] if len(named) > 4 else named
    ctx = contextlib.nullcontext()
    if zero_stage == 3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters([p for _, p in picked], modifier_rank=None)
    with ctx, torch.no_grad():
        return {n.replace(".default.", "."): float(p.detach().double().sum()) for n, p in picked}


def _tracker(c: LoopConfig):
    """``(log, close)`` for the phase's experiment-tracker run (one run per phase), or ``(None, None)``."""
    if c.tracking == "mlflow":
        from ray.air.integrations.mlflow import setup_mlflow

        if (c.tracking_uri or "").startswith("file:"):
            # MLflow 3 refuses its file store unless opted in; a file URI here is the user's choice
            # (or raycat's default, the run dir) for a setup without a tracking server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow = setup_mlflow(
            c.hparams,
            tracking_uri=c.tracking_uri,
            experiment_name=c.tracking_project,
            create_experiment_if_not_exists=True,  # as W&B does with a new project name
            rank_zero_only=True,
        )
        return (lambda m, step: mlflow.log_metrics(m, step=step)), mlflow.end_run
    if c.tracking == "wandb":
        from ray.air.integrations.wandb import setup_wandb

        run = setup_wandb(c.hparams, project=c.tracking_project, rank_zero_only=True)
        return (lambda m, step: run.log(m, step=step)), run.finish
    return None, None


def all_reduce_step(values: list[float], device) -> list[float]:
    """Sum a step's per-rank totals over the data-parallel group. The tensor lives on the engine's
    device: NCCL reduces CUDA tensors only, so a CPU tensor would stop a GPU run at its first step."""
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def micro_batches(shard, c: LoopConfig, epoch: int):
    """This worker's micro-batches for an epoch as torch tensors, in ``train.batching``'s form.

    Deterministic for a given epoch (Ray Data's seeded local shuffle, seeded grouping), so a resumed
    run skips exactly the micro-batches it had consumed."""
    import torch

    from raycat.train.batches import collate, length_groups, pack

    mb = c.phase.micro_batch_size
    group = 8 if c.batching == "grouped" else 1  # micro-batches sorted together
    batches = shard.iter_batches(
        batch_size=mb * group,
        batch_format="numpy",
        local_shuffle_buffer_size=mb * 8,
        local_shuffle_seed=c.seed + epoch,
        prefetch_batches=1,
    )
    for k, b in enumerate(batches):
        ids, labels = list(b["input_ids"]), list(b["labels"])
        order = list(range(len(ids)))
        if group > 1:
            order = length_groups([len(x) for x in ids], mb, seed=c.seed + 7919 * epoch + k)
        for i in range(0, len(order), mb):
            sel = order[i : i + mb]
            x, y = [ids[j] for j in sel], [labels[j] for j in sel]
            arrays = pack(x, y) if c.batching == "packed" else collate(x, y, c.pad_id)
            yield {name: torch.from_numpy(v) for name, v in arrays.items()}


def check_packing(engine, device) -> None:
    """Refuse packing for a model whose attention does not isolate packed examples (e.g. custom code
    that ignores position ids when building its mask): the second of two packed examples must get the
    logits it gets alone. One tiny forward pass; under ZeRO-3 every rank runs it (it is collective)."""
    import torch

    a, b = [11, 12, 13, 14, 15], [21, 22, 23]
    packed = {
        "input_ids": torch.tensor([a + b], device=device),
        "position_ids": torch.tensor([list(range(len(a))) + list(range(len(b)))], device=device),
    }
    alone = {"input_ids": torch.tensor([b], device=device)}
    was_training = engine.module.training
    engine.module.eval()  # no dropout
    with torch.no_grad():
        got = engine(**packed, use_cache=False).logits[0, len(a) :].float()
        want = engine(**alone, use_cache=False).logits[0].float()
    engine.module.train(was_training)
    err = float((got - want).abs().max())
    if err > 1e-2 * max(1.0, float(want.abs().max())):
        raise RuntimeError(
            f"train.batching=packed: this model's attention lets packed examples see each other (logits off "
            f"by {err:.3g}); set train.batching=grouped or padded"
        )


def _saved_state(ckpt) -> dict:
    """The loop state of a checkpoint (one small file, not the whole checkpoint)."""
    with ckpt.filesystem.open_input_stream(f"{ckpt.path}/state.json") as f:
        return json.loads(f.read())


def recorded(phase_dir: str, phase_hash: str) -> bool:
    """The phase's done.json holds this hash: the phase finished with these rows, settings and
    previous phases (the driver's skip rule and the workers' resume rule alike)."""
    done = rundir.read_json_if_exists(rundir.join(phase_dir, "done.json")) or {}
    return done.get("hash") == phase_hash


def _finish(c: LoopConfig, state: dict, wall_s: float) -> None:
    """Rank 0, after the phase's export and final checkpoint: its metrics.json, then done.json."""
    from raycat.train.metrics import phase_metrics

    rundir.write_json(rundir.join(c.phase_dir, "metrics.json"), phase_metrics(c.info, state, wall_s, state["started"]))
    rundir.write_json(rundir.join(c.phase_dir, "done.json"), {"hash": c.phase_hash})


def train_loop(config: dict) -> None:
    """The worker entry point; ``config`` is Ray Train's ``train_loop_config``: ``{"phases": [LoopConfig,
    ...], "fit_started": the driver's clock at the fit, "fit_id": this fit's id}``, phases in the
    recipe's order."""
    entered = time.time()  # start-up accounting (before the heavy imports): the driver knows when the fit began
    import gc

    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist

    phases: list[LoopConfig] = config["phases"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    gpu = phases[0].device == "gpu"
    if not gpu:
        torch.set_num_threads(phases[0].threads)
        _no_shm_build()
    # Ray Train made the torch process group; DeepSpeed's comm layer must adopt it before ZeRO-3's
    # zero.Init sizes the world (otherwise it sees world size 1).
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    names = [c.phase_name for c in phases]
    start, resume, restarted = 0, None, False
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        saved = _saved_state(ckpt)
        restarted = saved.get("fit_id") == config["fit_id"]  # Ray restarted this fit's workers
        # A checkpoint written before phases shared a worker group holds the fit's only (= last) phase.
        name = saved.get("phase", names[-1])
        at = names.index(name) if name in names else None
        # Phases before the checkpoint's are skipped only if they are still recorded as trained with
        # the hashes this fit chains (another config may have retrained them in between).
        if at is not None and not all(recorded(c.phase_dir, c.phase_hash) for c in phases[:at]):
            at = None
        if at is not None and saved.get("final"):  # exported and checkpointed; only its records may be missing
            if rank == 0:
                _finish(phases[at], saved, saved["wall_s"])
            start = at + 1
        elif at is not None:
            start, resume = at, ckpt
    # Ray's restart of a failed worker group does not say when the new group began: count from entering
    # the loop. A rerun's new fit restored from a checkpoint did start its group at fit_started.
    started = entered if restarted else config["fit_started"]
    for c in phases[start:]:
        _train_phase(c, rank, world, resume, entered, started, config["fit_id"])
        resume = None
        # The phase's engine, optimizer state and autograd graph are unreachable now; ZeRO-3's
        # parameters reference themselves, so only a full collection frees them before the next load.
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
        dist.barrier()  # the next phase loads the model rank 0 has just exported
        entered = started = time.time()  # no worker-group start for the phases after the first


def _train_phase(c: LoopConfig, rank: int, world: int, ckpt, entered: float, started: float, fit_id: str) -> None:
    """One phase on this worker: build the engine (from the previous phase's export), resume from
    ``ckpt`` if given, train, export, final checkpoint, records; then free the engine."""
    import deepspeed
    import ray.train
    import torch
    from transformers import AutoTokenizer

    from raycat.train.batches import target_tokens, window_loss

    gpu = c.device == "gpu"
    torch.manual_seed(c.seed)
    p = c.phase
    ds_config = deepspeed_config(
        zero_stage=c.zero_stage,
        offload_optimizer=c.offload_optimizer,
        offload_param=c.offload_param,
        bf16=c.bf16,
        micro_batch_size=p.micro_batch_size,
        accumulation=p.gradient_accumulation_steps,
        world=world,
        clipping=p.gradient_clipping,
        lr=p.lr,
        weight_decay=p.weight_decay,
        gpu=gpu,
    )
    model, base_dir, _keep = _load_model(c, ds_config)
    params = [x for x in model.parameters() if x.requires_grad]
    init_fp = fingerprint(model, c.zero_stage)
    optimizer = None if c.offload_optimizer else torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        model_parameters=params,
        config=ds_config,
        lr_scheduler=scheduler_factory(p.lr_scheduler, c.total_steps, int(p.warmup_ratio * c.total_steps)),
    )
    device = engine.device
    lora = c.method == "lora"
    state = {
        "phase": c.phase_name,
        "epoch": 0,
        "batch": 0,
        "micro_steps": 0,
        "history": [],
        "resumed_from_step": None,
        "real_tokens": 0,
        "padded_tokens": 0,
        "init_fingerprint": init_fp,
    }
    if ckpt is not None:
        with ckpt.as_directory() as d:
            engine.load_checkpoint(os.path.join(d, "deepspeed"), tag="ckpt", load_module_strict=not lora)
            with open(os.path.join(d, "state.json")) as f:
                state = json.load(f)
        state["phase"] = c.phase_name
        engine.micro_steps = state["micro_steps"]  # not in DS's own checkpoint; keeps accumulation aligned
        state["resumed_from_step"] = engine.global_steps
    # Wall-clock times (this attempt): the phase began, entered the loop, model + DeepSpeed ready, first step done.
    state["started"], state["fit_id"] = started, fit_id
    state["timing"] = {"entered": entered, "ready": time.time(), "first_step_done": None}
    log, close_log = _tracker(c) if rank == 0 else (None, None)

    def export() -> None:
        # Collective under ZeRO-3 (every rank gathers its partitions); rank 0 writes the HF dir.
        sd = engine._zero3_consolidated_16bit_state_dict() if c.zero_stage == 3 else None
        if rank != 0:
            return
        with tempfile.TemporaryDirectory() as d:
            engine.module.save_pretrained(d, state_dict=sd, safe_serialization=True)
            AutoTokenizer.from_pretrained(
                base_dir, revision=c.student_revision, trust_remote_code=c.trust_remote_code
            ).save_pretrained(d)
            rundir.replace_dir(d, c.model_dir)

    def save(final: bool, metrics: dict) -> None:
        if final:  # before the final checkpoint: a final checkpoint means the phase's model dir is complete
            export()
            state["final"], state["wall_s"] = True, time.time() - started
        with tempfile.TemporaryDirectory() as d:
            # Collective on every rank: each writes its own ZeRO shard; Ray merges rank directories.
            engine.save_checkpoint(os.path.join(d, "deepspeed"), tag="ckpt", exclude_frozen_parameters=lora)
            if rank == 0:
                with open(os.path.join(d, "state.json"), "w") as f:
                    json.dump(state, f)
            name = f"{c.phase_name}_step_{engine.global_steps:07d}" + ("_final" if final else "")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d), checkpoint_dir_name=name)

    shard = ray.train.get_dataset_shard(c.phase_name)
    if c.batching == "packed":
        check_packing(engine, device)

    max_steps = c.total_steps
    done = engine.global_steps >= max_steps
    metrics: dict = {}
    gas = p.gradient_accumulation_steps
    engine.train()
    t_prev = time.time()  # a step's time runs from the previous step's end: it includes fetching its batches
    for epoch in range(state["epoch"], p.epochs):
        if done:
            break
        batches = micro_batches(shard, c, epoch)
        skip = state["batch"] if epoch == state["epoch"] else 0
        for _ in itertools.islice(batches, skip):  # consumed before the checkpoint we resumed from
            pass
        consumed = skip
        while not done:
            # One optimizer step per window of `gas` micro-batches; an epoch's last window may be
            # shorter and is applied. Shards are equal, so every rank sees the same window sizes.
            t_fetch = time.time()
            window = [{k: v.to(device) for k, v in b.items()} for b in itertools.islice(batches, gas)]
            if not window:
                break
            fetch_s = time.time() - t_fetch
            local_targets = sum(target_tokens(b["labels"]) for b in window)
            n_window = int(all_reduce_step([local_targets], device)[0])  # the window's tokens, all ranks
            window_sum, real = 0.0, 0
            for j, batch in enumerate(window):
                engine.set_gradient_accumulation_boundary(j == len(window) - 1)
                loss, value = window_loss(engine, batch, max(n_window, 1), world)
                engine.backward(loss, scale_wrt_gas=False)  # already normalised over the window
                window_sum += value.item()
                mask = batch.get("attention_mask")  # packed rows have none: every token is real
                real += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
                state["padded_tokens"] += batch["input_ids"].numel()
            engine.step()  # the boundary: gradients reduced across ranks, one optimizer update
            state["real_tokens"] += real
            consumed += len(window)
            state["epoch"], state["batch"], state["micro_steps"] = epoch, consumed, engine.micro_steps
            agg = all_reduce_step([window_sum, real], device)
            now = time.time()
            dt, t_prev = now - t_prev, now
            if state["timing"]["first_step_done"] is None:
                state["timing"]["first_step_done"] = now
            step = engine.global_steps
            metrics = {
                "step": step,
                "epoch": epoch,
                "loss": agg[0],  # token-weighted mean over the window (each share was divided by n_window)
                "lr": engine.get_lr()[0],
                "tokens_per_s": agg[1] / max(dt, 1e-9),
                "step_s": dt,  # from the previous step's end, so the batch fetch counts
                "tokens": int(agg[1]),
                "target_tokens": n_window,
                "fetch_s": round(fetch_s, 4),  # waiting for this step's micro-batches (the data feed)
            }
            state["history"].append(metrics)
            if step % c.log_every_steps == 0:
                if rank == 0:  # Ray forwards worker stdout to the driver: `ray job logs` shows training
                    print(
                        f"train {c.recipe}/{c.phase_name}: step {step}/{c.total_steps} epoch {epoch} "
                        f"loss {metrics['loss']:.4f} lr {metrics['lr']:.3g} tokens/s {metrics['tokens_per_s']:.0f}",
                        flush=True,
                    )
                if log is not None:
                    log(metrics, step)
            done = step >= max_steps
            if step % c.save_steps == 0 and not done:
                save(False, metrics)
            elif step % c.log_every_steps == 0:
                ray.train.report(metrics)
            t_prev = time.time()  # a checkpoint is not the next step's time
        if not done:  # the epoch's data ran out
            state["epoch"], state["batch"] = epoch + 1, 0
    save(True, metrics or {"step": engine.global_steps})
    if rank == 0:
        _finish(c, state, time.time() - started)
    if close_log is not None:
        close_log()
    engine.destroy()  # its hooks and optimizer buffers; the caller collects the rest
