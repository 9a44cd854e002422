"""Score stage: student answer-token entropy for every question.

The driver leaves the data path: a Ray task reads and validates the corpus into questions.parquet;
a Ray Data pipeline reads it on the workers → drops ids already scored → renders prompts with the
student's chat template (CPU actor) → engine actor pool (vLLM; one engine per GPU or TP group) →
each finished block written by a worker as an atomic Parquet part under
``score/parts/<cache key>/``; a last Ray task merges the parts and computes the metrics. A rerun
skips ids already written under the same key (model, revision, dtype, template hash, prompt version,
entropy mode), so an interrupted run resumes without losing or duplicating rows. The driver holds
counts, the plan and the metrics, never the rows. The pure per-row maths is in ``raycat.score.core``;
metrics in ``raycat.score.metrics``.

One anatomy for score, teach and evaluate (reading one stage teaches the other two), top to bottom:
``INPUT_COLUMNS``, ``PART_COLUMNS``; the frozen plan ``ScorePlan`` and ``make_plan``; the Ray Data
actor ``ScoreBatch`` (``self.plan``); ``parts_dir``; ``prepare`` (a worker task before the pool);
``run_pipeline`` (the actor pool); ``finalize`` (a worker task after it); ``run(cfg)``.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import pandas as pd
import pyarrow as pa

from raycat import progress
from raycat.config import RaycatConfig, cache_root, for_workers, save_config
from raycat.data import questions
from raycat.data.prompts import (
    PROMPT_VERSION,
    LabelTokens,
    answer_labels,
    generation_context,
    label_tokens,
    messages_for,
    render_ids,
    score_template_hash,
)
from raycat.engines import actor_pool
from raycat.engines.base import Scorer, ScoreRequest, engine_kwargs, make_engine, resolve_dtype
from raycat.ray_env import ray_session, remote_call
from raycat.score.core import cache_key, deviation_sample, row_result
from raycat.storage import merge, models, rundir

INPUT_COLUMNS = ("id", "row_hash", "question", "options", "category", "gold")

PART_COLUMNS = [
    "id",
    "row_hash",
    "status",
    "skip_reason",
    "entropy",
    "entropy_options",
    "entropy_full",
    "entropy_topk",
    "entropy_topk_bound",
    "predicted",
    "correct",
    "predicted_greedy",
    "correct_greedy",
    "idk",
    "option_mass",
    "option_probs",
    "greedy_text",
    "prompt_tokens",
    "gold",
    "category",
]


@dataclass(frozen=True)
class ScorePlan:
    """Everything the actors need, resolved on the driver before Ray starts."""

    model_path: str
    revision: str | None
    trust_remote_code: bool
    preset: str
    system_prompt: str | None
    answer_prefix: str
    labels: LabelTokens
    # config.chat_template_kwargs: the variables the chat template is rendered with
    template_kwargs: dict
    template_hash: str
    cache_key: str
    sample_ids: frozenset[str]
    max_prompt_tokens: int
    mode: str
    top_k: int
    free_form_max_tokens: int
    backend: str
    # engines.base.engine_kwargs(...) for the backend
    engine_kwargs: dict


def make_plan(cfg: RaycatConfig, tokenizer, n_max: int, sample_ids) -> ScorePlan:
    """The tokenizer-dependent facts, resolved on the driver before any engine starts. ``n_max``: the
    most options any question has; ``sample_ids``: the deviation sample."""
    score = cfg.score
    prompt = score.prompt
    # Workers fetch the weights (models.local).
    model_path = models.portable(score.student.path)
    template = score_template_hash(cfg, tokenizer)
    sample = frozenset() if score.entropy_mode == "full" else frozenset(sample_ids)
    return ScorePlan(
        model_path=model_path,
        revision=score.student.revision,
        trust_remote_code=score.student.trust_remote_code,
        preset=prompt.preset,
        system_prompt=prompt.system_prompt,
        answer_prefix=prompt.answer_prefix,
        labels=label_tokens(
            tokenizer,
            max(n_max, 1),
            prompt.preset,
            generation_context(
                tokenizer, prompt.preset, prompt.system_prompt, cfg.chat_template_kwargs, prompt.answer_prefix
            ),
        ),
        template_kwargs=cfg.chat_template_kwargs,
        template_hash=template,
        cache_key=cache_key(cfg, score.student.path, template),
        sample_ids=sample,
        max_prompt_tokens=score.student.max_model_len - score.free_form_max_tokens,
        mode=score.entropy_mode,
        top_k=score.top_k,
        free_form_max_tokens=score.free_form_max_tokens,
        backend=score.engine.backend,
        engine_kwargs=engine_kwargs(score.student, score.engine),
    )


def student_tokenizer(cfg: RaycatConfig):
    """The student's tokenizer on the driver (its files only), before anything heavy starts."""
    student = cfg.score.student
    return models.load_tokenizer(
        models.resolve(models.portable(student.path)),
        revision=student.revision,
        trust_remote_code=student.trust_remote_code,
        key="score.student.path",
    )


