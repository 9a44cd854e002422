"""Run dirs and model dirs on shared storage: the per-node model cache, the pre-flight that refuses a
local run_dir where work lands on other nodes, and eval targets read through the run-dir URI."""

from __future__ import annotations

import json

import pytest

from raycat.errors import MissingInputError
from raycat.preflight import storage_problem
from raycat.storage import models


def _model_dir(root, weights: bytes = b"w" * 10):
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "tokenizer.json").write_text("{}")
    (root / "model.safetensors").write_bytes(weights)
    return root


def test_localize_copies_once_per_version_and_cleans_up_older_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYCAT_CACHE", str(tmp_path / "cache"))
    src = _model_dir(tmp_path / "src")
    uri = f"file://{src}"  # any pyarrow URI goes the same way as s3://
    first = models.localize(uri)
    assert sorted(p.name for p in (tmp_path / "cache/uri").iterdir()) == [first.rsplit("/", 1)[-1]]
    assert open(f"{first}/model.safetensors", "rb").read() == b"w" * 10
    (tmp_path / "cache/uri" / first.rsplit("/", 1)[-1] / "marker").write_text("x")
    assert models.localize(uri) == first  # cached: not fetched again
    meta = models.localize(uri, weights=False)  # tokenizer/config only, kept apart from the full copy
    assert meta != first and sorted(p.name for p in __import__("pathlib").Path(meta).iterdir()) == [
        ".complete",
        "config.json",
        "tokenizer.json",
    ]
    (src / "model.safetensors").write_bytes(b"v" * 12)  # retrained at the same URI
    second = models.localize(uri)
    assert second != first and open(f"{second}/model.safetensors", "rb").read() == b"v" * 12
    left = sorted(p.name for p in (tmp_path / "cache/uri").iterdir())
    assert left == sorted([second.rsplit("/", 1)[-1], meta.rsplit("/", 1)[-1]])  # the old full copy is gone


