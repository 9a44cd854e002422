"""Stage graph (hashes, --from/--only), evaluation maths, and the report built from a run directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raycat.config import load_config
from raycat.errors import RaycatError
from raycat.evaluate.core import accuracy_table, bootstrap_ci
from raycat.pipeline import STAGES, plan, stage_hashes

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "jobs" / "configs" / "demo-cpu.yaml"


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small, big = rng.random(40) < 0.6, rng.random(4000) < 0.6
    lo, hi = bootstrap_ci(small, 2000, seed=1)
    assert lo < small.mean() < hi
    blo, bhi = bootstrap_ci(big, 2000, seed=1)
    assert blo < big.mean() < bhi and (bhi - blo) < (hi - lo) / 5
    assert bootstrap_ci(small, 2000, seed=1) == (lo, hi)  # seeded
    assert all(np.isnan(bootstrap_ci(np.array([]), 10, 0)))


def test_accuracy_table_per_band_and_category():
    df = pd.DataFrame(
        {
            "correct": [True, False, True, True] * 5,
            "extracted": ["A", None, "B", "C"] * 5,
            "band": ["easy", "easy", "hard", "medium"] * 5,
            "category": ["x"] * 12 + ["y"] * 8,
        }
    )
    t = accuracy_table(df, 100, 0)
    assert t["overall"]["n"] == 20 and t["overall"]["accuracy"] == 0.75 and t["overall"]["unparsed"] == 5
    assert t["per_band"]["easy"]["accuracy"] == 0.5 and t["per_band"]["hard"]["accuracy"] == 1.0
    assert set(t["per_category"]) == {"x"}  # y has n < 10


def test_a_teacher_parameter_changes_teach_and_everything_downstream_only():
    a = stage_hashes(load_config(DEMO), ["complexity_aware"])
    b = stage_hashes(load_config(DEMO, ["teach.sampling.max_tokens=100"]), ["complexity_aware"])
    assert [s for s in STAGES if a[s] != b[s]] == ["teach", "train", "eval", "report"]
    c = stage_hashes(load_config(DEMO, ["split.seed=7"]), ["complexity_aware"])
    assert [s for s in STAGES if a[s] != c[s]] == ["split", "teach", "train", "eval", "report"]
    d = stage_hashes(load_config(DEMO), ["complexity_aware", "sft_all"])
    assert [s for s in STAGES if a[s] != d[s]] == ["train", "eval", "report"]


def test_a_data_file_or_model_dir_edited_in_place_reruns_its_stage(tmp_path):
    import os

    data, model = tmp_path / "q.jsonl", tmp_path / "student"
    data.write_text('{"question": "q?", "options": ["a", "b"], "answer": "A"}\n')
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"w" * 8)
    over = ["data.source=generic", f"data.path={data}", f"score.student.path={model}"]
    a = stage_hashes(load_config(DEMO, over), ["complexity_aware"])
    assert a == stage_hashes(load_config(DEMO, over), ["complexity_aware"])
    data.write_text('{"question": "other?", "options": ["a", "b"], "answer": "B"}\n')
    b = stage_hashes(load_config(DEMO, over), ["complexity_aware"])
    assert [s for s in STAGES if a[s] != b[s]] == list(STAGES)  # same config, new data: everything reruns
    os.utime(model / "model.safetensors", ns=(1, 1))  # the student retrained in place (same size)
    assert stage_hashes(load_config(DEMO, over), ["complexity_aware"])["score"] != b["score"]


def test_plan_skips_done_stages_and_honours_from_and_only():
    cfg = load_config(DEMO)
    hashes = stage_hashes(cfg, ["complexity_aware"])
    manifest = {"stages": {s: {"hash": hashes[s], "status": "done"} for s in STAGES}}
    assert {a for _, _, a in plan(cfg, ["complexity_aware"], manifest, None, None)} == {"skip"}
    got = {s: a for s, _, a in plan(cfg, ["complexity_aware"], manifest, "train", None)}
    assert [s for s in STAGES if got[s] == "run"] == ["train", "eval", "report"]
    got = {s: a for s, _, a in plan(cfg, ["complexity_aware"], manifest, None, "split")}
    assert [s for s in STAGES if got[s] == "run"] == ["split"]
    manifest["stages"]["teach"]["status"] = "failed"
    got = {s: a for s, _, a in plan(cfg, ["complexity_aware"], manifest, None, None)}
    assert [s for s in STAGES if got[s] == "run"] == ["teach"]  # the stage that failed; later ones still match


def test_cot_recipes_need_a_teacher():
    cfg = load_config(DEMO)
    cfg.teach = None
    with pytest.raises(RaycatError, match="no teach: section"):
        plan(cfg, ["complexity_aware"], {"stages": {}}, None, None)
    assert dict((s, a) for s, _, a in plan(cfg, ["sft_all"], {"stages": {}}, None, None))["teach"] == "off"


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
            {"scored": 200, "accuracy": 0.51, "roc_auc": 0.7321, "accuracy_greedy": 0.5, "roc_auc_greedy": 0.7012}
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
    assert "| ROC AUC, decoded token (the paper's ≈ 0.73 is this one) | 0.7012 |" in md
    assert (
        "| teacher tokens saved vs teaching every band (estimate) | 75.0% |" in md
        and "| complexity_aware/phase2 | 35 | 6 |" in md
    )
    html = (run / "report/report.html").read_text()
    assert html.count("data:image/png;base64,") == 5 and "<table>" in html  # self-contained


def test_preflight_resources_and_versions():
    from raycat.preflight import resource_problems, stage_asks, version_problems

    cfg = load_config(DEMO)
    assert stage_asks(cfg)["train"] == {"CPU": 2, "GPU": 0}
    assert resource_problems(cfg, {"CPU": 2.0}) == []
    gpu = load_config(ROOT / "jobs/configs/qwen2.5-3b-mmlu-pro.yaml")
    problems = resource_problems(gpu, {"CPU": 64.0, "GPU": 2.0})
    assert "score asks for 4 GPU but the cluster has 2" in problems
    assert "teach asks for 4 GPU but the cluster has 2" in problems  # one TP-4 engine for the 72B teacher
    errors, _ = version_problems(cfg)
    assert errors == []  # this environment has everything the demo needs


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
| ROC AUC, decoded token (the paper's ≈ 0.73 is this one) | 0.7012 | score/metrics.json `roc_auc_greedy` |
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


def test_paired_bootstrap_of_two_models_on_the_same_rows():
    from raycat.evaluate.core import paired_bootstrap

    a = np.array([1, 1, 0, 1, 0, 1, 1, 0] * 5, dtype=bool)
    same = paired_bootstrap(a, a, 500, 0)
    assert same["diff"] == 0 and same["ci95"] == [0.0, 0.0]  # unpaired CIs would not collapse to 0
    b = a.copy()
    b[:10] = False  # b loses seven of a's right answers
    d = paired_bootstrap(a, b, 2000, 0)
    assert d["diff"] == pytest.approx(7 / 40) and 0 < d["ci95"][0] < d["diff"] < d["ci95"][1]


def test_eval_compares_every_model_on_the_same_rows(tmp_path):
    from raycat.evaluate.stage import SINGLE_TOKEN_BASE, EvalPlan, finalize, parts_dir, rows_path
    from raycat.storage import rowkey, rundir

    cfg = load_config(DEMO, [f"run_dir={tmp_path / 'run'}"])
    rows = rowkey.add(
        pd.DataFrame(
            {
                "id": [f"q{i}" for i in range(4)],
                "question": [f"q{i}" for i in range(4)],
                "options": [["a", "b"]] * 4,
                "gold": "A",
                "category": "c",
                "band": ["easy", "medium", "hard", "hard"],
                "correct": [True, False, True, False],  # the score stage's single-token answers
                "predicted": ["A", "B", "A", "B"],
            }
        )
    )
    rundir.write_parquet(rows_path(cfg.run_dir), rows)

    def target(name):
        return EvalPlan(name, "m", None, "answer", name, 8, 100, 0, "vllm", {})

    def answers(name, correct, skip=()):
        out = rows[["id", "row_hash", "band", "category"]].assign(
            model=name,
            kind="answer",
            text="[[A]]",
            extracted="A",
            correct=correct,
            completion_tokens=3,
            finish_reason="stop",
            skip_reason=["prompt too long" if i in skip else "" for i in range(4)],
        )
        rundir.write_part(out, parts_dir(cfg, target(name)))

    answers("base", [False, False, False, False])
    answers("r/phase1", [True, True, True, False], skip=(3,))  # could not ask row 3: out for everyone
    m = finalize(cfg, [target("base"), target("r/phase1")])
    assert m["test_rows"] == 4 and m["compared_rows"] == 3 and m["excluded_rows"]["n"] == 1
    assert list(m["models"]) == [SINGLE_TOKEN_BASE, "base", "r/phase1"]
    assert all(v["overall"]["n"] == 3 for v in m["models"].values())
    assert m["models"][SINGLE_TOKEN_BASE]["overall"]["accuracy"] == pytest.approx(2 / 3)  # not 0 by construction
    assert m["models"]["r/phase1"]["band_average"] == pytest.approx(1.0)
    pair = next(p for p in m["paired"] if p["a"] == "base" and p["b"] == "r/phase1")
    assert pair["n"] == 3 and pair["diff"] == pytest.approx(-1.0)
