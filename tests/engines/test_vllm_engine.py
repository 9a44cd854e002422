"""The vLLM engine's settings that need no engine running (the engine itself: tests/engines/test_parity.py)."""

from __future__ import annotations

import json

from raycat.engines.vllm_engine import _lora_rank_slot


def test_lora_rank_slot(tmp_path):
    for r, slot in ((4, 8), (8, 8), (9, 16), (64, 64), (300, 320)):
        (tmp_path / "adapter_config.json").write_text(json.dumps({"r": r}))
        assert _lora_rank_slot(str(tmp_path)) == slot
