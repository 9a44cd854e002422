"""The report built from a run directory: files, plots, numbers equal to metrics.json, exact markdown."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raycat.errors import RaycatError


def make_run_dir(run: Path) -> None:
    """A finished run's outputs, small and hand-made, for the report."""
    rng = np.random.default_rng(0)
    (run / "score").mkdir(parents=True)
    ent = rng.random(200) * 1.5
    pd.DataFrame(
        {"id": [f"q{i}" for i in range(200)], "entropy": ent, "correct": rng.random(200) > ent / 1.5}
    ).to_parquet(run / "score/scores.parquet")
    (run / "score/metrics.json").write_text(
        json.dumps(
            {
                "scored": 200,
                "accuracy": 0.51,
                "roc_auc": 0.7321,
                "accuracy_greedy": 0.5,
                "roc_auc_greedy": 0.7012,
                "provenance": {"entropy_mode": "options"},
            }
        )
    )
    (run / "split").mkdir()
    (run / "split/thresholds.json").write_text(
        json.dumps(
            {
                "thresholds": [0.37, 1.12],
                "counts": {"easy": 40, "medium": 80, "hard": 40},
                "test_counts": {"easy": 10, "medium": 20, "hard": 10},
            }
        )
    )
    (run / "teach").mkdir()
    (run / "teach/metrics.json").write_text(
        json.dumps(
            {
                "status": {"verified": 35, "dropped_wrong": 5},
                "accounting": {
                    "prompt_tokens": 8000,
                    "completion_tokens": 12000,
                    "pool_rows": 160,
                    "per_teacher": {},
                    "per_band": {
                        "easy": {
                            "rows": 40,
                            "taught": False,
                            "measured_tokens": 0,
                            "estimated_tokens": 20000.0,
                            "tokens": 20000.0,
                            "basis": "estimated for 40 from the measured mean per row of all bands",
                        },
                        "medium": {
                            "rows": 80,
                            "taught": False,
                            "measured_tokens": 0,
                            "estimated_tokens": 40000.0,
                            "tokens": 40000.0,
                            "basis": "estimated for 80 from the measured mean per row of all bands",
                        },
                        "hard": {
                            "rows": 40,
                            "taught": True,
                            "measured_tokens": 20000,
                            "estimated_tokens": 0.0,
                            "tokens": 20000.0,
                            "basis": "measured",
                        },
                    },
                    "saving": {"saving_pct": 75.0, "basis": "estimate", "label": "estimate: ..."},
                },
            }
        )
    )
    cell = {"n": 10, "accuracy": 0.6, "ci95": [0.3, 0.9], "unparsed": 1}
    models = {
        name: {
            "kind": kind,
            "overall": {**cell, "n": 40, "accuracy": acc, "ci95": [acc - 0.1, acc + 0.1]},
            "per_band": {"easy": cell, "medium": {**cell, "n": 20}, "hard": cell},
            "per_category": {},
        }
        for name, kind, acc in (
            ("base", "answer", 0.425),
            ("complexity_aware/phase1", "answer", 0.55),
            ("complexity_aware/phase2", "cot", 0.625),
        )
    }
    (run / "eval").mkdir()
    (run / "eval/metrics.json").write_text(json.dumps({"test_rows": 40, "models": models}))
    for phase, n in (("phase1", 120), ("phase2", 35)):
        d = run / "train/complexity_aware" / phase
        d.mkdir(parents=True)
        hist = [
            {"step": i + 1, "loss": 2.0 / (i + 1), "epoch": 0, "tokens": 100, "tokens_per_s": 50.0} for i in range(6)
        ]
        d.joinpath("metrics.json").write_text(
            json.dumps(
                {
                    "examples": n,
                    "steps": 6,
                    "first_loss": 2.0,
                    "last_loss": 2.0 / 6,
                    "mean_tokens_per_s": 50.0,
                    "padding_waste": 0.125,
                    "wall_s": 30.5,
                    "history": hist,
                }
            )
        )
    (run / "manifest.json").write_text(
        json.dumps({"stages": {"score": {"status": "done", "hash": "abc", "wall_s": 12.5}}})
    )


