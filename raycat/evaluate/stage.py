"""Eval stage: greedy answers of the base student and of every trained phase on the held-out test set.

Ray Data pipeline per model: test rows (eval/rows.parquet, read on the workers) → one vLLM actor
(the model under test; its GPUs are freed when the pool ends) → render with the student's chat
template and the prompt the model was trained on (answer or CoT) → greedy, seeded generation →
``[[X]]`` extraction shared with the teacher stage → atomic Parquet parts under
``eval/<model>/parts/<key>/`` (key: model content hash, prompt kind, generation budget). Reruns
resume per row (same id and content). Bands are the student's own pre-training entropy bands.
Metrics (pure): accuracy overall / per band / per category with seeded bootstrap CIs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pandas as pd

from raycat import progress
from raycat.config import ModelConfig, RaycatConfig, cache_root, for_workers, save_config
from raycat.data.answers import extract_answer
from raycat.data.prompts import TRAIN_PROMPT_VERSION, render_ids, train_messages
from raycat.engines import actor_pool
from raycat.engines.base import Sampling, engine_kwargs, make_engine, resolve_dtype
from raycat.errors import MissingInputError
from raycat.recipes import RECIPES
from raycat.storage import rowkey, rundir

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


INPUT_COLUMNS = ("id", "row_hash", "question", "options", "category", "gold", "band")


@dataclass(frozen=True)
class EvalTarget:
    """One model under test and everything its actors need."""

    name: str  # "base" or "<recipe>/<phase>"
    path: str  # the model the engine loads: hub id, local dir or URI (fetched on the worker's node)
    adapter: str | None  # a LoRA adapter dir served on top of ``path`` (vLLM's LoRA support)
    kind: str  # "answer" | "cot": the prompt it was trained on
    key: str  # cache key: model content + prompt + generation budget
    max_tokens: int  # generation budget for this prompt kind
    max_prompt_tokens: int  # eval.max_model_len - max_tokens
    seed: int
    backend: str
    engine_kwargs: dict  # engine.engine_kwargs(...) for the backend


def bootstrap_ci(correct: np.ndarray, resamples: int, seed: int, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of a mean of per-row values (0/1 outcomes, or paired differences of them);
    (nan, nan) for an empty set."""
    x = np.asarray(correct, dtype=np.float64)
    if len(x) == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), size=(resamples, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int, seed: int, level: float = 0.95) -> dict:
    """Accuracy difference a − b on the same rows, with a paired percentile bootstrap CI (the rows are
    resampled once for both models, so the CI reflects the models' disagreement, not the row draw twice)."""
    x = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if len(x) == 0:
        return {"n": 0, "diff": None, "ci95": [None, None]}
    lo, hi = bootstrap_ci(x, resamples, seed, level)  # the bootstrap of the per-row differences
    return {"n": int(len(x)), "diff": float(x.mean()), "ci95": [lo, hi]}


def accuracy_table(df: pd.DataFrame, resamples: int, seed: int) -> dict:
    """Accuracy with CI overall, per band and per category (categories with n >= 10)."""

    def one(part: pd.DataFrame) -> dict:
        c = part["correct"].to_numpy(dtype=bool)
        lo, hi = bootstrap_ci(c, resamples, seed)
        return {
            "n": int(len(c)),
            "accuracy": float(c.mean()) if len(c) else None,
            "ci95": [lo, hi],
            "unparsed": int(part["extracted"].isna().sum()),
        }

    out = {"overall": one(df), "per_band": {}, "per_category": {}}
    for band in ("easy", "medium", "hard"):
        out["per_band"][band] = one(df[df["band"] == band])
    # The unweighted mean of the band accuracies: comparable across test sets with other band mixes.
    accs = [out["per_band"][b]["accuracy"] for b in ("easy", "medium", "hard")]
    out["band_average"] = float(np.mean(accs)) if all(a is not None for a in accs) else None
    for cat, part in df.groupby("category"):
        if len(part) >= 10:
            out["per_category"][str(cat)] = one(part)
    return out