class RenderPrompts:
    """Ray Data stage: chat-template rendering; flags rows that cannot be scored, with the reason."""

    REQUIRED_COLUMNS = INPUT_COLUMNS

    def __init__(self, plan: ScorePlan):
        from transformers import AutoTokenizer

        self.plan = plan
        self.tokenizer = AutoTokenizer.from_pretrained(
            models.local(plan.model_path), revision=plan.revision, trust_remote_code=plan.trust_remote_code
        )

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        plan = self.plan
        ids, reasons = [], []
        for question, options, category in zip(batch["question"], batch["options"], batch["category"], strict=True):
            options = list(options)
            prompt = render_ids(
                self.tokenizer,
                messages_for(question, options, category, plan.preset, plan.system_prompt),
                plan.template_kwargs,
                plan.answer_prefix,
            )
            reason = ""
            if not options and plan.mode == "options":
                reason = "free-form question has no options to score; use score.entropy_mode=full or topk"
            elif options and plan.mode == "options" and plan.labels.groups(len(options), plan.preset) is None:
                # Only the options distribution needs single-token labels; full/topk entropy and the
                # decoded answer do not.
                labels = answer_labels(len(options), plan.preset)
                bad = [label for label in plan.labels.multi_token if label in labels]
                reason = (
                    f"option label(s) {bad} are not single tokens for this tokenizer; use "
                    "score.prompt.preset=letters or score.entropy_mode=full"
                )
            elif len(prompt) >= plan.max_prompt_tokens:
                reason = (
                    f"prompt has {len(prompt)} tokens, over score.student.max_model_len "
                    f"({plan.max_prompt_tokens}); raise it"
                )
            ids.append(prompt)
            reasons.append(reason)
        out = batch.copy()
        out["prompt_ids"] = ids
        out["skip_reason"] = reasons
        return out


