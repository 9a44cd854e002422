"""Report: ``report/report.md``, a self-contained ``report/report.html`` and ``report/plots/*.png``,
built only from the run directory (so ``raycat report runs/<id>`` can rebuild it any time).

Every number names the file it comes from; plots are drawn with matplotlib's Agg backend (no display).
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pandas as pd

from raycat.errors import MissingInputError
from raycat.storage import rundir

BANDS = ("easy", "medium", "hard")
# What the stages write that the report reads; a run directory with none of them has nothing to report.
OUTPUTS = (
    "score/metrics.json",
    "score/scores.parquet",
    "split/thresholds.json",
    "teach/metrics.json",
    "eval/metrics.json",
)


def _read(run: str, *parts: str):
    return rundir.read_json_if_exists(rundir.join(run, *parts))


def _figure(width: float, height: float):
    """(figure, axes) on matplotlib's Agg backend, which ``plots`` selects (no display)."""
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def metric_rows(scores: pd.DataFrame) -> pd.DataFrame:
    """The rows score/metrics.json's accuracy and roc_auc are computed from (scored, not "I don't
    know"): the plots show exactly these."""
    idk = scores["idk"].astype(bool) if "idk" in scores else pd.Series(False, index=scores.index)
    return scores[scores["entropy"].notna() & ~idk]


def plots(run: str) -> dict[str, bytes]:
    """PNG bytes by file name, in the report's order; a plot whose stage has not run is absent."""
    import matplotlib

    matplotlib.use("Agg")
    return {
        **_entropy_plots(run, _read(run, "split", "thresholds.json")),
        **_accuracy_plot(_read(run, "eval", "metrics.json")),
        **_teacher_tokens_plot(_read(run, "teach", "metrics.json")),
        **_loss_plot(_loss_curves(run)),
    }


def _entropy_plots(run: str, thresholds: dict | None) -> dict[str, bytes]:
    """The entropy histogram by correctness, and the ROC curve where the rows are neither all right nor all
    wrong."""
    scores_path = rundir.join(run, "score", "scores.parquet")
    if not rundir.exists(scores_path):
        return {}
    # Three columns, not the questions' text: a million-row corpus is ~10 MB here.
    wanted = [c for c in ("entropy", "correct", "idk") if c in rundir.parquet_columns(scores_path)]
    scored = metric_rows(rundir.read_parquet_columns(scores_path, wanted))
    out = {"entropy_histogram.png": _entropy_histogram(scored, thresholds)}
    correct = scored["correct"].astype(bool).to_numpy()
    if 0 < correct.sum() < len(correct):
        out["roc.png"] = _roc(correct, -scored["entropy"].to_numpy())
    return out


def _entropy_histogram(scored: pd.DataFrame, thresholds: dict | None) -> bytes:
    fig, ax = _figure(6, 3.5)
    lo, hi = float(scored["entropy"].min()), float(scored["entropy"].max())
    bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 30)
    for correct, color, label in ((True, "tab:green", "correct"), (False, "tab:red", "wrong")):
        entropies = scored.loc[scored["correct"].astype(bool) == correct, "entropy"]
        ax.hist(entropies, bins=bins, alpha=0.6, color=color, label=label)
    if thresholds:
        for t, name, ls in zip(thresholds["thresholds"], ("easy | medium", "medium | hard"), ("--", ":"), strict=True):
            ax.axvline(t, color="k", ls=ls, lw=1, label=f"{name} at {t:.3f}")
    ax.set_xlabel("answer-token entropy (nats)")
    ax.set_ylabel("questions")
    ax.legend()
    ax.set_title("Student entropy by correctness")
    return _png(fig)


