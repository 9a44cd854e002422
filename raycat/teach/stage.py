"""Teach stage: verified chain-of-thought for the chosen bands (default: hard), on vLLM actors.

Ray Data: rows → teacher actor pool (the teacher's chat template, generate, extract ``[[X]]``, verify
against gold, retry wrong/missing answers with a temperature schedule) → atomic Parquet parts in
``teach/cache/<key>/``. The key covers (teacher model, revision, dtype, prompt version and template,
sampling, retries) but not the bands, so a hard-only run and a distill-all run share results and no
question is generated twice for the same teacher config. Teachers form a cascade: a later one sees
only rows no earlier one solved. The pure loop/policy/accounting are in ``raycat.teach.core``.

One anatomy for score, teach and evaluate (reading one stage teaches the other two), top to bottom:
``INPUT_COLUMNS``, ``PART_COLUMNS``; the frozen plan ``TeachPlan`` and ``make_plan`` (one per
teacher); the Ray Data actor ``TeachBatch`` (``self.plan``); ``parts_dir``; ``prepare`` (a worker task
before the pools); ``run_pipeline`` (one teacher's actor pool); ``finalize`` (a worker task after
them); ``run(cfg)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass

import pandas as pd
import pyarrow as pa

from raycat import progress
from raycat.config import RaycatConfig, TeacherConfig, cache_root, for_workers, save_config
from raycat.data.prompts import TEACH_PROMPT_VERSION, render_ids, teach_messages, teach_template_hash
from raycat.data.solve import SOLVER_VERSION
from raycat.engines import actor_pool
from raycat.engines.base import Sampling, engine_kwargs, generation_kwargs, make_engine, resolve_dtype
from raycat.engines.openai_http import OpenAITeacher
from raycat.errors import MissingInputError, RaycatError, StageFailed
from raycat.ray_env import ray_session, remote_call
from raycat.storage import merge, models, rundir
from raycat.teach import results
from raycat.teach.core import attempt_schedule, band_accounting, priced, resolve, teach_rows

INPUT_COLUMNS = ("id", "row_hash", "question", "options", "category", "gold")

PART_COLUMNS = [
    "id",
    "row_hash",
    "teacher",
    "response",
    "extracted",
    "status",
    "reason",
    "attempts",
    "prompt_tokens",
    "completion_tokens",
    "engine_seconds",
    "gpu_seconds",
    "finish_reason",
]


@dataclass(frozen=True)
class TeachPlan:
    """One teacher and everything its actors need, resolved on the driver before Ray starts."""

    # The teacher as configured (hub id / registry name): provenance and accounting key.
    name: str
    model_path: str
    revision: str | None
    trust_remote_code: bool
    # config.chat_template_kwargs: the variables a local teacher's chat template is rendered with
    template_kwargs: dict
    template_hash: str
    cache_key: str
    schedule: tuple[Sampling, ...]
    max_prompt_tokens: int
    gpus: float
    backend: str
    # engines.base.engine_kwargs(...) for the backend
    engine_kwargs: dict
    api: dict | None = None  # ApiConfig fields for an HTTP teacher


def make_plan(cfg: RaycatConfig, teacher: TeacherConfig) -> TeachPlan:
    """On the driver: one teacher's plan. Its tokenizer (or, for an HTTP teacher, its API key's
    environment variable) is checked here, before Ray or any actor starts."""
    teach, model = cfg.teach, teacher.model
    if teacher.api is not None:
        # The server applies its own chat template; we hash our prompt texts only.
        path, template = teacher.api.model or model.path, teach_template_hash(None)
        env = teacher.api.api_key_env
        if env and not os.environ.get(env):
            raise RaycatError(
                f"environment variable {env} (teach api.api_key_env) is not set; export it before "
                "`raycat teach` (on a cluster: in the job's environment)"
            )
    else:
        # Workers fetch the weights (models.local).
        path = models.portable(model.path)
        tokenizer = models.load_tokenizer(
            models.resolve(path),
            revision=model.revision,
            trust_remote_code=model.trust_remote_code,
            key=f"teach teacher {model.path!r}",
        )
        template = teach_template_hash(tokenizer, cfg.chat_template_kwargs)
    sampling = teach.sampling
    first = Sampling(sampling.temperature, sampling.top_p, sampling.max_tokens, sampling.seed, sampling.n)
    schedule = tuple(attempt_schedule(first, teach.retries, teach.retry_temperatures))
    max_prompt_tokens = model.max_model_len - sampling.max_tokens
    # "kept": which attempt a row keeps (teach.core.teach_rows); cached rows were chosen by that rule.
    key_parts = {
        # An HTTP teacher's model is the name sent to the server (api.model, else model.path).
        "model": model.path if teacher.api is None else path,
        # A dir retrained in place is a new model.
        "model_files": rundir.fingerprint(path) if teacher.api is None else "",
        "revision": model.revision,
        # An HTTP teacher uses neither: the server holds the weights and its own context limit.
        "dtype": resolve_dtype(model.dtype, teacher.engine.device) if teacher.api is None else None,
        "template": template,
        "prompt_version": TEACH_PROMPT_VERSION,
        "schedule": [asdict(attempt) for attempt in schedule],
        "kept": "best-then-first",
        # Rows over the prompt budget are cached as skipped: a larger budget must teach them.
        "max_prompt_tokens": max_prompt_tokens if teacher.api is None else None,
    }
    oracle = teacher.api is None and teacher.engine.backend == "oracle"
    if oracle:  # a solver, not the model: never shares a cache entry with the model's own answers
        key_parts["backend"] = f"oracle:{SOLVER_VERSION}"
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:16]
    engine = teacher.engine
    return TeachPlan(
        # Labelled wherever its rows and numbers go (teach parts, metrics, tracking, the report).
        name=f"oracle (solver; tokens counted by {model.path})" if oracle else model.path,
        model_path=path,
        revision=model.revision,
        trust_remote_code=model.trust_remote_code,
        template_kwargs=cfg.chat_template_kwargs,
        template_hash=template,
        cache_key=key,
        schedule=schedule,
        max_prompt_tokens=max_prompt_tokens,
        gpus=(
            engine.tensor_parallel_size * engine.pipeline_parallel_size
            if engine.device == "gpu" and teacher.api is None
            else 0
        ),
        api=teacher.api.model_dump() if teacher.api is not None else None,
        backend=engine.backend,
        engine_kwargs=engine_kwargs(model, engine),
    )


class TeachBatch(actor_pool.EngineActor):
    """Ray Data stage: one teacher engine per actor; renders, generates, verifies, retries."""

    REQUIRED_COLUMNS = INPUT_COLUMNS

    def __init__(self, plan: TeachPlan):
        self.plan, self.tokenizer = plan, None
        if plan.api is not None:
            api = dict(plan.api)
            api.pop("model")
            self.engine = OpenAITeacher(model=plan.model_path, **api)
            return
        from transformers import AutoTokenizer

        # On this node: registry models and URIs are fetched here.
        path = models.local(plan.model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(
            path, revision=plan.revision, trust_remote_code=plan.trust_remote_code
        )
        self.engine = make_engine(
            plan.backend, path, need_full=False, **generation_kwargs(plan.backend), **plan.engine_kwargs
        )

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        plan = self.plan
        rows = []
        for row in batch.to_dict(orient="records"):
            options = list(row["options"])
            messages = teach_messages(row["question"], options, row["category"])
            # An HTTP teacher gets messages; the server renders them.
            prompt, reason = messages, ""
            if self.tokenizer is not None:
                with self.render_lock:
                    prompt = render_ids(self.tokenizer, messages, plan.template_kwargs)
                if len(prompt) >= plan.max_prompt_tokens:
                    reason = (
                        f"prompt has {len(prompt)} tokens; model.max_model_len - sampling.max_tokens "
                        f"is {plan.max_prompt_tokens}"
                    )
            rows.append({"prompt": prompt, "n_options": len(options), "gold": row["gold"], "skip_reason": reason})
        out = pd.DataFrame(teach_rows(self.engine, rows, list(plan.schedule)))
        out.insert(0, "id", batch["id"].to_numpy())
        out.insert(1, "row_hash", batch["row_hash"].to_numpy())
        out.insert(2, "teacher", plan.name)
        out["gpu_seconds"] = out["engine_seconds"] * plan.gpus
        return out[PART_COLUMNS]


def parts_dir(cfg: RaycatConfig, plan: TeachPlan) -> str:
    """Where one teacher's parts go (``teach/cache/<key>``, shared by every run with that key)."""
    return rundir.join(cache_root(cfg), "teach", "cache", plan.cache_key)


