"""Score stage: student answer-token entropy for every question.

The driver leaves the data path: a Ray task reads and validates the corpus into questions.parquet;
a Ray Data pipeline reads it on the workers → drops ids already scored → renders prompts with the
student's chat template (CPU actor) → engine actor pool (vLLM; one engine per GPU or TP group) →
each finished block written by a worker as an atomic Parquet part under
``score/parts/<cache key>/``; a last Ray task merges the parts and computes the metrics. A rerun
skips ids already written under the same key (model, revision, dtype, template hash, prompt version,
entropy mode), so an interrupted run resumes without losing or duplicating rows. The driver holds
counts, the plan and the metrics, never the rows. The pure per-row maths is in ``row_result``;
metrics in ``raycat.score_metrics``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from raycat import progress
from raycat.config import RaycatConfig, cache_root, for_workers, save_config
from raycat.data.answers import normalize_number
from raycat.data.prompts import IDK_LABEL, LETTERS, PROMPT_VERSION, LabelTokens, answer_labels, messages_for, render_ids
from raycat.engines import actor_pool
from raycat.engines.base import Scorer, ScoreRequest, ScoreResult, engine_kwargs, make_engine, resolve_dtype
from raycat.entropy import entropy_options, options_distribution
from raycat.storage import rowkey, rundir

OUTPUT_COLUMNS = [
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


INPUT_COLUMNS = ("id", "row_hash", "question", "options", "category", "gold")


@dataclass(frozen=True)
class ScorePlan:
    """Everything the actors need, resolved on the driver before Ray starts."""

    model_path: str
    revision: str | None
    trust_remote_code: bool
    preset: str
    system_prompt: str | None
    labels: LabelTokens
    template_hash: str
    cache_key: str
    sample_ids: frozenset[str]
    max_prompt_tokens: int
    mode: str
    top_k: int
    free_form_max_tokens: int
    backend: str
    engine_kwargs: dict  # engine.engine_kwargs(...) for the backend


def cache_key(cfg: RaycatConfig, model_path: str, template_hash: str) -> str:
    s = cfg.score
    parts = {
        "model": model_path,
        "model_files": rundir.fingerprint(model_path),  # a local or URI dir retrained in place is a new model
        "revision": s.student.revision,
        "dtype": resolve_dtype(s.student.dtype, s.engine.device),  # what "auto" means on this machine
        "template": template_hash,
        "prompt_version": PROMPT_VERSION,
        "mode": s.entropy_mode,
        "top_k": s.top_k if s.entropy_mode == "topk" else None,
        "preset": s.prompt.preset,
        "system_prompt": s.prompt.system_prompt,
        "free_form_max_tokens": s.free_form_max_tokens,
        "label_tokens": "alone+in-context",  # the label spellings summed into the options distribution
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def deviation_sample(ids: pd.Series, n: int) -> frozenset[str]:
    """A stable sample (by id hash, not row order) also scored in full mode."""
    ranked = sorted(ids, key=lambda i: hashlib.sha1(i.encode()).hexdigest())
    return frozenset(ranked[:n])


def greedy_answer(res: ScoreResult, n_options: int, preset: str, groups: list[list[int]] | None) -> str:
    """The option the decoded answer names, as the paper reads it: a letter, "IDK" for the paper
    preset's "0", or "" when the decoded answer is no option label (invalid). Single-token labels: the
    greedy token; multi-token labels ("10"): the first word of the greedy text."""
    labels = answer_labels(n_options, preset)
    if groups:
        k = next((j for j, g in enumerate(groups) if res.greedy_token_id in g), None)
    else:
        m = re.match(r"\s*\(?([A-Za-z0-9]+)", res.greedy_text or "")
        k = labels.index(m.group(1)) if m and m.group(1) in labels else None
    if k is None:
        return ""
    return "IDK" if labels[k] == IDK_LABEL else LETTERS[k]


def row_result(
    res: ScoreResult, n_options: int, gold: str, mode: str, preset: str, groups: list[list[int]] | None = None
) -> dict:
    """Pure: one engine result → the output columns of one scored row.

    Two correctness labels: ``correct`` is the arg-max among the option tokens (always a valid option);
    ``correct_greedy`` is the paper's: the decoded token, a non-option answer counting as invalid.
    ``groups``: the token ids of each answer label (None: multi-token labels, read from the text)."""
    out: dict = {
        "entropy_full": res.entropy_full,
        "entropy_topk": res.entropy_topk,
        "entropy_topk_bound": res.entropy_topk_bound,
        "greedy_text": res.greedy_text,
        "idk": False,
    }
    if n_options:
        out["predicted_greedy"] = greedy_answer(res, n_options, preset, groups)
        out["correct_greedy"] = out["predicted_greedy"] == gold
    if n_options and res.option_logprobs:
        lp = np.asarray(res.option_logprobs)
        probs, mass = options_distribution(lp)
        k = int(probs.argmax())
        out["idk"] = preset == "paper" and k == n_options  # the appended "0" label
        out["predicted"] = "IDK" if out["idk"] else LETTERS[k]
        out["correct"] = out["predicted"] == gold
        out["option_mass"] = mass
        out["option_probs"] = probs.tolist()
        out["entropy_options"] = entropy_options(lp)
    elif n_options:  # multi-token labels in full/topk mode: no option distribution, the decoded answer
        out["idk"] = out["predicted_greedy"] == "IDK"
        out["predicted"], out["correct"] = out["predicted_greedy"], out["correct_greedy"]
        out["option_mass"], out["option_probs"], out["entropy_options"] = None, [], None
    else:
        out["predicted"] = normalize_number(res.greedy_text) or ""
        out["correct"] = out["predicted"] == gold
        out["predicted_greedy"], out["correct_greedy"] = out["predicted"], out["correct"]
        out["option_mass"] = None
        out["option_probs"] = []
        out["entropy_options"] = None
    by_mode = {"options": out["entropy_options"], "full": res.entropy_full, "topk": res.entropy_topk}
    out["entropy"] = by_mode[mode]
    return out


class RenderPrompts:
    """Ray Data stage: chat-template rendering; flags rows that cannot be scored, with the reason."""

    REQUIRED_COLUMNS = INPUT_COLUMNS

    def __init__(self, plan: ScorePlan):
        from transformers import AutoTokenizer

        from raycat.storage import models

        self.plan = plan
        self.tok = AutoTokenizer.from_pretrained(
            models.local(plan.model_path), revision=plan.revision, trust_remote_code=plan.trust_remote_code
        )

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        p = self.plan
        ids, reasons = [], []
        for q, opts, cat in zip(batch["question"], batch["options"], batch["category"], strict=True):
            opts = list(opts)
            prompt = render_ids(self.tok, messages_for(q, opts, cat, p.preset, p.system_prompt))
            reason = ""
            if not opts and p.mode == "options":
                reason = "free-form question has no options to score; use score.entropy_mode=full or topk"
            elif opts and p.mode == "options" and p.labels.groups(len(opts), p.preset) is None:
                # Only the options distribution needs single-token labels; full/topk entropy and the
                # decoded answer do not.
                bad = [lab for lab in p.labels.multi_token if lab in answer_labels(len(opts), p.preset)]
                reason = (
                    f"option label(s) {bad} are not single tokens for this tokenizer; use "
                    "score.prompt.preset=letters or score.entropy_mode=full"
                )
            elif len(prompt) >= p.max_prompt_tokens:
                reason = (
                    f"prompt has {len(prompt)} tokens, over score.student.max_model_len "
                    f"({p.max_prompt_tokens}); raise it"
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
        from raycat.storage import models

        self.plan = plan
        need_full = plan.mode == "full" or bool(plan.sample_ids)
        path = models.local(plan.model_path)  # on this node: registry models and URIs are fetched here
        self.engine: Scorer = make_engine(plan.backend, path, need_full=need_full, **plan.engine_kwargs)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        p = self.plan
        rows = batch.to_dict(orient="records")
        todo = [i for i, r in enumerate(rows) if not r["skip_reason"]]
        requests, groups = [], {}
        for i in todo:
            r = rows[i]
            groups[i] = p.labels.groups(len(r["options"]), p.preset) if len(r["options"]) else []
            # Multi-token labels (full/topk mode only): a short greedy answer is decoded instead.
            requests.append(
                ScoreRequest(
                    prompt_ids=list(r["prompt_ids"]), option_groups=groups[i] or [], want_full=r["id"] in p.sample_ids
                )
            )
        results = self.engine.score(requests, p.mode, p.top_k, p.free_form_max_tokens) if requests else []
        out = []
        scored = dict(zip(todo, results, strict=True))
        for i, r in enumerate(rows):
            row = {c: None for c in OUTPUT_COLUMNS}
            row.update(
                id=r["id"],
                row_hash=r["row_hash"],
                gold=r["gold"],
                category=r["category"],
                prompt_tokens=len(r["prompt_ids"]),
                option_probs=[],
                idk=False,
            )
            if i in scored:
                row.update(row_result(scored[i], len(r["options"]), r["gold"], p.mode, p.preset, groups[i]))
                row.update(status="scored", skip_reason="")
            else:
                row.update(status="skipped", skip_reason=r["skip_reason"], correct=False, correct_greedy=False)
            out.append(row)
        return pd.DataFrame(out, columns=OUTPUT_COLUMNS)


def resume_state(questions_path: str, parts_dir: str, n_sample: int) -> dict:
    """On a worker: how many questions there are, how many already have a part under this cache key
    (same id and content), and the deviation sample (ids only, a few hundred)."""
    counts = actor_pool.todo_count(questions_path, [(parts_dir, None)])
    ids = rundir.read_parquet_columns(questions_path, ["id"])["id"] if n_sample else None
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


def student_tokenizer(cfg: RaycatConfig):
    """The student's tokenizer on the driver (its files only), before anything heavy starts."""
    from raycat.storage import models

    s = cfg.score
    return models.load_tokenizer(
        models.resolve(models.portable(s.student.path)),
        revision=s.student.revision,
        trust_remote_code=s.student.trust_remote_code,
        key="score.student.path",
    )


