"""The comparison report of a study: every number is read from the variants' own outputs.

Per variant and model: accuracy overall and per band (the variant's ``eval/metrics.json``); across
seeds: mean, standard deviation and a t-interval; paired differences against the baseline variant on
the same test rows (each seed's rows paired with the baseline's same-seed run, pooled, paired
bootstrap); teacher tokens (measured + estimated, as the variant's teach accounting labels them) and
training tokens (measured in the training loop).
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pandas as pd

from raycat.evaluate.core import clustered_paired_bootstrap
from raycat.report import run_recipes
from raycat.storage import rowkey, rundir
from raycat.study import plot, recipe_effect, recipe_report


def variant_numbers(run_dir: str, quantiles: tuple[float, float] = (0.25, 0.75)) -> dict:
    """What one variant's outputs say (None where a stage did not run)."""
    eval_metrics = rundir.read_json_if_exists(rundir.join(run_dir, "eval", "metrics.json")) or {}
    models = {
        name: {
            "accuracy": m["overall"]["accuracy"],
            "n": m["overall"]["n"],
            "per_band": {b: v["accuracy"] for b, v in m.get("per_band", {}).items()},
        }
        for name, m in eval_metrics.get("models", {}).items()
    }
    teach = rundir.read_json_if_exists(rundir.join(run_dir, "teach", "metrics.json"))
    accounting = (teach or {}).get("accounting", {})
    trained, final = 0, {}
    train = rundir.join(run_dir, "train")
    for recipe in run_recipes(run_dir):
        for phase in rundir.list_dirs(rundir.join(train, recipe)):
            phase_metrics = rundir.read_json_if_exists(rundir.join(train, recipe, phase, "metrics.json"))
            trained += sum(h["tokens"] for h in (phase_metrics or {}).get("history", []))
        # The recipe's final model: its last evaluated phase (a later phase may be empty and untrained),
        # so variants compare what each recipe finally produced even where one variant's phase 2 is empty.
        done = [n for n in models if n.startswith(f"{recipe}/")]
        if done:
            final[recipe] = max(done, key=lambda n: n.split("/", 1)[1])
    for recipe, name in final.items():
        models[f"{recipe} (final)"] = {**models[name], "is": name}
    return {
        "models": models,
        "confident_wrong": _confident_wrong(run_dir),
        "band_migration": _band_migration(run_dir, quantiles),
        "not_trained": sorted(eval_metrics.get("not_trained", {})),
        "teacher_tokens": accounting.get("total_tokens"),
        "teacher_saving": accounting.get("saving"),
        # Measured tokens x the configured price; None without a price.
        "teacher_cost": accounting.get("cost"),
        "training_tokens": trained,
        "final": final,
    }


def _confident_wrong(run_dir: str) -> dict | None:
    """Low-entropy mistakes among the split's rows, and what each evaluated model answers on the
    held-out ones (raycat.study.analyses.confident_wrong)."""
    from raycat.study.analyses import confident_wrong

    split = rundir.join(run_dir, "split")
    cols = ["id", "band", "correct", "category"]
    parts = [
        rundir.read_parquet(rundir.join(split, f"{n}.parquet"))[cols]
        for n in ("easy", "medium", "hard", "test")
        if rundir.exists(rundir.join(split, f"{n}.parquet"))
    ]
    if not parts:
        return None
    rows = recipe_effect.compared_answers(run_dir)
    answers = {} if rows is None else {model: group[["id", "correct"]] for model, group in rows.groupby("model")}
    return confident_wrong(pd.concat(parts, ignore_index=True), answers)