class EvalBatch(actor_pool.EngineActor):
    """Ray Data stage: one engine per actor for the model under test; greedy answers, extracted and checked."""

    REQUIRED_COLUMNS = INPUT_COLUMNS

    def __init__(self, plan: EvalTarget):
        from transformers import AutoTokenizer

        from raycat.storage import models

        self.t = plan
        kw = plan.engine_kwargs
        path = models.local(plan.path)  # on this node: trained models in an s3:// run dir are fetched here
        self.tok = AutoTokenizer.from_pretrained(
            path, revision=kw["revision"], trust_remote_code=kw["trust_remote_code"]
        )
        adapter = models.local(plan.adapter) if plan.adapter else None
        self.engine = make_engine(plan.backend, path, need_full=False, lora_adapter=adapter, **kw)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows, prompts, idx = [], [], []
        for i, r in enumerate(batch.to_dict(orient="records")):
            opts = list(r["options"]) if r["options"] is not None else []
            ids = render_ids(self.tok, train_messages(r["question"], opts, r["category"] or "", self.t.kind))
            row = {
                "id": r["id"],
                "row_hash": r["row_hash"],
                "model": self.t.name,
                "kind": self.t.kind,
                "text": None,
                "extracted": None,
                "correct": False,
                "completion_tokens": 0,
                "finish_reason": None,
                "band": r["band"],
                "category": r["category"],
                "skip_reason": "",
                "_n": len(opts),
                "_gold": r["gold"],
            }
            if len(ids) > self.t.max_prompt_tokens:
                row["skip_reason"] = f"prompt has {len(ids)} tokens > eval.max_model_len - max_tokens"
            else:
                prompts.append(ids)
                idx.append(i)
            rows.append(row)
        gens = self.engine.generate(prompts, Sampling(0.0, 1.0, self.t.max_tokens, self.t.seed, 1)) if prompts else []
        for i, g in zip(idx, gens, strict=True):
            r = rows[i]
            r["text"], r["completion_tokens"], r["finish_reason"] = g.text, g.completion_tokens, g.finish_reason
            r["extracted"] = extract_answer(g.text, r["_n"])
            r["correct"] = r["extracted"] is not None and r["extracted"] == r["_gold"]
        return pd.DataFrame(rows)[PART_COLUMNS]


def _dir_hash(path: str) -> str:
    """Content hash of a model dir (local or URI): file names and sizes, and the JSON files' contents
    (cheap, and changes on retrain)."""
    h = hashlib.sha256()
    for f in rundir.list_files(path, ""):
        name = f.rsplit("/", 1)[-1]
        h.update(name.encode())
        h.update(str(rundir.size(f)).encode())
        if name.endswith(".json"):
            h.update(rundir.read_bytes(f))
    return h.hexdigest()[:16]


