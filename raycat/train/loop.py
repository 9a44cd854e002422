"""The Ray Train worker loop: one DeepSpeed engine per worker and phase, LoRA or full, resumable per phase.

Runs inside a ``TorchTrainer`` worker (rank = data-parallel rank). One worker group runs a recipe's
consecutive phases one after another (each from the model the one before exported), so a phase after
the first pays no worker-group start. Rows come from this worker's Ray Data shard of the phase
(``get_dataset_shard(phase)``), already tokenized and masked by the driver (``batches``).
Checkpoints: every rank writes its DeepSpeed shard and reports it (Ray Train merges the rank
directories; a checkpoint reported by rank 0 alone loses the other ranks' ZeRO shards); each names its
phase. A restart (worker failure, or a rerun of the same command) resumes the phase of the latest one
via ``ray.train.get_checkpoint()``, skipping the micro-batches already consumed in that epoch and the
phases before it (``resume_point``). A phase ends with its HF export, which rank 0 writes straight into
the phase's ``model/`` dir in the run dir (ZeRO-3 weights gathered to rank 0), then its final
checkpoint, then its ``metrics.json`` and ``done.json``: nothing travels through the driver.

One phase on one worker is a ``PhaseRun``, in torchtune's recipe order: setup, train,
save_checkpoint, cleanup.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Literal

from raycat.config import LoraSettings, PhaseConfig
from raycat.storage import models, rundir
from raycat.train.batches import target_tokens, window_loss
from raycat.train.feed import Started, check_resumable, micro_batches
from raycat.train.metrics import phase_metrics


@dataclass(frozen=True)
class LoopConfig:
    """Everything a Ray Train worker needs for one phase, built by the driver (``stage._loop_config``).

    Paths are absolute or URIs: workers do not share the driver's working directory."""

    # A hub id, absolute local dir, URI or registry:<name>; fetched on the worker's node.
    student_path: str
    student_revision: str | None
    trust_remote_code: bool
    # Full fine-tuning: the previous phase's model dir.
    init_model: str | None
    # LoRA: the previous phase's adapter dir.
    init_adapter: str | None
    # Where rank 0 writes this phase's HF export (a run-dir path or URI).
    model_dir: str
    # Where rank 0 writes metrics.json and done.json when the phase ends.
    phase_dir: str
    # What done.json records: the driver skips a phase whose done.json holds its hash.
    phase_hash: str
    # recipes.phase_settings, also in done.json: what eval compares with its config.
    phase_settings: dict
    # The driver's half of metrics.json (metrics.phase_info).
    info: dict
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
    # feed.layout: the read spans and worker count a mid-epoch checkpoint's resume depends on.
    feed_layout: dict
    save_steps: int
    log_every_steps: int
    tracking: Literal["none", "mlflow", "wandb"]
    tracking_uri: str | None
    tracking_project: str
    # Tags of the phase's tracker run: ``raycat run`` nests it under its own run (mlflow.parentRunId).
    tracking_tags: dict = field(default_factory=dict)
    # train.deepspeed's communication knobs that are set (zero_optimization entries).
    zero_comm: dict = field(default_factory=dict)

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
    comm: dict | None = None,
) -> dict:
    # ``comm``: overlap_comm, reduce_scatter, bucket sizes; DeepSpeed's defaults where absent.
    zero: dict = {"stage": zero_stage, **(comm or {})}
    if zero_stage == 3:
        # The export gathers the full weights on rank 0.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config: dict = {
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
        config["gradient_clipping"] = clipping
    if offload_optimizer:
        # Offload refuses a client optimizer: DeepSpeedCPUAdam comes from the DS config instead.
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": gpu}
        config["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "weight_decay": weight_decay}}
    if offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": gpu}
    return config


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


def _load_model(cfg: LoopConfig, ds_config: dict):
    """``(model, HfDeepSpeedConfig or None)``: the model this phase starts from (the
    previous phase's export, else the student), LoRA-wrapped for ``method=lora``. Under ZeRO-3 the
    caller keeps the HfDeepSpeedConfig alive for the phase: transformers only sees it while it lives."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    # Only the weights loaded here come to this node: after a full phase, not the student's.
    source = models.local(cfg.init_model or cfg.student_path)
    hf_ds_config = None
    if ds_config["zero_optimization"]["stage"] == 3:
        # Under an active HfDeepSpeedConfig, from_pretrained loads straight into ZeRO-3 partitions
        # (deepspeed.zero.Init), so a 70B model never materializes whole on one worker.
        from transformers.integrations import HfDeepSpeedConfig

        hf_ds_config = HfDeepSpeedConfig(ds_config)
    model = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=dtype,
        revision=None if cfg.init_model else cfg.student_revision,
        trust_remote_code=cfg.trust_remote_code,
    )
    model.config.use_cache = False
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.method == "lora":
        from peft import LoraConfig, PeftModel, get_peft_model

        if cfg.init_adapter:
            model = PeftModel.from_pretrained(model, models.local(cfg.init_adapter), is_trainable=True)
        else:
            lora = cfg.lora
            model = get_peft_model(
                model,
                LoraConfig(
                    r=lora.r,
                    lora_alpha=lora.alpha,
                    lora_dropout=lora.dropout,
                    target_modules=lora.target_modules,
                    bias="none",
                    task_type="CAUSAL_LM",
                ),
            )
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
    return model, hf_ds_config


def fingerprint(model, zero_stage: int) -> dict[str, float]:
    """Sums of the first and last two trainable tensors as loaded: lets a test (or a user) check that a
    phase started from the previous phase's weights, without gathering a whole ZeRO-3 model."""
    import contextlib

    import torch

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    picked = named[:2] + named[-2:] if len(named) > 4 else named
    gathered = contextlib.nullcontext()
    if zero_stage == 3:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters([p for _, p in picked], modifier_rank=None)
    with gathered, torch.no_grad():
        return {n.replace(".default.", "."): float(p.detach().double().sum()) for n, p in picked}


def _tracker(cfg: LoopConfig):
    """``(log, close)`` for the phase's experiment-tracker run (one run per phase), or ``(None, None)``."""
    if cfg.tracking == "mlflow":
        from ray.air.integrations.mlflow import setup_mlflow

        if (cfg.tracking_uri or "").startswith("file:"):
            # MLflow 3 refuses its file store unless opted in; a file URI here is the user's choice
            # (or raycat's default, the run dir) for a setup without a tracking server.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        mlflow = setup_mlflow(
            cfg.hparams,
            tracking_uri=cfg.tracking_uri,
            experiment_name=cfg.tracking_project,
            run_name=f"train {cfg.recipe}/{cfg.phase_name}",
            tags=cfg.tracking_tags or None,
            # As W&B does with a new project name.
            create_experiment_if_not_exists=True,
            rank_zero_only=True,
        )
        return (lambda m, step: mlflow.log_metrics(m, step=step)), mlflow.end_run
    if cfg.tracking == "wandb":
        from ray.air.integrations.wandb import setup_wandb

        # Under `raycat run`, the phase's run joins the run's W&B group (tracking.WandbTracker).
        group = (cfg.tracking_tags or {}).get("raycat.wandb_group")
        run = setup_wandb(
            cfg.hparams,
            project=cfg.tracking_project,
            rank_zero_only=True,
            group=group,
            job_type="train",
            name=f"train {cfg.recipe}/{cfg.phase_name}",
        )
        return (lambda m, step: run.log(m, step=step)), run.finish
    return None, None