def _band_migration(run_dir: str, quantiles: tuple[float, float]) -> dict | None:
    """The training pool's bands against the bands of a re-scoring after a phase (``raycat.study.grid.rescore``)."""
    from raycat.study.analyses import band_migration

    root = rundir.join(run_dir, "rescore")
    split = rundir.join(run_dir, "split")
    out = {}
    original = rundir.join(run_dir, "score", "scores.parquet")
    for phase in rundir.list_dirs(root):
        scores = rundir.join(root, phase, "score", "scores.parquet")
        pool = [rundir.join(split, f"{b}.parquet") for b in ("easy", "medium", "hard")]
        if not rundir.exists(scores) or not all(rundir.exists(p) for p in pool):
            continue
        before = pd.concat([rundir.read_parquet_columns(p, ["id", "band"]) for p in pool], ignore_index=True)
        if rundir.exists(original):
            before = before.merge(_mass_columns(original, ["id"]), on="id", how="left")
        out[phase] = band_migration(before, _mass_columns(scores, ["id", "entropy"]), quantiles)
    return out or None


def _mass_columns(path: str, columns: list[str]) -> pd.DataFrame:
    """``columns`` of a scores file, with ``option_mass`` when it has one."""
    has_mass = "option_mass" in rundir.parquet_columns(path)
    return rundir.read_parquet_columns(path, [*columns, "option_mass"] if has_mass else columns)


def mode_agreements(variants: list[dict]) -> list[dict]:
    """Every two variants (same seed, same split quantiles) whose scores used different entropy modes, on
    their shared rows; bands by those quantiles."""
    from raycat.study.analyses import mode_agreement

    scored = []
    for v in variants:
        path = rundir.join(v["run_dir"], "score", "scores.parquet")
        if rundir.exists(path):
            df = rundir.read_parquet_columns(path, ["id", "entropy", "entropy_mode"])
            scored.append((v, str(df["entropy_mode"].iloc[0]) if len(df) else "", df))
    out, done = [], set()
    for (variant_a, mode_a, scores_a), (variant_b, mode_b, scores_b) in itertools.combinations(scored, 2):
        quantiles = tuple(variant_a.get("quantiles", (0.25, 0.75)))
        if (
            mode_a == mode_b
            or variant_a["seed"] != variant_b["seed"]
            or quantiles != tuple(variant_b.get("quantiles", quantiles))
            or (mode_a, mode_b, quantiles) in done
        ):
            continue
        done.add((mode_a, mode_b, quantiles))
        agree = mode_agreement(scores_a, scores_b, quantiles)
        out.append(
            {
                "a": f"{variant_a['label']} ({mode_a})",
                "b": f"{variant_b['label']} ({mode_b})",
                "quantiles": list(quantiles),
                **agree,
            }
        )
    return out


def _t_interval(x: list[float]) -> list[float | None]:
    from scipy.stats import t

    if len(x) < 2:
        return [None, None]
    mean, std = float(np.mean(x)), float(np.std(x, ddof=1))
    half = float(t.ppf(0.975, len(x) - 1)) * std / np.sqrt(len(x))
    return [mean - half, mean + half]


def summarize(variants: list[dict]) -> list[dict]:
    """Across seeds, per (variant label, model)."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for v in variants:
        for name, m in v["numbers"]["models"].items():
            groups.setdefault((v["label"], name), []).append({"seed": v["seed"], **m})
    out = []
    for (label, name), runs in groups.items():
        acc = [r["accuracy"] for r in runs if r["accuracy"] is not None]
        bands = {b for r in runs for b in r["per_band"]}
        out.append(
            {
                "variant": label,
                "model": name,
                "seeds": [r["seed"] for r in runs],
                "accuracy": acc,
                "is": sorted({r["is"] for r in runs if r.get("is")}),  # what "<recipe> (final)" stood for
                "mean": float(np.mean(acc)) if acc else None,
                "std": float(np.std(acc, ddof=1)) if len(acc) > 1 else None,
                "ci95_across_seeds": _t_interval(acc),
                "per_band_mean": {
                    b: float(np.mean([r["per_band"][b] for r in runs if r["per_band"].get(b) is not None]))
                    for b in sorted(bands)
                    if any(r["per_band"].get(b) is not None for r in runs)
                },
            }
        )
    return out


def _eval_names(variant: dict, rows: pd.DataFrame) -> dict[str, str]:
    """Report name -> eval.parquet model name, for the models this variant's eval answered."""
    names = {m: m for m in set(rows["model"])}
    for name, m in variant.get("numbers", {}).get("models", {}).items():
        if m.get("is") in names:
            names[name] = m["is"]
    return names


