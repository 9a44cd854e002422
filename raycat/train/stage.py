"""Train stage: the recipe's phases, DeepSpeed in Ray Train workers; consecutive phases left to train
share one ``TorchTrainer`` fit (one worker group: no second worker start, process group or imports).

Per phase, under ``train/<recipe>/<phase>/``:
  ``checkpoints/``  Ray Train storage (every rank's ZeRO shard merged per checkpoint) of the fits whose
                    last phase this is: a fit of phases 1-2 keeps both phases' checkpoints under
                    ``phase2/``, named after phase 2's hash, which chains phase 1's
  ``model/``        HF model dir (LoRA: adapter + tokenizer; full: weights + tokenizer)
  ``merged/``       LoRA merged into the base (train.lora.merge)
  ``examples.parquet`` the phase's encoded examples, shuffled and padded to the workers: prepared by a
                    Ray task on a worker (``prepare``), read by the training workers; the driver holds
                    only counts and hashes
  ``metrics.json`` (per step and per epoch), ``done.json`` (the phase's hash); ``skipped.parquet``
  (rows left out, with the reason) is one level up, per recipe

A phase is done when ``done.json`` holds the phase's hash (its rows, targets, hyper-parameters and the
previous phase's hash); rank 0 writes it when the phase ends, inside the fit, so a failure in phase 2
never redoes phase 1. Unfinished phases are refit under the same Ray Train run name (the last phase's)
and resume from the latest checkpoint.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from raycat import progress
from raycat.config import RaycatConfig, TrainConfig, for_workers, save_config
from raycat.data.prompts import score_template_hash, train_template_hash
from raycat.errors import MissingInputError, RaycatError
from raycat.ray_env import ray_session, remote_call
from raycat.recipes import BANDS, RECIPES, Phase, needs_cot, phase_settings, phase_sources
from raycat.storage import models, rundir
from raycat.train import encoders, examples, memory
from raycat.train.batches import encode_rows, stop_token_ids, total_steps
from raycat.train.feed import FeedMismatch
from raycat.train.feed import layout as feed_layout
from raycat.train.loop import LoopConfig, recorded, train_loop
from raycat.train.lora_merge import merge_remote
from raycat.train.memory import uses_bf16, zero_comm, zero_stage
from raycat.train.metrics import phase_info


@dataclass(frozen=True, eq=False)
class PhasePlan:
    """One phase of the recipe as planned on a worker (``prepare``): its example counts, where its encoded
    (shuffled, padded to the workers) examples are, and the hash that decides whether a finished phase
    can be reused. Small: the driver holds this, never the rows."""

    phase: Phase
    # rows, examples, repeated (for equal shards), truncated, tokens, target_tokens
    stats: dict
    # examples.parquet in the phase dir (absolute); not written for a phase already trained
    examples: str
    hash: str
    score_template_hash: str
    # recipes.phase_settings: written into done.json beside the hash, for eval to compare.
    settings: dict


# What one fit trains: consecutive phases, each as (plan, phase dir, the model it starts from).
Fit = list[tuple[PhasePlan, str, dict]]


def input_paths(cfg: RaycatConfig) -> tuple[dict[str, str], str | None]:
    """The split's band files and teach/cot.parquet (None when there is none and the recipe needs none)."""
    split = rundir.join(cfg.run_dir, "split")
    bands = {}
    for band in BANDS:
        bands[band] = rundir.join(split, f"{band}.parquet")
        if not rundir.exists(bands[band]):
            raise MissingInputError(f"{bands[band]} not found: run `raycat split` with this config first")
    cot_path = rundir.join(cfg.run_dir, "teach", "cot.parquet")
    if rundir.exists(cot_path):
        return bands, cot_path
    if needs_cot(cfg.train.recipe):
        raise MissingInputError(
            f"{cot_path} not found: recipe '{cfg.train.recipe}' trains on teacher CoT; run "
            "`raycat teach` first (teach.bands=all for distill_all / random_split)"
        )
    return bands, None


