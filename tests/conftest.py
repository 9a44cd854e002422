"""Hermetic fixtures: no network, tiny real-shaped models built in-process, local data files.

Tiers (markers registered in pyproject.toml): a test with none of `integration`, `slow`, `gpu` is a
`unit` test (the default `pytest` run); `slow` tests count as `integration` too; `gpu(count=N)` tests
skip unless N CUDA devices are visible. Helpers shared between test modules live in tests/helpers.py.
"""

from __future__ import annotations

import faulthandler
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

from raycat.testing.tiny_models import build_tiny_model

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# 2 threads on 2 busy cores collapse throughput ~6x
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HAS_VLLM = importlib.util.find_spec("vllm") is not None
# A test with none of these is a unit test
OUTER_TIERS = {"integration", "slow", "gpu"}


def _cuda_devices() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:
        # No torch, or a CUDA build without a usable driver
        return 0


def pytest_collection_modifyitems(config, items):
    skip_vllm = pytest.mark.skip(reason="vllm is not installed (pip install -e '.[cpu]')")
    devices = None
    for item in items:
        names = {m.name for m in item.iter_markers()}
        if not names & OUTER_TIERS:
            item.add_marker(pytest.mark.unit)
        if "slow" in names and "integration" not in names:
            item.add_marker(pytest.mark.integration)
        if "vllm" in names and not HAS_VLLM:
            item.add_marker(skip_vllm)
        if "gpu" in names:
            want = item.get_closest_marker("gpu").kwargs.get("count", 1)
            devices = _cuda_devices() if devices is None else devices
            if devices < want:
                item.add_marker(pytest.mark.skip(reason=f"needs {want} CUDA GPU(s); {devices} visible"))


# A native crash (SIGSEGV) of the pytest process must leave its Python traceback where CI shows it. pytest's
# faulthandler writes to the terminal, which fd-capture hides while a test runs, and a native library loaded
# later (Ray's core worker, vLLM) may install its own handler over it; so every test re-arms one that writes
# every thread's stack to a file, which .ci/run prints when the suite fails.
FAULT_LOG = Path(os.environ.get("RAYCAT_FAULT_LOG", Path(__file__).resolve().parents[1] / ".pytest-faults.log"))
_fault_file = FAULT_LOG.open("w")


@pytest.fixture(autouse=True)
def _traceback_on_a_native_crash(request):
    _fault_file.write(f"{request.node.nodeid}\n")
    _fault_file.flush()
    faulthandler.enable(file=_fault_file, all_threads=True)
    yield


@pytest.fixture(autouse=True)
def _no_flask_in_this_process():
    """vLLM's in-process engine start (register_triton_kernel_overrides) scans every module in
    sys.modules and fails on flask's context proxies, so one test importing flask (moto.server does)
    broke a later, unrelated vLLM test. Servers run as subprocesses (tests.helpers.moto_s3)."""
    before = "flask" in sys.modules
    yield
    assert before or "flask" not in sys.modules, "this test imported flask into pytest; run its server as a subprocess"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama3_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama3"), family="llama3")


@pytest.fixture(scope="session")
def tiny_dated_dir(tmp_path_factory) -> Path:
    """Llama-3.1-style: its chat template writes today's date into every prompt."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama3-dated"), family="llama3_dated")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present (only in the development checkout)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def llama70b_dir(tmp_path_factory) -> Path:
    """config.json of Llama-3.1-70B's shape (no weights: the estimate counts parameters on the meta device)."""
    model_dir = tmp_path_factory.mktemp("llama70b")
    (model_dir / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 8192,
                "intermediate_size": 28672,
                "num_hidden_layers": 80,
                "num_attention_heads": 64,
                "num_key_value_heads": 8,
                "vocab_size": 128256,
                "max_position_embeddings": 131072,
                "rms_norm_eps": 1e-5,
                "tie_word_embeddings": False,
            }
        )
    )
    return model_dir