# The resume rule of a teacher's own parts: a row is done once it has an answer (verified, wrong,
# hedged, truncated, none) or was skipped (its prompt does not fit); a failed request is retried by
# the next run.
ANSWERED = "!failed"


def read_parts(parts_dir: str) -> pd.DataFrame:
    return rundir.read_parts(parts_dir, PART_COLUMNS)


def rows_path(run_dir: str) -> str:
    return rundir.join(run_dir, "teach", "rows.parquet")


def block_rows(cfg: RaycatConfig) -> int:
    """A few teacher engine batches: teach/rows.parquet's row groups hold ``rundir.group_rows`` of it
    (the teach pipeline cuts its own blocks of 4 batches, ``actor_pool.run``)."""
    return max(4, 4 * max(teacher.engine.batch_size for teacher in cfg.teach.teachers))


def taught_bands(cfg: RaycatConfig) -> list[str]:
    return ["easy", "medium", "hard"] if cfg.teach.bands == "all" else list(cfg.teach.bands)


def check_inputs(cfg: RaycatConfig) -> None:
    """On the driver, from the Parquet footers only: the bands to teach exist and have the columns the
    actors read (so a missing column fails before Ray or any engine starts)."""
    for band in taught_bands(cfg):
        path = rundir.join(cfg.run_dir, "split", f"{band}.parquet")
        if not rundir.exists(path):
            raise MissingInputError(f"{path} not found: run `raycat split` with this config first")
        actor_pool.check_columns("teach", rundir.parquet_columns(path), INPUT_COLUMNS)