def all_reduce_step(values: list[float], device) -> list[float]:
    """Sum a step's per-rank totals over the data-parallel group. The tensor lives on the engine's
    device: NCCL reduces CUDA tensors only, so a CPU tensor would stop a GPU run at its first step."""
    import torch
    import torch.distributed as dist

    totals = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return totals.tolist()


def check_packing(engine, device) -> None:
    """Refuse packing for a model whose attention does not isolate packed examples (e.g. custom code
    that ignores position ids when building its mask): the second of two packed examples must get the
    logits it gets alone. One tiny forward pass; under ZeRO-3 every rank runs it (it is collective)."""
    import torch

    first, second = [11, 12, 13, 14, 15], [21, 22, 23]
    packed = {
        "input_ids": torch.tensor([first + second], device=device),
        "position_ids": torch.tensor([list(range(len(first))) + list(range(len(second)))], device=device),
    }
    alone = {"input_ids": torch.tensor([second], device=device)}
    was_training = engine.module.training
    engine.module.eval()  # no dropout
    with torch.no_grad():
        got = engine(**packed, use_cache=False).logits[0, len(first) :].float()
        want = engine(**alone, use_cache=False).logits[0].float()
    engine.module.train(was_training)
    err = float((got - want).abs().max())
    if err > 1e-2 * max(1.0, float(want.abs().max())):
        raise RuntimeError(
            f"train.batching=packed: this model's attention lets packed examples see each other (logits off "
            f"by {err:.3g}); set train.batching=grouped or padded"
        )


