"""The transformers reference engine: the keywords it takes and how it generates (its numbers against
vLLM's are in tests/engines/test_parity.py)."""

from __future__ import annotations

import json

import pytest

from raycat.engines.transformers_engine import TransformersEngine
from raycat.testing.tiny_models import build_tiny_model


def test_transformers_engine_takes_no_stray_keywords():
    with pytest.raises(TypeError):
        TransformersEngine("unused", kv_cache_gib=1.0)


def test_transformers_engine_generates_without_the_models_generation_processors(tmp_path):
    """vLLM applies only the sampling parameters it is given; the reference engine must too."""
    model = build_tiny_model(tmp_path / "m")
    gc = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**gc, "repetition_penalty": 1.5, "top_k": 3}))
    e = TransformersEngine(str(model), dtype="float32")
    g = e.model.generation_config
    assert g.repetition_penalty in (None, 1.0) and g.top_k in (None, 50)  # unset: neutral at generate time
    assert g.eos_token_id == gc["eos_token_id"]  # the stop ids stay
