"""Hermetic fixtures: no network, tiny real-shaped models built in-process, local data files."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 threads on 2 busy cores collapse throughput ~6x
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
HAS_VLLM = importlib.util.find_spec("vllm") is not None

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def pytest_collection_modifyitems(config, items):
    skip_vllm = pytest.mark.skip(reason="vllm is not installed (pip install -e '.[cpu]')")
    for item in items:
        if "vllm" in item.keywords and not HAS_VLLM:
            item.add_marker(skip_vllm)


def _corpus() -> list[str]:
    words = ("the of and to in is what which following question answer option correct number "
             "multiple choice write down only letter nothing else about solve problem final math "
             "science history law biology chemistry physics value sum plus equals").split()
    lines = []
    for i in range(400):
        w = " ".join(words[(i * 7 + k) % len(words)] for k in range(12))
        lines.append(f"Question: {w}?\nOptions:\nA. {w}\nB. {w}\nC. {w}\nD. {w}\nE. x\nF. y\nG. z\nH. w\nI. v\nJ. u")
        lines.append(f"The answer is {'ABCDEFGHIJ'[i % 10]} and {i} + {i + 1} = {2 * i + 1}.")
    return lines


LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def build_tiny_model(path: Path, seed: int = 0, family: str = "chatml") -> Path:
    """BPE tokenizer (digits split, like Qwen) + random Llama with real-ish shapes for vLLM.

    ``family``: 'chatml' (Qwen-style <|im_start|>/<|im_end|>, EOS = <|im_end|>) or 'llama3'
    (<|begin_of_text|> BOS, header tokens, <|eot_id|> ends a turn; EOS = <|end_of_text|>, and
    generation_config lists both, as Llama-3-Instruct ships)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    specials = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if family == "chatml" else
                ["<|end_of_text|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                 "<|finetune_right_pad_id|>"])
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    if family == "chatml":
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                       bos_token=None)
        fast.chat_template = CHATML
        eos = fast.eos_token_id
    else:
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|end_of_text|>",
                                       pad_token="<|finetune_right_pad_id|>", bos_token="<|begin_of_text|>")
        fast.chat_template = LLAMA3
        eos = [fast.eos_token_id, fast.convert_tokens_to_ids("<|eot_id|>")]
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(fast), hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      eos_token_id=eos, pad_token_id=fast.pad_token_id, bos_token_id=fast.bos_token_id,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    # Random init gives near-uniform logits; scale the head so entropies differ between prompts.
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_llama3_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama3"), family="llama3")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present (only in the development checkout)")
    return SHARED_DATA


def kill_after_first_part(stage: str, config: Path, parts_root: Path, timeout_s: float = 240) -> int:
    """Run `raycat <stage>` in its own session, SIGKILL the whole session (driver, Ray, engines) as soon
    as the first part file appears, and return the rows the parts hold."""
    import pandas as pd

    proc = subprocess.Popen([sys.executable, "-m", "raycat.cli", stage, "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline and not list(parts_root.glob("*/part-*.parquet")):
            assert proc.poll() is None, f"raycat {stage} exited before writing any part"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # only the session this helper started
        proc.wait()
    return sum(len(pd.read_parquet(p)) for p in parts_root.glob("*/part-*.parquet"))


def wait_http(url: str, proc: subprocess.Popen, timeout_s: float, what: str, log=None) -> None:
    """Poll ``url`` until it answers; fail early (with ``log()``) if ``proc`` dies first."""
    import urllib.request

    deadline = time.time() + timeout_s
    while True:
        assert proc.poll() is None, f"{what} exited" + (f": {log()}" if log else "")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            assert time.time() < deadline, f"{what} did not come up in {timeout_s:.0f} s"
            time.sleep(1)