def gathered_trainable(module, rank: int) -> dict | None:
    """Under ZeRO-3, the trainable parameters (a LoRA adapter) gathered whole onto rank 0's CPU, one at a
    time (collective: all ranks call it). DeepSpeed's own consolidation, even with
    ``exclude_frozen_parameters``, gathers every frozen base weight too (~140 GB for a 70B model)."""
    import deepspeed

    state = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
            if rank == 0:
                state[name] = param.detach().to("cpu", copy=True)
    return state if rank == 0 else None


# A ZeRO shard of one data-parallel rank: its optimizer states, and under ZeRO-3 its model states.
_RANK_SHARD = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_")


def rank_files(names: list[str], rank: int) -> list[str]:
    """The files of a checkpoint that restoring data-parallel ``rank`` reads: all but the other ranks'
    ZeRO shards. DeepSpeed's ``load_checkpoint`` (with a tag, no elastic checkpoint) opens this rank's
    ``zero_pp_rank_<rank>_*`` files and, below ZeRO-3, the ``mp_rank_00_model_states.pt`` all ranks
    share; raycat adds state.json."""
    kept = []
    for name in names:
        shard = _RANK_SHARD.match(name.rsplit("/", 1)[-1])
        if shard is None or int(shard.group(1)) == rank:
            kept.append(name)
    return kept


def fetch_for_rank(ckpt, rank: int) -> str:
    """A local dir holding what ``rank`` needs of Ray Train checkpoint ``ckpt`` (``rank_files``): the
    checkpoint itself on a local filesystem; otherwise one node-local dir, each file fetched once per node
    (the ranks there wait for each other's downloads of the files they share). Ray's ``as_directory``
    would fetch every rank's shards to every node (~1 TB per node for a 70B full fine-tune)."""
    import hashlib
    from pathlib import Path

    import pyarrow.fs as pafs
    from filelock import FileLock

    filesystem, root = ckpt.filesystem, ckpt.path.rstrip("/")
    if isinstance(filesystem, pafs.LocalFileSystem):
        return ckpt.path
    infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted((i.path[len(root) :].lstrip("/"), i.size, i.mtime_ns) for i in infos if i.type == pafs.FileType.File)
    # Keyed by the listing too: a copy left by a crashed attempt serves only the same checkpoint.
    key = hashlib.sha256(repr((root, files)).encode()).hexdigest()[:16]
    local = Path(tempfile.gettempdir()) / f"raycat-restore-{key}"
    names = [name for name, _, _ in files]
    for name in rank_files(names, rank):
        dst = local / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(f"{dst}.lock"):
            if not dst.is_file():
                tmp = dst.with_name(f".tmp-{dst.name}")
                pafs.copy_files(f"{root}/{name}", str(tmp), source_filesystem=filesystem)
                os.replace(tmp, dst)
    return str(local)


def _saved_state(ckpt) -> dict:
    """The loop state of a checkpoint (one small file, not the whole checkpoint)."""
    with ckpt.filesystem.open_input_stream(f"{ckpt.path}/state.json") as f:
        return json.loads(f.read())


def recorded(phase_dir: str, phase_hash: str) -> bool:
    """The phase's done.json holds this hash: the phase finished with these rows, settings and
    previous phases (the driver's skip rule and the workers' resume rule alike)."""
    done = rundir.read_json_if_exists(rundir.join(phase_dir, "done.json")) or {}
    return done.get("hash") == phase_hash


def _finish(cfg: LoopConfig, state: dict, wall_s: float) -> None:
    """Rank 0, after the phase's export and final checkpoint: its metrics.json, then done.json."""
    metrics = phase_metrics(cfg.info, state, wall_s, state["started"])
    rundir.write_json(rundir.join(cfg.phase_dir, "metrics.json"), metrics)
    rundir.write_json(rundir.join(cfg.phase_dir, "done.json"), {"hash": cfg.phase_hash, "settings": cfg.phase_settings})