def check_template(cfg: RaycatConfig, tokenizer, band_paths: dict[str, str]) -> str:
    """Training must render prompts with the chat template the rows were scored under."""
    mine = score_template_hash(cfg, tokenizer)
    seen: set[str] = set()
    for path in band_paths.values():
        if "template_hash" in rundir.parquet_columns(path):
            for batch in rundir.iter_parquet(path, ["template_hash"]):
                seen.update(batch["template_hash"].dropna())
    if seen and seen != {mine} and not cfg.train.allow_template_mismatch:
        raise RaycatError(
            f"the student's chat template (hash {mine}) differs from the one the rows were scored "
            f"with ({', '.join(sorted(seen))}): rescore with this student, or set "
            "train.allow_template_mismatch=true to train anyway"
        )
    return mine


def _student_identity(cfg: RaycatConfig) -> dict:
    """What names the student's weights: path, revision, remote code, and a local or URI dir's files
    (retrained in place is a new student; a hub id fingerprints as "", its revision is here)."""
    student = cfg.score.student
    return {
        "path": student.path,
        "revision": student.revision,
        "trust_remote_code": student.trust_remote_code,
        "files": rundir.fingerprint(student.path),
    }


def examples_path(cfg: RaycatConfig, phase: str) -> str:
    return rundir.absolute(rundir.join(cfg.run_dir, "train", cfg.train.recipe, phase, "examples.parquet"))


def _hash_fields(cfg: RaycatConfig, tokenizer, phase: Phase, prev: str | None) -> dict:
    """Everything that changes the trained weights (not save/log cadence) but the examples themselves:
    hyper-parameters, parallel layout, the student, and the previous phase's hash. ``examples.prepare``
    adds the shuffled examples' ids, input ids and labels."""
    train = cfg.train
    return {
        "prev": prev,
        "phase": phase.name,
        "target": phase.target,
        "hp": train.phase(phase.name).model_dump(),
        "method": train.method,
        # A merge is its own step after training: flipping it retrains nothing.
        "lora": train.lora.model_dump(exclude={"merge"}) if train.method == "lora" else None,
        "deepspeed": train.deepspeed.weight_settings(),
        # 'grouped' composes steps differently.
        "batching": train.batching,
        "precision": uses_bf16(cfg),
        "workers": train.num_workers,
        # The student's weights, not its scoring engine's settings (max_model_len, dtype).
        "student": _student_identity(cfg),
        "template": train_template_hash(tokenizer, cfg.chat_template_kwargs),
        "seed": train.seed,
    }


def plan_phases(cfg: RaycatConfig, tokenizer, model_dir: str, map_batches=map) -> tuple[list[PhasePlan], list[dict]]:
    """Every phase of the recipe: its rows encoded, shuffled and padded to the workers, written to the
    phase's examples.parquet (unless the phase is already trained), with its counts and hash; the
    skipped rows written to the recipe's skipped.parquet and returned counted by phase and reason.
    Runs where the rows are (``prepare`` calls it on a worker), streamed (``train.examples``);
    ``map_batches`` tokenizes the batches in order (``train.encoders.pool``)."""
    train = cfg.train
    band_paths, cot_path = input_paths(cfg)
    score_template = check_template(cfg, tokenizer, band_paths)
    stops = stop_token_ids(tokenizer, model_dir, revision=cfg.score.student.revision)
    sizes = {band: rundir.parquet_rows(path) for band, path in band_paths.items()}
    root = rundir.join(cfg.run_dir, "train", train.recipe)
    plans, prev = [], None
    with examples.Skipped(rundir.join(root, "skipped.parquet")) as skipped:
        for phase, bands, keep in phase_sources(train.recipe, sizes, train.seed):
            hp = train.phase(phase.name)

            def encode(rows, phase=phase, hp=hp):
                kwargs = cfg.chat_template_kwargs
                return encode_rows(tokenizer, rows, phase.target, stops, hp.max_length, train.overlong, kwargs)

            stats, phase_hash = examples.prepare(
                examples.phase_rows(
                    phase,
                    [band_paths[b] for b in bands],
                    keep,
                    cot_path,
                    scratch=examples_path(cfg, phase.name) + "#cot",
                ),
                encode,
                phase=phase.name,
                fields=_hash_fields(cfg, tokenizer, phase, prev),
                seed=train.seed,
                world=train.num_workers,
                out_path=examples_path(cfg, phase.name),
                # The training workers read examples.parquet (never the driver); a trained phase needs none.
                trained=lambda h, name=phase.name: recorded(rundir.join(root, name), h),
                skipped=skipped,
                map_batches=map_batches,
            )
            plans.append(
                PhasePlan(
                    phase=phase,
                    stats=stats,
                    examples=examples_path(cfg, phase.name),
                    hash=phase_hash,
                    score_template_hash=score_template,
                    settings=phase_settings(cfg, train.recipe, phase.name),
                )
            )
            prev = phase_hash
    return plans, skipped.summary()