def targets(cfg: RaycatConfig, recipes: list[str]) -> list[EvalTarget]:
    """The base student plus every finished phase of each recipe, in training order. LoRA phases are
    served as adapters on the base student; full phases load their own model dir."""
    from raycat.storage import models

    ec, st = cfg.eval, cfg.score.student
    base = models.portable(st.path)
    out = []

    def add(name: str, path: str, adapter: str | None, kind: str, content: str, revision: str | None) -> None:
        budget = ec.max_tokens_answer if kind == "answer" else ec.max_tokens_cot
        key = hashlib.sha256(
            json.dumps(
                [
                    content,
                    kind,
                    budget,
                    ec.max_model_len,
                    ec.seed,
                    TRAIN_PROMPT_VERSION,
                    resolve_dtype(ec.dtype, ec.engine.device),
                ]
            ).encode()
        ).hexdigest()[:16]
        model = ModelConfig(
            path=path,
            revision=revision,
            dtype=ec.dtype,
            max_model_len=ec.max_model_len,
            trust_remote_code=st.trust_remote_code,
        )
        out.append(
            EvalTarget(
                name,
                path,
                adapter,
                kind,
                key,
                max_tokens=budget,
                max_prompt_tokens=ec.max_model_len - budget,
                seed=ec.seed,
                backend=ec.engine.backend,
                engine_kwargs=engine_kwargs(model, ec.engine),
            )
        )

    if ec.include_base:
        add("base", base, None, ec.base_prompt, f"base:{st.path}:{st.revision}:{rundir.fingerprint(base)}", st.revision)
    for recipe in recipes:
        for phase in RECIPES[recipe]:
            pdir = rundir.join(cfg.run_dir, "train", recipe, phase.name)
            done = rundir.join(pdir, "done.json")
            if not rundir.exists(done):
                raise MissingInputError(f"{done} not found: run `raycat train` (train.recipe={recipe}) first")
            state = rundir.read_json(done)
            if state.get("empty"):  # train.on_empty_phase=skip: no model to evaluate (see empty_phases)
                continue
            model = rundir.absolute(rundir.join(pdir, "model"))
            content = state["hash"] + _dir_hash(model)
            if rundir.exists(rundir.join(model, "adapter_config.json")):
                add(f"{recipe}/{phase.name}", base, model, phase.target, content, st.revision)
            else:
                add(f"{recipe}/{phase.name}", model, None, phase.target, content, None)
    return out


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
    """On a worker: the held-out rows (``eval.limit`` applied) written to eval/rows.parquet, in row
    groups of a few engine batches (the blocks of the eval pipeline); returns their count."""
    df = rundir.read_parquet(rundir.join(cfg.run_dir, "split", "test.parquet"))
    if cfg.eval.limit is not None and cfg.eval.limit < len(df):
        df = df.sample(n=cfg.eval.limit, random_state=cfg.eval.seed).sort_index()
    df = df.reset_index(drop=True)
    rundir.write_parquet(rows_path(cfg.run_dir), df, row_group_size=max(4, 4 * cfg.eval.engine.batch_size))
    return int(len(df))


def read_parts(parts_dir: str) -> pd.DataFrame:
    return rundir.read_parts(parts_dir, PART_COLUMNS)


def run_target(cfg: RaycatConfig, t: EvalTarget, rows, parts_dir: str, on_rows) -> int:
    """One model over ``rows`` (a Dataset or a frame), leaving out rows it already answered."""
    pool = actor_pool.Pool.of(cfg.eval.engine)
    return actor_pool.run("eval", rows, EvalBatch, t, pool, parts_dir, on_rows, skip=[(parts_dir, None)])


def parts_dir(cfg: RaycatConfig, t: EvalTarget) -> str:
    return rundir.join(cache_root(cfg), "eval", t.name.replace("/", "__"), "parts", t.key)


SINGLE_TOKEN_BASE = "base (single-token, from score)"