@dataclass(frozen=True)
class ResumePoint:
    """Where a fit's workers start, from the state of the latest checkpoint (``resume_point``)."""

    # The first phase to train; the phases before it are done.
    start: int = 0
    # phases[start] resumes from the checkpoint (not from its first step).
    from_checkpoint: bool = False
    # Ray restarted this fit's workers (not a rerun's new fit restored from a checkpoint).
    restarted: bool = False
    # A phase whose final checkpoint exists (exported): only its records may be missing.
    finished: int | None = None


def resume_point(phases: list[LoopConfig], saved: dict | None, fit_id: str) -> ResumePoint:
    """Where this fit starts, given the state saved with the latest checkpoint (None: no checkpoint).

    No DeepSpeed or Ray: reads only the phases' done.json files."""
    if saved is None:
        return ResumePoint()
    names = [phase.phase_name for phase in phases]
    restarted = saved.get("fit_id") == fit_id
    # A checkpoint written before phases shared a worker group holds the fit's only (= last) phase.
    name = saved.get("phase", names[-1])
    if name not in names:
        return ResumePoint(restarted=restarted)
    index = names.index(name)
    # Phases before the checkpoint's are skipped only if they are still recorded as trained with
    # the hashes this fit chains (another config may have retrained them in between).
    if not all(recorded(phase.phase_dir, phase.phase_hash) for phase in phases[:index]):
        return ResumePoint(restarted=restarted)
    if saved.get("final"):
        return ResumePoint(start=index + 1, restarted=restarted, finished=index)
    return ResumePoint(start=index, from_checkpoint=True, restarted=restarted)