def prepare(cfg: RaycatConfig) -> tuple[list[PhasePlan], list[dict]]:
    """On a worker: ``plan_phases`` with the student's tokenizer, tokenizing on Encoder actors; returns
    the plans and the skipped rows counted by phase and reason (the driver holds no rows)."""
    student = cfg.score.student
    model_dir = models.resolve(models.portable(student.path))
    tokenizer = models.load_tokenizer(
        model_dir, revision=student.revision, trust_remote_code=student.trust_remote_code, key="score.student.path"
    )
    with encoders.pool() as map_batches:
        return plan_phases(cfg, tokenizer, model_dir, map_batches)


def _loop_config(
    cfg: RaycatConfig,
    plan: PhasePlan,
    init: dict,
    total_steps: int,
    pad_id: int,
    phase_dir: str,
    info: dict,
    tracking_tags: dict | None = None,
) -> LoopConfig:
    train, student = cfg.train, cfg.score.student
    return LoopConfig(
        # Workers do not share the driver's working directory.
        student_path=models.portable(student.path),
        student_revision=student.revision,
        trust_remote_code=student.trust_remote_code,
        init_model=init["model"],
        init_adapter=init["adapter"],
        model_dir=rundir.absolute(rundir.join(phase_dir, "model")),
        phase_dir=rundir.absolute(phase_dir),
        phase_hash=plan.hash,
        phase_settings=plan.settings,
        info=info,
        method=train.method,
        lora=train.lora.model_copy(),
        zero_stage=zero_stage(train),
        offload_optimizer=train.deepspeed.offload_optimizer,
        offload_param=train.deepspeed.offload_param,
        zero_comm=zero_comm(train),
        bf16=uses_bf16(cfg),
        device=train.device,
        threads=max(1, int(train.cpus_per_worker)),
        batching=train.batching,
        gradient_checkpointing=train.gradient_checkpointing,
        recipe=train.recipe,
        phase_name=plan.phase.name,
        phase=train.phase(plan.phase.name).model_copy(),
        total_steps=total_steps,
        pad_id=pad_id,
        seed=train.seed,
        feed_layout=feed_layout(rundir.parquet_spans(plan.examples), train.num_workers),
        save_steps=train.save_steps,
        log_every_steps=train.log_every_steps,
        tracking=train.tracking,
        tracking_uri=tracking_uri(cfg),
        tracking_project=train.tracking_project,
        tracking_tags=dict(tracking_tags or {}),
    )


MLFLOW_BARE_URIS = ("databricks", "databricks-uc", "uc")


def tracking_uri(cfg: RaycatConfig) -> str | None:
    """The MLflow URI the workers log to: the configured one, else a file store in the run dir (a
    relative ./mlruns would land in each worker's own working directory and be lost with it)."""
    train = cfg.train
    if train.tracking != "mlflow":
        return train.tracking_uri
    # A local run dir (config checks the rest).
    uri = train.tracking_uri or rundir.join(cfg.run_dir, "mlruns")
    # MLflow's scheme-less URIs (a Databricks workspace) are not paths.
    if uri in MLFLOW_BARE_URIS:
        return uri
    # A plain path is a file store; absolute, or each worker would resolve it in its own cwd.
    return uri if ":" in uri.split("/", 1)[0] else Path(os.path.abspath(uri)).as_uri()


