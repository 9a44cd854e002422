"""The score and split stages end to end on a real local Ray, with real engines on a tiny model."""

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from raycat.cli import main
from raycat.storage import rundir
from tests.helpers import N_QUESTIONS, kill_after_first_part, make_corpus

# Every test runs `raycat score` on a local Ray.
pytestmark = pytest.mark.integration


def write_config(tmp_path: Path, model: Path, **score) -> Path:
    tree = {
        "run_dir": str(tmp_path / "run"),
        "data": {
            "source": "generic",
            "path": str(make_corpus(tmp_path / "corpus.jsonl")),
            "columns": {
                "id": "qid",
                "question": "question",
                "options": "options",
                "answer": "answer",
                "category": "topic",
            },
        },
        "score": {
            "student": {"path": str(model), "dtype": "float32", "max_model_len": 512},
            "deviation_sample": 8,
            "engine": {"batch_size": 4, "kv_cache_gib": 0.25},
            **score,
        },
        "split": {"test_fraction": 0.2},
        "ray": {"num_cpus": 2},
    }
    p = tmp_path / "config.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def read_scores(tmp_path):
    return rundir.read_parquet(str(tmp_path / "run" / "score" / "scores.parquet"))


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("vllm-run")
    cfg = write_config(tmp, tiny_model_dir)
    assert main(["score", "--config", str(cfg)]) == 0
    return tmp, cfg


@pytest.mark.vllm
def test_vllm_in_ray_data_scores_every_question(vllm_run):
    tmp, _ = vllm_run
    df = read_scores(tmp)
    assert sorted(df.id) == sorted([f"q{i:03d}" for i in range(N_QUESTIONS)] + ["ten"])
    assert df.id.is_unique and (df.status == "scored").all()
    assert df.entropy.between(0, 10**0.5).all()
    assert (df.entropy == df.entropy_options).all()
    assert df.predicted.isin(list("ABCDEFGHIJ")).all()
    assert (df.correct == (df.predicted == df.gold)).all()
    assert df.option_mass.between(0, 1).all()
    assert {"model", "model_revision", "template_hash", "prompt_version", "entropy_mode", "cache_key"} <= set(df)
    metrics = json.loads((tmp / "run" / "score" / "metrics.json").read_text())
    assert metrics["scored"] == N_QUESTIONS + 1 and metrics["missing"] == 0
    assert metrics["accuracy"] == pytest.approx(df.correct.mean())
    assert metrics["deviation_from_full"]["options_vs_full"]["n"] == 8
    assert metrics["deviation_from_full"]["topk_vs_full"]["within_bound"] is True
    assert set(metrics["per_category"]) == {"alpha", "beta"}
    assert sum(metrics["entropy"]["histogram"]["counts"]) == N_QUESTIONS + 1
    assert (tmp / "run" / "score" / "config.yaml").is_file()


@pytest.mark.vllm
def test_split_after_vllm_scoring(vllm_run):
    tmp, cfg = vllm_run
    assert main(["split", "--config", str(cfg)]) == 0
    out = tmp / "run" / "split"
    info = json.loads((out / "thresholds.json").read_text())
    bands = {b: pd.read_parquet(out / f"{b}.parquet") for b in ("easy", "medium", "hard")}
    test = pd.read_parquet(out / "test.parquet")
    ids = pd.concat([*bands.values(), test]).id
    assert ids.is_unique and len(ids) == N_QUESTIONS + 1
    lo, hi = info["thresholds"]
    assert (bands["easy"].entropy < lo).all() and (bands["hard"].entropy >= hi).all()
    assert bands["medium"].entropy.between(lo, hi, inclusive="left").all()
    assert {"question", "options", "gold", "entropy", "band"} <= set(bands["hard"])


@pytest.mark.vllm
def test_rerun_skips_finished_ids(vllm_run):
    tmp, cfg = vllm_run
    before = read_scores(tmp)
    assert main(["score", "--config", str(cfg)]) == 0
    m = json.loads((tmp / "run" / "score" / "metrics.json").read_text())
    assert m["rows_this_run"] == 0
    pd.testing.assert_frame_equal(before, read_scores(tmp))


@pytest.mark.vllm
def test_killed_run_resumes_without_losing_or_duplicating_rows(vllm_run, tmp_path, tiny_model_dir):
    tmp_ref, _ = vllm_run
    # batch_size=1: many small parts, so the kill lands mid-run (batching does not enter the cache key).
    cfg = write_config(tmp_path, tiny_model_dir, engine={"batch_size": 1, "kv_cache_gib": 0.25})
    written = kill_after_first_part("score", cfg, tmp_path / "run" / "score" / "parts")
    assert 0 < written < N_QUESTIONS + 1, "the kill must land mid-run"
    assert main(["score", "--config", str(cfg)]) == 0
    m = json.loads((tmp_path / "run" / "score" / "metrics.json").read_text())
    assert m["rows_this_run"] == N_QUESTIONS + 1 - written
    resumed, ref = read_scores(tmp_path), read_scores(tmp_ref)
    # The same multiset: nothing lost, nothing twice.
    assert sorted(resumed.id) == sorted(ref.id)
    merged = resumed.merge(ref, on="id", suffixes=("", "_ref"))
    assert (merged.entropy - merged.entropy_ref).abs().max() < 1e-5
    assert (merged.predicted == merged.predicted_ref).all()