def prepare_plan(cfg: RaycatConfig, tok, n_max: int, sample_ids) -> ScorePlan:
    """The tokenizer-dependent facts, resolved on the driver before any engine starts. ``n_max``: the
    most options any question has; ``sample_ids``: the deviation sample."""
    from raycat.data.prompts import generation_context, label_tokens, template_hash
    from raycat.storage import models

    s = cfg.score
    model_path = models.portable(s.student.path)  # workers fetch the weights (models.local)
    th = template_hash(tok, s.prompt.preset, s.prompt.system_prompt)
    sample = frozenset() if s.entropy_mode == "full" else frozenset(sample_ids)
    return ScorePlan(
        model_path=model_path,
        revision=s.student.revision,
        trust_remote_code=s.student.trust_remote_code,
        preset=s.prompt.preset,
        system_prompt=s.prompt.system_prompt,
        labels=label_tokens(
            tok, max(n_max, 1), s.prompt.preset, generation_context(tok, s.prompt.preset, s.prompt.system_prompt)
        ),
        template_hash=th,
        cache_key=cache_key(cfg, s.student.path, th),
        sample_ids=sample,
        max_prompt_tokens=s.student.max_model_len - s.free_form_max_tokens,
        mode=s.entropy_mode,
        top_k=s.top_k,
        free_form_max_tokens=s.free_form_max_tokens,
        backend=s.engine.backend,
        engine_kwargs=engine_kwargs(s.student, s.engine),
    )