def fit_phases(cfg: RaycatConfig, fit: Fit, pad_id: int, tracking_tags: dict | None = None):
    """One TorchTrainer fit for consecutive phases ``(plan, phase dir, init)``, run in order by the same
    workers. Named after the last phase (its hash chains the others'), so a rerun of any tail of the
    group finds the same run and resumes from its latest checkpoint. ``tracking_tags``: the tags of
    each phase's tracker run (``raycat run`` nests them under its own)."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    train = cfg.train
    last, last_dir = fit[-1][0], fit[-1][1]
    storage, name = rundir.absolute(rundir.join(last_dir, "checkpoints")), f"{last.phase.name}-{last.hash}"
    loops, datasets = [], {}
    for plan, phase_dir, init in fit:
        hp = train.phase(plan.phase.name)
        rows = plan.stats["examples"] + plan.stats["repeated"]
        total = total_steps(
            rows, train.num_workers, hp.micro_batch_size, hp.gradient_accumulation_steps, hp.epochs, hp.max_steps
        )
        # Read by the workers in the order written (preserve_order below). No CPU asked: the training
        # workers may hold every CPU of the cluster while they read.
        datasets[plan.phase.name] = rundir.parquet_dataset(plan.examples, num_cpus=0)
        info = phase_info(plan.phase, plan.stats, plan.hash, total, rundir.join(storage, name))
        loops.append(_loop_config(cfg, plan, init, total, pad_id, phase_dir, info, tracking_tags))
    trainer = TorchTrainer(
        train_loop,
        # Ray Train wants a dict here; the typed configs travel inside it.
        train_loop_config={"phases": loops, "fit_started": time.time(), "fit_id": uuid.uuid4().hex},
        scaling_config=ScalingConfig(
            num_workers=train.num_workers,
            use_gpu=train.device == "gpu",
            resources_per_worker={"CPU": train.cpus_per_worker},
        ),
        datasets=datasets,
        # Ordered, equal shards: a resumed worker skips exactly the micro-batches it already trained on.
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=train.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=train.num_to_keep),
        ),
    )
    return trainer.fit()


def merge_lora(cfg: RaycatConfig, phase_dir: str, params: int) -> str:
    """``train.lora.merge``: the phase's adapter merged into the base student under ``merged/``, as a
    Ray task on a node with room for it."""
    student = cfg.score.student
    return merge_remote(
        student.path,
        rundir.absolute(rundir.join(phase_dir, "model")),
        rundir.absolute(rundir.join(phase_dir, "merged")),
        revision=student.revision,
        trust_remote_code=student.trust_remote_code,
        dtype="bfloat16" if uses_bf16(cfg) else "float32",
        params=params,
        num_cpus=cfg.train.cpus_per_worker,
    )


def _empty_phases(plans: list[PhasePlan], root: str, on_empty_phase: str) -> dict[str, str]:
    """Phase name -> why it has nothing to train on; for ``train.on_empty_phase=error``, the error,
    raised before any phase trains."""
    empty = {
        p.phase.name: f"no rows to train on ({p.phase.target} target, bands {'+'.join(p.phase.bands)}); "
        f"see {root}/skipped.parquet"
        for p in plans
        if p.stats["examples"] == 0
    }
    if empty and on_empty_phase == "error":
        raise RaycatError(
            "; ".join(f"{k}: {v}" for k, v in empty.items()) + ". Set train.on_empty_phase=skip to go on without it"
        )
    return empty


def _record_empty(plan: PhasePlan, phase_dir: str, why: str, say) -> dict:
    """An empty phase under ``train.on_empty_phase=skip``: no model, records saying why; its summary entry."""
    say(f"{plan.phase.name}: skipped, {why} (train.on_empty_phase=skip)")
    rundir.write_json(rundir.join(phase_dir, "metrics.json"), {"status": "empty", "reason": why})
    rundir.write_json(rundir.join(phase_dir, "done.json"), {"hash": plan.hash, "settings": plan.settings, "empty": why})
    return {"status": "empty", "reason": why, "examples": 0}


def _phase_line(plan: PhasePlan, train: TrainConfig, after: str | None) -> str:
    """What the user reads for a phase about to train: on new workers, or after ``after`` on the same."""
    head = f"{plan.phase.name}: {plan.stats['examples']} examples ({plan.phase.target} target)"
    if after is not None:
        return f"{head}, same workers, after {after}"
    stage = zero_stage(train)
    why = ""
    if stage != train.deepspeed.zero_stage:
        why = f" (configured {train.deepspeed.zero_stage}: one worker has nothing to partition)"
    return f"{head}, {train.num_workers} worker(s), ZeRO-{stage}{why}, {train.method}"


def _group_into_fits(
    cfg: RaycatConfig, plans: list[PhasePlan], root: str, empty: dict[str, str], say
) -> tuple[list[Fit], dict[str, dict]]:
    """The phases in order: an empty one is recorded, a trained one (same hash) is cached, and consecutive
    phases left to train make one fit. Each phase starts from the export of the last phase before it
    that has a model. Returns the fits and each phase's summary entry so far."""
    lora = cfg.train.method == "lora"
    init: dict = {"model": None, "adapter": None}
    fits: list[Fit] = []
    fit: Fit | None = None
    status: dict[str, dict] = {}
    for plan in plans:
        name = plan.phase.name
        phase_dir = rundir.join(root, name)
        if name in empty:
            status[name] = _record_empty(plan, phase_dir, empty[name], say)
            # The fit goes on: the next phase starts from the last trained one.
            continue
        if recorded(phase_dir, plan.hash):
            say(f"{name}: already trained (hash {plan.hash}), skipping")
            _refresh_settings(plan, phase_dir)
            status[name] = {"status": "cached"}
            fit = None
        else:
            if fit is None:
                fit = []
                fits.append(fit)
            say(_phase_line(plan, cfg.train, fit[-1][0].phase.name if fit else None))
            fit.append((plan, phase_dir, init))
            status[name] = {"status": "trained"}
        # Absolute: workers have their own cwd.
        model_dir = rundir.absolute(rundir.join(phase_dir, "model"))
        init = {"model": None if lora else model_dir, "adapter": model_dir if lora else None}
    return fits, status


