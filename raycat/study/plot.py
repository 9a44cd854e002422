"""Accuracy against a numeric study axis: one line per model (and per value of the other axes), the
mean across seeds with its t-interval. ``split.quantiles`` is drawn as the hard-band fraction."""

from __future__ import annotations

import io
import json

from raycat.storage import rundir


def axis_value(key: str, value) -> float | None:
    """A number to put on the x axis for this axis value, or None."""
    if key == "split.quantiles" and isinstance(value, list | tuple) and len(value) == 2:
        return round(1.0 - float(value[1]), 6)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def x_label(key: str) -> str:
    return "hard-band fraction (1 - split.quantiles[1])" if key == "split.quantiles" else key


def series(variants: list[dict], summary: list[dict], axes: dict) -> dict | None:
    """The first axis whose every value is numeric: points (x, mean, ci low, ci high, seeds) per line."""
    values = {v["label"]: dict(v["values"]) for v in variants}
    for key in axes:
        x_of = {label: axis_value(key, vals.get(key)) for label, vals in values.items()}
        if len(set(x_of.values())) < 2 or any(x is None for x in x_of.values()):
            continue
        # Two values on one x (e.g. quantiles with the same upper bound) would stack points: not this axis.
        distinct = {json.dumps(vals.get(key)) for vals in values.values()}
        if len(distinct) != len(set(x_of.values())):
            continue
        lines: dict[str, list] = {}
        for row in summary:
            if row["mean"] is None:
                continue
            rest = ", ".join(f"{k}={json.dumps(v)}" for k, v in values[row["variant"]].items() if k != key)
            name = row["model"] + (f" ({rest})" if rest else "")
            low, high = row["ci95_across_seeds"]
            lines.setdefault(name, []).append([x_of[row["variant"]], row["mean"], low, high, len(row["seeds"])])
        return {
            "axis": key,
            "x_label": x_label(key),
            "lines": {k: sorted(v, key=lambda p: p[0]) for k, v in lines.items()},
            "basis": "mean accuracy on each variant's held-out rows across seeds; bars: t-interval across seeds",
        }
    return None


def write_png(plot: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, pts in plot["lines"].items():
        x = [p[0] for p in pts]
        y = [p[1] for p in pts]
        err = [
            [p[1] - p[2] if p[2] is not None else 0 for p in pts],
            [p[3] - p[1] if p[3] is not None else 0 for p in pts],
        ]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
    ax.set_xlabel(plot["x_label"])
    ax.set_ylabel("held-out accuracy (mean across seeds)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    ax.set_title(f"Accuracy vs {plot['axis']}")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    rundir.write_bytes(path, buf.getvalue())


def recipe_series(summary: list[dict], recipes: list[str]) -> dict | None:
    """Each recipe's final model (and the base student) per variant: mean held-out accuracy across seeds
    with its t-interval."""
    bars: dict[str, list] = {}
    # The untrained student twice: its single-token answers (the score stage) and its answers to the
    # training prompt (a small student may not write that format at all).
    labels = {"base (single-token, from score)": "base\n(single token)", "base": "base\n(trained prompt)"}
    labels |= {f"{r} (final)": r for r in recipes}
    for row in summary:
        if row["model"] in labels and row["mean"] is not None:
            low, high = row["ci95_across_seeds"]
            bars.setdefault(row["variant"], []).append(
                [labels[row["model"]], row["mean"], low, high, len(row["seeds"])]
            )
    if not bars:
        return None
    order = {label: i for i, label in enumerate(labels.values())}
    return {
        "bars": {k: sorted(v, key=lambda b: order[b[0]]) for k, v in bars.items()},
        "basis": "mean held-out accuracy of each recipe's final model across seeds; bars: t-interval across seeds",
    }


def write_recipe_png(plot: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    groups = list(plot["bars"].items())
    width = 0.8 / len(groups)
    # Every name any variant has, in the plot's order: a variant without a recipe leaves a gap, not a shift.
    names = list(dict.fromkeys(b[0] for _, bars in groups for b in bars))
    for g, (variant, bars) in enumerate(groups):
        x = [names.index(b[0]) + g * width for b in bars]
        low = [b[1] - (b[2] if b[2] is not None else b[1]) for b in bars]
        high = [(b[3] if b[3] is not None else b[1]) - b[1] for b in bars]
        err = [low, high]
        ax.bar(x, [b[1] for b in bars], width, yerr=err, capsize=3, label=variant)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, fontsize=8)
    ax.set_ylabel("held-out accuracy (mean across seeds)")
    ax.set_ylim(0, 1)
    if len(groups) > 1:
        ax.legend(fontsize=7)
    ax.set_title("Accuracy per recipe")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    rundir.write_bytes(path, buf.getvalue())