def _roc(correct: np.ndarray, confidence: np.ndarray) -> bytes:
    from sklearn.metrics import roc_auc_score, roc_curve

    fpr, tpr, _ = roc_curve(correct, confidence)
    fig, ax = _figure(4, 4)
    ax.plot(fpr, tpr, label=f"AUC = {roc_auc_score(correct, confidence):.3f}")
    ax.plot([0, 1], [0, 1], "k:", lw=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC: −entropy → correct")
    ax.legend(loc="lower right")
    return _png(fig)


def _accuracy_plot(eval_metrics: dict | None) -> dict[str, bytes]:
    """Accuracy with its 95% CI per model, overall and per band; an empty band is drawn as 0."""
    if not eval_metrics or not eval_metrics["models"]:
        return {}
    names = list(eval_metrics["models"])
    groups = ["overall", *BANDS]
    fig, ax = _figure(1.2 + 1.6 * len(groups), 3.8)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        model = eval_metrics["models"][name]
        cells = [model["overall"], *(model["per_band"][b] for b in BANDS)]
        acc = [c["accuracy"] if c["n"] else 0.0 for c in cells]
        err = [
            [max(0.0, a - c["ci95"][0]) if c["n"] else 0 for a, c in zip(acc, cells, strict=True)],
            [max(0.0, c["ci95"][1] - a) if c["n"] else 0 for a, c in zip(acc, cells, strict=True)],
        ]
        ax.bar(np.arange(len(groups)) + i * width, acc, width, yerr=err, capsize=2, label=name)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups)
    ax.set_ylabel("accuracy (95% CI)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("Held-out accuracy by student entropy band")
    return {"accuracy_by_band.png": _png(fig)}


def _teacher_tokens_plot(teach_metrics: dict | None) -> dict[str, bytes]:
    """Teacher tokens per band, measured and estimated, where the teach stage computed a saving."""
    saving = teach_metrics and teach_metrics["accounting"].get("saving")
    if not saving or saving["saving_pct"] is None:
        return {}
    per_band = teach_metrics["accounting"]["per_band"]
    fig, ax = _figure(4.5, 3.2)
    names = list(per_band)
    measured = [per_band[b]["measured_tokens"] for b in names]
    estimated = [per_band[b]["estimated_tokens"] for b in names]
    ax.bar(names, measured, color="tab:blue", label="measured")
    ax.bar(names, estimated, bottom=measured, color="tab:gray", label="estimated")
    ax.set_xticks(range(len(names)), [f"{b}\n({'taught' if per_band[b]['taught'] else 'not taught'})" for b in names])
    ax.set_ylabel("teacher tokens")
    ax.legend(fontsize=7)
    ax.set_title(f"Teacher tokens: {saving['saving_pct']:.1f}% saved ({saving['basis']})")
    return {"teacher_tokens.png": _png(fig)}


def _loss_plot(curves: list[tuple[str, list[int], list[float]]]) -> dict[str, bytes]:
    if not curves:
        return {}
    fig, ax = _figure(6, 3.5)
    for label, steps, loss in curves:
        ax.plot(steps, loss, label=label)
    ax.set_xlabel("optimizer step (phases concatenated)")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("Training loss")
    return {"loss_curves.png": _png(fig)}


def run_recipes(run: str) -> list[str]:
    """The recipes of this run: those its manifest.json names (an earlier run's recipe dirs in the same
    run dir are not this run's), or, without a manifest (stages run one by one), every train/ dir."""
    trained = rundir.list_dirs(rundir.join(run, "train"))
    manifest = rundir.read_json_if_exists(rundir.join(run, "manifest.json")) or {}
    if "recipes" not in manifest:
        return trained
    return [recipe for recipe in manifest["recipes"] if recipe in trained]


def _loss_curves(run: str) -> list[tuple[str, list[int], list[float]]]:
    out = []
    for recipe in run_recipes(run):
        offset = 0
        for phase in ("phase1", "phase2", "phase3"):
            history = (_read(run, "train", recipe, phase, "metrics.json") or {}).get("history")
            # Absent, or an empty phase (train.on_empty_phase=skip).
            if not history:
                continue
            out.append((f"{recipe}/{phase}", [offset + h["step"] for h in history], [h["loss"] for h in history]))
            offset += history[-1]["step"]
    return out


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _fmt_acc(c: dict) -> str:
    if not c["n"]:
        return "–"
    return f"{c['accuracy']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}] (n={c['n']})"


def markdown(run: str, images: list[str]) -> str:
    """report.md: a section per stage that has run, each number next to the file and key it comes from."""
    sections = [
        _score_section(_read(run, "score", "metrics.json"), _read(run, "split", "thresholds.json")),
        _eval_section(_read(run, "eval", "metrics.json")),
        _teach_section(_read(run, "teach", "metrics.json")),
        _train_section(run, run_recipes(run)),
        _stages_section(_read(run, "manifest.json")),
        _plots_section(images),
        _provenance_section(run),
    ]
    # Each section is its markdown lines, or [] where its stage has not run.
    return "\n".join([f"# raycat report — `{run}`", "", *(line for lines in sections for line in lines)])


def _paper_auc_note(score_metrics: dict) -> str:
    """The paper's ≈ 0.73 is the decoded token's AUC of the full-vocabulary entropy."""
    mode = (score_metrics.get("provenance") or {}).get("entropy_mode")
    if mode == "full":
        return "full-vocabulary entropy: the paper's ≈ 0.73 is this one"
    return f"{mode or 'configured'} entropy; the paper's ≈ 0.73 is with the full-vocabulary entropy"


def _score_section(score_metrics: dict | None, thresholds: dict | None) -> list[str]:
    if not score_metrics:
        return []
    lines = [
        "## Complexity estimate (student entropy)",
        "",
        "| metric | value | source |",
        "|---|---|---|",
        f"| questions scored | {score_metrics['scored']} | score/metrics.json `scored` |",
        f"| student accuracy, arg-max among the option tokens | {_num(score_metrics['accuracy'])} | "
        "score/metrics.json `accuracy` |",
        f"| ROC AUC (−entropy → correct), arg-max among the option tokens | {_num(score_metrics['roc_auc'])} | "
        "score/metrics.json `roc_auc` |",
        f"| student accuracy, decoded token (invalid and IDK rows dropped, as the paper) | "
        f"{_num(score_metrics.get('accuracy_greedy'))} | score/metrics.json `accuracy_greedy` |",
        f"| ROC AUC, decoded token ({_paper_auc_note(score_metrics)}) | {_num(score_metrics.get('roc_auc_greedy'))} | "
        "score/metrics.json `roc_auc_greedy` |",
    ]
    if thresholds:
        low, high = thresholds["thresholds"]
        counts, test_counts = thresholds["counts"], thresholds["test_counts"]
        lines += [
            f"| band thresholds (nats) | {low:.4f} / {high:.4f} | split/thresholds.json `thresholds` |",
            f"| train rows easy / medium / hard | {counts['easy']} / {counts['medium']} / {counts['hard']} | "
            "split/thresholds.json `counts` |",
            f"| test rows easy / medium / hard | {test_counts['easy']} / {test_counts['medium']} / "
            f"{test_counts['hard']} | split/thresholds.json `test_counts` |",
        ]
    return [*lines, ""]


def _eval_section(eval_metrics: dict | None) -> list[str]:
    if not eval_metrics:
        return []
    test_rows = eval_metrics["test_rows"]
    lines = [
        "## Accuracy on held-out questions (greedy; 95% bootstrap CI)",
        "",
        f"{eval_metrics.get('compared_rows', test_rows)} of {test_rows} test questions, the same rows for "
        "every model (a row any model could not be asked is left out of all; "
        f"{eval_metrics.get('excluded_rows', {}).get('n', 0)} left out). Bands are the student's own pre-training "
        "entropy bands; band avg is the unweighted mean of the three. Source: eval/metrics.json `models.<model>`.",
        "",
        "| model | prompt | overall | easy | medium | hard | band avg | unparsed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, model in eval_metrics["models"].items():
        lines.append(
            f"| {name} | {model['kind']} | {_fmt_acc(model['overall'])} | "
            + " | ".join(_fmt_acc(model["per_band"][b]) for b in BANDS)
            + f" | {_num(model.get('band_average'))} | {model['overall']['unparsed']} |"
        )
    for name, why in eval_metrics.get("not_trained", {}).items():
        lines.append(f"| {name} | not trained: {why} (train.on_empty_phase=skip) | | | | | | |")
    return [*lines, "", *_paired_section(eval_metrics.get("paired"))]


def _paired_section(paired: list[dict] | None) -> list[str]:
    if not paired:
        return []
    lines = [
        "### Paired differences (same rows; paired bootstrap 95% CI)",
        "",
        "| a | b | a − b | 95% CI | rows | source |",
        "|---|---|---|---|---|---|",
    ]
    for pair in paired:
        if pair["diff"] is not None:
            low, high = pair["ci95"]
            lines.append(
                f"| {pair['a']} | {pair['b']} | {pair['diff']:+.3f} | [{low:+.3f}, {high:+.3f}] | "
                f"{pair['n']} | eval/metrics.json `paired` |"
            )
    return [*lines, ""]


def _teach_section(teach_metrics: dict | None) -> list[str]:
    if not teach_metrics:
        return []
    accounting = teach_metrics["accounting"]
    lines = ["## Teacher", "", "| metric | value | source |", "|---|---|---|"]
    for status, n in sorted(teach_metrics["status"].items()):
        lines.append(f"| rows {status} | {n} | teach/metrics.json `status.{status}` |")
    lines.append(
        f"| prompt / completion tokens | {accounting['prompt_tokens']} / {accounting['completion_tokens']} | "
        "teach/metrics.json `accounting` |"
    )
    for band, tokens in accounting.get("per_band", {}).items():
        lines.append(
            f"| teacher tokens, {band} band ({tokens['rows']} rows, "
            f"{'taught' if tokens['taught'] else 'not taught'}) | "
            f"{tokens['tokens']:.0f} ({tokens['basis']}) | teach/metrics.json `accounting.per_band.{band}` |"
        )
    saving = accounting.get("saving")
    if saving and saving["saving_pct"] is not None:
        lines.append(
            f"| teacher tokens saved vs teaching every band ({saving['basis']}) | {saving['saving_pct']:.1f}% | "
            "teach/metrics.json `accounting.saving` |"
        )
    hard_only = accounting.get("hard_only_saving")
    if hard_only and hard_only["saving_pct"] is not None:
        lines.append(
            f"| teacher tokens teaching the hard band only would save ({hard_only['basis']}) | "
            f"{hard_only['saving_pct']:.1f}% | teach/metrics.json `accounting.hard_only_saving` |"
        )
    for name, teacher in accounting["per_teacher"].items():
        if "cost" in teacher:
            lines.append(f"| cost, {name} | {teacher['cost']:.4f} {teacher['currency']} | teach/metrics.json |")
    return [*lines, ""]


def _train_section(run: str, recipes: list[str]) -> list[str]:
    if not recipes:
        return []
    lines = [
        "## Training",
        "",
        "| recipe / phase | rows | steps | loss first → last | tokens/s | padding | wall s | source |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for recipe in recipes:
        for phase in ("phase1", "phase2", "phase3"):
            phase_metrics = _read(run, "train", recipe, phase, "metrics.json")
            if phase_metrics:
                lines.append(_train_row(f"{recipe}/{phase}", phase_metrics))
    return [*lines, ""]


def _train_row(name: str, metrics: dict) -> str:
    """One phase: its rows, steps, loss, throughput and padding, or why it was not trained."""
    source = f"train/{name}/metrics.json"
    if metrics.get("status") == "empty":
        return f"| {name} | 0 | not trained: {metrics['reason']} | | | | | {source} |"
    loss = f"{metrics['first_loss']:.4f} → {metrics['last_loss']:.4f}" if metrics["steps"] else "–"
    tps = f"{metrics['mean_tokens_per_s']:.0f}" if metrics["mean_tokens_per_s"] else "–"
    pad = f"{metrics['padding_waste']:.1%}" if metrics["padding_waste"] is not None else "–"
    rows, steps, wall = metrics["examples"], metrics["steps"], metrics["wall_s"]
    return f"| {name} | {rows} | {steps} | {loss} | {tps} | {pad} | {wall} | {source} |"


def _stages_section(manifest: dict | None) -> list[str]:
    if not manifest:
        return []
    lines = ["## Stages", "", "| stage | status | hash | wall s |", "|---|---|---|---|"]
    for stage, entry in manifest.get("stages", {}).items():
        status, wall = entry.get("status", "–"), entry.get("wall_s", "–")
        if stage == "report" and status == "running":
            # Inside `raycat run` the manifest marks this stage running while it writes this file.
            status, wall = "this report", "–"
        lines.append(f"| {stage} | {status} | `{entry.get('hash', '–')}` | {wall} |")
    return [*lines, ""]


def _plots_section(images: list[str]) -> list[str]:
    if not images:
        return []
    return ["## Plots", ""] + [line for name in images for line in (f"![{name}](plots/{name})", "")]


def _provenance_section(run: str) -> list[str]:
    return [
        "## Provenance",
        "",
        f"Everything above is read from `{run}`: the run's resolved config is "
        "`config.yaml`; each stage's inputs, model and template hashes are in its `metrics.json` and "
        "`manifest.json`. Rebuild with `raycat report " + run + "`.",
        "",
    ]


def _md_to_html(md: str, images: dict[str, bytes]) -> str:
    """CommonMark + tables (markdown-it-py); raw HTML in the text is escaped, plots are inlined as data URIs
    so the file stands alone."""
    from markdown_it import MarkdownIt

    mdit = MarkdownIt("commonmark", {"html": False}).enable("table")
    tokens = mdit.parse(md)
    for tok in tokens:
        for child in tok.children or ():
            src = child.attrGet("src") if child.type == "image" else None
            if isinstance(src, str) and src.startswith("plots/") and src.removeprefix("plots/") in images:
                data = base64.b64encode(images[src.removeprefix("plots/")]).decode()
                child.attrSet("src", f"data:image/png;base64,{data}")
    body = mdit.renderer.render(tokens, mdit.options, {})
    style = (
        "body{font-family:sans-serif;max-width:1000px;margin:2em auto}table{border-collapse:collapse;"
        "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%}"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>raycat report</title><style>{style}</style>"
        f"</head><body>{body}</body></html>\n"
    )


def build(run: str) -> dict:
    """Write report.md, report.html and plots/ under ``<run>/report``; returns what was written.

    Raises MissingInputError (a RaycatError) when ``run`` does not exist or holds none of the stages'
    outputs: a mistyped path must not produce an empty report."""
    if not rundir.exists(run):
        raise MissingInputError(f"run directory {run} does not exist")
    if not (any(rundir.exists(rundir.join(run, o)) for o in OUTPUTS) or run_recipes(run)):
        raise MissingInputError(
            f"run directory {run} holds no stage outputs to report on (looked for "
            f"{', '.join(OUTPUTS)} and train/<recipe>/)"
        )
    images = plots(run)
    report_dir = rundir.join(run, "report")
    for name, data in images.items():
        rundir.write_bytes(rundir.join(report_dir, "plots", name), data)
    md = markdown(run, list(images))
    rundir.write_text(rundir.join(report_dir, "report.md"), md)
    rundir.write_text(rundir.join(report_dir, "report.html"), _md_to_html(md, images))
    summary = {
        "report_md": rundir.join(report_dir, "report.md"),
        "report_html": rundir.join(report_dir, "report.html"),
        "plots": sorted(images),
    }
    rundir.write_text(rundir.join(report_dir, "index.json"), json.dumps(summary, indent=2) + "\n")
    return summary
