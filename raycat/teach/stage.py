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

from raycat import progress
from raycat.config import RaycatConfig, TeacherConfig, cache_root, for_workers, save_config
from raycat.data.prompts import TEACH_PROMPT_VERSION, render_ids, teach_messages, teach_template_hash
from raycat.engines import actor_pool
from raycat.engines.base import Sampling, engine_kwargs, make_engine, resolve_dtype
from raycat.errors import MissingInputError, RaycatError, StageFailed
from raycat.storage import rowkey, rundir
from raycat.teach.core import accounting, attempt_schedule, band_accounting, resolve, teach_rows

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

    from raycat.storage import models

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
        "model_files": rundir.fingerprint(path) if t.api is None else "",  # a dir retrained in place is new
        "revision": t.model.revision,
        "dtype": resolve_dtype(t.model.dtype, t.engine.device) if t.api is None else t.model.dtype,
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


INPUT_COLUMNS = ("id", "row_hash", "question", "options", "category", "gold")


class TeachBatch(actor_pool.EngineActor):
    """Ray Data stage: one teacher engine per actor; renders, generates, verifies, retries."""

    REQUIRED_COLUMNS = INPUT_COLUMNS

    def __init__(self, plan: TeachPlan):
        self.plan, self.tok = plan, None
        if plan.api is not None:
            from raycat.engines.openai_http import OpenAITeacher

            api = dict(plan.api)
            api.pop("model")
            self.engine = OpenAITeacher(model=plan.model_path, **api)
            return
        from transformers import AutoTokenizer

        from raycat.storage import models

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
        out.insert(1, "row_hash", batch["row_hash"].to_numpy())
        out.insert(2, "teacher", p.name)
        out["gpu_seconds"] = out["engine_seconds"] * p.gpus
        return out[PART_COLUMNS]


def read_cache(cache_dir: str) -> pd.DataFrame:
    return rundir.read_parts(cache_dir, PART_COLUMNS)


def cache_dir(cfg: RaycatConfig, plan: TeachPlan) -> str:
    return rundir.join(cache_root(cfg), "teach", "cache", plan.cache_key)


def rows_path(run_dir: str) -> str:
    return rundir.join(run_dir, "teach", "rows.parquet")


def block_rows(cfg: RaycatConfig) -> int:
    """Rows per row group of teach/rows.parquet: one block of the teach pipeline, a few engine batches."""
    return max(4, 4 * max(t.engine.batch_size for t in cfg.teach.teachers))


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


