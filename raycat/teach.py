"""Teach stage: verified chain-of-thought for the chosen bands (default: hard), on vLLM actors.

Ray Data: rows → teacher actor pool (the teacher's chat template, generate, extract ``[[X]]``, verify
against gold, retry wrong/missing answers with a temperature schedule) → atomic Parquet parts in
``teach/cache/<key>/``. The key covers (teacher model, revision, dtype, prompt version and template,
sampling, retries) but not the bands, so a hard-only run and a distill-all run share results and no
question is generated twice for the same teacher config. Teachers form a cascade: a later one sees
only rows no earlier one solved. The pure loop/policy/accounting are in ``raycat.teach_core``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass

import pandas as pd

from raycat import engine_stage, progress, rundir
from raycat.config import RaycatConfig, TeacherConfig, save_config
from raycat.engine import Sampling, engine_kwargs, make_engine
from raycat.errors import MissingInputError, RaycatError, StageFailed
from raycat.prompts import TEACH_PROMPT_VERSION, render_ids, teach_messages, teach_template_hash
from raycat.teach_core import accounting, attempt_schedule, resolve, teach_rows

PART_COLUMNS = [
    "id",
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
    name: str  # the teacher as configured (hub id / registry name): provenance and accounting key
    model_path: str
    revision: str | None
    trust_remote_code: bool
    template_hash: str
    cache_key: str
    schedule: tuple[Sampling, ...]
    max_prompt_tokens: int
    gpus: float
    backend: str
    engine_kwargs: dict  # engine.engine_kwargs(...) for the backend
    api: dict | None = None  # ApiConfig fields for an HTTP teacher


def teacher_plan(cfg: RaycatConfig, t: TeacherConfig) -> TeachPlan:

    from raycat import models

    tc = cfg.teach
    if t.api is not None:  # the server applies its own chat template; we hash our prompt texts only
        path, th = t.api.model or t.model.path, teach_template_hash(None)
        env = t.api.api_key_env
        if env and not os.environ.get(env):  # found here, on the driver, before any actor starts
            raise RaycatError(
                f"environment variable {env} (teach api.api_key_env) is not set; export it before "
                "`raycat teach` (on a cluster: in the job's environment)"
            )
    else:
        path = models.portable(t.model.path)  # workers fetch the weights (models.local)
        tok = models.load_tokenizer(
            models.resolve(path),
            revision=t.model.revision,
            trust_remote_code=t.model.trust_remote_code,
            key=f"teach teacher {t.model.path!r}",
        )
        th = teach_template_hash(tok)
    s = tc.sampling
    schedule = tuple(
        attempt_schedule(Sampling(s.temperature, s.top_p, s.max_tokens, s.seed, s.n), tc.retries, tc.retry_temperatures)
    )
    # "kept": which attempt a row keeps (teach_core.teach_rows); cached rows were chosen by that rule.
    key_parts = {
        "model": t.model.path,
        "revision": t.model.revision,
        "dtype": t.model.dtype,
        "template": th,
        "prompt_version": TEACH_PROMPT_VERSION,
        "schedule": [asdict(x) for x in schedule],
        "kept": "best-then-first",
    }
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True).encode()).hexdigest()[:16]
    return TeachPlan(
        name=t.model.path,
        model_path=path,
        revision=t.model.revision,
        trust_remote_code=t.model.trust_remote_code,
        template_hash=th,
        cache_key=key,
        schedule=schedule,
        max_prompt_tokens=t.model.max_model_len - s.max_tokens,
        gpus=(
            t.engine.tensor_parallel_size * t.engine.pipeline_parallel_size
            if t.engine.device == "gpu" and t.api is None
            else 0
        ),
        api=t.api.model_dump() if t.api is not None else None,
        backend=t.engine.backend,
        engine_kwargs=engine_kwargs(t.model, t.engine),
    )


INPUT_COLUMNS = ("id", "question", "options", "category", "gold")


class TeachBatch(engine_stage.EngineActor):
    """Ray Data stage: one teacher engine per actor; renders, generates, verifies, retries."""

    REQUIRED_COLUMNS = INPUT_COLUMNS

    def __init__(self, plan: TeachPlan):
        self.plan, self.tok = plan, None
        if plan.api is not None:
            from raycat.teach_http import OpenAITeacher

            api = dict(plan.api)
            api.pop("model")
            self.engine = OpenAITeacher(model=plan.model_path, **api)
            return
        from transformers import AutoTokenizer

        from raycat import models

        path = models.local(plan.model_path)  # on this node: registry models and URIs are fetched here
        self.tok = AutoTokenizer.from_pretrained(path, revision=plan.revision, trust_remote_code=plan.trust_remote_code)
        self.engine = make_engine(plan.backend, path, need_full=False, **plan.engine_kwargs)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        p = self.plan
        rows = []
        for r in batch.to_dict(orient="records"):
            opts = list(r["options"])
            messages = teach_messages(r["question"], opts, r["category"])
            prompt, reason = messages, ""  # an HTTP teacher gets messages; the server renders them
            if self.tok is not None:
                prompt = render_ids(self.tok, messages)
                if len(prompt) >= p.max_prompt_tokens:
                    reason = (
                        f"prompt has {len(prompt)} tokens; model.max_model_len - sampling.max_tokens "
                        f"is {p.max_prompt_tokens}"
                    )
            rows.append({"prompt": prompt, "n_options": len(opts), "gold": r["gold"], "skip_reason": reason})
        res = teach_rows(self.engine, rows, list(p.schedule))
        out = pd.DataFrame(res)
        out.insert(0, "id", batch["id"].to_numpy())
        out.insert(1, "teacher", p.name)
        out["gpu_seconds"] = out["engine_seconds"] * p.gpus
        return out[PART_COLUMNS]


def read_cache(cache_dir: str) -> pd.DataFrame:
    return rundir.read_parts(cache_dir, PART_COLUMNS)


def run_teacher(t: TeacherConfig, plan: TeachPlan, todo: pd.DataFrame, cache_dir: str, on_rows) -> int:
    pool = engine_stage.Pool.of(t.engine, remote=plan.api is not None)
    return engine_stage.run("teach", todo, TeachBatch, plan, pool, cache_dir, on_rows)


def load_rows(cfg: RaycatConfig) -> tuple[pd.DataFrame, int]:
    """(rows to teach, training-pool size). Bands come from the split stage's Parquet files."""
    tc = cfg.teach
    bands = ["easy", "medium", "hard"] if tc.bands == "all" else list(tc.bands)
    frames = []
    for band in ("easy", "medium", "hard", "test"):
        path = rundir.join(cfg.run_dir, "split", f"{band}.parquet")
        if band in bands and not rundir.exists(path):
            raise MissingInputError(f"{path} not found: run `raycat split` with this config first")
        if rundir.exists(path):
            frames.append(rundir.read_parquet(path).assign(band=band))
    all_rows = pd.concat(frames, ignore_index=True)
    pool = int(all_rows["band"].isin(["easy", "medium", "hard"]).sum())
    rows = all_rows[all_rows["band"].isin(bands)].reset_index(drop=True)
    if tc.limit is not None and tc.limit < len(rows):
        rows = rows.sample(n=tc.limit, random_state=tc.seed).sort_index().reset_index(drop=True)
    return rows, pool


