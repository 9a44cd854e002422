"""The teach driver checks its input rows and its teachers' API keys on the driver, before Ray starts."""

from __future__ import annotations

import pandas as pd

from raycat.cli import main
from tests.helpers import write_config


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


def test_a_larger_teacher_max_model_len_reteaches_rows_skipped_as_too_long(monkeypatch, tiny_model_dir):
    from raycat.config import validate_config
    from raycat.teach.stage import make_plan

    monkeypatch.setenv("RAYCAT_TEST_KEY", "k")

    def key(max_model_len: int, max_tokens: int = 512, api: bool = False, dtype: str = "auto", name=None) -> str:
        model = {"path": "t" if api else str(tiny_model_dir), "max_model_len": max_model_len, "dtype": dtype}
        teacher = {"model": model, **({"api": {"base_url": "http://x/v1", "model": name}} if api else {})}
        tree = {
            "data": {"source": "synthetic"},
            "score": {"student": {"path": "m"}},
            "teach": {"teachers": [teacher], "sampling": {"max_tokens": max_tokens}},
        }
        cfg = validate_config(tree)
        return make_plan(cfg, cfg.teach.teachers[0]).cache_key

    # A local teacher caches rows over its prompt budget as skipped; raising the budget must teach them.
    assert key(4096) != key(8192) and key(4096, 512) != key(4096, 1024)
    assert key(4096) == key(4096)
    # An HTTP teacher skips nothing (the server has its own limits) and uses neither model.max_model_len
    # nor model.dtype: changing them must not buy every row again.
    assert key(4096, api=True) == key(8192, api=True) == key(4096, api=True, dtype="float32")
    assert key(4096, 512, api=True) != key(4096, 1024, api=True)  # the completion budget is the schedule's
    # The model the server is asked for is api.model when set: another model is another cache.
    assert key(4096, api=True, name="org/other") != key(4096, api=True) == key(4096, api=True, name="t")


def test_the_cascade_keeps_a_wrong_cot_over_a_later_teachers_failed_request():
    """Review m5: teacher 1 answered wrong, teacher 2 could not be reached; under on_wrong=keep the wrong
    CoT is a target, so it must win over the failure. Verified still wins in teacher order, and among
    answers the later teacher's."""
    from raycat.teach.stage import _cascade

    def result(statuses):
        return pd.DataFrame({"_key": [f"k{i}" for i in range(len(statuses))], "status": statuses})

    rows = pd.DataFrame({"_key": ["k0", "k1", "k2", "k3", "k4", "k5"]})
    first = result(["wrong", "verified", "wrong", "failed", "skipped", "skipped"]).assign(teacher="t1")
    second = result(["failed", "verified", "truncated", "failed", "wrong", "failed"]).assign(teacher="t2")
    got = _cascade(rows, [first, second])
    assert list(zip(got["status"], got["teacher"], strict=True)) == [
        ("wrong", "t1"),
        ("verified", "t1"),
        ("truncated", "t2"),
        ("failed", "t2"),
        ("wrong", "t2"),  # too long for t1, answered by t2 (a longer context)
        ("failed", "t2"),  # a failure is retried by the next run: it shows, not the skip
    ]
