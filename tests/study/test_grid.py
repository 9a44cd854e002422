"""`raycat study` units: expansion, variant configs, plan, and the comparison report's arithmetic."""

import numpy as np
import pandas as pd
import pytest
import yaml

from raycat.config import ConfigError
from raycat.storage import rundir
from raycat.study.comparison import paired, summarize
from raycat.study.grid import StudyConfig, expand, load_study, plan
from tests.helpers import ROOT

BASE = {
    "data": {"source": "synthetic", "sample": 40},
    "score": {"student": {"path": "m"}},
    "teach": {"teachers": [{"model": {"path": "t"}}]},
}


def write_study(tmp_path, **study):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({"study": {"base": "base.yaml", "run_dir": str(tmp_path / "study"), **study}}))
    return p


def test_grid_times_seeds_in_order_with_unique_directories():
    sc = StudyConfig(
        base={}, axes={"split.quantiles": [[0.25, 0.75], [0.1, 0.9]], "train.method": ["lora", "full"]}, seeds=[0, 1]
    )
    vs = expand(sc)
    assert len(vs) == 8
    assert [v.seed for v in vs[:2]] == [0, 1] and vs[0].label == vs[1].label
    assert vs[0].label == 'split.quantiles=[0.25, 0.75], train.method="lora"'
    assert len({v.slug for v in vs}) == 8
    explicit = StudyConfig(base={}, variants=[{"name": "a", "set": {"teach.on_wrong": "keep"}}, {"name": "b"}])
    assert [v.label for v in expand(explicit)] == ["a", "b"]


def test_variant_configs_apply_set_axes_and_seed_and_share_one_cache(tmp_path):
    s = load_study(
        write_study(
            tmp_path,
            set={"split.test_fraction": 0.25},
            axes={"split.quantiles": [[0.1, 0.9]]},
            seeds=[3],
            seed_keys=["train.seed", "split.seed"],
        )
    )
    (v,) = s.variants()
    cfg = s.variant_config(v)
    assert cfg.split.quantiles == (0.1, 0.9) or list(cfg.split.quantiles) == [0.1, 0.9]
    assert cfg.split.test_fraction == 0.25 and cfg.train.seed == 3 and cfg.split.seed == 3
    assert cfg.run_dir.startswith(str(tmp_path / "study" / "variants"))
    assert cfg.cache_dir == str(tmp_path / "study" / "cache")


def test_study_overrides_set_the_study_and_the_base_config_of_every_variant(tmp_path):
    path = write_study(tmp_path, axes={"split.quantiles": [[0.1, 0.9], [0.2, 0.8]]})
    s = load_study(path, [f"study.run_dir={tmp_path / 'elsewhere'}", "score.engine.batch_size=3"])
    assert s.root == str(tmp_path / "elsewhere")
    for variant in s.variants():
        cfg = s.variant_config(variant)
        assert cfg.score.engine.batch_size == 3 and cfg.run_dir.startswith(str(tmp_path / "elsewhere"))
    with pytest.raises(ConfigError, match=r"set study.run_dir=\.\.\. instead"):
        load_study(path, ["run_dir=/x"])