def finalize(cfg: RaycatConfig, rows: pd.DataFrame, pool: int, plans: list[TeachPlan]) -> dict:
    """Pick each row's result across the cascade, apply teach.on_wrong, write cot/skipped Parquet;
    returns the metrics (``run`` writes them)."""
    tc = cfg.teach
    results = {
        p.name: read_cache(rundir.join(cfg.run_dir, "teach", "cache", p.cache_key))
        .drop_duplicates("id")
        .set_index("id")
        for p in plans
    }
    picked = []
    for _, r in rows.iterrows():
        chosen = None
        for p in plans:  # first verified wins; otherwise the last teacher that answered
            res = results[p.name]
            if r["id"] in res.index:
                chosen = res.loc[r["id"]]
                if chosen["status"] == "verified":
                    break
        if chosen is None:
            raise RaycatError(f"row {r['id']} has no teacher result; rerun `raycat teach` to finish it")
        final, target, reason = resolve(chosen["status"], chosen["response"], r["gold"], tc.on_wrong)
        picked.append(
            {
                **r.to_dict(),
                **chosen.to_dict(),
                "id": r["id"],
                "final_status": final,
                "target": target,
                "reason": "; ".join(x for x in (reason, chosen["reason"]) if x),
            }
        )
    out = pd.DataFrame(picked)
    out["teach_prompt_version"] = TEACH_PROMPT_VERSION
    out["teacher_template_hash"] = out["teacher"].map({p.name: p.template_hash for p in plans})
    d = rundir.join(cfg.run_dir, "teach")
    rundir.write_parquet(rundir.join(d, "cot.parquet"), out[out["target"].notna()])
    rundir.write_parquet(rundir.join(d, "skipped.parquet"), out[out["target"].isna()])
    # Accounting counts every attempt of every teacher that worked on these rows.
    ids = set(rows["id"])
    spent = pd.concat([r.reset_index().loc[lambda f: f["id"].isin(ids)] for r in results.values()], ignore_index=True)
    prices = {
        t.model.path: (t.price.prompt_per_mtok, t.price.completion_per_mtok, t.price.currency) if t.price else None
        for t in tc.teachers
    }
    metrics = {
        "rows": int(len(out)),
        "bands": tc.bands,
        "status": {s: int(n) for s, n in out["final_status"].value_counts().items()},
        "attempt_status": {s: int(n) for s, n in out["status"].value_counts().items()},
        "accounting": accounting(spent, pool, prices),
        "provenance": {
            "prompt_version": TEACH_PROMPT_VERSION,
            "on_wrong": tc.on_wrong,
            "teachers": [
                {"model": p.name, "revision": p.revision, "cache_key": p.cache_key, "template_hash": p.template_hash}
                for p in plans
            ],
        },
    }
    failed = metrics["status"].get("failed", 0)
    metrics["failure_ratio"] = failed / len(out) if len(out) else 0.0
    return metrics