def test_transformers_backend_paper_preset_reports_multi_token_labels(tmp_path, tiny_model_dir):
    cfg = write_config(
        tmp_path, tiny_model_dir, prompt={"preset": "paper"}, engine={"backend": "transformers", "batch_size": 8}
    )
    assert main(["score", "--config", str(cfg)]) == 0
    skipped = rundir.read_parquet(str(tmp_path / "run" / "score" / "skipped.parquet"))
    assert list(skipped.id) == ["ten"]
    assert "'10'" in skipped.skip_reason.iloc[0] and "preset=letters" in skipped.skip_reason.iloc[0]
    m = json.loads((tmp_path / "run" / "score" / "metrics.json").read_text())
    assert m["scored"] == N_QUESTIONS and sum(m["skipped"].values()) == 1
    df = read_scores(tmp_path)
    assert df.predicted.isin(list("ABCDE") + ["IDK"]).all()
    assert (df.idk == (df.predicted == "IDK")).all()
    assert main(["split", "--config", str(cfg)]) == 0
    info = json.loads((tmp_path / "run" / "split" / "thresholds.json").read_text())
    assert info["skipped"]["idk"] == int(df.idk.sum())
    # Full-vocabulary entropy needs no single-token labels: the ten-option row is scored, its answer
    # read from the decoded text.
    assert main(["score", "--config", str(cfg), "score.entropy_mode=full"]) == 0
    full = read_scores(tmp_path)
    assert len(full) == N_QUESTIONS + 1 and "ten" in set(full.id) and full.entropy.notna().all()
    assert full.predicted_greedy.isin(list("ABCDEFGHIJ") + ["IDK", ""]).all()
    assert (full.correct_greedy == (full.predicted_greedy == full.gold)).all()
    assert "roc_auc_greedy" in json.loads((tmp_path / "run" / "score" / "metrics.json").read_text())


def test_free_form_questions_in_full_mode(tmp_path, tiny_model_dir):
    rows = [{"question": f"What is {i} + {i}?", "answer": f"work\n#### {2 * i}"} for i in range(6)]
    (tmp_path / "gsm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tree = {
        "run_dir": str(tmp_path / "run"),
        "data": {"source": "gsm8k", "path": str(tmp_path / "gsm.jsonl")},
        "score": {
            "student": {"path": str(tiny_model_dir), "dtype": "float32", "max_model_len": 512},
            "entropy_mode": "full",
            "free_form_max_tokens": 4,
            "engine": {"backend": "transformers"},
        },
        "ray": {"num_cpus": 2},
    }
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tree))
    assert main(["score", "--config", str(p)]) == 0
    df = read_scores(tmp_path)
    assert len(df) == 6 and df.entropy.notna().all() and (df.entropy == df.entropy_full).all()
    assert df.option_mass.isna().all() and (df.correct == (df.predicted == df.gold)).all()


def test_free_form_rows_in_options_mode_are_skipped_with_the_fix(tmp_path, tiny_model_dir):
    (tmp_path / "n.jsonl").write_text(
        "".join(json.dumps({"question": f"{i}+1?", "answer": i + 1}) + "\n" for i in range(3))
    )
    tree = {
        "run_dir": str(tmp_path / "run"),
        "data": {
            "source": "generic",
            "path": str(tmp_path / "n.jsonl"),
            "columns": {"options": None},
            "answer_format": "number",
        },
        "score": {
            "student": {"path": str(tiny_model_dir), "dtype": "float32", "max_model_len": 512},
            "engine": {"backend": "transformers"},
        },
        "ray": {"num_cpus": 2},
    }
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tree))
    assert main(["score", "--config", str(p)]) == 0
    skipped = rundir.read_parquet(str(tmp_path / "run" / "score" / "skipped.parquet"))
    assert len(skipped) == 3 and skipped.skip_reason.str.contains("entropy_mode=full or topk").all()


@pytest.mark.vllm
def test_relative_run_dir_as_in_the_demo_config(tmp_path, tiny_model_dir, monkeypatch):
    """The demo config's run_dir is relative (runs/demo-cpu); the corpus task, the part writers and the
    merge run in Ray workers, which must still write under the user's working directory."""
    cfg = write_config(tmp_path, tiny_model_dir)
    tree = yaml.safe_load(cfg.read_text())
    tree["run_dir"] = "runs/rel"
    tree["data"]["limit"] = 40
    cfg.write_text(yaml.safe_dump(tree))
    monkeypatch.chdir(tmp_path)
    assert main(["score", "--config", "config.yaml"]) == 0
    assert len(rundir.read_parquet(str(tmp_path / "runs/rel/score/scores.parquet"))) == 40
    assert list((tmp_path / "runs/rel/score/parts").iterdir())
    # Split, and teach's rows / parts / merge, also run in Ray workers with the relative run_dir.
    tree["split"] = {"test_fraction": 0.2}
    teacher_model = {"path": str(tiny_model_dir), "dtype": "float32", "max_model_len": 512}
    tree["teach"] = {
        "teachers": [{"model": teacher_model, "engine": {"backend": "transformers", "batch_size": 8}}],
        "sampling": {"max_tokens": 8},
        "retries": 0,
        "max_failure_ratio": 1.0,
    }
    cfg.write_text(yaml.safe_dump(tree))
    assert main(["split", "--config", "config.yaml"]) == 0
    assert main(["teach", "--config", "config.yaml"]) == 0
    hard = rundir.read_parquet(str(tmp_path / "runs/rel/split/hard.parquet"))
    m = json.loads((tmp_path / "runs/rel/teach/metrics.json").read_text())
    assert m["rows"] == len(hard) > 0 and list((tmp_path / "runs/rel/teach/cache").iterdir())
