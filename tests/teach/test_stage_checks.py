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
    from raycat.teach.results import cascade

    def result(statuses, teacher, i):
        return pd.DataFrame({"_pos": range(len(statuses)), "status": statuses, "teacher": teacher, "_teacher": i})

    first = result(["wrong", "verified", "wrong", "failed", "skipped", "skipped"], "t1", 0)
    second = result(["failed", "verified", "truncated", "failed", "wrong", "failed"], "t2", 1)
    got = cascade(pd.concat([second, first], ignore_index=True), 2)
    assert list(zip(got["status"], got["teacher"], strict=True)) == [
        ("wrong", "t1"),
        ("verified", "t1"),
        ("truncated", "t2"),
        ("failed", "t2"),
        ("wrong", "t2"),  # too long for t1, answered by t2 (a longer context)
        ("failed", "t2"),  # a failure is retried by the next run: it shows, not the skip
    ]


def test_the_rows_to_teach_are_streamed_from_the_bands_with_the_limit_drawn_as_before(tmp_path):
    """teach.prepare reads the band files batch by batch; teach.limit keeps the rows that
    DataFrame.sample(n=limit, random_state=seed) over the bands' concatenation kept (same rows, same
    order), so runs from before the streaming rewrite keep their teacher cache."""
    from raycat.config import validate_config
    from raycat.storage import rundir
    from raycat.teach.stage import prepare, rows_path

    run = tmp_path / "run"
    (run / "split").mkdir(parents=True)
    frames = []
    for k, band in enumerate(("easy", "medium", "hard")):
        n = [150_000, 3, 70_001][k]
        rows = pd.DataFrame({"id": [f"{band}{i}" for i in range(n)], "row_hash": "h", "band": band, "x": range(n)})
        rows.to_parquet(run / "split" / f"{band}.parquet", row_group_size=40_000)
        frames.append(rows)
    tree = {
        "run_dir": str(run),
        "data": {"source": "synthetic"},
        "score": {"student": {"path": "unused"}},
        "teach": {"teachers": [{"model": {"path": "unused"}}], "bands": "all", "limit": 1000, "seed": 7},
    }
    assert prepare(validate_config(tree)) == 1000
    got = rundir.read_parquet(rows_path(str(run)))
    want = pd.concat(frames, ignore_index=True).sample(n=1000, random_state=7).sort_index()
    assert got["id"].tolist() == want["id"].tolist()
    assert got["band"].tolist() == want["band"].tolist() and set(got["band"]) == {"easy", "hard"}
    tree["teach"].update(bands=["hard"], limit=None)
    assert prepare(validate_config(tree)) == 70_001
    got = rundir.read_parquet(rows_path(str(run)))
    assert got["id"].tolist() == frames[2]["id"].tolist() and (got["band"] == "hard").all()