def run(cfg: RaycatConfig) -> dict:
    """The teach stage: every teacher of the cascade on the rows no earlier teacher solved, then
    ``teach.on_wrong`` and the accounting. Stops with an error when too many rows failed."""
    import time

    from raycat.ray_env import ray_session

    if cfg.teach is None:
        raise RaycatError("the config has no teach: section (teach.teachers lists the teacher models)")
    t0 = time.time()
    rows, pool = load_rows(cfg)
    engine_stage.check_columns("teach", rows, INPUT_COLUMNS)
    plans = [teacher_plan(cfg, t) for t in cfg.teach.teachers]
    solved: set[str] = set()
    written = 0
    for i, (t, plan) in enumerate(zip(cfg.teach.teachers, plans, strict=True)):
        cache = rundir.join(cfg.run_dir, "teach", "cache", plan.cache_key)
        have = read_cache(cache)
        todo = rows[~rows["id"].isin(solved) & ~rows["id"].isin(set(have["id"]))]
        progress.say(
            "teach",
            f"({i + 1}/{len(plans)}) {plan.name}: {len(rows)} rows, {len(solved)} solved by "
            f"earlier teachers, {len(rows) - len(solved) - len(todo)} cached, {len(todo)} to generate",
        )
        if len(todo):
            with ray_session(cfg.ray, cfg.run_dir), progress.rows("teaching", len(todo)) as advance:
                written += run_teacher(t, plan, todo, cache, on_rows=advance)
            have = read_cache(cache)
        solved |= set(have.loc[have["status"] == "verified", "id"]) & set(rows["id"])
    m = finalize(cfg, rows, pool, plans)
    m["wall_s"] = round(time.time() - t0, 2)
    m["rows_this_run"] = written
    rundir.write_json(rundir.join(cfg.run_dir, "teach", "metrics.json"), m)
    save_config(cfg, "teach")
    if m["failure_ratio"] > cfg.teach.max_failure_ratio:
        raise StageFailed(
            "teach",
            f"{m['status'].get('failed', 0)} of {m['rows']} rows failed "
            f"({m['failure_ratio']:.0%} > teach.max_failure_ratio); finished rows are kept, see "
            "teach/skipped.parquet",
            m,
        )
    return m
