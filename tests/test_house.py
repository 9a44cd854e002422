"""The error boundary seen from the CLI (no Ray, no engines): errors print as written, unexpected errors keep
their traceback, and the teach driver checks its input and its API key before Ray starts."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from raycat import split
from raycat.cli import main


def write_config(tmp_path: Path, tree: dict) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def test_teach_driver_checks_its_columns_before_ray(tmp_path, capsys):
    import ray

    run = tmp_path / "run"
    (run / "split").mkdir(parents=True)
    for band in ("easy", "medium", "hard"):
        row = {"id": [f"{band}1"], "row_hash": ["h"], "question": ["q?"], "options": [["x", "y"]], "category": ["c"]}
        pd.DataFrame(row).to_parquet(run / "split" / f"{band}.parquet")
    cfg = {
        "run_dir": str(run),
        "data": {"source": "synthetic"},
        "score": {"student": {"path": "unused"}},
        "teach": {"teachers": [{"model": {"path": "unused"}}]},
    }
    p = write_config(tmp_path, cfg)
    assert main(["teach", "--config", str(p)]) == 1
    err = capsys.readouterr().err
    assert "teach: input rows lack column(s) gold" in " ".join(err.split())
    assert not ray.is_initialized()


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


def test_missing_api_key_is_reported_on_the_driver_before_ray(tmp_path, monkeypatch, capsys):
    import ray

    monkeypatch.delenv("RAYCAT_NO_SUCH_KEY", raising=False)
    run = tmp_path / "run"
    (run / "split").mkdir(parents=True)
    for band in ("easy", "medium", "hard"):
        row = {"id": [f"{band}1"], "row_hash": ["h"], "question": ["q?"], "options": [["x", "y"]], "category": ["c"]}
        pd.DataFrame({**row, "gold": ["A"]}).to_parquet(run / "split" / f"{band}.parquet")
    cfg = {
        "run_dir": str(run),
        "data": {"source": "synthetic"},
        "score": {"student": {"path": "unused"}},
        "teach": {
            "teachers": [
                {
                    "model": {"path": "hosted"},
                    "api": {"base_url": "http://127.0.0.1:9/v1", "api_key_env": "RAYCAT_NO_SUCH_KEY"},
                }
            ]
        },
    }
    p = write_config(tmp_path, cfg)
    assert main(["teach", "--config", str(p)]) == 1
    assert "RAYCAT_NO_SUCH_KEY" in capsys.readouterr().err and not ray.is_initialized()
