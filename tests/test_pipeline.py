"""The stage graph: stage hashes, what reruns after a change, --from/--only, and what each recipe needs."""

from __future__ import annotations

import pytest

from raycat.config import load_config
from raycat.errors import RaycatError
from raycat.pipeline import STAGES, plan, stage_hashes
from tests.helpers import DEMO


def test_a_teacher_parameter_changes_teach_and_everything_downstream_only():
    a = stage_hashes(load_config(DEMO), ["complexity_aware"])
    b = stage_hashes(load_config(DEMO, ["teach.sampling.max_tokens=100"]), ["complexity_aware"])
    assert [s for s in STAGES if a[s] != b[s]] == ["teach", "train", "eval", "report"]
    c = stage_hashes(load_config(DEMO, ["split.seed=7"]), ["complexity_aware"])
    assert [s for s in STAGES if a[s] != c[s]] == ["split", "teach", "train", "eval", "report"]
    d = stage_hashes(load_config(DEMO), ["complexity_aware", "sft_all"])
    assert [s for s in STAGES if a[s] != d[s]] == ["train", "eval", "report"]


def test_turning_engine_metrics_off_reruns_nothing():
    """engine.metrics changes what the Ray dashboard shows, never a row: no stage's hash moves."""
    a = stage_hashes(load_config(DEMO), ["complexity_aware"])
    off = load_config(DEMO, ["score.engine.metrics=false", "eval.engine.metrics=false"])
    for teacher in off.teach.teachers:
        teacher.engine.metrics = False
    assert not off.score.engine.metrics and not off.teach.teachers[0].engine.metrics
    assert stage_hashes(off, ["complexity_aware"]) == a
    # Its neighbours still count: a changed engine seed is a changed section.
    assert stage_hashes(load_config(DEMO, ["score.engine.seed=3"]), ["complexity_aware"])["score"] != a["score"]


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


@pytest.mark.parametrize("form", ["glob", "file_uri_prefix"])
def test_a_shard_replaced_added_or_removed_under_a_prefix_or_glob_reruns_score(tmp_path, form):
    import os

    shards = tmp_path / "corpus"
    shards.mkdir()
    row = '{"question": "q?", "options": ["a", "b"], "answer": "A"}\n'
    for i in range(3):
        (shards / f"part-{i}.jsonl").write_text(row)
    (shards / "notes.txt").write_text("not data")
    path = str(shards / "part-*.jsonl") if form == "glob" else f"file://{shards}/"
    over = ["data.source=generic", f"data.path={path}"]

    def score_hash() -> str:
        return stage_hashes(load_config(DEMO, over), ["complexity_aware"])["score"]

    a = score_hash()
    assert a == score_hash()
    (shards / "notes.txt").write_text("edited, still not data")
    assert score_hash() == a  # a file that is not part of the corpus
    os.utime(shards / "part-1.jsonl", ns=(1, 1))  # a shard replaced with the same size
    b = score_hash()
    (shards / "part-3.jsonl").write_text(row)
    c = score_hash()
    (shards / "part-0.jsonl").unlink()
    d = score_hash()
    assert len({a, b, c, d}) == 4


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


def test_only_says_which_other_stages_are_not_run_and_whether_they_are_up_to_date():
    from raycat.pipeline import not_run_reason

    cfg = load_config(DEMO)
    hashes = stage_hashes(cfg, ["complexity_aware"])
    manifest = {"stages": {s: {"hash": hashes[s], "status": "done"} for s in STAGES}}
    manifest["stages"]["train"]["hash"] = "an-older-config"
    got = {s: (a, h) for s, h, a in plan(cfg, ["complexity_aware"], manifest, None, "eval")}
    assert got["eval"][0] == "run"
    assert got["score"][0] == "not run" and got["train"][0] == "not run, stale"
    lines = {s: not_run_reason(a, h, "eval") for s, (a, h) in got.items() if s != "eval"}
    assert lines["score"] == f"not run (--only eval); up to date (hash {hashes['score']})"
    assert lines["train"].startswith("not run (--only eval); NOT up to date")
    assert not any("skipping" in line for line in lines.values())


def test_recipes_that_widen_teach_bands_say_so():
    """Review §2: adding distill_all to --recipes taught every band (~4x the paid teacher rows) silently."""
    from raycat.pipeline import bands_note, effective_config

    def note(cfg, recipes):
        return bands_note(cfg, effective_config(cfg, recipes), recipes)

    cfg = load_config(DEMO)
    assert note(cfg, ["complexity_aware", "sft_all"]) is None
    said = note(cfg, ["complexity_aware", "distill_all"])
    assert said.startswith("teach.bands ['hard'] -> all") and "4x" in said
    assert effective_config(cfg, ["distill_all"]).teach.bands == "all" and cfg.teach.bands == ["hard"]
    assert note(load_config(DEMO, ["teach.bands=all"]), ["distill_all"]) is None


def test_keys_added_after_runs_existed_leave_their_hashes_alone_until_set():
    """data.synthetic.kinds and score.prompt.answer_prefix at their defaults are not in the score stage's
    section (a run made before they existed is still up to date); set, they rerun score and after."""
    from raycat.pipeline import _section

    section = _section(load_config(DEMO), "score", ["complexity_aware"])
    assert "kinds" not in section["data"]["synthetic"] and "answer_prefix" not in section["score"]["prompt"]
    assert "preset" in section["score"]["prompt"] and "num_options" in section["data"]["synthetic"]
    a = stage_hashes(load_config(DEMO), ["complexity_aware"])
    b = stage_hashes(load_config(DEMO, ["score.prompt.answer_prefix=The answer is "]), ["complexity_aware"])
    assert [s for s in STAGES if a[s] != b[s]] == list(STAGES)