def prepare(cfg: RaycatConfig) -> int:
    """On a worker: the rows to teach (the chosen bands of the split, ``teach.limit`` applied) written
    to teach/rows.parquet; returns their count. Streams the band files: memory is one batch."""
    teach = cfg.teach
    paths = {band: rundir.join(cfg.run_dir, "split", f"{band}.parquet") for band in taught_bands(cfg)}
    total = sum(rundir.parquet_rows(path) for path in paths.values())
    keep = None
    if teach.limit is not None and teach.limit < total:
        keep = merge.sample_positions(total, teach.limit, teach.seed)
    schema = merge.unified_schema(list(paths.values()), {"band": pa.string()})
    batches = (b.assign(band=band) for band, path in paths.items() for b in rundir.iter_parquet(path))
    group = rundir.group_rows(block_rows(cfg))
    with merge.ParquetSink(rows_path(cfg.run_dir), schema, row_group_size=group) as out:
        for _, rows in merge.kept(batches, keep):
            out.write(rows)
    return out.rows


def run_pipeline(teacher: TeacherConfig, plan: TeachPlan, rows, parts_dir: str, on_rows, skip=()) -> int:
    """One teacher over ``rows`` (a Dataset or a frame), leaving out rows the ``skip`` rules mark done."""
    pool = actor_pool.Pool.of(teacher.engine, remote=plan.api is not None, generate=True)
    return actor_pool.run("teach", rows, TeachBatch, plan, pool, parts_dir, on_rows, skip=skip)


def band_paths(cfg: RaycatConfig) -> dict[str, str]:
    """The split's training-pool files (easy / medium / hard), by band."""
    return {band: rundir.join(cfg.run_dir, "split", f"{band}.parquet") for band in ("easy", "medium", "hard")}


