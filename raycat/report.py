"""Report: ``report/report.md``, a self-contained ``report/report.html`` and ``report/plots/*.png``,
built only from the run directory (so ``raycat report runs/<id>`` can rebuild it any time).

Every number names the file it comes from; plots are drawn with matplotlib's Agg backend (no display).
"""

from __future__ import annotations

import base64
import io
import json

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out: dict[str, bytes] = {}
    scores_path = rundir.join(run, "score", "scores.parquet")
    thresholds = _read(run, "split", "thresholds.json")
    if rundir.exists(scores_path):
        s = metric_rows(rundir.read_parquet(scores_path))
        fig, ax = plt.subplots(figsize=(6, 3.5))
        lo, hi = float(s["entropy"].min()), float(s["entropy"].max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 30)
        for ok, color, label in ((True, "tab:green", "correct"), (False, "tab:red", "wrong")):
            ax.hist(s.loc[s["correct"].astype(bool) == ok, "entropy"], bins=bins, alpha=0.6, color=color, label=label)
        if thresholds:
            for t, name, ls in zip(
                thresholds["thresholds"], ("easy | medium", "medium | hard"), ("--", ":"), strict=True
            ):
                ax.axvline(t, color="k", ls=ls, lw=1, label=f"{name} at {t:.3f}")
        ax.set_xlabel("answer-token entropy (nats)")
        ax.set_ylabel("questions")
        ax.legend()
        ax.set_title("Student entropy by correctness")
        out["entropy_histogram.png"] = _png(fig)
        y = s["correct"].astype(bool).to_numpy()
        if 0 < y.sum() < len(y):
            from sklearn.metrics import roc_auc_score, roc_curve

            fpr, tpr, _ = roc_curve(y, -s["entropy"].to_numpy())
            fig, ax = plt.subplots(figsize=(4, 4))
            ax.plot(fpr, tpr, label=f"AUC = {roc_auc_score(y, -s['entropy'].to_numpy()):.3f}")
            ax.plot([0, 1], [0, 1], "k:", lw=1)
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("true positive rate")
            ax.set_title("ROC: −entropy → correct")
            ax.legend(loc="lower right")
            out["roc.png"] = _png(fig)
    ev = _read(run, "eval", "metrics.json")
    if ev and ev["models"]:
        names = list(ev["models"])
        groups = ["overall", *BANDS]
        fig, ax = plt.subplots(figsize=(1.2 + 1.6 * len(groups), 3.8))
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            m = ev["models"][name]
            cells = [m["overall"], *(m["per_band"][b] for b in BANDS)]
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
        out["accuracy_by_band.png"] = _png(fig)
    teach = _read(run, "teach", "metrics.json")
    sv = teach and teach["accounting"].get("saving")
    if sv and sv["saving_pct"] is not None:
        per_band = teach["accounting"]["per_band"]
        fig, ax = plt.subplots(figsize=(4.5, 3.2))
        names = list(per_band)
        measured = [per_band[b]["measured_tokens"] for b in names]
        estimated = [per_band[b]["estimated_tokens"] for b in names]
        ax.bar(names, measured, color="tab:blue", label="measured")
        ax.bar(names, estimated, bottom=measured, color="tab:gray", label="estimated")
        ax.set_xticks(
            range(len(names)), [f"{b}\n({'taught' if per_band[b]['taught'] else 'not taught'})" for b in names]
        )
        ax.set_ylabel("teacher tokens")
        ax.legend(fontsize=7)
        ax.set_title(f"Teacher tokens: {sv['saving_pct']:.1f}% saved ({sv['basis']})")
        out["teacher_tokens.png"] = _png(fig)
    curves = _loss_curves(run)
    if curves:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for label, steps, loss in curves:
            ax.plot(steps, loss, label=label)
        ax.set_xlabel("optimizer step (phases concatenated)")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        ax.set_title("Training loss")
        out["loss_curves.png"] = _png(fig)
    return out


def _recipes(run: str) -> list[str]:
    return rundir.list_dirs(rundir.join(run, "train"))


