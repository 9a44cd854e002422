"""The method-effect study (jobs/studies/method-effect-cpu.yaml) as CI's tiny smoke variant: the shipped
study file, shrunk by overrides to 36 questions, one seed and two steps per phase on the tiny model
(transformers engines: no vLLM start-up), through every real stage: scoring with the answer prefix,
the oracle teacher, Ray Train + DeepSpeed for three recipes, eval, and the report `raycat report`
rebuilds. The full study (SmolLM2-135M, three seeds, 31 minutes here) is README's "Does it work?"."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from raycat.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

STUDY = Path(__file__).resolve().parents[2] / "jobs" / "studies" / "method-effect-cpu.yaml"


def test_the_method_effect_study_runs_end_to_end_and_its_report_rebuilds(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    engine = ["backend=transformers", "batch_size=12"]
    tiny = str(tiny_model_dir)
    overrides = [
        "study.run_dir=smoke",
        "study.seeds=[0]",
        "data.synthetic.num_questions=36",
        f"score.student.path={tiny}",
        "score.student.dtype=float32",
        f"teach.teachers.0.model.path={tiny}",
        *(f"{stage}.engine.{kv}" for stage in ("score", "eval") for kv in engine),
        "eval.max_tokens_cot=24",
        "train.lora.r=4",
        "train.deepspeed.zero_stage=0",
        "train.phase1.max_steps=2",
        "train.phase2.max_steps=2",
        "ray.num_cpus=2",
    ]
    assert main(["study", "--config", str(STUDY), *overrides]) == 0

    report = json.loads((tmp_path / "smoke" / "report" / "study.json").read_text())
    assert report["recipes"] == ["complexity_aware", "sft_all", "distill_all"]
    (run,) = (Path(v["run_dir"]) for v in report["variants"])
    # The oracle taught every training row (distill_all needs them all), each verified and labelled.
    cot = pd.read_parquet(run / "teach" / "cot.parquet")
    pool = sum(len(pd.read_parquet(run / "split" / f"{b}.parquet")) for b in ("easy", "medium", "hard"))
    assert len(cot) == pool and set(cot["final_status"]) == {"verified"}
    assert cot["teacher"].str.startswith("oracle (solver").all()
    # Recipe against recipe, each row of the held-out set paired within the run.
    pairs = {(p["a"], p["b"]): p for p in report["recipe_paired"]}
    bases = ("base", "base (single-token, from score)")
    assert set(pairs) == {("complexity_aware", b) for b in ("sft_all", "distill_all", *bases)}
    test_rows = len(pd.read_parquet(run / "split" / "test.parquet"))
    assert all(p["n"] == test_rows and p["seeds"] == 1 and p["mde80"] is not None for p in pairs.values())
    ev = json.loads((run / "eval" / "metrics.json").read_text())["models"]
    final = {r: max(n for n in ev if n.startswith(f"{r}/")) for r in ("complexity_aware", "sft_all")}
    diff = ev[final["complexity_aware"]]["overall"]["accuracy"] - ev[final["sft_all"]]["overall"]["accuracy"]
    assert pairs[("complexity_aware", "sft_all")]["diff"] == pytest.approx(diff)
    # Teacher tokens per recipe: none for SFT, the hard band's for the method, every band's for distillation.
    per_band = json.loads((run / "teach" / "metrics.json").read_text())["accounting"]["per_band"]
    tokens = {c["recipe"]: c["teacher_tokens"] for c in report["recipe_costs"]}
    assert tokens == {
        "sft_all": 0,
        "complexity_aware": per_band["hard"]["tokens"],
        "distill_all": sum(b["tokens"] for b in per_band.values()),
    }
    (signal,) = report["signal"]
    assert signal["rows"] == test_rows and signal["base_accuracy"] is not None
    md = (tmp_path / "smoke" / "report" / "study.md").read_text()
    for heading in ("## Signal check", "## Recipe against recipe", "## Teacher tokens per recipe"):
        assert heading in md
    assert (tmp_path / "smoke" / "report" / "accuracy_vs_recipe.png").stat().st_size > 1000

    # `raycat report` rebuilds the same numbers from the study directory alone.
    (tmp_path / "smoke" / "report" / "study.json").unlink()
    assert main(["report", "smoke"]) == 0
    again = json.loads((tmp_path / "smoke" / "report" / "study.json").read_text())
    assert again["recipe_paired"] == report["recipe_paired"] and again["recipe_costs"] == report["recipe_costs"]