def test_localize_of_nothing_says_what_to_check(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYCAT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(MissingInputError, match="no files there"):
        models.localize(f"file://{tmp_path}/absent")


def test_local_and_resolve_leave_hub_ids_and_shared_mounts_in_place(tmp_path):
    assert models.local("Qwen/Qwen2.5-3B-Instruct") == "Qwen/Qwen2.5-3B-Instruct"
    assert models.local(f"file://{tmp_path}") == str(tmp_path)
    assert models.resolve(f"file://{tmp_path}") == str(tmp_path)
    assert models.portable("registry:smollm2-135m-instruct") == "registry:smollm2-135m-instruct"
    assert models.portable("s3://b/m") == "s3://b/m"


def _node(node_id: str, cpu: float = 2, gpu: float = 0, alive: bool = True) -> dict:
    return {"NodeID": node_id, "Alive": alive, "Resources": {"CPU": cpu, "GPU": gpu} if cpu or gpu else {}}


@pytest.mark.parametrize(
    ("run_dir", "nodes", "cwd", "refused"),
    [
        ("s3://bucket/run", [_node("head", 0), _node("w1"), _node("w2")], "/home/u", None),
        ("file:///mnt/shared/run", [_node("head", 0), _node("w1")], "/home/u", None),
        ("/data/run", [_node("head")], "/home/u", None),  # one machine: local Ray, or a one-node cluster
        ("/data/run", [_node("head"), _node("w1", alive=False)], "/home/u", None),  # a dead node runs nothing
        ("/data/run", [_node("head"), _node("w1")], "/home/u", "1 other node(s)"),
        ("/data/run", [_node("head", 0)], "/home/u", "this one has no CPUs"),  # autoscaler adds the workers
        ("runs/x", [_node("head")], "/tmp/ray/session_1/runtime_resources/working_dir_files/_ray_pkg_ab", "uploaded"),
    ],
)
def test_storage_preflight(run_dir, nodes, cwd, refused):
    problem = storage_problem(run_dir, nodes, "head", cwd)
    if refused is None:
        assert problem is None
    else:
        assert refused in problem and "s3://" in problem and repr(run_dir) in problem


def test_eval_targets_serve_lora_phases_as_adapters_and_load_full_phases(tmp_path):
    from raycat.config import validate_config
    from raycat.evaluate.stage import targets

    run = tmp_path / "run"
    for recipe, adapter in (("sft_all", True), ("distill_all", False)):
        pdir = run / "train" / recipe / "phase1"
        (pdir / "model").mkdir(parents=True)
        (pdir / "done.json").write_text(json.dumps({"hash": recipe}))
        (pdir / "model" / ("adapter_config.json" if adapter else "config.json")).write_text('{"r": 4}')
    cfg = validate_config(
        {"run_dir": f"file://{run}", "data": {"source": "synthetic"}, "score": {"student": {"path": "org/student"}}}
    )
    got = {t.name: t for t in targets(cfg, ["sft_all", "distill_all"])}
    lora, full = got["sft_all/phase1"], got["distill_all/phase1"]
    assert (lora.path, lora.adapter) == ("org/student", f"file://{run}/train/sft_all/phase1/model")
    assert (full.path, full.adapter) == (f"file://{run}/train/distill_all/phase1/model", None)
    # The cache key follows the model dir's content: a retrained adapter is evaluated again.
    (run / "train/sft_all/phase1/model/adapter_config.json").write_text('{"r": 8}')
    assert {t.name: t for t in targets(cfg, ["sft_all"])}["sft_all/phase1"].key != lora.key


def test_lora_rank_slot(tmp_path):
    from raycat.engines.vllm_engine import _lora_rank_slot

    for r, slot in ((4, 8), (8, 8), (9, 16), (64, 64), (300, 320)):
        (tmp_path / "adapter_config.json").write_text(json.dumps({"r": r}))
        assert _lora_rank_slot(str(tmp_path)) == slot


def test_parts_are_named_after_their_ids_so_a_retried_block_replaces_its_part(tmp_path):
    import pandas as pd

    from raycat.storage import rundir

    d = str(tmp_path / "parts")
    a = pd.DataFrame({"id": ["q2", "q1"], "v": [1, 2]})
    assert rundir.write_part(a, d) == 2
    assert rundir.write_part(a.iloc[::-1], d) == 2  # the same block again (a retried task): same part
    assert rundir.write_part(pd.DataFrame({"id": ["q3"], "v": [3]}), d) == 1
    assert rundir.write_part(pd.DataFrame({"id": [], "v": []}), d) == 0  # nothing written for nothing
    files = rundir.list_files(d, ".parquet")
    assert len(files) == 2 and all(f.rsplit("/", 1)[1].startswith("part-") for f in files)
    assert sorted(rundir.read_parts(d, ["id", "v"])["id"]) == ["q1", "q2", "q3"]


def test_questions_are_written_in_row_groups_that_read_back_in_order(tmp_path):
    import pandas as pd

    from raycat.config import validate_config
    from raycat.data import questions
    from raycat.storage import rundir

    cfg = validate_config(
        {
            "run_dir": str(tmp_path / "run"),
            "data": {"source": "synthetic", "synthetic": {"num_questions": 50}},
            "score": {"student": {"path": "unused"}, "engine": {"batch_size": 4}},
        }
    )
    summary = questions.build(cfg)
    assert summary["selected"] == 50 and summary["max_options"] == 4
    p = questions.path(cfg.run_dir)
    groups = rundir.row_groups(p)
    assert questions.block_rows(cfg) == 16 and len(groups) == 4  # 16 + 16 + 16 + 2 rows
    back = pd.concat([rundir.read_row_groups(p, [g]) for g in groups], ignore_index=True)
    assert list(back["id"]) == list(rundir.read_parquet(p)["id"])
    assert "options" in rundir.parquet_columns(p)
