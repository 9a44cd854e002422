from pathlib import Path

import pytest
import yaml

from raycat.config import (
    ConfigError,
    EngineConfig,
    PromptConfig,
    dump_config,
    load_config,
    parse_overrides,
    set_dotted,
    validate_config,
)

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"data": {"source": "synthetic"}, "score": {"student": {"path": "some/model"}}}


def write(tmp_path, tree) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tree))
    return p


def test_minimal_config_gets_documented_defaults(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.score.entropy_mode == "options"
    assert cfg.split.quantiles == (0.25, 0.75)
    assert cfg.score.student.trust_remote_code is False


def test_dotted_overrides_parse_yaml_scalars(tmp_path):
    cfg = load_config(
        write(tmp_path, MINIMAL),
        [
            "score.engine.batch_size=7",
            "split.quantiles=[0.1, 0.9]",
            "score.student.trust_remote_code=true",
            "data.limit=5",
        ],
    )
    assert cfg.score.engine.batch_size == 7
    assert cfg.split.quantiles == (0.1, 0.9)
    assert cfg.score.student.trust_remote_code is True
    assert cfg.data.limit == 5


def test_unknown_keys_are_rejected_with_the_dotted_key(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, MINIMAL), ["score.engine.bach_size=3"])
    assert "score.engine.bach_size: unknown key" in str(e.value)


def test_all_errors_reported_at_once_with_keys(tmp_path):
    tree = {
        "data": {"source": "mmlu_pro"},
        "score": {"student": {"path": "m"}, "entropy_mode": "nope"},
        "split": {"quantiles": [0.8, 0.2]},
    }
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, tree))
    msg = str(e.value)
    assert "data.path: source 'mmlu_pro' needs data.path" in msg
    assert "score.entropy_mode:" in msg
    assert "split.quantiles: must satisfy 0 < low < high < 1" in msg


def test_cross_field_rules_name_the_key(tmp_path):
    tree = {"data": {"source": "gsm8k", "path": "x"}, "score": {"student": {"path": "m"}}}
    with pytest.raises(ConfigError, match=r"score.entropy_mode: 'options' needs multiple-choice"):
        load_config(write(tmp_path, tree))
    with pytest.raises(ConfigError, match=r"score.engine.device: model parallelism .* needs gpu"):
        load_config(write(tmp_path, MINIMAL), ["score.engine.tensor_parallel_size=2"])
    teach = {"teachers": [{"model": {"path": "t"}, "engine": {"pipeline_parallel_size": 2}}]}
    with pytest.raises(ConfigError, match=r"teach.teachers.0.engine.device: model parallelism"):
        load_config(write(tmp_path, {**MINIMAL, "teach": teach}))


def test_missing_required_key_says_how_to_set_it(tmp_path):
    with pytest.raises(ConfigError, match=r"score: required"):
        load_config(write(tmp_path, {"data": {"source": "synthetic"}}))