def _refresh_settings(plan: PhasePlan, phase_dir: str) -> None:
    """A phase reused under a config whose settings differ only where the weights do not (its hash
    matches): done.json takes this config's settings, so eval accepts the model under it."""
    done_path = rundir.join(phase_dir, "done.json")
    done = rundir.read_json(done_path)
    if done.get("settings") != plan.settings:
        rundir.write_json(done_path, {**done, "settings": plan.settings})


def _fit_and_check(cfg: RaycatConfig, fit: Fit, pad_id: int, tracking_tags: dict | None = None) -> None:
    """One fit; a failure after ``train.max_failures`` restarts, or a phase the fit did not record as
    trained, is an error that says how to go on."""
    from ray.train import TrainingFailedError

    names = "+".join(plan.phase.name for plan, _, _ in fit)
    try:
        result = fit_phases(cfg, fit, pad_id, tracking_tags)
        if getattr(result, "error", None) is not None:
            raise result.error
    except TrainingFailedError as e:
        refusal = _feed_mismatch(e)
        if refusal is not None:
            # Rerunning would refuse again: the message says how to go on.
            raise RaycatError(refusal) from e
        # The workers failed train.max_failures + 1 times.
        raise RaycatError(
            f"{names} failed (after up to {cfg.train.max_failures} restarts from the latest "
            f"checkpoint; rerun the command to resume): {type(e).__name__}: {e}"
        ) from e
    # Rank 0 records each phase as it ends.
    for plan, phase_dir, _ in fit:
        if not recorded(phase_dir, plan.hash):
            last = fit[-1][0]
            ckpts = rundir.join(fit[-1][1], "checkpoints", f"{last.phase.name}-{last.hash}")
            raise RaycatError(
                f"{plan.phase.name} was not recorded as trained by the fit of {names} (its "
                f"done.json is missing or stale): remove this fit's checkpoints, "
                f"{ckpts}, "
                f"and rerun to train {names} again"
            )