def test_report_files_plots_and_numbers_match_the_metrics(tmp_path):
    from raycat.report import build

    run = tmp_path / "run"
    make_run_dir(run)
    out = build(str(run))
    assert out["plots"] == [
        "accuracy_by_band.png",
        "entropy_histogram.png",
        "loss_curves.png",
        "roc.png",
        "teacher_tokens.png",
    ]
    for name in out["plots"]:
        data = (run / "report/plots" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000  # a real, non-empty image
    md = (run / "report/report.md").read_text()
    ev = json.loads((run / "eval/metrics.json").read_text())
    for name, m in ev["models"].items():
        o = m["overall"]
        assert f"| {name} | {m['kind']} | {o['accuracy']:.3f} [{o['ci95'][0]:.3f}, {o['ci95'][1]:.3f}] (n=40)" in md
    assert "| ROC AUC (−entropy → correct), arg-max among the option tokens | 0.7321 |" in md
    assert (
        "| ROC AUC, decoded token (options entropy; the paper's ≈ 0.73 is with the full-vocabulary entropy) | 0.7012 |"
        in md
    )
    assert (
        "| teacher tokens saved vs teaching every band (estimate) | 75.0% |" in md
        and "| complexity_aware/phase2 | 35 | 6 |" in md
    )
    html = (run / "report/report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "<table>" in html  # self-contained


def test_report_html_is_commonmark_with_tables_and_escapes_raw_html(tmp_path):
    from raycat.report import build

    run = tmp_path / "run"
    make_run_dir(run)
    ev = json.loads((run / "eval/metrics.json").read_text())
    ev["models"]["<script>alert(1)</script>"] = ev["models"].pop("base")  # a name is data, never markup
    (run / "eval/metrics.json").write_text(json.dumps(ev))
    build(str(run))
    html = (run / "report/report.html").read_text()
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert html.count("<table>") == 5 and "<th>metric</th>" in html and "<td>0.7321</td>" in html
    assert "<td>score/metrics.json <code>scored</code></td>" in html  # inline code is rendered
    assert 'src="plots/' not in html  # every plot inlined: the file stands alone


def test_report_names_the_stage_being_written_not_running(tmp_path):
    from raycat.report import build

    run = tmp_path / "run"
    make_run_dir(run)
    stages = {
        "score": {"status": "done", "hash": "abc", "wall_s": 12.5},
        "report": {"status": "running", "hash": "def", "started": 1.0},
    }
    (run / "manifest.json").write_text(json.dumps({"stages": stages}))
    build(str(run))
    md = (run / "report/report.md").read_text()
    assert "| report | this report | `def` | – |" in md and "running" not in md
    assert "| score | done | `abc` | 12.5 |" in md


def _add_the_rarer_rows(run: Path) -> None:
    """make_run_dir plus what it lacks: compared and excluded rows, a missing band cell, paired differences,
    a model not trained, a teacher's cost, an empty phase, a phase of zero steps, a stage without status."""
    ev = json.loads((run / "eval/metrics.json").read_text())
    ev.update({"compared_rows": 38, "excluded_rows": {"n": 2}, "not_trained": {"sft_all/phase2": "no rows"}})
    ev["paired"] = [
        {"a": "complexity_aware/phase1", "b": "base", "diff": 0.125, "ci95": [0.01, 0.2], "n": 38},
        {"a": "x", "b": "y", "diff": None, "ci95": [None, None], "n": 0},
    ]
    ev["models"]["base"]["band_average"] = 0.5
    ev["models"]["base"]["per_band"]["hard"] = {"n": 0, "accuracy": None, "ci95": [None, None], "unparsed": 0}
    (run / "eval/metrics.json").write_text(json.dumps(ev))
    teach = json.loads((run / "teach/metrics.json").read_text())
    teach["accounting"]["per_teacher"] = {
        "t1": {"attempts": 3, "engine_seconds": 1.5, "gpu_seconds": 0.0, "cost": 0.01234, "currency": "USD"},
        "t2": {"attempts": 1, "engine_seconds": 2.5, "gpu_seconds": 1.0},
    }
    (run / "teach/metrics.json").write_text(json.dumps(teach))
    (run / "train/complexity_aware/phase3").mkdir(parents=True)
    (run / "train/complexity_aware/phase3/metrics.json").write_text(
        json.dumps({"status": "empty", "reason": "no rows"})
    )
    (run / "train/sft_all/phase1").mkdir(parents=True)
    zero_steps = {"examples": 5, "steps": 0, "mean_tokens_per_s": 0, "padding_waste": None, "wall_s": 1, "history": []}
    (run / "train/sft_all/phase1/metrics.json").write_text(json.dumps(zero_steps))
    stages = {"score": {"status": "done", "hash": "abc", "wall_s": 12.5}, "split": {}, "report": {"status": "running"}}
    (run / "manifest.json").write_text(json.dumps({"stages": stages}))


REPORT_MD = """\
# raycat report — `RUN`

## Complexity estimate (student entropy)

| metric | value | source |
|---|---|---|
| questions scored | 200 | score/metrics.json `scored` |
| student accuracy, arg-max among the option tokens | 0.5100 | score/metrics.json `accuracy` |
| ROC AUC (−entropy → correct), arg-max among the option tokens | 0.7321 | score/metrics.json `roc_auc` |
| student accuracy, decoded token (invalid and IDK rows dropped, as the paper) | 0.5000 | \
score/metrics.json `accuracy_greedy` |
| ROC AUC, decoded token (options entropy; the paper's ≈ 0.73 is with the full-vocabulary entropy) | 0.7012 | \
score/metrics.json `roc_auc_greedy` |
| band thresholds (nats) | 0.3700 / 1.1200 | split/thresholds.json `thresholds` |
| train rows easy / medium / hard | 40 / 80 / 40 | split/thresholds.json `counts` |
| test rows easy / medium / hard | 10 / 20 / 10 | split/thresholds.json `test_counts` |

## Accuracy on held-out questions (greedy; 95% bootstrap CI)

38 of 40 test questions, the same rows for every model (a row any model could not be asked is left out of all; \
2 left out). Bands are the student's own pre-training entropy bands; band avg is the unweighted mean of the three. \
Source: eval/metrics.json `models.<model>`.

| model | prompt | overall | easy | medium | hard | band avg | unparsed |
|---|---|---|---|---|---|---|---|
| base | answer | 0.425 [0.325, 0.525] (n=40) | 0.600 [0.300, 0.900] (n=10) | 0.600 [0.300, 0.900] (n=20) | \
– | 0.5000 | 1 |
| complexity_aware/phase1 | answer | 0.550 [0.450, 0.650] (n=40) | 0.600 [0.300, 0.900] (n=10) | \
0.600 [0.300, 0.900] (n=20) | 0.600 [0.300, 0.900] (n=10) | n/a | 1 |
| complexity_aware/phase2 | cot | 0.625 [0.525, 0.725] (n=40) | 0.600 [0.300, 0.900] (n=10) | \
0.600 [0.300, 0.900] (n=20) | 0.600 [0.300, 0.900] (n=10) | n/a | 1 |
| sft_all/phase2 | not trained: no rows (train.on_empty_phase=skip) | | | | | | |

### Paired differences (same rows; paired bootstrap 95% CI)

| a | b | a − b | 95% CI | rows | source |
|---|---|---|---|---|---|
| complexity_aware/phase1 | base | +0.125 | [+0.010, +0.200] | 38 | eval/metrics.json `paired` |

## Teacher

| metric | value | source |
|---|---|---|
| rows dropped_wrong | 5 | teach/metrics.json `status.dropped_wrong` |
| rows verified | 35 | teach/metrics.json `status.verified` |
| prompt / completion tokens | 8000 / 12000 | teach/metrics.json `accounting` |
| teacher tokens, easy band (40 rows, not taught) | 20000 (estimated for 40 from the measured mean per row of \
all bands) | teach/metrics.json `accounting.per_band.easy` |
| teacher tokens, medium band (80 rows, not taught) | 40000 (estimated for 80 from the measured mean per row of \
all bands) | teach/metrics.json `accounting.per_band.medium` |
| teacher tokens, hard band (40 rows, taught) | 20000 (measured) | teach/metrics.json `accounting.per_band.hard` |
| teacher tokens saved vs teaching every band (estimate) | 75.0% | teach/metrics.json `accounting.saving` |
| cost, t1 | 0.0123 USD | teach/metrics.json |

## Training

| recipe / phase | rows | steps | loss first → last | tokens/s | padding | wall s | source |
|---|---|---|---|---|---|---|---|
| complexity_aware/phase1 | 120 | 6 | 2.0000 → 0.3333 | 50 | 12.5% | 30.5 | train/complexity_aware/phase1/metrics.json |
| complexity_aware/phase2 | 35 | 6 | 2.0000 → 0.3333 | 50 | 12.5% | 30.5 | train/complexity_aware/phase2/metrics.json |
| complexity_aware/phase3 | 0 | not trained: no rows | | | | | train/complexity_aware/phase3/metrics.json |
| sft_all/phase1 | 5 | 0 | – | – | – | 1 | train/sft_all/phase1/metrics.json |

## Stages

| stage | status | hash | wall s |
|---|---|---|---|
| score | done | `abc` | 12.5 |
| split | – | `–` | – |
| report | this report | `–` | – |

## Plots

![roc.png](plots/roc.png)

![loss_curves.png](plots/loss_curves.png)

## Provenance

Everything above is read from `RUN`: the run's resolved config is `config.yaml`; each stage's inputs, model and \
template hashes are in its `metrics.json` and `manifest.json`. Rebuild with `raycat report RUN`.
"""


def test_report_markdown_is_exactly_this(tmp_path):
    """Every section, byte for byte: a rebuilt report of an old run reads the same."""
    from raycat.report import markdown

    run = tmp_path / "run"
    make_run_dir(run)
    _add_the_rarer_rows(run)
    assert markdown(str(run), ["roc.png", "loss_curves.png"]) == REPORT_MD.replace("RUN", str(run))
    bare = tmp_path / "bare"
    bare.mkdir()  # no stage has run: the title and the provenance only
    head, provenance = REPORT_MD.split("## Complexity")[0], REPORT_MD[REPORT_MD.index("## Provenance") :]
    assert markdown(str(bare), []) == (head + provenance).replace("RUN", str(bare))


def test_report_of_a_missing_or_empty_run_dir_fails_and_writes_nothing(tmp_path):
    from raycat.report import build

    missing = tmp_path / "no-such-run"
    with pytest.raises(RaycatError, match=f"run directory {missing} does not exist"):
        build(str(missing))
    assert not missing.exists()
    empty = tmp_path / "empty"
    (empty / "logs").mkdir(parents=True)
    with pytest.raises(RaycatError, match=f"run directory {empty} holds no stage outputs"):
        build(str(empty))
    assert not (empty / "report").exists()


def test_the_papers_auc_is_named_only_for_the_full_vocabulary_entropy():
    from raycat.report import _paper_auc_note
    from raycat.tables import greedy_auc_label

    full, options = {"provenance": {"entropy_mode": "full"}}, {"provenance": {"entropy_mode": "options"}}
    assert _paper_auc_note(full) == "full-vocabulary entropy: the paper's ≈ 0.73 is this one"
    assert "options entropy" in _paper_auc_note(options) and "is this one" not in _paper_auc_note(options)
    assert greedy_auc_label(full).endswith("paper ≈ 0.73)")
    assert greedy_auc_label(options).startswith("ROC AUC (decoded token, options entropy;")


def test_report_and_study_totals_hold_only_the_recipes_of_this_run(tmp_path):
    from raycat.report import markdown, run_recipes
    from raycat.study.comparison import variant_numbers

    run = tmp_path / "run"
    make_run_dir(run)
    (recipe,) = run_recipes(str(run))
    # An earlier run in the same run dir trained another recipe; this run's manifest names only one.
    shutil.copytree(run / "train" / recipe, run / "train" / "sft_all_earlier")
    manifest = json.loads((run / "manifest.json").read_text())
    (run / "manifest.json").write_text(json.dumps({**manifest, "recipes": [recipe]}))
    assert run_recipes(str(run)) == [recipe]
    assert "sft_all_earlier" not in markdown(str(run), [])
    alone = variant_numbers(str(run))["training_tokens"]
    (run / "manifest.json").write_text(json.dumps({**manifest, "recipes": [recipe, "sft_all_earlier"]}))
    assert variant_numbers(str(run))["training_tokens"] == 2 * alone > 0
    # Without a manifest (stages run one by one) every recipe dir is the run's.
    (run / "manifest.json").unlink()
    assert sorted(run_recipes(str(run))) == sorted([recipe, "sft_all_earlier"])


def test_the_entropy_plots_read_three_columns_of_the_scores_not_the_questions(tmp_path, monkeypatch):
    """A million-row scores.parquet holds the questions' text; the plots need entropy, correct, idk."""
    from raycat import report
    from raycat.storage import rundir

    make_run_dir(tmp_path)
    scores = pd.read_parquet(tmp_path / "score/scores.parquet").assign(question="a long question " * 20)
    scores.to_parquet(tmp_path / "score/scores.parquet")
    read = []
    real = rundir.read_parquet_columns
    monkeypatch.setattr(rundir, "read_parquet", lambda path: pytest.fail(f"read whole: {path}"))
    monkeypatch.setattr(rundir, "read_parquet_columns", lambda path, cols: read.append(cols) or real(path, cols))
    plots = report._entropy_plots(str(tmp_path), None)
    assert set(plots) == {"entropy_histogram.png", "roc.png"} and read == [["entropy", "correct"]]