# The parts' types where no teacher wrote a part (nothing to teach): the outputs keep their columns.
_PART_TYPES = {"attempts": pa.int64(), "prompt_tokens": pa.int64(), "completion_tokens": pa.int64()}
EMPTY_PART_SCHEMA = pa.schema(
    [(c, _PART_TYPES.get(c, pa.float64() if c.endswith("_seconds") else pa.string())) for c in PART_COLUMNS]
)


def output_schema(cfg: RaycatConfig, plans: list[TeachPlan]) -> pa.Schema:
    """cot.parquet's and skipped.parquet's columns: the rows', each row's chosen result's, the verdict."""
    files = [f for plan in plans for f in rundir.list_files(parts_dir(cfg, plan), ".parquet")]
    parts = merge.unified_schema(files) if files else EMPTY_PART_SCHEMA
    fields = list(rundir.parquet_schema(rows_path(cfg.run_dir)))
    fields += [parts.field(c) for c in parts.names if c not in ("id", "row_hash", *[f.name for f in fields])]
    verdict = ("reason", "final_status", "target", "teach_prompt_version", "teacher_template_hash")
    # ``reason`` keeps its place among the result's columns and becomes the verdict's text.
    fields = [pa.field(f.name, pa.string()) if f.name == "reason" else f for f in fields]
    fields += [pa.field(c, pa.string()) for c in verdict if c not in {f.name for f in fields}]
    return pa.schema(fields)


def resolved(cfg: RaycatConfig, plans: list[TeachPlan], chunk: pd.DataFrame) -> pd.DataFrame:
    """A batch of rows with their chosen result: teach.on_wrong applied, the verdict columns added."""
    verdicts = [
        resolve(status, response, gold, cfg.teach.on_wrong)
        for status, response, gold in zip(chunk["status"], chunk["response"], chunk["gold"], strict=True)
    ]
    whys = zip([why for _, _, why in verdicts], chunk["reason"], strict=True)
    return chunk.assign(
        reason=["; ".join(x for x in pair if x) for pair in whys],
        final_status=[final for final, _, _ in verdicts],
        target=[target for _, target, _ in verdicts],
        teach_prompt_version=TEACH_PROMPT_VERSION,
        teacher_template_hash=chunk["teacher"].map({plan.name: plan.template_hash for plan in plans}),
    )


def finalize(cfg: RaycatConfig, plans: list[TeachPlan]) -> dict:
    """On a worker: pick each row's result across the cascade, apply teach.on_wrong, write cot/skipped
    Parquet; returns the metrics (``run`` writes them). Streamed (``results``): memory is a batch, a
    bucket and ~9 bytes a training-pool row a teacher."""
    teach, path = cfg.teach, rows_path(cfg.run_dir)
    teach_dir = rundir.join(cfg.run_dir, "teach")
    pool_keys, pool_index, bands = results.pool_index(band_paths(cfg))
    pool = results.PoolTokens(pool_keys, pool_index, len(plans))
    merged = results.Merged()
    schema = output_schema(cfg, plans)
    group = rundir.group_rows(block_rows(cfg))
    with (
        merge.scratch(rundir.join(teach_dir, "finalize")) as tmp,
        merge.ParquetSink(rundir.join(teach_dir, "cot.parquet"), schema, row_group_size=group) as cot,
        merge.ParquetSink(rundir.join(teach_dir, "skipped.parquet"), schema, row_group_size=group) as skipped,
    ):
        buckets = merge.Buckets(tmp, results.PART_BATCH_ROWS)
        # Each cache is read once; only this content's rows count (a reused id is a new row).
        results.spread(path, [parts_dir(cfg, plan) for plan in plans], pool, buckets)
        for chunk in results.walk(path, buckets, len(plans), merged):
            out = resolved(cfg, plans, chunk)
            merged.final_status.update(out["final_status"])
            merged.attempt_status.update(out["status"])
            cot.write(out[out["target"].notna()])
            skipped.write(out[out["target"].isna()])
        if merged.missing:
            # Raised inside the sinks: neither file is published.
            raise results.no_result_error(merged)
    n_rows = cot.rows + skipped.rows
    prices = {
        t.model.path: (t.price.prompt_per_mtok, t.price.completion_per_mtok, t.price.currency) if t.price else None
        for t in teach.teachers
    }
    metrics = {
        "rows": n_rows,
        "bands": teach.bands,
        "status": dict(merged.final_status.most_common()),
        "attempt_status": dict(merged.attempt_status.most_common()),
        "accounting": {
            # Counts every attempt of every teacher that worked on these rows.
            **priced(merged.totals, merged.rows_taught, prices),
            "pool_rows": int(len(bands)),
            **band_accounting(bands, pool.per_row(), taught_bands(cfg)),
        },
        "provenance": {
            "prompt_version": TEACH_PROMPT_VERSION,
            "on_wrong": teach.on_wrong,
            "teachers": [
                {"model": p.name, "revision": p.revision, "cache_key": p.cache_key, "template_hash": p.template_hash}
                for p in plans
            ],
        },
    }
    failed = metrics["status"].get("failed", 0)
    metrics["failure_ratio"] = failed / n_rows if n_rows else 0.0
    return metrics