def _loss_curves(run: str) -> list[tuple[str, list[int], list[float]]]:
    out = []
    for recipe in _recipes(run):
        offset = 0
        for phase in ("phase1", "phase2", "phase3"):
            m = _read(run, "train", recipe, phase, "metrics.json")
            if not m or not m.get("history"):  # absent, or an empty phase (train.on_empty_phase=skip)
                continue
            out.append(
                (f"{recipe}/{phase}", [offset + h["step"] for h in m["history"]], [h["loss"] for h in m["history"]])
            )
            offset += m["history"][-1]["step"]
    return out


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _fmt_acc(c: dict) -> str:
    if not c["n"]:
        return "–"
    return f"{c['accuracy']:.3f} [{c['ci95'][0]:.3f}, {c['ci95'][1]:.3f}] (n={c['n']})"


def markdown(run: str, images: list[str]) -> str:
    lines = [f"# raycat report — `{run}`", ""]
    sc, th = _read(run, "score", "metrics.json"), _read(run, "split", "thresholds.json")
    manifest = _read(run, "manifest.json")
    if sc:
        lines += [
            "## Complexity estimate (student entropy)",
            "",
            "| metric | value | source |",
            "|---|---|---|",
            f"| questions scored | {sc['scored']} | score/metrics.json `scored` |",
            f"| student accuracy, arg-max among the option tokens | {_num(sc['accuracy'])} | "
            "score/metrics.json `accuracy` |",
            f"| ROC AUC (−entropy → correct), arg-max among the option tokens | {_num(sc['roc_auc'])} | "
            "score/metrics.json `roc_auc` |",
            f"| student accuracy, decoded token (invalid and IDK rows dropped, as the paper) | "
            f"{_num(sc.get('accuracy_greedy'))} | score/metrics.json `accuracy_greedy` |",
            f"| ROC AUC, decoded token (the paper's ≈ 0.73 is this one) | {_num(sc.get('roc_auc_greedy'))} | "
            "score/metrics.json `roc_auc_greedy` |",
        ]
        if th:
            lines.append(
                f"| band thresholds (nats) | {th['thresholds'][0]:.4f} / {th['thresholds'][1]:.4f} | "
                "split/thresholds.json `thresholds` |"
            )
            lines.append(
                f"| train rows easy / medium / hard | {th['counts']['easy']} / {th['counts']['medium']} / "
                f"{th['counts']['hard']} | split/thresholds.json `counts` |"
            )
            lines.append(
                f"| test rows easy / medium / hard | {th['test_counts']['easy']} / "
                f"{th['test_counts']['medium']} / {th['test_counts']['hard']} | split/thresholds.json "
                "`test_counts` |"
            )
        lines.append("")
    ev = _read(run, "eval", "metrics.json")
    if ev:
        lines += [
            "## Accuracy on held-out questions (greedy; 95% bootstrap CI)",
            "",
            f"{ev.get('compared_rows', ev['test_rows'])} of {ev['test_rows']} test questions, the same rows for "
            "every model (a row any model could not be asked is left out of all; "
            f"{ev.get('excluded_rows', {}).get('n', 0)} left out). Bands are the student's own pre-training "
            "entropy bands; band avg is the unweighted mean of the three. Source: eval/metrics.json `models.<model>`.",
            "",
            "| model | prompt | overall | easy | medium | hard | band avg | unparsed |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, m in ev["models"].items():
            lines.append(
                f"| {name} | {m['kind']} | {_fmt_acc(m['overall'])} | "
                + " | ".join(_fmt_acc(m["per_band"][b]) for b in BANDS)
                + f" | {_num(m.get('band_average'))} | {m['overall']['unparsed']} |"
            )
        for name, why in ev.get("not_trained", {}).items():
            lines.append(f"| {name} | not trained: {why} (train.on_empty_phase=skip) | | | | | | |")
        lines.append("")
        if ev.get("paired"):
            lines += [
                "### Paired differences (same rows; paired bootstrap 95% CI)",
                "",
                "| a | b | a − b | 95% CI | rows | source |",
                "|---|---|---|---|---|---|",
            ]
            for d in ev["paired"]:
                if d["diff"] is not None:
                    lines.append(
                        f"| {d['a']} | {d['b']} | {d['diff']:+.3f} | [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] | "
                        f"{d['n']} | eval/metrics.json `paired` |"
                    )
            lines.append("")
    te = _read(run, "teach", "metrics.json")
    if te:
        a = te["accounting"]
        lines += ["## Teacher", "", "| metric | value | source |", "|---|---|---|"]
        for status, n in sorted(te["status"].items()):
            lines.append(f"| rows {status} | {n} | teach/metrics.json `status.{status}` |")
        lines.append(
            f"| prompt / completion tokens | {a['prompt_tokens']} / {a['completion_tokens']} | "
            "teach/metrics.json `accounting` |"
        )
        for band, d in a.get("per_band", {}).items():
            lines.append(
                f"| teacher tokens, {band} band ({d['rows']} rows, {'taught' if d['taught'] else 'not taught'}) | "
                f"{d['tokens']:.0f} ({d['basis']}) | teach/metrics.json `accounting.per_band.{band}` |"
            )
        sv = a.get("saving")
        if sv and sv["saving_pct"] is not None:
            lines.append(
                f"| teacher tokens saved vs teaching every band ({sv['basis']}) | {sv['saving_pct']:.1f}% | "
                "teach/metrics.json `accounting.saving` |"
            )
        for name, d in a["per_teacher"].items():
            if "cost" in d:
                lines.append(f"| cost, {name} | {d['cost']:.4f} {d['currency']} | teach/metrics.json |")
        lines.append("")
    recipes = _recipes(run)
    if recipes:
        lines += [
            "## Training",
            "",
            "| recipe / phase | rows | steps | loss first → last | tokens/s | padding | wall s | source |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for recipe in recipes:
            for phase in ("phase1", "phase2", "phase3"):
                m = _read(run, "train", recipe, phase, "metrics.json")
                if not m:
                    continue
                if m.get("status") == "empty":
                    lines.append(
                        f"| {recipe}/{phase} | 0 | not trained: {m['reason']} | | | | | "
                        f"train/{recipe}/{phase}/metrics.json |"
                    )
                    continue
                loss = f"{m['first_loss']:.4f} → {m['last_loss']:.4f}" if m["steps"] else "–"
                tps = f"{m['mean_tokens_per_s']:.0f}" if m["mean_tokens_per_s"] else "–"
                pad = f"{m['padding_waste']:.1%}" if m["padding_waste"] is not None else "–"
                lines.append(
                    f"| {recipe}/{phase} | {m['examples']} | {m['steps']} | {loss} | {tps} | {pad} | "
                    f"{m['wall_s']} | train/{recipe}/{phase}/metrics.json |"
                )
        lines.append("")
    if manifest:
        lines += ["## Stages", "", "| stage | status | hash | wall s |", "|---|---|---|---|"]
        for stage, e in manifest.get("stages", {}).items():
            status, wall = e.get("status", "–"), e.get("wall_s", "–")
            if stage == "report" and status == "running":
                # Inside `raycat run` the manifest marks this stage running while it writes this file.
                status, wall = "this report", "–"
            lines.append(f"| {stage} | {status} | `{e.get('hash', '–')}` | {wall} |")
        lines.append("")
    if images:
        lines += ["## Plots", ""] + [x for n in images for x in (f"![{n}](plots/{n})", "")]
    lines += [
        "## Provenance",
        "",
        f"Everything above is read from `{run}`: the run's resolved config is "
        "`config.yaml`; each stage's inputs, model and template hashes are in its `metrics.json` and "
        "`manifest.json`. Rebuild with `raycat report " + run + "`.",
        "",
    ]
    return "\n".join(lines)


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
    if not (any(rundir.exists(rundir.join(run, o)) for o in OUTPUTS) or _recipes(run)):
        raise MissingInputError(
            f"run directory {run} holds no stage outputs to report on (looked for "
            f"{', '.join(OUTPUTS)} and train/<recipe>/)"
        )
    images = plots(run)
    d = rundir.join(run, "report")
    for name, data in images.items():
        rundir.write_bytes(rundir.join(d, "plots", name), data)
    md = markdown(run, list(images))
    rundir.write_text(rundir.join(d, "report.md"), md)
    rundir.write_text(rundir.join(d, "report.html"), _md_to_html(md, images))
    summary = {
        "report_md": rundir.join(d, "report.md"),
        "report_html": rundir.join(d, "report.html"),
        "plots": sorted(images),
    }
    rundir.write_text(rundir.join(d, "index.json"), json.dumps(summary, indent=2) + "\n")
    return summary
