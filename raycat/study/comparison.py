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

from raycat.storage import rundir


def variant_numbers(run_dir: str, quantiles: tuple[float, float] = (0.25, 0.75)) -> dict:
    """What one variant's outputs say (None where a stage did not run)."""
    ev = rundir.read_json_if_exists(rundir.join(run_dir, "eval", "metrics.json")) or {}
    models = {
        name: {
            "accuracy": m["overall"]["accuracy"],
            "n": m["overall"]["n"],
            "per_band": {b: v["accuracy"] for b, v in m.get("per_band", {}).items()},
        }
        for name, m in ev.get("models", {}).items()
    }
    teach = rundir.read_json_if_exists(rundir.join(run_dir, "teach", "metrics.json"))
    acc = (teach or {}).get("accounting", {})
    trained, final = 0, {}
    train = rundir.join(run_dir, "train")
    for recipe in rundir.list_dirs(train):
        for phase in rundir.list_dirs(rundir.join(train, recipe)):
            m = rundir.read_json_if_exists(rundir.join(train, recipe, phase, "metrics.json"))
            trained += sum(h["tokens"] for h in (m or {}).get("history", []))
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
        "not_trained": sorted(ev.get("not_trained", {})),
        "teacher_tokens": acc.get("total_tokens"),
        "teacher_saving": acc.get("saving"),
        "teacher_cost": acc.get("cost"),  # measured tokens x the configured price; None without a price
        "training_tokens": trained,
        "final": final,
    }


def _confident_wrong(run_dir: str) -> dict | None:
    """Low-entropy mistakes among the split's rows, and what each evaluated model answers on the
    held-out ones (raycat.analyses.confident_wrong)."""
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
    ev_path = rundir.join(run_dir, "eval", "eval.parquet")
    answers = {}
    if rundir.exists(ev_path):
        ev = rundir.read_parquet(ev_path)
        ev = ev[ev["compared"]] if "compared" in ev else ev
        answers = {m: g[["id", "correct"]] for m, g in ev.groupby("model")}
    return confident_wrong(pd.concat(parts, ignore_index=True), answers)


def _band_migration(run_dir: str, quantiles: tuple[float, float]) -> dict | None:
    """The training pool's bands against the bands of a re-scoring after a phase (``raycat.study.rescore``)."""
    from raycat.study.analyses import band_migration

    root = rundir.join(run_dir, "rescore")
    split = rundir.join(run_dir, "split")
    out = {}
    for phase in rundir.list_dirs(root):
        scores = rundir.join(root, phase, "score", "scores.parquet")
        pool = [rundir.join(split, f"{b}.parquet") for b in ("easy", "medium", "hard")]
        if not rundir.exists(scores) or not all(rundir.exists(p) for p in pool):
            continue
        before = pd.concat([rundir.read_parquet_columns(p, ["id", "band"]) for p in pool], ignore_index=True)
        out[phase] = band_migration(before, rundir.read_parquet_columns(scores, ["id", "entropy"]), quantiles)
    return out or None


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
    for (va, ma, a), (vb, mb, b) in itertools.combinations(scored, 2):
        q = tuple(va.get("quantiles", (0.25, 0.75)))
        if ma == mb or va["seed"] != vb["seed"] or q != tuple(vb.get("quantiles", q)) or (ma, mb, q) in done:
            continue
        done.add((ma, mb, q))
        agree = mode_agreement(a, b, q)
        out.append({"a": f"{va['label']} ({ma})", "b": f"{vb['label']} ({mb})", "quantiles": list(q), **agree})
    return out


def _t_interval(x: list[float]) -> list[float | None]:
    from scipy.stats import t

    if len(x) < 2:
        return [None, None]
    m, s = float(np.mean(x)), float(np.std(x, ddof=1))
    h = float(t.ppf(0.975, len(x) - 1)) * s / np.sqrt(len(x))
    return [m - h, m + h]


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
    from raycat.evaluate.stage import paired_bootstrap

    def rows(run_dir: str) -> pd.DataFrame | None:
        path = rundir.join(run_dir, "eval", "eval.parquet")
        if not rundir.exists(path):
            return None
        df = rundir.read_parquet(path)
        return df[df["compared"]] if "compared" in df else df

    base = {v["seed"]: rows(v["run_dir"]) for v in variants if v["label"] == baseline}
    base_v = {v["seed"]: v for v in variants if v["label"] == baseline}
    out: dict[tuple[str, str], list[np.ndarray]] = {}
    for v in variants:
        if v["label"] == baseline or base.get(v["seed"]) is None:
            continue
        mine, theirs = rows(v["run_dir"]), base[v["seed"]]
        if mine is None:
            continue
        # Model names as the report shows them; "<recipe> (final)" is each side's own last phase.
        ours, others = _eval_names(v, mine), _eval_names(base_v[v["seed"]], theirs)
        for model in sorted(set(ours) & set(others)):
            a = mine[mine["model"] == ours[model]][["id", "row_hash", "correct"]]
            b = theirs[theirs["model"] == others[model]][["id", "row_hash", "correct"]]
            j = a.merge(b, on=["id", "row_hash"], suffixes=("_a", "_b"))
            out.setdefault((v["label"], model), []).append(
                j["correct_a"].to_numpy(dtype=float) - j["correct_b"].to_numpy(dtype=float)
            )
    result = []
    for (label, model), diffs in out.items():
        d = np.concatenate(diffs)
        r = paired_bootstrap(d, np.zeros_like(d), resamples, seed)
        result.append({"variant": label, "baseline": baseline, "model": model, "seeds": len(diffs), **r})
    return result


