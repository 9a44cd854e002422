"""A 2 x 2 study (split quantiles x seeds) end to end on the tiny model: real Ray, real Ray Train +
DeepSpeed, the transformers engines (vLLM's start-up, four variants over, would only add minutes;
the vLLM stages are covered by test_run_e2e)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from raycat.cli import main
from tests.helpers import tiny_config

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.filterwarnings("ignore")]


def _parts(d: Path) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(p) for p in d.glob("*/part-*.parquet")], ignore_index=True)


def _finished(study: Path) -> dict:
    return {
        str(m.parent.name): {s: e.get("finished") for s, e in json.loads(m.read_text())["stages"].items()}
        for m in (study / "variants").glob("*/manifest.json")
    }


def test_a_two_by_two_study_scores_once_teaches_once_trains_four_times_and_reports_their_numbers(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    base = tiny_config(tmp_path / "unused", tiny_model_dir)
    engine = {"backend": "transformers", "device": "cpu", "batch_size": 40}
    base["score"]["engine"] = engine
    base["teach"]["teachers"][0]["engine"] = engine
    base["eval"]["engine"] = engine
    # The random tiny teacher is never right: with on_wrong=drop phase 2 is empty and skipped, so the
    # study trains phase 1 four times (the trainings this test is about) in half the time.
    base["teach"]["on_wrong"] = "drop"
    del base["run_dir"]
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    # The user's path: a relative run_dir, resolved against the directory the command runs in.
    monkeypatch.chdir(tmp_path)
    study = tmp_path / "study"
    spec = {
        "study": {
            "base": "base.yaml",
            "run_dir": "study",
            "axes": {"split.quantiles": [[0.25, 0.75], [0.25, 0.5]]},
            "seeds": [0, 1],
            "rescore_after": "phase1",
        }
    }
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    assert main(["study", "--config", str(tmp_path / "s.yaml")]) == 0

    variants = sorted((study / "variants").iterdir())
    assert len(variants) == 4
    # Scored once: one shared cache, every question once; the later variants found every row there.
    # (The cache also holds the re-scorings after phase 1, each under its own model's key.)
    keys = {pd.read_parquet(v / "score/scores.parquet")["cache_key"].iloc[0] for v in variants}
    assert len(keys) == 1
    student_parts = study / "cache" / "score" / "parts" / keys.pop()
    scored = pd.concat([pd.read_parquet(p) for p in student_parts.glob("part-*.parquet")], ignore_index=True)
    assert len(scored) == scored["id"].nunique() == 40
    rows_scored = [json.loads((v / "score/metrics.json").read_text())["rows_this_run"] for v in variants]
    assert sorted(rows_scored) == [0, 0, 0, 40]
    # Taught once per question: the union of the variants' hard bands, each generated once.
    taught = _parts(study / "cache" / "teach" / "cache")
    assert taught["id"].is_unique
    hard = set().union(*(set(pd.read_parquet(v / "split/hard.parquet")["id"]) for v in variants))
    assert set(taught["id"]) == hard
    assert sum(json.loads((v / "teach/metrics.json").read_text())["rows_this_run"] for v in variants) == len(hard)
    # Four trainings: every variant trained its own phases (seeds and bands differ).
    hashes = {json.loads((v / "train/complexity_aware/phase1/metrics.json").read_text())["hash"] for v in variants}
    assert len(hashes) == 4
    # One report whose numbers are the variants' own.
    report = json.loads((study / "report" / "study.json").read_text())
    for v in report["variants"]:
        ev = json.loads((Path(v["run_dir"]) / "eval/metrics.json").read_text())
        assert v["numbers"]["models"] and all(
            m["accuracy"] == ev["models"][m.get("is", name)]["overall"]["accuracy"]
            for name, m in v["numbers"]["models"].items()
        )
    for s in report["summary"]:
        runs = [v for v in report["variants"] if v["label"] == s["variant"]]
        mine = [v["numbers"]["models"][s["model"]]["accuracy"] for v in runs]
        assert s["mean"] == pytest.approx(sum(mine) / len(mine)) and len(s["seeds"]) == 2
    assert {p["variant"] for p in report["paired"]} == {"split.quantiles=[0.25, 0.5]"}
    assert (study / "report" / "study.md").read_text().startswith("# Study")
    assert report["plot"]["axis"] == "split.quantiles" and (study / "report" / "accuracy_vs_axis.png").is_file()
    for v in report["variants"]:
        logged = [
            h["tokens"]
            for m in Path(v["run_dir"]).glob("train/*/*/metrics.json")
            for h in json.loads(m.read_text()).get("history", [])
        ]
        assert v["numbers"]["training_tokens"] == sum(logged) > 0
        assert v["numbers"]["final"] == {"complexity_aware": "complexity_aware/phase1"}  # phase 2 is empty
    # The analyses: every variant's pool re-scored after phase 1 (band migration over all its rows),
    # and its confident-wrong rows counted.
    for v in report["variants"]:
        pool = sum(len(pd.read_parquet(Path(v["run_dir"]) / f"split/{b}.parquet")) for b in ("easy", "medium", "hard"))
        mig = v["numbers"]["band_migration"]["phase1"]
        assert mig["rows"] == pool and mig["rows_not_rescored"] == 0
        assert sum(sum(row.values()) for row in mig["matrix"].values()) == pool
        assert v["numbers"]["confident_wrong"]["rows"] >= 0

    # Rerun: every stage of every variant is up to date; nothing runs again.
    before = _finished(study)
    assert main(["study", "--config", str(tmp_path / "s.yaml")]) == 0
    assert _finished(study) == before
    assert sum(len(pd.read_parquet(p)) for p in student_parts.glob("part-*.parquet")) == 40
    # The report rebuilds from the study directory alone.
    assert main(["report", "study"]) == 0

    # The cost plan: tokens per question measured on the first variant's rows, hours from a bench record.
    from raycat.study import costs

    params = costs.model_params(str(tiny_model_dir), False)["params"]
    rec = {"kind": "prefill", "device": "cpu", "params": params, "tokens_per_s_per_device": 1000.0}
    rec |= {"model": "tiny", "device_name": "here", "bench": "bench/score.py", "measured_at": "today"}
    (tmp_path / "rates.json").write_text(json.dumps([rec]))
    spec["study"]["scaling"] = {"throughput": ["rates.json"]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    capsys.readouterr()
    assert main(["study", "--config", "s.yaml", "--plan", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    first = pd.read_parquet(variants[0] / "score/scores.parquet")
    for r in rows:
        assert {s["action"] for s in r["stages"].values()} <= {"skip", "off"}  # everything is done
        score = r["costs"]["stages"]["score"]
        assert score["tokens"]["value"] == pytest.approx(
            40 * first.loc[first["status"] == "scored", "prompt_tokens"].mean()
        )
        assert score["device_hours"]["basis"].startswith("measured: tiny")
        assert score["device_hours"]["value"] == pytest.approx(score["tokens"]["value"] / 1000.0 / 3600)
        assert r["memory"]["phases"]["phase1"]["fits"] is True