def paired(variants: list[dict], baseline: str, resamples: int = 1000, seed: int = 0) -> list[dict]:
    """Each variant's models against the baseline variant's same model, row by row on the test rows
    both answered, same seed paired with same seed, pooled over seeds."""
    base = {v["seed"]: recipe_effect.compared_answers(v["run_dir"]) for v in variants if v["label"] == baseline}
    base_variant = {v["seed"]: v for v in variants if v["label"] == baseline}
    out: dict[tuple[str, str], list[pd.DataFrame]] = {}
    for variant in variants:
        if variant["label"] == baseline or base.get(variant["seed"]) is None:
            continue
        mine, theirs = recipe_effect.compared_answers(variant["run_dir"]), base[variant["seed"]]
        if mine is None:
            continue
        # Model names as the report shows them; "<recipe> (final)" is each side's own last phase.
        ours, others = _eval_names(variant, mine), _eval_names(base_variant[variant["seed"]], theirs)
        for model in sorted(set(ours) & set(others)):
            a = mine[mine["model"] == ours[model]][["id", "row_hash", "correct"]]
            b = theirs[theirs["model"] == others[model]][["id", "row_hash", "correct"]]
            both = a.merge(b, on=["id", "row_hash"], suffixes=("_a", "_b"))
            difference = both["correct_a"].to_numpy(dtype=float) - both["correct_b"].to_numpy(dtype=float)
            out.setdefault((variant["label"], model), []).append(
                pd.DataFrame({"row": rowkey.keys(both).to_numpy(), "difference": difference})
            )
    result = []
    for (label, model), per_seed in out.items():
        pooled = pd.concat(per_seed, ignore_index=True)
        # Seeds share test rows (split.seed is not a seed key by default): a row's differences under
        # every seed are resampled together.
        bootstrap = clustered_paired_bootstrap(pooled["difference"], pooled["row"], resamples, seed)
        result.append({"variant": label, "baseline": baseline, "model": model, "seeds": len(per_seed), **bootstrap})
    return result


def build(study) -> dict:
    """Write ``<study>/report/study.json``, ``study.md`` and the accuracy-vs-axis plot; returns the report."""
    variants = []
    for spec in study.variants():
        cfg = study.variant_config(spec)  # validated once per variant
        quantiles = tuple(cfg.split.quantiles)
        variants.append(
            {
                "label": spec.label,
                "seed": spec.seed,
                "values": [[k, v] for k, v in spec.overrides],
                "run_dir": cfg.run_dir,
                "quantiles": list(quantiles),
                "numbers": variant_numbers(cfg.run_dir, quantiles),
            }
        )
    baseline = study.config.baseline or variants[0]["label"]
    summary = summarize(variants)
    recipes = study.recipes()
    report = {
        "study": study.name,
        "baseline": baseline,
        "axes": {k: v for k, v in study.config.axes.items()},
        "seeds": study.config.seeds,
        "variants": variants,
        "summary": summary,
        "paired": paired(variants, baseline),
        "mode_agreement": mode_agreements(variants),
        "plot": plot.series(variants, summary, study.config.axes),
        **_recipe_sections(variants, recipes, summary),
    }
    report_dir = rundir.join(study.root, "report")
    if report["plot"]:
        report["plot"]["file"] = "accuracy_vs_axis.png"
        plot.write_png(report["plot"], rundir.join(report_dir, "accuracy_vs_axis.png"))
    if report.get("recipe_plot"):
        report["recipe_plot"]["file"] = "accuracy_vs_recipe.png"
        plot.write_recipe_png(report["recipe_plot"], rundir.join(report_dir, "accuracy_vs_recipe.png"))
    rundir.write_json(rundir.join(report_dir, "study.json"), report)
    rundir.write_text(rundir.join(report_dir, "study.md"), markdown(report))
    return report


