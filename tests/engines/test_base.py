"""The engine interfaces and the choice of backend: the constructor arguments each backend gets."""

from __future__ import annotations

from raycat.config import EngineConfig, ModelConfig
from raycat.engines.base import engine_kwargs


def test_engine_kwargs_carry_revision_and_remote_code_for_each_backend():
    m = ModelConfig(path="x", revision="abc", trust_remote_code=True)
    for backend in ("vllm", "transformers"):
        kw = engine_kwargs(m, EngineConfig(backend=backend))
        assert kw["revision"] == "abc" and kw["trust_remote_code"] is True
    assert "kv_cache_gib" not in engine_kwargs(m, EngineConfig(backend="transformers"))


def test_vllm_engines_export_their_statistics_unless_told_not_to():
    m = ModelConfig(path="x")
    assert engine_kwargs(m, EngineConfig())["metrics"] is True
    assert engine_kwargs(m, EngineConfig(metrics=False))["metrics"] is False
    # The reference engine has no statistics to export
    assert "metrics" not in engine_kwargs(m, EngineConfig(backend="transformers"))