def train_loop(config: dict) -> None:
    """The worker entry point; ``config`` is Ray Train's ``train_loop_config``: ``{"phases": [LoopConfig,
    ...], "fit_started": the driver's clock at the fit, "fit_id": this fit's id}``, phases in the
    recipe's order."""
    # Start-up accounting, before the heavy imports: the driver knows when the fit began.
    entered = time.time()
    import gc

    import deepspeed
    import ray.train
    import torch
    import torch.distributed as dist

    phases: list[LoopConfig] = config["phases"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    gpu = phases[0].device == "gpu"
    if not gpu:
        torch.set_num_threads(phases[0].threads)
        _no_shm_build()
    # Ray Train made the torch process group; DeepSpeed's comm layer must adopt it before ZeRO-3's
    # zero.Init sizes the world (otherwise it sees world size 1).
    deepspeed.init_distributed(dist_backend="nccl" if gpu else "gloo")
    ckpt = ray.train.get_checkpoint()
    saved = _saved_state(ckpt) if ckpt is not None else None
    point = resume_point(phases, saved, config["fit_id"])
    if point.finished is not None and rank == 0:
        # The checkpoint is the phase's last one: the model is exported; only its records may be missing.
        _finish(phases[point.finished], saved, saved["wall_s"])
    resume = ckpt if point.from_checkpoint else None
    if resume is not None:
        # Refused before any model loads (_restore checks again, for callers that start there).
        phase = phases[point.start]
        check_resumable(saved, phase.feed_layout, phase.phase_name, phase.info.get("checkpoints", "?"))
    # Ray's restart of a failed worker group does not say when the new group began: count from entering
    # the loop. A rerun's new fit restored from a checkpoint did start its group at fit_started.
    started = entered if point.restarted else config["fit_started"]
    for phase in phases[point.start :]:
        _train_phase(phase, rank, world, resume, entered, started, config["fit_id"])
        resume = None
        # The phase's engine, optimizer state and autograd graph are unreachable now; ZeRO-3's
        # parameters reference themselves, so only a full collection frees them before the next load.
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
        # The next phase loads the model rank 0 has just exported.
        dist.barrier()
        # No worker-group start for the phases after the first.
        entered = started = time.time()


def _train_phase(cfg: LoopConfig, rank: int, world: int, ckpt, entered: float, started: float, fit_id: str) -> None:
    """One phase on this worker: build the engine (from the previous phase's export), resume from
    ``ckpt`` if given, train, export, final checkpoint, records; then free the engine."""
    phase_run = PhaseRun(cfg, rank, world)
    phase_run.setup(ckpt, entered, started, fit_id)
    metrics = phase_run.train()
    phase_run.save_checkpoint(final=True, metrics=metrics)
    phase_run.cleanup()


class PhaseRun:
    """One phase on one worker, in torchtune's recipe order: ``setup`` -> ``train`` ->
    ``save_checkpoint`` -> ``cleanup``. Every rank runs every step: the collectives in them (the
    window's all-reduces, ``engine.step``, checkpoint saves, the ZeRO-3 export and packing check) are
    called by all ranks in the same order; only writing files and logging are rank 0's."""

    def __init__(self, cfg: LoopConfig, rank: int, world: int) -> None:
        self.cfg, self.rank, self.world = cfg, rank, world
        self.engine = None
        # What a checkpoint's state.json holds and metrics.json is built from.
        self.state: dict = {}
        # When this phase's attempt began (the fit's start, or the previous phase's end).
        self.started = 0.0
        self.log = self.close_log = None
        # Under ZeRO-3, held for the phase: transformers loads into partitions only while it lives.
        self._hf_ds_config = None
        # A fresh phase's first epoch, its first fetch started before the model loads (feed.Started).
        self._early = None

    def setup(self, ckpt, entered: float, started: float, fit_id: str) -> None:
        """The DeepSpeed engine, built from the previous phase's export; the loop state, restored from
        ``ckpt`` if given; the experiment tracker (rank 0)."""
        import deepspeed
        import torch

        cfg, hp = self.cfg, self.cfg.phase
        torch.manual_seed(cfg.seed)
        ds_config = deepspeed_config(
            zero_stage=cfg.zero_stage,
            offload_optimizer=cfg.offload_optimizer,
            offload_param=cfg.offload_param,
            bf16=cfg.bf16,
            micro_batch_size=hp.micro_batch_size,
            accumulation=hp.gradient_accumulation_steps,
            world=self.world,
            clipping=hp.gradient_clipping,
            lr=hp.lr,
            weight_decay=hp.weight_decay,
            gpu=cfg.device == "gpu",
            comm=cfg.zero_comm,
        )
        if ckpt is None:
            # Ray Data starts executing the shard at its first fetch (~3 s: read tasks, the split across
            # workers): started now, that overlaps the model load and DeepSpeed init. A resumed phase
            # learns its epoch from the checkpoint, so it starts its feed in train().
            self._early = Started(self._batches(0))
        model, self._hf_ds_config = _load_model(cfg, ds_config)
        params = [x for x in model.parameters() if x.requires_grad]
        init_fingerprint = fingerprint(model, cfg.zero_stage)
        optimizer = None if cfg.offload_optimizer else torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=params,
            config=ds_config,
            lr_scheduler=scheduler_factory(hp.lr_scheduler, cfg.total_steps, int(hp.warmup_ratio * cfg.total_steps)),
        )
        self.state = {
            "phase": cfg.phase_name,
            "epoch": 0,
            "batch": 0,
            "micro_steps": 0,
            "history": [],
            "resumed_from_step": None,
            "real_tokens": 0,
            "padded_tokens": 0,
            "init_fingerprint": init_fingerprint,
            "feed": cfg.feed_layout,
        }
        if ckpt is not None:
            self._restore(ckpt)
        # Wall-clock times of this attempt: the phase began, entered the loop, model + DeepSpeed ready,
        # first step done.
        self.started = started
        self.state["started"], self.state["fit_id"] = started, fit_id
        self.state["timing"] = {"entered": entered, "ready": time.time(), "first_step_done": None}
        self.log, self.close_log = _tracker(cfg) if self.rank == 0 else (None, None)

    def _restore(self, ckpt) -> None:
        """The engine and loop state of a checkpoint of this phase (collective: all ranks call it)."""
        import shutil

        import torch.distributed as dist

        engine, cfg = self.engine, self.cfg
        ckpt_dir = fetch_for_rank(ckpt, self.rank)
        with open(os.path.join(ckpt_dir, "state.json")) as f:
            saved = json.load(f)
        # Every rank reads the same state, so every rank refuses (no rank waits in a collective).
        check_resumable(saved, cfg.feed_layout, cfg.phase_name, cfg.info.get("checkpoints", "?"))
        engine.load_checkpoint(os.path.join(ckpt_dir, "deepspeed"), tag="ckpt", load_module_strict=cfg.method != "lora")
        self.state = saved
        if ckpt_dir != ckpt.path:
            # Every rank on this node has read the files they share.
            dist.barrier()
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:
                shutil.rmtree(ckpt_dir, ignore_errors=True)
        self.state["phase"], self.state["feed"] = cfg.phase_name, cfg.feed_layout
        # Not in DeepSpeed's own checkpoint; keeps the accumulation windows aligned.
        engine.micro_steps = self.state["micro_steps"]
        self.state["resumed_from_step"] = engine.global_steps

    def _batches(self, epoch: int):
        """The epoch's micro-batches from this worker's shard; a generator, so nothing (not even the
        shard lookup) runs before the first fetch."""
        import ray.train

        cfg = self.cfg
        shard = ray.train.get_dataset_shard(cfg.phase_name)
        yield from micro_batches(shard, cfg.batching, cfg.phase.micro_batch_size, cfg.pad_id, cfg.seed, epoch)

    def train(self) -> dict:
        """Optimizer steps until ``total_steps``, from where the state left off (skipping the micro-batches
        a resumed epoch already consumed); returns the last step's metrics."""
        cfg, engine, state = self.cfg, self.engine, self.state
        if cfg.batching == "packed":
            check_packing(engine, engine.device)
        done = engine.global_steps >= cfg.total_steps
        metrics: dict = {}
        accumulation = cfg.phase.gradient_accumulation_steps
        engine.train()
        # A step's time runs from the previous step's end: it includes fetching its batches.
        step_ended = time.time()
        for epoch in range(state["epoch"], cfg.phase.epochs):
            if done:
                break
            early, self._early = self._early, None
            batches = iter(early) if early is not None and epoch == 0 else self._batches(epoch)
            skip = state["batch"] if epoch == state["epoch"] else 0
            # Consumed before the checkpoint we resumed from.
            for _ in itertools.islice(batches, skip):
                pass
            consumed = skip
            while not done:
                # One optimizer step per window of `accumulation` micro-batches; an epoch's last window
                # may be shorter and is applied. Shards are equal, so every rank sees the same window sizes.
                fetch_started = time.time()
                window = [
                    {k: v.to(engine.device) for k, v in batch.items()}
                    for batch in itertools.islice(batches, accumulation)
                ]
                if not window:
                    break
                fetch_s = time.time() - fetch_started
                loss, tokens, target_total = self._optimizer_step(window)
                consumed += len(window)
                state["epoch"], state["batch"], state["micro_steps"] = epoch, consumed, engine.micro_steps
                now = time.time()
                step_s, step_ended = now - step_ended, now
                if state["timing"]["first_step_done"] is None:
                    state["timing"]["first_step_done"] = now
                metrics = self._step_metrics(epoch, loss, tokens, target_total, step_s, fetch_s)
                done = metrics["step"] >= cfg.total_steps
                self._report(metrics, done)
                # A checkpoint is not the next step's time.
                step_ended = time.time()
            # The epoch's data ran out.
            if not done:
                state["epoch"], state["batch"] = epoch + 1, 0
        return metrics or {"step": engine.global_steps}

    def _optimizer_step(self, window: list[dict]) -> tuple[float, float, int]:
        """One optimizer step over a window of micro-batches: ``(loss, real tokens, target tokens)``, each
        over all ranks, the loss token-weighted. Plays the part of torchtune's ``_loss_step``."""
        engine, state = self.engine, self.state
        local_targets = sum(target_tokens(batch["labels"]) for batch in window)
        # The window's target tokens on all ranks: every micro-batch's loss is divided by them.
        target_total = int(all_reduce_step([local_targets], engine.device)[0])
        loss_sum, real = 0.0, 0
        for j, batch in enumerate(window):
            engine.set_gradient_accumulation_boundary(j == len(window) - 1)
            loss, value = window_loss(engine, batch, max(target_total, 1), self.world)
            engine.backward(loss, scale_wrt_gas=False)  # already normalised over the window
            loss_sum += value.item()
            # Packed rows have no attention mask: every token is real.
            mask = batch.get("attention_mask")
            real += int(mask.sum()) if mask is not None else batch["input_ids"].numel()
            state["padded_tokens"] += batch["input_ids"].numel()
        # The boundary: gradients reduced across ranks, one optimizer update.
        engine.step()
        state["real_tokens"] += real
        loss_total, real_total = all_reduce_step([loss_sum, real], engine.device)
        return loss_total, real_total, target_total

    def _step_metrics(
        self, epoch: int, loss: float, tokens: float, target_total: int, step_s: float, fetch_s: float
    ) -> dict:
        """A step's entry in the history (and what Ray Train and the tracker get)."""
        metrics = {
            "step": self.engine.global_steps,
            "epoch": epoch,
            # Token-weighted mean over the window (each share was divided by the window's target tokens).
            "loss": loss,
            "lr": self.engine.get_lr()[0],
            "tokens_per_s": tokens / max(step_s, 1e-9),
            # From the previous step's end, so the batch fetch counts.
            "step_s": step_s,
            "tokens": int(tokens),
            "target_tokens": target_total,
            # Waiting for this step's micro-batches (the data feed).
            "fetch_s": round(fetch_s, 4),
        }
        self.state["history"].append(metrics)
        return metrics

    def _report(self, metrics: dict, done: bool) -> None:
        """Logs a step (every ``log_every_steps``, and the last: a phase shorter than the interval still
        reaches the tracker) and reports it to Ray Train, with a checkpoint every ``save_steps`` (the
        final one is ``save_checkpoint(final=True)``'s)."""
        import ray.train

        cfg, step = self.cfg, metrics["step"]
        if step % cfg.log_every_steps == 0 or done:
            # Ray forwards worker stdout to the driver: `ray job logs` shows training.
            if self.rank == 0:
                print(
                    f"train {cfg.recipe}/{cfg.phase_name}: step {step}/{cfg.total_steps} epoch {metrics['epoch']} "
                    f"loss {metrics['loss']:.4f} lr {metrics['lr']:.3g} tokens/s {metrics['tokens_per_s']:.0f}",
                    flush=True,
                )
            if self.log is not None:
                self.log(metrics, step)
        if step % cfg.save_steps == 0 and not done:
            self.save_checkpoint(False, metrics)
        elif step % cfg.log_every_steps == 0:
            ray.train.report(metrics)

    def save_checkpoint(self, final: bool, metrics: dict) -> None:
        """Every rank's ZeRO shard into one Ray Train checkpoint (collective: all ranks call it); a final
        one exports the HF model first, so a final checkpoint means the phase's model dir is complete."""
        import ray.train

        engine, state = self.engine, self.state
        if final:
            self._export()
            state["final"], state["wall_s"] = True, time.time() - self.started
        with tempfile.TemporaryDirectory() as tmp_dir:
            # Collective on every rank: each writes its own ZeRO shard; Ray merges rank directories.
            engine.save_checkpoint(
                os.path.join(tmp_dir, "deepspeed"), tag="ckpt", exclude_frozen_parameters=self.cfg.method == "lora"
            )
            if self.rank == 0:
                with open(os.path.join(tmp_dir, "state.json"), "w") as f:
                    json.dump(state, f)
            name = f"{self.cfg.phase_name}_step_{engine.global_steps:07d}" + ("_final" if final else "")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp_dir), checkpoint_dir_name=name)

    def _export(self) -> None:
        """The phase's HF model dir (weights or adapter, and the student's tokenizer), written by rank 0.
        Collective under ZeRO-3: every rank gathers its partitions."""
        from transformers import AutoTokenizer

        cfg, engine = self.cfg, self.engine
        state_dict = None
        if cfg.zero_stage == 3 and cfg.method == "lora":
            state_dict = gathered_trainable(engine.module, self.rank)
        elif cfg.zero_stage == 3:
            state_dict = engine._zero3_consolidated_16bit_state_dict()
        if self.rank != 0:
            return
        with tempfile.TemporaryDirectory() as tmp_dir:
            engine.module.save_pretrained(tmp_dir, state_dict=state_dict, safe_serialization=True)
            # The student's tokenizer and config files only (resolve): its weights stay where they are.
            AutoTokenizer.from_pretrained(
                models.resolve(cfg.student_path), revision=cfg.student_revision, trust_remote_code=cfg.trust_remote_code
            ).save_pretrained(tmp_dir)
            rundir.replace_dir(tmp_dir, cfg.model_dir)

    def cleanup(self) -> None:
        """Rank 0 writes metrics.json, then done.json; the tracker run ends; the engine frees its hooks and
        optimizer buffers (the caller collects the rest)."""
        if self.rank == 0:
            _finish(self.cfg, self.state, time.time() - self.started)
        if self.close_log is not None:
            self.close_log()
        self.engine.destroy()