def _recipe_sections(variants: list[dict], recipes: list[str], summary: list[dict]) -> dict:
    """With two or more recipes: recipe against recipe within each variant, teacher tokens per recipe, the
    signal check per distinct held-out set, and the accuracy-vs-recipe plot."""
    if len(recipes) < 2:
        return {}
    signals, seen = [], set()
    for v in variants:
        found = recipe_effect.signal(v["run_dir"])
        # Seeds share the split unless a seed key changes it: one row per distinct result.
        key = (v["label"], json.dumps(found, sort_keys=True))
        if found is not None and key not in seen:
            seen.add(key)
            signals.append({"variant": v["label"], "seed": v["seed"], **found})
    return {
        "recipes": recipes,
        "recipe_paired": recipe_effect.recipe_paired(variants, recipes),
        "recipe_costs": recipe_effect.recipe_costs(variants, recipes),
        "signal": signals,
        "recipe_plot": plot.recipe_series(summary, recipes),
    }


def _f(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(report: dict) -> str:
    """study.md: a section per analysis; the optional ones (band migration, the plot, entropy-mode agreement)
    only where the study has them."""
    sections = [
        *recipe_report.sections(report),
        _accuracy_section(report["summary"]),
        _paired_section(report["paired"]),
        _cost_section(report["variants"]),
        _confident_wrong_section(report["variants"]),
        _migration_section(report["variants"]),
        _plot_section(report.get("plot")),
        _mode_agreement_section(report.get("mode_agreement")),
    ]
    head = [
        f"# Study {report['study']}",
        "",
        f"Axes: {json.dumps(report['axes'])}; seeds {report['seeds']}; baseline: {report['baseline']}.",
    ]
    # A blank line before each section; an empty section is left out.
    return "\n".join(head + [line for lines in sections if lines for line in ("", *lines)]) + "\n"


def _accuracy_section(summary: list[dict]) -> list[str]:
    lines = [
        "## Accuracy across seeds",
        "",
        "| variant | model | seeds | mean | std | 95% CI (t, across seeds) | per band (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary:
        low, high = row["ci95_across_seeds"]
        bands = ", ".join(f"{b} {_f(a)}" for b, a in row["per_band_mean"].items())
        final = " = " + " / ".join(row["is"]) if row.get("is") else ""
        lines.append(
            f"| {row['variant']} | {row['model']}{final} | {len(row['seeds'])} | {_f(row['mean'])} | "
            f"{_f(row['std'])} | [{_f(low)}, {_f(high)}] | {bands} |"
        )
    return lines


def _paired_section(paired: list[dict]) -> list[str]:
    lines = ["## Paired differences against the baseline (same test rows, same seeds)", ""]
    lines += ["| variant | model | rows | diff | 95% CI (paired bootstrap) |", "|---|---|---|---|---|"]
    for pair in paired:
        low, high = pair["ci95"]
        lines.append(
            f"| {pair['variant']} | {pair['model']} | {pair['n']} | {_f(pair['diff'])} | [{_f(low)}, {_f(high)}] |"
        )
    return lines


def _saving_cell(saving: dict) -> str:
    """The teacher saving of one run; '–' without a teach stage, and says so when no token was booked
    (every teacher request failed: there is nothing to compare)."""
    if not saving:
        return "–"
    if saving.get("saving_pct") is None:
        return "– (no teacher tokens booked)"
    return f"{saving['saving_pct']:.1f} % ({saving.get('basis', '?')})"


def _cost_section(variants: list[dict]) -> list[str]:
    lines = [
        "## Cost per run",
        "",
        "| variant | seed | teacher tokens | teacher cost | teacher saving | training tokens (measured) |",
        "|---|---|---|---|---|---|",
    ]
    for variant in variants:
        numbers = variant["numbers"]
        saving = numbers["teacher_saving"] or {}
        saved = _saving_cell(saving)
        lines.append(
            f"| {variant['label']} | {variant['seed']} | {numbers['teacher_tokens'] or '–'} | "
            f"{_f(numbers.get('teacher_cost'), 4)} | {saved} | {numbers['training_tokens']} |"
        )
    return lines


def _confident_wrong_section(variants: list[dict]) -> list[str]:
    lines = ["## Confident-wrong rows (easy band, wrong answer)", ""]
    lines += ["| variant | seed | rows | share of easy | by category | models' accuracy on the held-out ones |"]
    lines += ["|---|---|---|---|---|---|"]
    for variant in variants:
        found = variant["numbers"].get("confident_wrong")
        if found:
            models = ", ".join(f"{m} {_f(x['accuracy'])} (n={x['rows']})" for m, x in found["models"].items())
            categories = ", ".join(f"{k} {n}" for k, n in found["by_category"].items())
            lines.append(
                f"| {variant['label']} | {variant['seed']} | {found['rows']} | {_f(found['share_of_easy'])} | "
                f"{categories} | {models} |"
            )
    return lines


def _migration_section(variants: list[dict]) -> list[str]:
    migrations = [(v, p, m) for v in variants for p, m in (v["numbers"].get("band_migration") or {}).items()]
    if not migrations:
        return []
    lines = ["## Band migration after re-scoring (training pool, bands before -> after)", ""]
    columns = ["variant", "seed", "after", "rows", "easy ->", "medium ->", "hard ->", "hard still hard"]
    lines += ["| " + " | ".join([*columns, "option mass, score -> rescore"]) + " |"]
    lines += ["|---|---|---|---|---|---|---|---|---|"]
    for variant, phase, migration in migrations:
        matrix = migration["matrix"]
        cells = ["/".join(str(matrix[b][a]) for a in ("easy", "medium", "hard")) for b in ("easy", "medium", "hard")]
        head = f"| {variant['label']} | {variant['seed']} | {phase} | {migration['rows']} | "
        mass = migration.get("option_mass") or {}
        lines.append(
            head
            + " | ".join(cells)
            + f" | {_f(migration['hard_still_hard'])} | {_f(mass.get('before'))} -> {_f(mass.get('after'))} |"
        )
    lines += [
        "",
        "Option mass (median): the probability on the option letters. The re-scored model was trained to "
        "open with `[[`; a low mass after means its options-mode entropy is renormalised over little mass and "
        "the bands after are not comparable with the bands before.",
    ]
    return lines


def _plot_section(plot: dict | None) -> list[str]:
    if not plot:
        return []
    lines = [f"## Accuracy vs {plot['x_label']}", "", f"![accuracy]({plot['file']})", ""]
    lines += [f"{plot['basis']}.", "", "| line | x | mean | 95% CI | seeds |", "|---|---|---|---|---|"]
    for name, points in plot["lines"].items():
        for x, mean, low, high, seeds in points:
            lines.append(f"| {name} | {x:g} | {_f(mean)} | [{_f(low)}, {_f(high)}] | {seeds} |")
    return lines


def _mode_agreement_section(agreements: list[dict] | None) -> list[str]:
    if not agreements:
        return []
    lines = ["## Entropy-mode agreement (same rows)", "", "| a | b | rows | Spearman | same band |"]
    lines += ["|---|---|---|---|---|"]
    for pair in agreements:
        lines.append(
            f"| {pair['a']} | {pair['b']} | {pair['rows']} | {_f(pair['spearman'])} | {_f(pair['same_band'])} |"
        )
    return lines
