"""study.md's sections on the method's effect (``recipe_effect``): the signal check, recipe against
recipe with paired intervals and power, and teacher tokens per recipe. Empty for a one-recipe study."""

from __future__ import annotations


def _f(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _ci(pair) -> str:
    low, high = pair
    return f"[{_f(low)}, {_f(high)}]"


def sections(report: dict) -> list[list[str]]:
    if not report.get("recipe_paired") and not report.get("signal"):
        return []
    return [_signal(report["signal"]), _paired(report["recipe_paired"]), _costs(report), _plot(report)]


def _signal(signals: list[dict]) -> list[str]:
    lines = [
        "## Signal check (held-out rows)",
        "",
        "Does the student's entropy separate its right from its wrong answers, and is it off the ceiling? "
        "ROC AUC of −entropy for a correct score-stage answer, percentile bootstrap CI over rows.",
        "",
        "| variant | seed | rows | ROC AUC | 95% CI | score-stage accuracy (all held-out rows) "
        "| base accuracy (rows eval compared) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in signals:
        lines.append(
            f"| {s['variant']} | {s['seed']} | {s['rows']} | {_f(s['auc'])} | {_ci(s['auc_ci95'])} | "
            f"{_f(s['score_accuracy'])} | {_f(s['base_accuracy'])} |"
        )
    return lines


def _paired(paired: list[dict]) -> list[str]:
    lines = [
        "## Recipe against recipe (final models, same held-out rows, seeds pooled)",
        "",
        "diff = accuracy of a − accuracy of b on the rows both answered, seeds pooled. 95% CI, seeds × rows: "
        "a bootstrap that redraws the training seeds and the test rows (the interval for the recipes); rows: "
        "one that redraws the test rows only, each row's differences under every seed together (the interval "
        "for these trained models). MDE: the smallest difference the design detects with 80 % power at the "
        "5 % level (≈ 2.8 × the seeds × rows SE), estimated from these runs.",
        "",
        "| variant | a | b | seeds | rows | diff | 95% CI, seeds × rows | 95% CI, rows | MDE (80 %) | per seed "
        "| hard band diff [seeds × rows CI] |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in paired:
        per_seed = ", ".join(f"{s['seed']}: {_f(s['diff'])}" for s in p["per_seed"])
        hard = p["per_band"].get("hard")
        hard_cell = f"{_f(hard['diff'])} {_ci(hard['ci95_seeds'])}" if hard else "–"
        lines.append(
            f"| {p['variant']} | {p['a']} | {p['b']} | {p['seeds']} | {p['n']} | {_f(p['diff'])} | "
            f"{_ci(p['ci95_seeds'])} | {_ci(p['ci95'])} | {_f(p['mde80'])} | {per_seed} | {hard_cell} |"
        )
    return lines


def _costs(report: dict) -> list[str]:
    lines = ["## Teacher tokens per recipe", "", "| variant | recipe | teacher tokens | basis |", "|---|---|---|---|"]
    for c in report["recipe_costs"]:
        tokens = "–" if c["teacher_tokens"] is None else f"{c['teacher_tokens']:.0f}"
        lines.append(f"| {c['variant']} | {c['recipe']} | {tokens} | {'; '.join(c['basis'])} |")
    return lines


def _plot(report: dict) -> list[str]:
    plot = report.get("recipe_plot")
    if not plot:
        return []
    return ["## Accuracy per recipe", "", f"![accuracy per recipe]({plot['file']})", "", f"{plot['basis']}."]
