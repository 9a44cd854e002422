"""The CLI's tables, printed on the driver: one per stage's result (``TABLES``), the study plan and its
cost plan. They only read the dicts the stages and the study planner return."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from raycat.config import RaycatConfig
from raycat.pipeline import STAGES
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


def greedy_auc_label(metrics: dict) -> str:
    """The paper's ≈ 0.73 is the decoded token's AUC of the full-vocabulary entropy: say so only then."""
    mode = (metrics.get("provenance") or {}).get("entropy_mode")
    if mode == "full":
        return "ROC AUC (decoded token, full-vocab entropy; paper ≈ 0.73)"
    return f"ROC AUC (decoded token, {mode or 'configured'} entropy; the paper's ≈ 0.73 is full-vocab)"


def score_table(metrics: dict, cfg: RaycatConfig) -> None:
    table = Table(title=Text(f"score — {cfg.score.student.path} ({cfg.score.entropy_mode} entropy)"))
    table.add_column("metric")
    table.add_column("value", justify="right")
    questions = metrics["questions"]
    rows = [
        (
            "questions read / valid / quarantined",
            f"{questions['rows_read']} / {questions['valid']} / {questions['quarantined']}",
        ),
        ("questions selected (data.limit / data.sample)", str(questions["selected"])),
        ("scored / skipped / IDK", f"{metrics['scored']} / {sum(metrics['skipped'].values())} / {metrics['idk']}"),
        ("accuracy (arg-max among options)", _fmt(metrics["accuracy"])),
        ("ROC AUC (−entropy → correct, arg-max among options)", _fmt(metrics["roc_auc"])),
        ("accuracy (decoded token, as the paper)", _fmt(metrics.get("accuracy_greedy"))),
        (greedy_auc_label(metrics), _fmt(metrics.get("roc_auc_greedy"))),
        ("mean entropy (nats)", _fmt(metrics.get("entropy", {}).get("mean"))),
        ("mean option mass", _fmt(metrics.get("option_mass", {}).get("mean"))),
    ]
    for name, deviation in metrics["deviation_from_full"].items():
        rows.append((f"{name}: mean |Δ| (n={deviation['n']})", _fmt(deviation["mean_abs_nats"])))
    for reason, n in metrics["skipped"].items():
        rows.append((f"skipped: {reason[:60]}", str(n)))
    rows.append(("rows this run / wall s", f"{metrics['rows_this_run']} / {metrics['wall_s']}"))
    for row in rows:
        _row(table, *row)
    console.print(table)
    if metrics["per_category"]:
        per_category = Table(title="per category (n ≥ 10)")
        for column in ("category", "n", "accuracy", "ROC AUC"):
            per_category.add_column(column)
        for category, entry in sorted(metrics["per_category"].items()):
            _row(per_category, category, str(entry["n"]), _fmt(entry["accuracy"]), _fmt(entry["roc_auc"]))
        console.print(per_category)
    console.print(Text(f"outputs: {rundir.join(cfg.run_dir, 'score')}/(scores.parquet, skipped.parquet, metrics.json)"))


def split_table(info: dict, cfg: RaycatConfig) -> None:
    low, high = info["thresholds"]
    table = Table(title=f"split — {info['method']} thresholds {_fmt(low)} / {_fmt(high)} nats")
    for column in ("band", "train", "test"):
        table.add_column(column)
    for band in ("easy", "medium", "hard"):
        _row(table, band, str(info["counts"][band]), str(info["test_counts"][band]))
    _row(table, "skipped", str(sum(info["skipped"].values())), "")
    console.print(table)
    console.print(Text(f"outputs: {rundir.join(cfg.run_dir, 'split')}/"))


def teach_table(metrics: dict, cfg: RaycatConfig) -> None:
    accounting = metrics["accounting"]
    table = Table(title="teach — verified chain-of-thought and teacher cost")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for status, n in sorted(metrics["status"].items()):
        _row(table, f"rows {status}", str(n))
    _row(table, "prompt / completion tokens", f"{accounting['prompt_tokens']} / {accounting['completion_tokens']}")
    for name, teacher in accounting["per_teacher"].items():
        _row(
            table,
            f"{name}: attempts / engine s / GPU s",
            f"{teacher['attempts']} / {teacher['engine_seconds']:.1f} / {teacher['gpu_seconds']:.1f}",
        )
        if "cost" in teacher:
            _row(table, f"{name}: cost", f"{teacher['cost']:.4f} {teacher['currency']}")
    for band, tokens in accounting.get("per_band", {}).items():
        taught = "taught" if tokens["taught"] else "not taught"
        _row(table, f"teacher tokens, {band} ({taught})", f"{tokens['tokens']:.0f}")
        if tokens["basis"] != "measured":
            _row(table, f"  {band}: basis", tokens["basis"])
    saving = accounting.get("saving")
    if saving and saving["saving_pct"] is not None:
        _row(table, f"teacher tokens saved vs every band ({saving['basis']})", f"{saving['saving_pct']:.1f}%")
    hard_only = accounting.get("hard_only_saving")
    if hard_only and hard_only["saving_pct"] is not None:
        label = f"teaching the hard band only would save ({hard_only['basis']})"
        _row(table, label, f"{hard_only['saving_pct']:.1f}%")
    failed = metrics["status"].get("failed", 0)
    if failed:
        # What was lost: failed rows have no CoT; a rerun retries them.
        _row(table, "rows failed (no CoT; a rerun retries them)", f"{failed} of {metrics['rows']}")
    skipped = metrics["status"].get("skipped", 0)
    if skipped:
        _row(
            table,
            "rows skipped (prompt too long for the teacher; teach/skipped.parquet)",
            f"{skipped} of {metrics['rows']}",
        )
    if metrics.get("failed_rows_retried"):
        _row(table, "failed rows of an earlier run, retried", str(metrics["failed_rows_retried"]))
    _row(table, "rows this run / wall s", f"{metrics['rows_this_run']} / {metrics['wall_s']}")
    console.print(table)


def train_table(summary: dict, cfg: RaycatConfig) -> None:
    table = Table(
        title=f"train — {summary['recipe']} ({summary['method']}, ZeRO-{summary['zero_stage']}, "
        f"{summary['num_workers']} worker(s))"
    )
    for column in ("phase", "status", "rows", "steps", "loss", "tok/s", "pad", "wall s"):
        table.add_column(column, no_wrap=True)
    for name, phase in summary["phases"].items():
        if phase["status"] == "empty":  # train.on_empty_phase=skip
            _row(table, name, "empty: not trained", "0", "0", "n/a", "n/a", "n/a", "0")
            continue
        _row(
            table,
            name,
            phase["status"],
            str(phase["examples"]),
            str(phase["steps"]),
            f"{phase['first_loss']:.3f}→{phase['last_loss']:.3f}" if phase["steps"] else "n/a",
            f"{phase['mean_tokens_per_s']:.0f}" if phase["mean_tokens_per_s"] else "n/a",
            f"{phase['padding_waste']:.0%}" if phase["padding_waste"] is not None else "n/a",
            f"{phase['wall_s']:.0f}",
        )
    console.print(table)
    for skipped in summary["skipped"]:
        console.print(Text(f"skipped in {skipped['phase']}: {skipped['n']} rows — {skipped['skip_reason']}"))
    console.print(Text(f"models: {rundir.join(cfg.run_dir, 'train', summary['recipe'])}/<phase>/model"))


def _accuracy_cell(cell: dict) -> str:
    if not cell["n"]:
        return "n/a"
    return f"{cell['accuracy']:.3f} [{cell['ci95'][0]:.2f}, {cell['ci95'][1]:.2f}] n={cell['n']}"


def eval_table(metrics: dict, cfg: RaycatConfig) -> None:
    table = Table(
        title=f"eval — accuracy on the {metrics.get('compared_rows', metrics['test_rows'])} held-out questions "
        f"every model answered, of {metrics['test_rows']} (95% bootstrap CI)"
    )
    for column in ("model", "overall", "easy", "medium", "hard", "band avg", "unparsed"):
        table.add_column(column, no_wrap=True)
    for name, model in metrics["models"].items():
        _row(
            table,
            name,
            _accuracy_cell(model["overall"]),
            *(_accuracy_cell(model["per_band"][b]) for b in ("easy", "medium", "hard")),
            _fmt(model.get("band_average")),
            str(model["overall"]["unparsed"]),
        )
    console.print(table)
    if metrics.get("paired"):
        paired = Table(title="paired differences, a − b on the same rows (paired bootstrap 95% CI)")
        for column in ("a", "b", "a − b", "95% CI"):
            paired.add_column(column, no_wrap=True)
        for pair in metrics["paired"]:
            if pair["diff"] is not None:
                low, high = pair["ci95"]
                _row(paired, pair["a"], pair["b"], f"{pair['diff']:+.3f}", f"[{low:+.3f}, {high:+.3f}]")
        console.print(paired)
    for name, why in metrics.get("not_trained", {}).items():
        console.print(Text(f"{name}: not trained, not evaluated: {why}"))


def report_line(out: dict, cfg: RaycatConfig | None) -> None:
    console.print(Text(f"report: {out['report_md']} and {out['report_html']} ({len(out['plots'])} plots)"))


# A stage's result -> its table; `raycat <stage>` and `raycat run` print each stage's as it finishes.
TABLES = {
    "score": score_table,
    "split": split_table,
    "teach": teach_table,
    "train": train_table,
    "eval": eval_table,
    "report": report_line,
}


def plan_table(rows: list[dict]) -> Table:
    table = Table(title="study plan — what each variant runs (done = finished with the same inputs)")
    for column in ["#", "variant", "seed", *STAGES, "estimate (from the config)"]:
        table.add_column(column)
    index = {f"{row['variant']} (seed {row['seed']})": i for i, row in enumerate(rows, 1)}
    for i, row in enumerate(rows, 1):
        cells = []
        for stage in STAGES:
            step = row["stages"][stage]
            cached = step["same_as"] and step["action"] == "run"
            cells.append(step["action"] + (f" (rows cached by #{index[step['same_as']]})" if cached else ""))
        estimate = row["estimate"]
        work = (
            f"{estimate['questions'] or 'all'} questions, <= {estimate['teach_rows_max'] or '?'} taught, "
            f"max steps {estimate['max_steps']}"
        )
        table.add_row(str(i), row["variant"], str(row["seed"]), *cells, work)
    return table


def _num(x, fmt: str = "{:.3g}") -> str:
    return "?" if x is None else fmt.format(x)


def _memory_cell(memory: dict) -> str:
    """Device memory per training worker, per phase, or why it is unknown."""
    if "error" in memory:
        return memory["error"]
    verdict = {True: "", False: " (does not fit)", None: " (host RAM unknown)"}
    return ", ".join(
        f"{p} {x['device_gib_per_worker']:.1f} GiB" + verdict[x["fits"]] for p, x in memory["phases"].items()
    )


def cost_table(rows: list[dict]) -> Table:
    """The scaling plan: per variant and stage, devices, memory per training worker, tokens, device-hours;
    every figure's basis in the last column."""
    table = Table(title="study cost plan — one run of each variant (basis: measured / extrapolated / config)")
    for column in ["#", "stage", "model", "devices", "memory/worker", "tokens", "device-hours", "basis"]:
        table.add_column(column, overflow="fold")
    for i, row in enumerate(rows, 1):
        for name, stage in row["costs"]["stages"].items():
            if stage["device"] == "api":
                devices = "api"
            else:
                devices = f"{_num(stage.get('devices'), '{:g}')} {stage['device'].upper()}"
            table.add_row(
                str(i) if name == "score" else "",
                name,
                f"{stage['model']} ({_num(stage.get('params') and stage['params'] / 1e9)}B)",
                devices,
                _memory_cell(row["memory"]) if name == "train" else "",
                _num(stage["tokens"]["value"]),
                _num(stage["device_hours"]["value"]),
                f"tokens: {stage['tokens']['basis']}; hours: {stage['device_hours']['basis']}",
            )
        total = row["costs"]["device_hours_total"]
        table.add_row("", "total", "", "", "", "", _num(total["value"]), total["basis"], end_section=True)
    return table