def finalize(cfg: RaycatConfig, plan: ScorePlan, questions_path: str, parts_dir: str) -> dict:
    """Merge parts into scores.parquet / skipped.parquet; returns the metrics (``run`` writes them).
    Runs as a Ray task: the rows stay on a worker."""
    from raycat.score.metrics import score_metrics

    questions = rundir.read_parquet_columns(questions_path, ["id", "row_hash"])
    qkeys = rowkey.keys(questions)
    df = rundir.read_parts(parts_dir, OUTPUT_COLUMNS)
    # A part row counts only for the same id *and* content: an id reused by another data.path is new.
    df = df.assign(_key=rowkey.keys(df)).loc[lambda f: f["_key"].isin(set(qkeys))]
    # Parts are written at least once: a worker of a killed run can finish a part the rerun also
    # computes (same model, same key, same values). Each row counts once; the extra copies are reported.
    dupes = int(df["_key"].duplicated().sum())
    df = df.drop_duplicates("_key", keep="first").set_index("_key")
    df = df.loc[qkeys[qkeys.isin(df.index)]].reset_index(drop=True)  # questions' order
    s = cfg.score
    df["model"] = s.student.path
    df["model_revision"] = s.student.revision or ""
    df["template_hash"] = plan.template_hash
    df["prompt_version"] = PROMPT_VERSION
    df["entropy_mode"] = s.entropy_mode
    df["logits"] = "raw"
    df["cache_key"] = plan.cache_key
    out = rundir.join(cfg.run_dir, "score")
    rundir.write_parquet(rundir.join(out, "scores.parquet"), df[df["status"] == "scored"])
    rundir.write_parquet(rundir.join(out, "skipped.parquet"), df[df["status"] == "skipped"])
    metrics = score_metrics(df)
    metrics["duplicate_part_rows_dropped"] = dupes
    metrics["missing"] = int(len(questions) - len(df))
    metrics["provenance"] = {
        "model": s.student.path,
        "model_revision": s.student.revision,
        "resolved_model_path": plan.model_path,
        "template_hash": plan.template_hash,
        "prompt_version": PROMPT_VERSION,
        "prompt_preset": plan.preset,
        "entropy_mode": s.entropy_mode,
        "top_k": s.top_k,
        "logits": "raw (no generation-config processors)",
        "engine": s.engine.backend,
        "dtype": resolve_dtype(s.student.dtype, s.engine.device),  # what "auto" means on this machine
        "cache_key": plan.cache_key,
    }
    return metrics