def build(study) -> dict:
    """Write ``<study>/report/study.json``, ``study.md`` and the accuracy-vs-axis plot; returns the report."""
    from raycat.study import plot

    variants = []
    for spec in study.variants():
        cfg = study.variant_config(spec)  # validated once per variant
        q = tuple(cfg.split.quantiles)
        variants.append(
            {
                "label": spec.label,
                "seed": spec.seed,
                "values": [[k, v] for k, v in spec.overrides],
                "run_dir": cfg.run_dir,
                "quantiles": list(q),
                "numbers": variant_numbers(cfg.run_dir, q),
            }
        )
    baseline = study.config.baseline or variants[0]["label"]
    summary = summarize(variants)
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
    }
    d = rundir.join(study.root, "report")
    if report["plot"]:
        report["plot"]["file"] = "accuracy_vs_axis.png"
        plot.write_png(report["plot"], rundir.join(d, "accuracy_vs_axis.png"))
    rundir.write_json(rundir.join(d, "study.json"), report)
    rundir.write_text(rundir.join(d, "study.md"), markdown(report))
    return report


def _f(x, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(r: dict) -> str:
    lines = [
        f"# Study {r['study']}",
        "",
        f"Axes: {json.dumps(r['axes'])}; seeds {r['seeds']}; baseline: {r['baseline']}.",
        "",
    ]
    lines += [
        "## Accuracy across seeds",
        "",
        "| variant | model | seeds | mean | std | 95% CI (t, across seeds) | per band (mean) |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in r["summary"]:
        ci = s["ci95_across_seeds"]
        bands = ", ".join(f"{b} {_f(a)}" for b, a in s["per_band_mean"].items())
        lines.append(
            f"| {s['variant']} | {s['model']}{' = ' + ' / '.join(s['is']) if s.get('is') else ''} | "
            f"{len(s['seeds'])} | {_f(s['mean'])} | {_f(s['std'])} | "
            f"[{_f(ci[0])}, {_f(ci[1])}] | {bands} |"
        )
    lines += ["", "## Paired differences against the baseline (same test rows, same seeds)", ""]
    lines += ["| variant | model | rows | diff | 95% CI (paired bootstrap) |", "|---|---|---|---|---|"]
    for p in r["paired"]:
        lo, hi = p["ci95"]
        lines.append(f"| {p['variant']} | {p['model']} | {p['n']} | {_f(p['diff'])} | [{_f(lo)}, {_f(hi)}] |")
    lines += [
        "",
        "## Cost per run",
        "",
        "| variant | seed | teacher tokens | teacher cost | teacher saving | training tokens (measured) |",
        "|---|---|---|---|---|---|",
    ]
    for v in r["variants"]:
        n = v["numbers"]
        sav = n["teacher_saving"] or {}
        saving = f"{sav.get('saving_pct', 0):.1f} % ({sav.get('basis', '?')})" if sav else "–"
        lines.append(
            f"| {v['label']} | {v['seed']} | {n['teacher_tokens'] or '–'} | {_f(n.get('teacher_cost'), 4)} | "
            f"{saving} | {n['training_tokens']} |"
        )
    lines += ["", "## Confident-wrong rows (easy band, wrong answer)", ""]
    lines += ["| variant | seed | rows | share of easy | by category | models' accuracy on the held-out ones |"]
    lines += ["|---|---|---|---|---|---|"]
    for v in r["variants"]:
        cw = v["numbers"].get("confident_wrong")
        if cw:
            models = ", ".join(f"{m} {_f(x['accuracy'])} (n={x['rows']})" for m, x in cw["models"].items())
            cats = ", ".join(f"{k} {n}" for k, n in cw["by_category"].items())
            lines.append(
                f"| {v['label']} | {v['seed']} | {cw['rows']} | {_f(cw['share_of_easy'])} | {cats} | {models} |"
            )
    migrations = [(v, p, m) for v in r["variants"] for p, m in (v["numbers"].get("band_migration") or {}).items()]
    if migrations:
        lines += ["", "## Band migration after re-scoring (training pool, bands before -> after)", ""]
        lines += ["| variant | seed | after | rows | easy -> | medium -> | hard -> | hard still hard |"]
        lines += ["|---|---|---|---|---|---|---|---|"]
        for v, phase, m in migrations:
            cells = [
                "/".join(str(m["matrix"][b][a]) for a in ("easy", "medium", "hard")) for b in ("easy", "medium", "hard")
            ]
            head = f"| {v['label']} | {v['seed']} | {phase} | {m['rows']} | "
            lines.append(head + " | ".join(cells) + f" | {_f(m['hard_still_hard'])} |")
    if r.get("plot"):
        lines += ["", f"## Accuracy vs {r['plot']['x_label']}", "", f"![accuracy]({r['plot']['file']})", ""]
        lines += [f"{r['plot']['basis']}.", "", "| line | x | mean | 95% CI | seeds |", "|---|---|---|---|---|"]
        for name, pts in r["plot"]["lines"].items():
            for x, m, lo, hi, n in pts:
                lines.append(f"| {name} | {x:g} | {_f(m)} | [{_f(lo)}, {_f(hi)}] | {n} |")
    if r.get("mode_agreement"):
        lines += ["", "## Entropy-mode agreement (same rows)", "", "| a | b | rows | Spearman | same band |"]
        lines += ["|---|---|---|---|---|"]
        for m in r["mode_agreement"]:
            lines.append(f"| {m['a']} | {m['b']} | {m['rows']} | {_f(m['spearman'])} | {_f(m['same_band'])} |")
    return "\n".join(lines) + "\n"