class ScoreBatch(actor_pool.EngineActor):
    """Ray Data stage: one engine per actor, loaded once, scoring whole batches."""

    REQUIRED_COLUMNS = INPUT_COLUMNS

    def __init__(self, plan: ScorePlan):
        self.plan = plan
        need_full = plan.mode == "full" or bool(plan.sample_ids)
        # On this node: registry models and URIs are fetched here.
        path = models.local(plan.model_path)
        self.engine: Scorer = make_engine(plan.backend, path, need_full=need_full, **plan.engine_kwargs)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        plan = self.plan
        rows = batch.to_dict(orient="records")
        todo = [i for i, row in enumerate(rows) if not row["skip_reason"]]
        requests, label_ids = [], {}
        for i in todo:
            row = rows[i]
            label_ids[i] = plan.labels.groups(len(row["options"]), plan.preset) if len(row["options"]) else []
            # Multi-token labels (full/topk mode only): a short greedy answer is decoded instead.
            requests.append(
                ScoreRequest(
                    prompt_ids=list(row["prompt_ids"]),
                    option_groups=label_ids[i] or [],
                    want_full=row["id"] in plan.sample_ids,
                )
            )
        results = self.engine.score(requests, plan.mode, plan.top_k, plan.free_form_max_tokens) if requests else []
        out = []
        scored = dict(zip(todo, results, strict=True))
        for i, row in enumerate(rows):
            record = {column: None for column in PART_COLUMNS}
            record.update(
                id=row["id"],
                row_hash=row["row_hash"],
                gold=row["gold"],
                category=row["category"],
                prompt_tokens=len(row["prompt_ids"]),
                option_probs=[],
                idk=False,
            )
            if i in scored:
                n_options = len(row["options"])
                record.update(
                    row_result(
                        scored[i], n_options, row["gold"], plan.mode, plan.preset, label_ids[i], plan.answer_prefix
                    )
                )
                record.update(status="scored", skip_reason="")
            else:
                record.update(status="skipped", skip_reason=row["skip_reason"], correct=False, correct_greedy=False)
            out.append(record)
        return pd.DataFrame(out, columns=PART_COLUMNS)


def parts_dir(cfg: RaycatConfig, key: str) -> str:
    """Where the parts of cache key ``key`` go. Named by the key, not the plan: the plan holds the
    deviation sample, which ``prepare`` draws after counting this dir."""
    return rundir.join(cache_root(cfg), "score", "parts", key)


def prepare(questions_path: str, parts_dir: str, n_sample: int) -> dict:
    """On a worker: how many questions there are, how many already have a part under this cache key
    (same id and content), and the deviation sample (ids only, a few hundred)."""
    counts = actor_pool.todo_count(questions_path, [(parts_dir, None)])
    ids = (i for batch in rundir.iter_parquet(questions_path, ["id"]) for i in batch["id"])
    return {
        "questions": counts["rows"],
        "done": counts["done"][0],
        "sample_ids": sorted(deviation_sample(ids, n_sample)) if n_sample else [],
    }


def run_pipeline(plan: ScorePlan, pool: actor_pool.Pool, rows, parts_dir: str, on_rows=lambda n: None) -> int:
    """Score ``rows`` (a Dataset or a frame) except ids already in ``parts_dir``; each finished block is
    written as an atomic part by a worker. Returns rows written."""
    # Rendering is light: a fraction of a CPU, so render + one engine fit on a 2-core machine.
    return actor_pool.run(
        "score",
        rows,
        ScoreBatch,
        plan,
        pool,
        parts_dir,
        on_rows,
        pre=[actor_pool.Prestage(RenderPrompts, plan)],
        skip=[(parts_dir, None)],
    )