def run(cfg: RaycatConfig) -> dict:
    """The score stage: questions → entropy for every row (resuming under the cache key) → metrics."""
    import time

    import ray

    from raycat.data import questions as Q
    from raycat.data.prompts import template_hash
    from raycat.ray_env import ray_session, remote_call

    t0 = time.time()
    s = cfg.score
    tok = student_tokenizer(cfg)  # a missing model or chat template fails here, before Ray
    qpath = rundir.absolute(Q.path(cfg.run_dir))
    with ray_session(cfg.ray, cfg.run_dir):
        qsum = Q.stage_questions(cfg)
        n_sample = 0 if s.entropy_mode == "full" else s.deviation_sample
        key = cache_key(cfg, s.student.path, template_hash(tok, s.prompt.preset, s.prompt.system_prompt))
        parts = rundir.absolute(rundir.join(cache_root(cfg), "score", "parts", key))
        state = remote_call(ray.remote(num_cpus=1)(resume_state), qpath, parts, n_sample)
        plan = prepare_plan(cfg, tok, qsum["max_options"], state["sample_ids"])
        todo = state["questions"] - state["done"]
        progress.say(
            "score",
            f"{state['questions']} questions ({qsum['quarantined']} quarantined), {state['done']} already "
            f"scored under key {plan.cache_key}, {todo} to do",
        )
        written = 0
        if todo:
            actor_pool.check_columns("score", rundir.parquet_columns(qpath), INPUT_COLUMNS)
            rows = Q.dataset(cfg.run_dir)
            with progress.rows("scoring", todo) as advance:
                written = run_pipeline(plan, actor_pool.Pool.of(s.engine), rows, parts, on_rows=advance)
        wcfg = for_workers(cfg)
        metrics = remote_call(ray.remote(num_cpus=1)(finalize), wcfg, plan, qpath, parts)
    metrics["questions"] = qsum
    metrics["wall_s"] = round(time.time() - t0, 2)
    metrics["rows_this_run"] = written
    rundir.write_json(rundir.join(cfg.run_dir, "score", "metrics.json"), metrics)
    save_config(cfg, "score")
    return metrics