def test_yaml_is_loaded_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("data: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match=r"evil\.yaml:1:\d+: invalid YAML: could not determine a constructor"):
        load_config(p)


def test_overrides_index_list_items_as_the_readme_says(tmp_path):
    tree = {**MINIMAL, "teach": {"teachers": [{"model": {"path": "a"}}, {"model": {"path": "b"}}]}}
    cfg = load_config(write(tmp_path, tree), ["teach.teachers.1.engine.num_engines=2", "teach.teachers.0.model.path=c"])
    assert [t.model.path for t in cfg.teach.teachers] == ["c", "b"]
    assert [t.engine.num_engines for t in cfg.teach.teachers] == [1, 2]
    with pytest.raises(ConfigError, match=r"'teach.teachers' is a list of 2 item\(s\); index it with 0..1"):
        load_config(write(tmp_path, tree), ["teach.teachers.2.engine.num_engines=2"])
    with pytest.raises(ConfigError, match=r"'score.student.path' is a value, not a section"):
        load_config(write(tmp_path, tree), ["score.student.path.x=1"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="not key=value"):
        parse_overrides(["score.engine.batch_size"])


def test_dump_round_trips(tmp_path):
    cfg = load_config(write(tmp_path, MINIMAL), ["score.entropy_mode=topk"])
    again = load_config(write(tmp_path, yaml.safe_load(dump_config(cfg))))
    assert again == cfg


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    load_config(path)


@pytest.mark.parametrize("path", sorted((ROOT / "jobs" / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_gpu_configs_evaluate_on_gpu_with_the_teachers_budget(path):
    cfg = load_config(path)
    if cfg.score.engine.device != "gpu":
        return
    assert cfg.eval.engine.device == "gpu"
    # A phase-2 model answers with CoT as long as the teacher's
    if cfg.teach is not None:
        assert cfg.eval.max_tokens_cot >= cfg.teach.sampling.max_tokens
    assert cfg.eval.max_model_len > cfg.eval.max_tokens_cot


def test_scoring_on_gpu_but_evaluating_on_cpu_is_refused(tmp_path):
    tree = {**MINIMAL, "score": {**MINIMAL["score"], "engine": {"device": "gpu"}}}
    with pytest.raises(ConfigError, match="eval.engine.device: score.engine runs on gpu"):
        load_config(write(tmp_path, tree))
    tree["eval"] = {"engine": {"device": "gpu"}}
    load_config(write(tmp_path, tree))


def test_api_key_env_must_be_a_variable_name_and_a_key_is_never_echoed(tmp_path):
    secret = "sk-or-v1-0123456789abcdef"
    teach = {"teachers": [{"model": {"path": "hosted"}, "api": {"base_url": "http://x/v1", "api_key_env": secret}}]}
    with pytest.raises(ConfigError, match="NAME of an environment variable") as e:
        load_config(write(tmp_path, {**MINIMAL, "teach": teach}))
    assert secret not in str(e.value)
    teach["teachers"][0]["api"]["api_key_env"] = "OPENROUTER_API_KEY"
    load_config(write(tmp_path, {**MINIMAL, "teach": teach}))


def test_mlflow_on_a_cluster_needs_a_tracking_uri():
    tree = {
        "run_dir": "s3://bucket/run",
        "data": {"source": "synthetic"},
        "score": {"student": {"path": "m"}},
        "train": {"tracking": "mlflow"},
    }
    with pytest.raises(ConfigError, match="train.tracking_uri"):
        validate_config(tree)
    tree["train"]["tracking_uri"] = "http://mlflow.internal:5000"
    assert validate_config(tree).train.tracking_uri == "http://mlflow.internal:5000"
    assert validate_config({**tree, "run_dir": "runs/x", "train": {"tracking": "mlflow"}})  # local: <run_dir>/mlruns


def test_null_backend_scores_uniformly_and_generates_empty_answers():
    import numpy as np

    from raycat.engines.base import NullEngine, Sampling, ScoreRequest

    base = {"data": {"source": "synthetic"}, "score": {"student": {"path": "m"}, "engine": {"backend": "null"}}}
    assert validate_config(base).score.engine.backend == "null"
    # Every stage may run it (resource-lifecycle tests and benches of the data plane)
    assert validate_config({**base, "eval": {"engine": {"backend": "null"}}}).eval.engine.backend == "null"
    engine = NullEngine("m")
    got = engine.generate([[1, 2, 3], [4]], Sampling(0.0, 1.0, 8, 0, n=2))
    assert [(g.text, g.prompt_tokens, g.completion_tokens) for g in got] == [("", 3, 0)] * 2 + [("", 1, 0)] * 2
    [scored] = engine.score([ScoreRequest(prompt_ids=[1], option_groups=[[5], [6], [7]])], "options", 0, 0)
    assert scored.option_logprobs == pytest.approx([-np.log(3)] * 3)


def test_a_misspelt_key_gets_a_did_you_mean_and_union_errors_name_only_user_keys():
    base = {"data": {"source": "synthetic"}, "score": {"student": {"path": "m"}}}
    with pytest.raises(ConfigError, match=r"score\.student\.dtyp: unknown key; did you mean score\.student\.dtype\?"):
        validate_config({**base, "score": {"student": {"path": "m", "dtyp": "auto"}}})
    teach = {"teachers": [{"model": {"path": "t"}, "engin": {}}]}
    with pytest.raises(ConfigError, match=r"did you mean teach\.teachers\.0\.engine\?"):
        validate_config({**base, "teach": teach})
    with pytest.raises(ConfigError) as e:
        validate_config({**base, "teach": {"teachers": [{"model": {"path": "t"}}], "bands": ["hard", "hardest"]}})
    assert "teach.bands.1: Input should be 'easy', 'medium', 'hard' or 'test'" in str(e.value)
    assert "literal[" not in str(e.value) and "list[" not in str(e.value)


def test_transformers_backend_refuses_vllm_only_settings():
    with pytest.raises(ValueError, match="kv_cache_gib only apply to backend=vllm"):
        EngineConfig(backend="transformers", kv_cache_gib=2)
    with pytest.raises(ValueError, match="metrics only apply to backend=vllm"):
        EngineConfig(backend="transformers", metrics=False)
    with pytest.raises(ValueError, match="tensor/pipeline parallelism"):
        EngineConfig(backend="transformers", device="gpu", tensor_parallel_size=2)
    EngineConfig(backend="transformers", device="gpu", batch_size=4)  # what it honours is fine


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("data:\n  source: synthetic\nscore: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml:\d+:\d+: invalid YAML"):
        load_config(p)


def test_a_dumped_transformers_config_loads_again(tmp_path):
    cfg = validate_config(
        {"data": {"source": "synthetic"}, "score": {"student": {"path": "m"}, "engine": {"backend": "transformers"}}}
    )
    p = tmp_path / "config.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p).score.engine.backend == "transformers"


def test_a_system_prompt_with_stray_braces_fails_at_config_time():
    with pytest.raises(ValueError, match="only {subject} may appear"):
        PromptConfig(system_prompt="Answer {subject} in {format}")
    PromptConfig(system_prompt="Answer {subject} as {{json}}")


MINIMAL = {"data": {"source": "synthetic"}, "score": {"student": {"path": "org/student"}}}


def test_a_lora_rank_vllm_cannot_serve_is_refused_by_the_config():
    """Review m13: eval serves LoRA phases with vLLM, whose largest max_lora_rank is 512; a larger rank
    failed as a bare StopIteration inside an eval actor after training."""
    with pytest.raises(ConfigError, match=r"train\.lora\.r"):
        validate_config({**MINIMAL, "train": {"lora": {"r": 1024}}})
    assert validate_config({**MINIMAL, "train": {"lora": {"r": 512}}}).train.lora.r == 512


def test_gpu_scoring_with_an_eval_section_on_cpu_says_set_the_key_not_add_a_section():
    """Review §4: on the demo (which has an eval: section) score.engine.device=gpu said "add an eval:
    section"; it must say which key to set."""
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "jobs" / "configs" / "demo-cpu.yaml", ["score.engine.device=gpu"])
    msg = " ".join(str(e.value).split())
    assert "eval.engine.device: score.engine runs on gpu" in msg and "set eval.engine.device=gpu" in msg
    assert "add an eval: section" not in msg
    load_config(ROOT / "jobs" / "configs" / "demo-cpu.yaml", ["score.engine.device=gpu", "eval.engine.device=gpu"])
    # Without an eval: section, the override still comes first.
    with pytest.raises(ConfigError, match=r"set eval\.engine\.device=gpu \(or add an eval: section"):
        validate_config({**MINIMAL, "score": {**MINIMAL["score"], "engine": {"device": "gpu"}}})


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("teach.bands=hard", "teach.bands=[hard]"),
        ("teach.bands=easy,hard", "teach.bands=[easy,hard]"),
        ("split.quantiles=0.25,0.75", "split.quantiles=[0.25,0.75]"),
        ("split.quantiles=0.1 0.9", "split.quantiles=[0.1,0.9]"),
        ("teach.retry_temperatures=0.7", "teach.retry_temperatures=[0.7]"),
    ],
)
def test_a_list_given_as_one_value_gets_one_line_with_the_list_form_that_then_validates(override, hint):
    """Review §4: teach.bands=hard gave two pydantic lines and split.quantiles=0.25,0.75 no hint at all."""
    teach = {"teachers": [{"model": {"path": "t"}}]}
    base = {**MINIMAL, "teach": teach}
    tree = yaml.safe_load(yaml.safe_dump(base))
    for key, value in parse_overrides([override]):
        set_dotted(tree, key, value)
    with pytest.raises(ConfigError) as e:
        validate_config(tree)
    lines = str(e.value).splitlines()[1:]
    key = override.partition("=")[0]
    assert len(lines) == 1 and lines[0].startswith(f"  {key}: ") and lines[0].endswith(f"write it as a list: {hint}")
    if key == "teach.bands":
        assert "Input should be a valid list or 'all'" in lines[0]
    # The hint, copied as an override, is accepted.
    tree = yaml.safe_load(yaml.safe_dump(base))
    for key, value in parse_overrides([hint]):
        set_dotted(tree, key, value)
    validate_config(tree)


def test_no_list_hint_for_a_value_that_would_not_read_back_as_a_list():
    with pytest.raises(ConfigError) as e:
        validate_config({**MINIMAL, "teach": {"teachers": [{"model": {"path": "t"}}], "bands": {"a": "b"}}})
    assert "write it as a list" not in str(e.value)


# Made-up values shaped like real keys (prefix, length, alphabet); none is a live credential.
PASTED_KEYS = [
    "gsk_" + "a1B2c3D4e5F6g7H8i9J0k1L2m3N4o5P6q7R8s9T0u1V2w3X4y5Z6",  # Groq
    "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh",  # Hugging Face: letters only
    "0123456789abcdef0123456789abcdef01234567",  # 40-char hex
    "0123456789ABCDEF0123456789ABCDEF01234567",
    "AKIAIOSFODNN7EXAMPLE",  # AWS's documented example access key id
    "sk_live_" + "51H8xY2eZvKYlo2C0abcdEFGhij",
    "ghp_" + "1a2B3c4D5e6F7g8H9i0J1k2L3m4N5o6P7q8R",
    "k3j4h5g6f7d8s9a0q1w2e3r4t5y6u7i8",  # lowercase and digits
    "AIzaSyA1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q",
]


@pytest.mark.parametrize("secret", PASTED_KEYS, ids=lambda s: s[:4])
def test_a_pasted_key_that_looks_like_a_variable_name_is_refused_without_being_echoed(tmp_path, secret):
    """Review item 11: keys made of letters, digits and _ passed the name check, then were echoed by
    "environment variable <key> is not set" and written to config.yaml."""
    teach = {"teachers": [{"model": {"path": "hosted"}, "api": {"base_url": "http://x/v1", "api_key_env": secret}}]}
    with pytest.raises(ConfigError, match="looks like an API key") as e:
        load_config(write(tmp_path, {**MINIMAL, "teach": teach}))
    assert secret not in str(e.value) and secret[-8:] not in str(e.value)
    with pytest.raises(ConfigError) as e:
        load_config(
            write(tmp_path, MINIMAL),
            [f"teach.teachers=[{{model: {{path: h}}, api: {{base_url: u, api_key_env: {secret}}}}}]"],
        )
    assert secret not in str(e.value)


@pytest.mark.parametrize(
    "name",
    ["OPENROUTER_API_KEY", "MY_KEY_2", "HF_TOKEN", "hf_token", "GROQ_API_KEY", "openai_api_key", "XAI_API_KEY",
     "HUGGING_FACE_HUB_TOKEN", "TOGETHER_API_KEY_2024", "OpenRouterApiKey", "AWS_SECRET_ACCESS_KEY", "_K"],
)  # fmt: skip
def test_ordinary_variable_names_stay_accepted(name):
    api = {"base_url": "http://x/v1", "api_key_env": name}
    cfg = validate_config({**MINIMAL, "teach": {"teachers": [{"model": {"path": "hosted"}, "api": api}]}})
    assert cfg.teach.teachers[0].api.api_key_env == name


def test_split_holds_out_a_tenth_by_default(tmp_path):
    """`raycat run` ends in eval, so a config without a split section must still hold rows out (the
    paper's recipe: 10 %, seed 42)."""
    cfg = load_config(write(tmp_path, MINIMAL))
    assert cfg.split.test_fraction == 0.1 and cfg.split.seed == 42