def finalize(cfg: RaycatConfig, plan: ScorePlan, questions_path: str, parts_dir: str) -> dict:
    """Merge parts into scores.parquet / skipped.parquet in the questions' order; returns the metrics
    (``run`` writes them). Runs as a Ray task that streams: it holds a bucket of rows, the corpus's
    keys and the few columns the metrics need (``merge``, ``scored_summary``), not the corpus."""
    # Imports sklearn and scipy: loaded only in the worker that merges.
    from raycat.score.metrics import (
        DEVIATION_COLUMNS,
        concat_summaries,
        deviation_rows,
        scored_summary,
        summary_metrics,
    )

    score = cfg.score
    constants = {
        "model": score.student.path,
        "model_revision": score.student.revision or "",
        "template_hash": plan.template_hash,
        "prompt_version": PROMPT_VERSION,
        "entropy_mode": score.entropy_mode,
        "logits": "raw",
        "cache_key": plan.cache_key,
    }
    score_dir = rundir.join(cfg.run_dir, "score")
    schema = merge.part_schema(parts_dir, {name: pa.string() for name in constants})
    if schema is None:
        schema = pa.schema([(c, pa.null()) for c in PART_COLUMNS] + [(c, pa.string()) for c in constants])
    # A part row counts only for the same id *and* content: an id reused by another data.path is new.
    # Parts are written at least once: a worker of a killed run can finish a part the rerun also
    # computes (same model, same key, same values). Each row counts once; the extra copies are reported.
    merged = merge.OrderedParts(parts_dir, questions_path)
    summaries, samples, skipped = [], [], Counter()
    with (
        merge.ParquetSink(rundir.join(score_dir, "scores.parquet"), schema) as scored_out,
        merge.ParquetSink(rundir.join(score_dir, "skipped.parquet"), schema) as skipped_out,
    ):
        for chunk in merged:
            chunk = chunk.assign(**constants)
            status = chunk["status"]
            scored_out.write(chunk[status == "scored"])
            skipped_out.write(chunk[status == "skipped"])
            skipped.update(chunk.loc[status == "skipped", "skip_reason"].dropna().astype(str))
            summaries.append(scored_summary(chunk))
            samples.append(deviation_rows(chunk))
    rows = concat_summaries(summaries)
    sample = pd.concat(samples, ignore_index=True) if samples else pd.DataFrame(columns=DEVIATION_COLUMNS)
    metrics = summary_metrics(rows, merged.rows, dict(skipped.most_common()), sample)
    metrics["duplicate_part_rows_dropped"] = merged.duplicates
    metrics["missing"] = merged.missing
    metrics["provenance"] = {
        "model": score.student.path,
        "model_revision": score.student.revision,
        "resolved_model_path": plan.model_path,
        "template_hash": plan.template_hash,
        "prompt_version": PROMPT_VERSION,
        "prompt_preset": plan.preset,
        "entropy_mode": score.entropy_mode,
        "top_k": score.top_k,
        "logits": "raw (no generation-config processors)",
        "engine": score.engine.backend,
        # What "auto" means on this machine.
        "dtype": resolve_dtype(score.student.dtype, score.engine.device),
        "cache_key": plan.cache_key,
    }
    return metrics


def run(cfg: RaycatConfig) -> dict:
    """The score stage: questions → entropy for every row (resuming under the cache key) → metrics."""
    import ray

    started = time.time()
    score = cfg.score
    # A missing model or chat template fails here, before Ray.
    tokenizer = student_tokenizer(cfg)
    questions_path = rundir.absolute(questions.path(cfg.run_dir))
    with ray_session(cfg.ray, cfg.run_dir):
        summary = questions.stage_questions(cfg)
        n_sample = 0 if score.entropy_mode == "full" else score.deviation_sample
        template = score_template_hash(cfg, tokenizer)
        key = cache_key(cfg, score.student.path, template)
        parts = rundir.absolute(parts_dir(cfg, key))
        state = remote_call(ray.remote(num_cpus=1)(prepare), questions_path, parts, n_sample)
        plan = make_plan(cfg, tokenizer, summary["max_options"], state["sample_ids"])
        todo = state["questions"] - state["done"]
        progress.say(
            "score",
            f"{state['questions']} questions ({summary['quarantined']} quarantined), {state['done']} already "
            f"scored under key {plan.cache_key}, {todo} to do",
        )
        written = 0
        if todo:
            actor_pool.check_columns("score", rundir.parquet_columns(questions_path), INPUT_COLUMNS)
            rows = questions.dataset(cfg)
            with progress.rows("scoring", todo) as advance:
                written = run_pipeline(plan, actor_pool.Pool.of(score.engine), rows, parts, on_rows=advance)
        metrics = remote_call(ray.remote(num_cpus=1)(finalize), for_workers(cfg), plan, questions_path, parts)
    metrics["questions"] = summary
    metrics["wall_s"] = round(time.time() - started, 2)
    metrics["rows_this_run"] = written
    rundir.write_json(rundir.join(cfg.run_dir, "score", "metrics.json"), metrics)
    save_config(cfg, "score")
    return metrics
