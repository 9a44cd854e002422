"""The eval stage's driver side without engines: the targets it builds and the comparison finalize writes."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from raycat.config import load_config
from tests.helpers import DEMO


def test_eval_targets_serve_lora_phases_as_adapters_and_load_full_phases(tmp_path):
    from raycat.config import validate_config
    from raycat.evaluate.stage import make_plans

    run = tmp_path / "run"
    for recipe, adapter in (("sft_all", True), ("distill_all", False)):
        pdir = run / "train" / recipe / "phase1"
        (pdir / "model").mkdir(parents=True)
        (pdir / "done.json").write_text(json.dumps({"hash": recipe}))
        (pdir / "model" / ("adapter_config.json" if adapter else "config.json")).write_text('{"r": 4}')
    cfg = validate_config(
        {"run_dir": f"file://{run}", "data": {"source": "synthetic"}, "score": {"student": {"path": "org/student"}}}
    )
    got = {t.name: t for t in make_plans(cfg, ["sft_all", "distill_all"])}
    lora, full = got["sft_all/phase1"], got["distill_all/phase1"]
    assert (lora.model_path, lora.adapter) == ("org/student", f"file://{run}/train/sft_all/phase1/model")
    assert (full.model_path, full.adapter) == (f"file://{run}/train/distill_all/phase1/model", None)
    # The cache key follows the model dir's content: a retrained adapter is evaluated again.
    (run / "train/sft_all/phase1/model/adapter_config.json").write_text('{"r": 8}')
    assert {t.name: t for t in make_plans(cfg, ["sft_all"])}["sft_all/phase1"].cache_key != lora.cache_key


def test_lora_phases_with_merged_weights_are_served_merged_unless_the_adapter_is_asked_for(tmp_path):
    from raycat.config import validate_config
    from raycat.errors import MissingInputError
    from raycat.evaluate.stage import make_plans

    run = tmp_path / "run"
    pdir = run / "train" / "sft_all" / "phase1"
    (pdir / "model").mkdir(parents=True)
    (pdir / "done.json").write_text(json.dumps({"hash": "h"}))
    (pdir / "model" / "adapter_config.json").write_text('{"r": 4}')
    tree = {"run_dir": str(run), "data": {"source": "synthetic"}, "score": {"student": {"path": "org/student"}}}

    def plan(choice):
        cfg = validate_config({**tree, "eval": {"lora_weights": choice}})
        return make_plans(cfg, ["sft_all"])[-1]

    assert plan("auto").adapter == str(pdir / "model")  # nothing merged: the adapter
    with pytest.raises(MissingInputError, match="train.lora.merge=true"):
        plan("merged")
    (pdir / "merged").mkdir()
    (pdir / "merged" / "config.json").write_text("{}")
    # A merged/ this training did not record (a retrain with merge off, or a merge of an earlier training)
    # is stale: the adapter is served.
    (pdir / "metrics.json").write_text(json.dumps({"hash": "h"}))
    assert plan("auto").adapter == str(pdir / "model")
    (pdir / "metrics.json").write_text(json.dumps({"hash": "earlier", "merged": str(pdir / "merged")}))
    assert plan("auto").adapter == str(pdir / "model")
    (pdir / "metrics.json").write_text(json.dumps({"hash": "h", "merged": str(pdir / "merged")}))
    merged, adapter = plan("auto"), plan("adapter")
    assert (merged.model_path, merged.adapter) == (str(pdir / "merged"), None)
    assert adapter.adapter == str(pdir / "model") and merged.cache_key != adapter.cache_key
    assert plan("merged").model_path == merged.model_path


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


def test_eval_refuses_a_model_trained_under_other_train_settings(tmp_path):
    """Review m10 / issue 22 item 5: a train setting changed without training is refused, naming the key;
    settings that change no weights (lora.merge) and a done.json from before settings were recorded are
    taken as they are."""
    from raycat.config import validate_config
    from raycat.errors import RaycatError
    from raycat.evaluate.stage import make_plans
    from raycat.recipes import phase_settings

    run = tmp_path / "run"

    def cfg(**train):
        tree = {"run_dir": str(run), "data": {"source": "synthetic"}, "score": {"student": {"path": "org/s"}}}
        return validate_config({**tree, "train": train})

    trained = cfg(phase1={"lr": 2e-4})
    for phase in ("phase1", "phase2"):
        pdir = run / "train" / "complexity_aware" / phase
        (pdir / "model").mkdir(parents=True)
        (pdir / "model" / "adapter_config.json").write_text("{}")
        settings = phase_settings(trained, "complexity_aware", phase)
        (pdir / "done.json").write_text(json.dumps({"hash": phase, "settings": settings}))

    assert len(make_plans(trained, ["complexity_aware"])) == 3
    assert len(make_plans(cfg(phase1={"lr": 2e-4}, lora={"merge": True}), ["complexity_aware"])) == 3
    with pytest.raises(RaycatError, match=r"complexity_aware/phase1 was not trained with this config") as e:
        make_plans(cfg(phase1={"lr": 1e-4}), ["complexity_aware"])
    assert "train.phase1.lr: 0.0002 -> 0.0001" in str(e.value) and "raycat train" in str(e.value)
    # Phase 2 continues from phase 1: phase 1's settings are phase 2's too.
    assert "train.phase1.lr" in phase_settings(trained, "complexity_aware", "phase2")
    with pytest.raises(RaycatError, match=r"complexity_aware/phase2 was not trained.*train.phase2.epochs: 3 -> 1"):
        make_plans(cfg(phase1={"lr": 2e-4}, phase2={"epochs": 1}), ["complexity_aware"])
    with pytest.raises(RaycatError, match=r"train.method: 'lora' -> 'full'"):
        make_plans(cfg(phase1={"lr": 2e-4}, method="full"), ["complexity_aware"])
    # Recorded before settings were: accepted.
    for phase in ("phase1", "phase2"):
        (run / "train" / "complexity_aware" / phase / "done.json").write_text(json.dumps({"hash": phase}))
    assert len(make_plans(cfg(phase1={"lr": 1e-4}), ["complexity_aware"])) == 3


def test_raycat_eval_on_the_users_path_refuses_before_ray_starts(tmp_path, monkeypatch, capsys):
    """Item 5 as a user meets it: the CLI, a relative run_dir, a train override on the command line and
    no `raycat train` since. done.json holds what training records for the unchanged config (the real
    DeepSpeed test checks that training writes exactly this)."""
    import ray

    from raycat.cli import main
    from raycat.recipes import phase_settings
    from tests.helpers import write_config

    monkeypatch.chdir(tmp_path)
    tree = {"run_dir": "runs/x", "data": {"source": "synthetic"}, "score": {"student": {"path": "org/s"}}}
    config = write_config(tmp_path, tree)
    cfg = load_config(config)
    split = tmp_path / "runs/x/split"
    split.mkdir(parents=True)
    test = {"id": ["q0"], "row_hash": ["h"], "question": ["q?"], "options": [["a", "b"]], "category": ["c"]}
    pd.DataFrame({**test, "gold": ["A"], "band": ["easy"]}).to_parquet(split / "test.parquet")
    for phase in ("phase1", "phase2"):
        pdir = tmp_path / "runs/x/train/complexity_aware" / phase
        (pdir / "model").mkdir(parents=True)
        done = {"hash": phase, "settings": phase_settings(cfg, "complexity_aware", phase)}
        (pdir / "done.json").write_text(json.dumps(done))
    assert main(["eval", "--config", str(config), "train.phase1.lr=0.5"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "complexity_aware/phase1 was not trained with this config" in err and "train.phase1.lr: 0.0001 -> 0.5" in err
    assert not ray.is_initialized()