def finalize(cfg: RaycatConfig, done: list[EvalTarget]) -> dict:
    """On a worker: every model's answers on eval/rows.parquet merged into eval.parquet; the metrics.

    Every model is compared on the same rows: a row that any model could not be asked (its prompt too
    long for that model's generation budget) is left out of every model's accuracy and counted. The
    base student is also reported in the single-token format it was scored in (its score-stage answer,
    no [[X]] format to learn), so the baseline is not 0 by construction."""
    ec = cfg.eval
    rows = rundir.read_parquet(rows_path(cfg.run_dir))
    rows["_key"] = rowkey.keys(rows)
    want = set(rows["_key"])
    got: dict[str, pd.DataFrame] = {}
    for t in done:  # only this content's rows: an id reused by another data.path is a new row
        g = read_parts(parts_dir(cfg, t))
        g = g.assign(_key=rowkey.keys(g)).loc[lambda f: f["_key"].isin(want)].drop_duplicates("_key")
        got[t.name] = g.set_index("_key")
    excluded: dict[str, str] = {}
    for name, g in got.items():
        for key, why in g.loc[g["skip_reason"].fillna("") != "", "skip_reason"].items():
            excluded.setdefault(key, f"{name}: {why}")
        for key in want - set(g.index):
            excluded.setdefault(key, f"{name}: no answer recorded")
    common = [k for k in rows["_key"] if k not in excluded]
    frames, metrics, correct = [], {}, {}
    if ec.include_base and "correct" in rows:
        r = rows.set_index("_key").loc[common]
        single = pd.DataFrame({"correct": r["correct"].astype(bool), "band": r["band"], "category": r["category"]})
        single["extracted"] = r["predicted"]
        metrics[SINGLE_TOKEN_BASE] = {
            **accuracy_table(single, ec.bootstrap_resamples, ec.seed),
            "kind": "single-token (the score stage's answer: arg-max among the option tokens)",
            "path": cfg.score.student.path,
            "adapter": None,
            "cache_key": None,
            "skipped": 0,
            "mean_completion_tokens": 1.0,
        }
        correct[SINGLE_TOKEN_BASE] = single["correct"].to_numpy()
    for t in done:
        g = got[t.name]
        frames.append(g.reset_index(drop=True).assign(compared=g.index.isin(common)))
        scored = g.loc[[k for k in common if k in g.index]]
        correct[t.name] = scored["correct"].astype(bool).to_numpy()
        metrics[t.name] = {
            **accuracy_table(scored, ec.bootstrap_resamples, ec.seed),
            "kind": t.kind,
            "path": t.path,
            "adapter": t.adapter,
            "cache_key": t.key,
            "skipped": int((g["skip_reason"].fillna("") != "").sum()),
            "mean_completion_tokens": float(scored["completion_tokens"].mean()) if len(scored) else None,
        }
    names = list(metrics)
    paired = [
        {"a": a, "b": b, **paired_bootstrap(correct[a], correct[b], ec.bootstrap_resamples, ec.seed)}
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    ]
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=PART_COLUMNS)
    rundir.write_parquet(rundir.join(cfg.run_dir, "eval", "eval.parquet"), out)
    reasons = pd.Series(list(excluded.values()), dtype=str)
    return {
        "test_rows": int(len(rows)),
        "compared_rows": len(common),
        "excluded_rows": {
            "n": len(excluded),
            "rule": "a row any model could not be asked is left out of every model's accuracy (paired comparison)",
            "reasons": reasons.str.split(":").str[0].value_counts().to_dict() if len(reasons) else {},
        },
        "models": metrics,
        "paired": paired,
        "provenance": {
            "prompt_version": TRAIN_PROMPT_VERSION,
            "greedy": True,
            "seed": ec.seed,
            "bootstrap_resamples": ec.bootstrap_resamples,
            "bands": "the student's pre-training entropy bands (split thresholds)",
            "paired": "a − b on the same rows; paired percentile bootstrap 95% CI",
        },
    }


def run(cfg: RaycatConfig, recipes: list[str] | None = None) -> dict:
    """The eval stage: the base student and every finished phase of ``recipes`` on the held-out rows."""
    import time

    import ray

    from raycat.ray_env import ray_session, remote_call

    t0 = time.time()
    check_inputs(cfg)
    tgts = targets(cfg, recipes or [cfg.train.recipe])
    wcfg = for_workers(cfg)
    path = rows_path(wcfg.run_dir)
    # One model at a time: each pool's engines end (freeing their GPUs) before the next model loads.
    with ray_session(cfg.ray, cfg.run_dir):
        n_rows = remote_call(ray.remote(num_cpus=1)(prepare), wcfg)
        for t in tgts:
            parts = parts_dir(wcfg, t)
            n = remote_call(ray.remote(num_cpus=0.1)(actor_pool.todo_count), path, [(parts, None)])
            progress.say("eval", f"{t.name} ({t.kind} prompt): {n_rows} test rows, {n['todo']} to do")
            if n["todo"]:
                rows = actor_pool.parquet_dataset(path)
                with progress.rows(f"eval {t.name}", n["todo"]) as advance:
                    run_target(wcfg, t, rows, parts, on_rows=advance)
        m = remote_call(ray.remote(num_cpus=1)(finalize), wcfg, tgts)
    m["not_trained"] = empty_phases(cfg, recipes or [cfg.train.recipe])
    m["wall_s"] = round(time.time() - t0, 2)
    rundir.write_json(rundir.join(cfg.run_dir, "eval", "metrics.json"), m)
    save_config(cfg, "eval")
    return m
