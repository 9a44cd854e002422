"""Tiny random-weight models with real tokenizers and chat templates, for smoke runs, tests and benchmarks.

Hermetic: the BPE tokenizer is trained in-process on a built-in corpus and the weights are random, so
nothing is downloaded from a model hub. The shapes are real enough for vLLM, transformers, PEFT and
DeepSpeed to load them; the answers are noise. ``build_tiny_train_run`` lays out the split and teach
outputs that ``raycat train`` reads, so training can run without scoring or teaching first.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from raycat.data.prompts import template_hash
from raycat.storage import rowkey

__all__ = ["CHATML", "LLAMA3", "LLAMA3_DATED", "build_tiny_model", "build_tiny_train_run"]

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# LLAMA3 with the date logic of Llama 3.1/3.2's own template: "Today Date: <today>" in a system turn
# unless the caller passes date_string.
LLAMA3_DATED = (
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    '{%- set date_string = strftime_now("%d %b %Y") %}{%- else %}{%- set date_string = "26 Jul 2024" %}'
    "{%- endif %}{%- endif %}"
    "{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\nToday Date: {{ date_string }}<|eot_id|>"
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _corpus() -> list[str]:
    words = (
        "the of and to in is what which following question answer option correct number "
        "multiple choice write down only letter nothing else about solve problem final math "
        "science history law biology chemistry physics value sum plus equals"
    ).split()
    lines = []
    for i in range(400):
        w = " ".join(words[(i * 7 + k) % len(words)] for k in range(12))
        lines.append(f"Question: {w}?\nOptions:\nA. {w}\nB. {w}\nC. {w}\nD. {w}\nE. x\nF. y\nG. z\nH. w\nI. v\nJ. u")
        lines.append(f"The answer is {'ABCDEFGHIJ'[i % 10]} and {i} + {i + 1} = {2 * i + 1}.")
    return lines


def build_tiny_model(path: Path, seed: int = 0, family: str = "chatml") -> Path:
    """BPE tokenizer (digits split, like Qwen) + random Llama with real-ish shapes for vLLM.

    ``family``: 'chatml' (Qwen-style <|im_start|>/<|im_end|>, EOS = <|im_end|>) or 'llama3'
    (<|begin_of_text|> BOS, header tokens, <|eot_id|> ends a turn; EOS = <|end_of_text|>, and
    generation_config lists both, as Llama-3-Instruct ships); 'llama3_dated' also writes today's date
    into every prompt, as Llama 3.1/3.2 do."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    specials = (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        if family == "chatml"
        else [
            "<|end_of_text|>",
            "<|begin_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|finetune_right_pad_id|>",
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=900,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    if family == "chatml":
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
        )
        fast.chat_template = CHATML
        eos = fast.eos_token_id
    else:
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tokenizer,
            eos_token="<|end_of_text|>",
            pad_token="<|finetune_right_pad_id|>",
            bos_token="<|begin_of_text|>",
        )
        fast.chat_template = LLAMA3_DATED if family == "llama3_dated" else LLAMA3
        eos = [fast.eos_token_id, fast.convert_tokens_to_ids("<|eot_id|>")]
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        eos_token_id=eos,
        pad_token_id=fast.pad_token_id,
        bos_token_id=fast.bos_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Random init gives near-uniform logits; scale the head so entropies differ between prompts.
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


def build_tiny_train_run(root: Path, model_dir: Path, n: int = 24) -> Path:
    """A run dir as score/split/teach leave it: bands (with the scoring template hash) and teacher CoT.

    ``n`` synthetic questions; the first quarter is easy, the middle half medium, the last quarter hard,
    and every hard row has a CoT target that ends in its gold letter."""
    from transformers import AutoTokenizer

    scoring_hash = template_hash(AutoTokenizer.from_pretrained(model_dir), "letters", None)
    rows = rowkey.add(
        pd.DataFrame(
            [
                {
                    "id": f"q{i}",
                    "question": f"What is {i} plus one?",
                    "options": ["x", "y", "z", "w"],
                    "gold": "ABCD"[i % 4],
                    "category": "math",
                    "source": "synthetic",
                    "entropy": i / 10,
                    "template_hash": scoring_hash,
                }
                for i in range(n)
            ]
        )
    )
    (root / "split").mkdir(parents=True)
    (root / "teach").mkdir()
    medium_start, hard_start = n // 4, 3 * n // 4
    rows.iloc[:medium_start].to_parquet(root / "split/easy.parquet")
    rows.iloc[medium_start:hard_start].to_parquet(root / "split/medium.parquet")
    rows.iloc[hard_start:].to_parquet(root / "split/hard.parquet")
    hard = rows.iloc[hard_start:]
    pd.DataFrame(
        {
            "id": hard["id"],
            "row_hash": hard["row_hash"],
            "target": [f"{i} plus one. So [[{g}]]" for i, g in zip(range(hard_start, n), hard["gold"], strict=True)],
        }
    ).to_parquet(root / "teach/cot.parquet")
    return root