def pool_keys(cfg: RaycatConfig) -> pd.DataFrame:
    """``_key, band`` of every training-pool row (the split's easy / medium / hard files)."""
    frames = []
    for band in ("easy", "medium", "hard"):
        path = rundir.join(cfg.run_dir, "split", f"{band}.parquet")
        if rundir.exists(path):
            f = rundir.read_parquet_columns(path, ["id", "row_hash"])
            frames.append(pd.DataFrame({"_key": rowkey.keys(f), "band": band}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["_key", "band"])


def prepare(cfg: RaycatConfig) -> int:
    """On a worker: the rows to teach (the chosen bands of the split, ``teach.limit`` applied) written
    to teach/rows.parquet; returns their count."""
    tc = cfg.teach
    frames = [
        rundir.read_parquet(rundir.join(cfg.run_dir, "split", f"{band}.parquet")).assign(band=band)
        for band in taught_bands(cfg)  # check_inputs found each of them
    ]
    rows = pd.concat(frames, ignore_index=True)
    if tc.limit is not None and tc.limit < len(rows):
        rows = rows.sample(n=tc.limit, random_state=tc.seed).sort_index().reset_index(drop=True)
    rundir.write_parquet(rows_path(cfg.run_dir), rows, row_group_size=block_rows(cfg))
    return int(len(rows))


def _cascade(rows: pd.DataFrame, results: list[pd.DataFrame]) -> pd.DataFrame:
    """Each row's result across the teachers, in cascade order: the first verified one, otherwise the
    last teacher that answered. ``results``: one frame per teacher, with ``_key`` (rowkey.keys)."""
    # Rank: verified rows by teacher order first, then the others by reverse teacher order.
    both = pd.concat(
        [r.assign(_rank=(r["status"] != "verified") * (10_000 - 2 * i) + i) for i, r in enumerate(results)],
        ignore_index=True,
    )
    best = both.sort_values("_rank", kind="stable").drop_duplicates("_key").set_index("_key")
    missing = rows["_key"][~rows["_key"].isin(best.index)]
    if len(missing):
        raise RaycatError(
            f"{len(missing)} row(s) have no teacher result (e.g. {missing.iloc[0].split(rowkey.SEP)[0]}); "
            "rerun `raycat teach` to finish them"
        )
    return best.loc[rows["_key"]].drop(columns=["_rank"]).reset_index(drop=True)


def finalize(cfg: RaycatConfig, plans: list[TeachPlan]) -> dict:
    """On a worker: pick each row's result across the cascade, apply teach.on_wrong, write cot/skipped
    Parquet; returns the metrics (``run`` writes them)."""
    tc = cfg.teach
    rows = rundir.read_parquet(rows_path(cfg.run_dir))
    rows["_key"] = rowkey.keys(rows)
    want = set(rows["_key"])
    pool = pool_keys(cfg)
    in_pool = set(pool["_key"])
    results, spent_pool = [], []
    for p in plans:  # each cache read once; only this content's rows (a reused id is a new row)
        res = read_cache(cache_dir(cfg, p))
        res = res.assign(_key=rowkey.keys(res))
        results.append(res.loc[res["_key"].isin(want)].drop_duplicates("_key"))
        # Every band, from this run or an earlier one sharing the cache: the per-band accounting.
        spent_pool.append(res.loc[res["_key"].isin(in_pool)].drop_duplicates("_key"))
    chosen = _cascade(rows, results).drop(columns=["id", "row_hash"])
    resolved = [
        resolve(st, resp, gold, tc.on_wrong)
        for st, resp, gold in zip(chosen["status"], chosen["response"], rows["gold"], strict=True)
    ]
    out = pd.concat([rows.drop(columns=["_key"]), chosen], axis=1)
    out["final_status"] = [f for f, _, _ in resolved]
    out["target"] = [t for _, t, _ in resolved]
    whys = zip([why for _, _, why in resolved], chosen["reason"], strict=True)
    out["reason"] = ["; ".join(x for x in pair if x) for pair in whys]
    out["teach_prompt_version"] = TEACH_PROMPT_VERSION
    out["teacher_template_hash"] = out["teacher"].map({p.name: p.template_hash for p in plans})
    d = rundir.join(cfg.run_dir, "teach")
    rundir.write_parquet(rundir.join(d, "cot.parquet"), out[out["target"].notna()])
    rundir.write_parquet(rundir.join(d, "skipped.parquet"), out[out["target"].isna()])
    # Accounting counts every attempt of every teacher that worked on these rows.
    spent = pd.concat(results, ignore_index=True)
    prices = {
        t.model.path: (t.price.prompt_per_mtok, t.price.completion_per_mtok, t.price.currency) if t.price else None
        for t in tc.teachers
    }
    metrics = {
        "rows": int(len(out)),
        "bands": tc.bands,
        "status": {s: int(n) for s, n in out["final_status"].value_counts().items()},
        "attempt_status": {s: int(n) for s, n in out["status"].value_counts().items()},
        "accounting": {
            **accounting(spent, prices),
            "pool_rows": int(len(pool)),
            **band_accounting(pool, pd.concat(spent_pool, ignore_index=True), taught_bands(cfg)),
        },
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


def run_teacher(t: TeacherConfig, plan: TeachPlan, rows, cache: str, on_rows, skip=()) -> int:
    """One teacher over ``rows`` (a Dataset or a frame), leaving out rows the ``skip`` rules mark done."""
    pool = actor_pool.Pool.of(t.engine, remote=plan.api is not None)
    return actor_pool.run("teach", rows, TeachBatch, plan, pool, cache, on_rows, skip=skip)


def run(cfg: RaycatConfig) -> dict:
    """The teach stage: every teacher of the cascade on the rows no earlier teacher solved, then
    ``teach.on_wrong`` and the accounting. Stops with an error when too many rows failed."""
    import time

    import ray

    from raycat.ray_env import ray_session, remote_call

    if cfg.teach is None:
        raise RaycatError("the config has no teach: section (teach.teachers lists the teacher models)")
    t0 = time.time()
    check_inputs(cfg)
    plans = [teacher_plan(cfg, t) for t in cfg.teach.teachers]  # tokenizers and keys fail here, before Ray
    wcfg = for_workers(cfg)
    path = rows_path(wcfg.run_dir)
    written = 0
    with ray_session(cfg.ray, cfg.run_dir):
        remote_call(ray.remote(num_cpus=1)(prepare), wcfg)
        # Rows a teacher already answered (same id and content) or an earlier teacher verified are
        # left out on the workers.
        for i, (t, plan) in enumerate(zip(cfg.teach.teachers, plans, strict=True)):
            skip = [(cache_dir(wcfg, plan), None)] + [(cache_dir(wcfg, p), "verified") for p in plans[:i]]
            n = remote_call(ray.remote(num_cpus=0.1)(actor_pool.todo_count), path, skip)
            progress.say(
                "teach",
                f"({i + 1}/{len(plans)}) {plan.name}: {n['rows']} rows, {sum(n['done'][1:])} solved by "
                f"earlier teachers, {n['done'][0]} cached, {n['todo']} to generate",
            )
            if n["todo"]:
                rows = actor_pool.parquet_dataset(path)
                with progress.rows("teaching", n["todo"]) as advance:
                    written += run_teacher(t, plan, rows, cache_dir(wcfg, plan), advance, skip)
        m = remote_call(ray.remote(num_cpus=1)(finalize), wcfg, plans)
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