def _feed_mismatch(error: BaseException) -> str | None:
    """The refusal a worker raised (``feed.FeedMismatch``) behind Ray Train's failure, if that was it."""
    for failure in getattr(error, "worker_failures", {}).values():
        for cause in (failure, getattr(failure, "cause", None)):
            if isinstance(cause, FeedMismatch):
                return str(cause.args[0] if cause.args else cause)
    return None


def _merges(cfg: RaycatConfig) -> bool:
    return cfg.train.method == "lora" and cfg.train.lora.merge


def _merge_lora(cfg: RaycatConfig, trained: list[tuple[PhasePlan, str]], params: int) -> None:
    """Merges every trained phase not merged yet, also one a killed run finished but did not merge."""
    for _, phase_dir in trained if _merges(cfg) else []:
        metrics = rundir.read_json(rundir.join(phase_dir, "metrics.json"))
        if "merged" not in metrics:
            metrics["merged"] = merge_lora(cfg, phase_dir, params)
            rundir.write_json(rundir.join(phase_dir, "metrics.json"), metrics)


def _write_summary(
    cfg: RaycatConfig,
    root: str,
    preflight: dict,
    skipped: list[dict],
    status: dict[str, dict],
    trained: list[tuple[PhasePlan, str]],
) -> dict:
    """The recipe's ``metrics.json``: the run's layout, the pre-flight, the skipped rows, and each phase
    (what the workers wrote, in the recipe's order)."""
    train = cfg.train
    summary = {
        "recipe": train.recipe,
        "method": train.method,
        # What ran (0 for one worker without offload).
        "zero_stage": zero_stage(train),
        "zero_stage_configured": train.deepspeed.zero_stage,
        "num_workers": train.num_workers,
        "preflight": preflight,
        "skipped": skipped,
        "phases": status,
    }
    for plan, phase_dir in trained:
        name = plan.phase.name
        metrics = rundir.read_json(rundir.join(phase_dir, "metrics.json"))
        status[name] = {
            **{k: v for k, v in metrics.items() if k != "history"},
            "status": status[name]["status"],
            "model": rundir.join(phase_dir, "model"),
        }
    rundir.write_json(rundir.join(root, "metrics.json"), summary)
    return summary


def run_train(cfg: RaycatConfig, say=print, tracking_tags: dict | None = None) -> dict:
    """Every phase of ``train.recipe`` in order; finished phases (same hash) are skipped."""
    import ray

    student = cfg.score.student
    base_dir = models.resolve(student.path)
    # Before Ray or any accelerator.
    preflight = memory.preflight(cfg, base_dir, list(RECIPES[cfg.train.recipe]))
    say(memory.describe(preflight))
    tokenizer = models.load_tokenizer(
        base_dir, revision=student.revision, trust_remote_code=student.trust_remote_code, key="score.student.path"
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    root = rundir.join(cfg.run_dir, "train", cfg.train.recipe)
    with ray_session(cfg.ray, cfg.run_dir):
        # Rows are read, encoded and written by a worker; the driver gets counts and hashes.
        plans, skipped = remote_call(ray.remote(num_cpus=1)(prepare), for_workers(cfg))
        empty = _empty_phases(plans, root, cfg.train.on_empty_phase)
        fits, status = _group_into_fits(cfg, plans, root, empty, say)
        trained = [(plan, rundir.join(root, plan.phase.name)) for plan in plans if plan.phase.name not in empty]
        for fit in fits:
            _fit_and_check(cfg, fit, pad_id, tracking_tags)
        _merge_lora(cfg, trained, preflight["params"])
    return _write_summary(cfg, root, preflight, skipped, status, trained)


def run(cfg: RaycatConfig, tracking_tags: dict | None = None) -> dict:
    """The train stage as the CLI and ``raycat run`` call it: ``run_train`` reporting through
    ``progress``, then the resolved config saved next to the outputs."""
    summary = run_train(cfg, say=lambda msg: progress.say("train", msg), tracking_tags=tracking_tags)
    save_config(cfg, "train")
    return summary