def run(cfg: RaycatConfig) -> dict:
    """The teach stage: every teacher of the cascade on the rows no earlier teacher solved, then
    ``teach.on_wrong`` and the accounting. Stops with an error when too many rows failed."""
    import ray

    if cfg.teach is None:
        raise RaycatError("the config has no teach: section (teach.teachers lists the teacher models)")
    started = time.time()
    check_inputs(cfg)
    # Tokenizers and keys fail here, before Ray.
    plans = [make_plan(cfg, teacher) for teacher in cfg.teach.teachers]
    worker_cfg = for_workers(cfg)
    path = rows_path(worker_cfg.run_dir)
    written = retried = 0
    with ray_session(cfg.ray, cfg.run_dir):
        remote_call(ray.remote(num_cpus=1)(prepare), worker_cfg)
        # Rows a teacher already answered (same id and content) or an earlier teacher verified are
        # left out on the workers. A failed request (an outage, a timeout) is no answer: retried.
        for i, (teacher, plan) in enumerate(zip(cfg.teach.teachers, plans, strict=True)):
            parts = parts_dir(worker_cfg, plan)
            skip = [(parts, ANSWERED)] + [(parts_dir(worker_cfg, earlier), "verified") for earlier in plans[:i]]
            # One pass; the last rule counts the rows left to generate that failed in an earlier run
            # (a row answered since, or solved by an earlier teacher, is not counted).
            counts = remote_call(ray.remote(num_cpus=0.1)(actor_pool.todo_count), path, skip + [(parts, "failed")])
            *done, retrying = counts["done"]
            todo = counts["todo"] + retrying
            retried += retrying
            progress.say(
                "teach",
                f"({i + 1}/{len(plans)}) {plan.name}: {counts['rows']} rows, {sum(done[1:])} solved by "
                f"earlier teachers, {done[0]} cached, {todo} to generate"
                + (f" ({retrying} failed in an earlier run: retried)" if retrying else ""),
            )
            if todo:
                rows = rundir.parquet_dataset(path)
                with progress.rows("teaching", todo) as advance:
                    written += run_pipeline(teacher, plan, rows, parts, advance, skip)
        metrics = remote_call(ray.remote(num_cpus=1)(finalize), worker_cfg, plans)
    metrics["wall_s"] = round(time.time() - started, 2)
    metrics["rows_this_run"] = written
    # Rows whose earlier answer was a failed request, sent again this run (the status counts say how
    # many of them failed again).
    metrics["failed_rows_retried"] = retried
    rundir.write_json(rundir.join(cfg.run_dir, "teach", "metrics.json"), metrics)
    save_config(cfg, "teach")
    if metrics["failure_ratio"] > cfg.teach.max_failure_ratio:
        raise StageFailed(
            "teach",
            f"{metrics['status'].get('failed', 0)} of {metrics['rows']} rows failed "
            f"({metrics['failure_ratio']:.0%} > teach.max_failure_ratio); finished rows are kept, see "
            "teach/skipped.parquet",
            metrics,
        )
    return metrics