def test_raycat_study_takes_overrides_on_the_command_line(tmp_path, capsys):
    import json

    from raycat.cli import main

    path = write_study(tmp_path, axes={"split.quantiles": [[0.1, 0.9]]})
    assert main(["study", "--config", str(path), "--plan", "--json", f"study.run_dir={tmp_path / 'cli'}"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows and all(row["run_dir"].startswith(str(tmp_path / "cli")) for row in rows)


def test_a_bad_variant_or_baseline_fails_before_anything_runs(tmp_path):
    with pytest.raises(ConfigError, match=r"(?s)study variant 'split.quantiles=.*seed 0.*split.quantiles"):
        load_study(write_study(tmp_path, axes={"split.quantiles": [[0.9, 0.1]]}))
    with pytest.raises(ConfigError, match="study.baseline 'nope' is not a variant"):
        load_study(write_study(tmp_path, axes={"split.quantiles": [[0.2, 0.8]]}, baseline="nope"))
    with pytest.raises(ConfigError, match="study.base: .* not found"):
        p = tmp_path / "x.yaml"
        p.write_text(yaml.safe_dump({"study": {"base": "missing.yaml"}}))
        load_study(p)


def test_plan_marks_stages_whose_inputs_an_earlier_variant_shares(tmp_path):
    s = load_study(write_study(tmp_path, axes={"split.quantiles": [[0.25, 0.75], [0.1, 0.9]]}, seeds=[0, 1]))
    rows = plan(s)
    assert len(rows) == 4 and all(r["stages"]["score"]["action"] == "run" for r in rows)
    first = f"{rows[0]['variant']} (seed 0)"
    # score and split read neither the split ratio nor the training seed: one set of inputs for all four
    assert [r["stages"]["score"]["same_as"] for r in rows] == [None, first, first, first]
    # the seed changes training only: the second seed of a ratio shares its split
    assert rows[1]["stages"]["split"]["same_as"] == first and rows[2]["stages"]["split"]["same_as"] is None
    assert rows[1]["stages"]["train"]["same_as"] is None  # another seed trains anew
    assert rows[0]["estimate"]["questions"] == 40


def _variant(tmp_path, label, seed, correct: dict[str, list[int]], acc: dict[str, float]):
    run = tmp_path / f"{label}-{seed}"
    rows = []
    for model, c in correct.items():
        rows += [
            {"id": f"q{i}", "row_hash": "h", "model": model, "correct": bool(x), "compared": True}
            for i, x in enumerate(c)
        ]
    rundir.write_parquet(str(run / "eval" / "eval.parquet"), pd.DataFrame(rows))
    return {
        "label": label,
        "seed": seed,
        "run_dir": str(run),
        "numbers": {"models": {m: {"accuracy": a, "n": 4, "per_band": {"hard": a / 2}} for m, a in acc.items()}},
    }


def test_summary_across_seeds_and_paired_differences_on_the_same_rows(tmp_path):
    vs = [
        _variant(tmp_path, "base", 0, {"p1": [1, 0, 0, 0]}, {"p1": 0.25}),
        _variant(tmp_path, "base", 1, {"p1": [1, 1, 0, 0]}, {"p1": 0.5}),
        _variant(tmp_path, "wide", 0, {"p1": [1, 1, 1, 0]}, {"p1": 0.75}),
        _variant(tmp_path, "wide", 1, {"p1": [1, 1, 0, 0]}, {"p1": 0.5}),
    ]
    s = {(x["variant"], x["model"]): x for x in summarize(vs)}
    assert s[("base", "p1")]["mean"] == pytest.approx(0.375) and s[("base", "p1")]["std"] == pytest.approx(
        np.std([0.25, 0.5], ddof=1)
    )
    lo, hi = s[("wide", "p1")]["ci95_across_seeds"]
    assert lo < 0.625 < hi and s[("wide", "p1")]["per_band_mean"]["hard"] == pytest.approx(0.3125)
    (p,) = paired(vs, "base")
    # seed 0: +2 of 4 rows better; seed 1: identical. Pooled over 8 row pairs: +0.25.
    assert (p["variant"], p["model"], p["seeds"], p["n"]) == ("wide", "p1", 2, 8) and p["diff"] == pytest.approx(0.25)
    assert p["ci95"][0] <= 0.25 <= p["ci95"][1]


@pytest.mark.parametrize("path", sorted(ROOT.joinpath("jobs", "studies").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_study_configs_validate_every_variant(path):
    s = load_study(path)  # every variant's config is validated here (no GPU, no cluster needed)
    assert len(s.variants()) >= 2
    assert s.config.baseline is None or s.config.baseline in {v.label for v in s.variants()}


def test_accuracy_vs_axis_points_are_the_summary_means_with_quantiles_as_hard_fraction(tmp_path):
    from raycat.study.plot import series, write_png

    variants = [
        {"label": "a", "values": [["split.quantiles", [0.25, 0.75]], ["train.method", "lora"]]},
        {"label": "b", "values": [["split.quantiles", [0.25, 0.5]], ["train.method", "lora"]]},
    ]
    summary = [
        {"variant": "b", "model": "m", "mean": 0.6, "ci95_across_seeds": [0.5, 0.7], "seeds": [0, 1]},
        {"variant": "a", "model": "m", "mean": 0.4, "ci95_across_seeds": [None, None], "seeds": [0]},
    ]
    axes = {"train.method": ["lora"], "split.quantiles": [[0.25, 0.75], [0.25, 0.5]]}
    plot = series(variants, summary, axes)
    assert plot["axis"] == "split.quantiles"  # train.method is not numeric
    assert plot["lines"] == {'m (train.method="lora")': [[0.25, 0.4, None, None, 1], [0.5, 0.6, 0.5, 0.7, 2]]}
    write_png(plot, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    assert series(variants, summary, {"train.method": ["lora"]}) is None


def test_an_unreachable_study_dir_is_one_clear_error(tmp_path, monkeypatch):
    from raycat.errors import RaycatError
    from raycat.study import grid as study_mod

    s = load_study(write_study(tmp_path, axes={"split.quantiles": [[0.25, 0.75], [0.25, 0.5]]}))

    def unreachable(path):
        raise OSError("Could not resolve host: my-bucket.s3.amazonaws.com\ncurl details")

    monkeypatch.setattr(study_mod.rundir, "exists", unreachable)
    with pytest.raises(RaycatError, match="cannot be reached from this machine .*Could not resolve host"):
        plan(s)


def test_a_study_file_on_an_object_store_resolves_parent_paths():
    from raycat.study.grid import beside

    assert beside("s3://b/jobs/studies/s.yaml", "../configs/x.yaml") == "s3://b/jobs/configs/x.yaml"
    assert beside("s3://b/s.yaml", "s3://c/x.yaml") == "s3://c/x.yaml"
    assert beside("/a/b/s.yaml", "c.yaml") == "/a/b/c.yaml"


def test_first_token_records_of_a_failed_batch_are_discarded():
    first_token = pytest.importorskip("raycat.engines.first_token")  # needs vllm
    first_token._results.update({"k1": (1.0, []), "k2": (2.0, []), "other": (3.0, [])})
    first_token.discard(["k1", "k2", "never-recorded"])
    assert "k1" not in first_token._results and "k2" not in first_token._results
    assert first_token.take("other") == (3.0, [])


def test_variant_numbers_read_teacher_tokens_cost_and_training_tokens_from_the_run(tmp_path):
    import json

    from raycat.study.comparison import variant_numbers

    run = tmp_path / "v"
    (run / "teach").mkdir(parents=True)
    acc = {"total_tokens": 1234, "cost": 0.0042, "saving": {"saving_pct": 75.0, "basis": "measured"}}
    (run / "teach" / "metrics.json").write_text(json.dumps({"accounting": acc}))
    for phase, tokens in (("phase1", [10, 20]), ("phase2", [])):
        d = run / "train" / "complexity_aware" / phase
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"history": [{"tokens": t} for t in tokens]} if tokens else {}))
    n = variant_numbers(str(run))
    assert (n["teacher_tokens"], n["teacher_cost"], n["training_tokens"]) == (1234, 0.0042, 30)


def test_the_cost_table_of_a_run_whose_teacher_booked_no_token_says_so():
    from raycat.study.comparison import _cost_section

    numbers = {"teacher_tokens": 0, "teacher_cost": None, "training_tokens": 10}
    variants = [
        {"label": "all failed", "seed": 0, "numbers": {**numbers, "teacher_saving": {"saving_pct": None}}},
        {"label": "no teach", "seed": 0, "numbers": {**numbers, "teacher_saving": None}},
        {"label": "ok", "seed": 0, "numbers": {**numbers, "teacher_saving": {"saving_pct": 62.5, "basis": "measured"}}},
    ]
    rows = _cost_section(variants)[4:]
    assert "| – (no teacher tokens booked) |" in rows[0] and "| – |" in rows[1] and "| 62.5 % (measured) |" in rows[2]
