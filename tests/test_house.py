"""The house rules: stage boundaries, the engine-stage shell, the error boundary (no Ray, no engines)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import yaml

from raycat.cli import main
from raycat.config import ConfigError, EngineConfig, load_config
from raycat.engines import actor_pool
from raycat.errors import RaycatError


def write_config(tmp_path: Path, tree: dict) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


class _NeverStarts(actor_pool.EngineActor):
    REQUIRED_COLUMNS = ("id", "question", "gold")

    def __init__(self, plan):
        raise AssertionError("an engine started although the input was invalid")


def test_missing_input_column_is_reported_with_the_stage_before_any_engine():
    import ray

    rows = pd.DataFrame({"id": ["a"], "question": ["q?"]})
    pool = actor_pool.Pool.of(EngineConfig())
    with pytest.raises(RaycatError, match=r"teach: input rows lack column\(s\) gold"):
        actor_pool.run("teach", rows, _NeverStarts, plan=None, pool=pool, parts_dir="/nonexistent")
    assert not ray.is_initialized()


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


def test_pool_resources_follow_the_engine_config():
    gpu = actor_pool.Pool.of(
        EngineConfig(device="gpu", tensor_parallel_size=2, pipeline_parallel_size=2, num_engines=3, cpus_per_engine=4)
    )
    # A 4-GPU engine (TP 2 x PP 2): its actor asks for no GPU itself; each engine gets a STRICT_PACK
    # placement group of 4 GPU bundles (vLLM's Ray executor fills them), the first holding the actor's CPUs.
    assert (gpu.size, gpu.num_gpus, gpu.num_cpus, gpu.gpu_bundles) == (3, 0, 4, 4)
    assert gpu.placement_bundles() == [{"GPU": 1, "CPU": 4}] + [{"GPU": 1, "CPU": 1}] * 3
    args = gpu.remote_args()
    assert (args["num_gpus"], args["num_cpus"]) == (0, 4) and callable(args["ray_remote_args_fn"])
    one = actor_pool.Pool.of(EngineConfig(device="gpu", cpus_per_engine=2))
    assert one.remote_args() == {"num_gpus": 1, "num_cpus": 2}  # one GPU: a plain actor, no placement group
    assert actor_pool.Pool.of(EngineConfig(device="gpu"), remote=True).num_gpus == 0
    # a CPU engine: its process computes with the CPUs it was given, rounded up (every thread of it)
    cpu = actor_pool.Pool.of(EngineConfig(device="cpu", cpus_per_engine=1.5)).remote_args()
    assert cpu == {"num_gpus": 0, "num_cpus": 1.5, "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "2"}}}


def test_multi_gpu_engine_placement_group_is_strict_pack(monkeypatch):
    import ray

    made = {}

    def fake_pg(bundles, strategy):  # records the request; the real call needs a cluster with GPUs
        made.update(bundles=bundles, strategy=strategy)
        return object()

    monkeypatch.setattr(ray.util, "placement_group", fake_pg)
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pool = actor_pool.Pool.of(EngineConfig(device="gpu", tensor_parallel_size=2))
    got = pool.remote_args()["ray_remote_args_fn"]()
    assert made == {"bundles": [{"GPU": 1, "CPU": 1}] * 2, "strategy": "STRICT_PACK"}
    strategy = got["scheduling_strategy"]
    assert isinstance(strategy, PlacementGroupSchedulingStrategy)
    assert strategy.placement_group_capture_child_tasks  # vLLM's workers land in the same group


def test_transformers_backend_refuses_vllm_only_settings():
    with pytest.raises(ValueError, match="kv_cache_gib only apply to backend=vllm"):
        EngineConfig(backend="transformers", kv_cache_gib=2)
    with pytest.raises(ValueError, match="tensor/pipeline parallelism"):
        EngineConfig(backend="transformers", device="gpu", tensor_parallel_size=2)
    EngineConfig(backend="transformers", device="gpu", batch_size=4)  # what it honours is fine


def test_transformers_engine_takes_no_stray_keywords():
    from raycat.engines.transformers_engine import TransformersEngine

    with pytest.raises(TypeError):
        TransformersEngine("unused", kv_cache_gib=1.0)


def test_engine_kwargs_carry_revision_and_remote_code_for_each_backend():
    from raycat.config import ModelConfig
    from raycat.engines.base import engine_kwargs

    m = ModelConfig(path="x", revision="abc", trust_remote_code=True)
    for backend in ("vllm", "transformers"):
        kw = engine_kwargs(m, EngineConfig(backend=backend))
        assert kw["revision"] == "abc" and kw["trust_remote_code"] is True
    assert "kv_cache_gib" not in engine_kwargs(m, EngineConfig(backend="transformers"))


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data:\n  source: synthetic\nscore: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+:\d+: invalid YAML"):
        load_config(p)


def test_cli_prints_errors_without_markup(tmp_path, capsys):
    run = tmp_path / "odd[/]dir[bold]"
    cfg = {"run_dir": str(run), "data": {"source": "synthetic"}, "score": {"student": {"path": "unused"}}}
    p = write_config(tmp_path, cfg)
    assert main(["split", "--config", str(p)]) == 1  # no scores yet: a RaycatError naming the path
    assert "odd[/]dir[bold]" in "".join(capsys.readouterr().err.split())


def test_unexpected_errors_keep_their_traceback(tmp_path, monkeypatch):
    from raycat import split

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


def test_a_dumped_transformers_config_loads_again(tmp_path):
    from raycat.config import dump_config, validate_config

    cfg = validate_config(
        {"data": {"source": "synthetic"}, "score": {"student": {"path": "m"}, "engine": {"backend": "transformers"}}}
    )
    p = tmp_path / "config.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p).score.engine.backend == "transformers"


def test_a_system_prompt_with_stray_braces_fails_at_config_time():
    from raycat.config import PromptConfig

    with pytest.raises(ValueError, match="only {subject} may appear"):
        PromptConfig(system_prompt="Answer {subject} in {format}")
    PromptConfig(system_prompt="Answer {subject} as {{json}}")


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


def test_an_unparseable_data_file_names_the_file(tmp_path):
    # The questions stage's work (run as a Ray task by `raycat score`; tests/test_cli.py checks that
    # its errors reach the user as one line).
    from raycat.config import validate_config
    from raycat.data import questions
    from raycat.errors import RaycatError

    bad = tmp_path / "corpus.jsonl"
    bad.write_text('{"question": "q", "options": ["a", "b"], "answer": "A"}\n{"question": \n')
    cfg = {
        "run_dir": str(tmp_path / "run"),
        "data": {"source": "generic", "path": str(bad), "columns": {"question": "question"}},
        "score": {"student": {"path": "unused"}},
    }
    with pytest.raises(RaycatError, match=r"row corpus.jsonl line 2, field .\(line\).: not valid JSON"):
        questions.build(validate_config(cfg))


def test_transformers_engine_generates_without_the_models_generation_processors(tmp_path):
    """vLLM applies only the sampling parameters it is given; the reference engine must too."""
    import json as _json

    from raycat.engines.transformers_engine import TransformersEngine
    from raycat.testing.tiny_models import build_tiny_model

    model = build_tiny_model(tmp_path / "m")
    gc = _json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(_json.dumps({**gc, "repetition_penalty": 1.5, "top_k": 3}))
    e = TransformersEngine(str(model), dtype="float32")
    g = e.model.generation_config
    assert g.repetition_penalty in (None, 1.0) and g.top_k in (None, 50)  # unset: neutral at generate time
    assert g.eos_token_id == gc["eos_token_id"]  # the stop ids stay
