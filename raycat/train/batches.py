"""Training examples: prompt + target through the student's chat template, with a token-exact loss mask.

The prompt part is tokenized exactly as inference sees it (``render_ids``: generation prompt, no extra
BOS); the example is the full conversation with the assistant turn. Labels cover the assistant tokens
**up to and including the first stop token** (end-of-turn / EOS), so the model learns to stop; what a
template writes after it (ChatML's trailing newline) is masked. Everything here is pure: no Ray, no torch.

Micro-batches (``train.batching``): ``packed`` (default) concatenates a micro-batch's examples into one
row with position ids restarting per example, so no token is padding and, since transformers builds a
block-diagonal causal mask from such position ids (flash-attention: varlen kernels), no example attends
to another: the loss equals the padded batch's (``pack``); ``padded`` right-pads to the longest example
(``collate``); ``grouped`` pads micro-batches of similar lengths (``length_groups``). The training loop
measures the wasted fraction per phase (``padding_waste`` in its metrics).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from raycat.data.prompts import answer_target, apply_template, render_text, train_messages
from raycat.errors import RaycatError

IGNORE_INDEX = -100


class TemplateError(RaycatError, ValueError):
    """The chat template cannot give a well-defined loss mask for this example."""


def stop_token_ids(tokenizer, model_dir: str | None = None, *, revision: str | None = None) -> set[int]:
    """The ids that end an assistant turn: the tokenizer's EOS plus the generation config's eos_token_id(s)
    (Llama-3: <|eot_id|> and <|end_of_text|>; Qwen: <|im_end|> and <|endoftext|>), as vLLM stops on them.
    ``model_dir`` is a local dir or a hub id (at ``revision``); a model without a generation config
    contributes only the tokenizer's EOS."""
    from transformers import GenerationConfig

    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if model_dir:
        try:
            eos = GenerationConfig.from_pretrained(model_dir, revision=revision).eos_token_id
        except OSError:
            # No generation_config.json (locally or on the hub).
            local = os.path.join(model_dir, "generation_config.json")
            # There but unreadable: a silent fallback would train the wrong stop.
            if os.path.isfile(local):
                raise RaycatError(f"{local} cannot be read; fix or remove it") from None
            eos = None
        ids.update(int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None)
    if not ids:
        raise TemplateError(
            "the student tokenizer has no EOS token and generation_config.json names none; "
            "set eos_token in tokenizer_config.json so training can teach the model to stop"
        )
    return ids


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def encode(
    tokenizer,
    messages: list[dict[str, str]],
    target: str,
    stop_ids: set[int],
    max_length: int,
    overlong: str,
    template_kwargs: dict | None = None,
) -> Encoded | str:
    """One example, or the reason it cannot be used (over-long under 'drop', nothing left to learn)."""
    prompt, full = _texts(tokenizer, messages, target, template_kwargs)
    prompt_ids, full_ids = tokenizer([prompt, full], add_special_tokens=False)["input_ids"]
    return label(prompt_ids, full_ids, stop_ids, max_length, overlong)


def _texts(tokenizer, messages: list[dict[str, str]], target: str, template_kwargs: dict | None) -> tuple[str, str]:
    """The prompt as inference renders it and the whole conversation with the assistant turn."""
    # Templates such as Llama-3's trim content; the mask must match what is rendered.
    target = target.strip()
    if not target:
        raise TemplateError("empty target")
    prompt = render_text(tokenizer, messages, template_kwargs)
    full = apply_template(tokenizer, messages + [{"role": "assistant", "content": target}], False, template_kwargs)
    return prompt, full


def label(
    prompt_ids: list[int], full_ids: list[int], stop_ids: set[int], max_length: int, overlong: str
) -> Encoded | str:
    """The loss mask of one rendered example (``encode``'s rule), from its prompt's and its whole ids."""
    n = len(prompt_ids)
    if full_ids[:n] != prompt_ids:
        raise TemplateError(
            "the chat template renders the prompt differently with and without the assistant "
            "turn, so training tokens would not match inference tokens"
        )
    completion = full_ids[n:]
    stop_at = next((i for i, t in enumerate(completion) if t in stop_ids), None)
    if stop_at is None:
        raise TemplateError(
            f"the assistant turn does not end with a stop token {sorted(stop_ids)}; the model would never learn to stop"
        )
    if stop_at == 0:
        raise TemplateError("the assistant turn is empty after rendering")
    labels = [IGNORE_INDEX] * n + completion[: stop_at + 1] + [IGNORE_INDEX] * (len(completion) - stop_at - 1)
    if len(full_ids) <= max_length:
        return Encoded(full_ids, labels, False)
    if overlong == "drop":
        return f"over max_length: {len(full_ids)} > {max_length} tokens (train.overlong=drop)"
    ids, labels = full_ids[:max_length], labels[:max_length]
    if all(x == IGNORE_INDEX for x in labels):
        return f"prompt alone fills max_length ({n} >= {max_length} tokens): no target token left to train on"
    return Encoded(ids, labels, True)


def encode_rows(
    tokenizer,
    rows: pd.DataFrame,
    kind: str,
    stop_ids: set[int],
    max_length: int,
    overlong: str,
    template_kwargs: dict | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows with ``question, options, category, gold`` (+ ``target`` for kind 'cot') → (encoded, skipped).

    A template problem is an error naming the row; a too-long example is skipped with its reason. The
    batch's texts are tokenized in one call (the fast tokenizer's batch path: threaded where allowed)."""
    texts: list[str] = []
    for r in rows.itertuples(index=False):
        options = list(r.options) if r.options is not None else []
        target = answer_target(r.gold) if kind == "answer" else r.target
        try:
            texts.extend(
                _texts(tokenizer, train_messages(r.question, options, r.category or "", kind), target, template_kwargs)
            )
        except TemplateError as e:
            raise TemplateError(f"row {r.id!r}: {e}") from None
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    out, skipped = [], []
    for i, row_id in enumerate(rows["id"]):
        try:
            enc = label(ids[2 * i], ids[2 * i + 1], stop_ids, max_length, overlong)
        except TemplateError as e:
            raise TemplateError(f"row {row_id!r}: {e}") from None
        if isinstance(enc, str):
            skipped.append({"id": row_id, "skip_reason": enc})
            continue
        out.append(
            {
                "id": row_id,
                "input_ids": enc.input_ids,
                "labels": enc.labels,
                "truncated": enc.truncated,
                "num_tokens": len(enc.input_ids),
                "num_target_tokens": sum(x != IGNORE_INDEX for x in enc.labels),
            }
        )
    cols = ["id", "input_ids", "labels", "truncated", "num_tokens", "num_target_tokens"]
    return pd.DataFrame(out, columns=cols), pd.DataFrame(skipped, columns=["id", "skip_reason"])


def collate(input_ids: list, labels: list, pad_id: int) -> dict[str, np.ndarray]:
    """Right-pad to the longest example in the batch; padding is masked out of attention and loss."""
    width = max(len(x) for x in input_ids)
    ids = np.full((len(input_ids), width), pad_id, dtype=np.int64)
    lab = np.full((len(input_ids), width), IGNORE_INDEX, dtype=np.int64)
    att = np.zeros((len(input_ids), width), dtype=np.int64)
    for i, (x, y) in enumerate(zip(input_ids, labels, strict=True)):
        ids[i, : len(x)], lab[i, : len(y)], att[i, : len(x)] = x, y, 1
    return {"input_ids": ids, "labels": lab, "attention_mask": att}


def pack(input_ids: list, labels: list) -> dict[str, np.ndarray]:
    """The micro-batch's examples as one row, isolated by position ids that restart at 0 per example.

    Each example's first token is unlabelled: after the causal shift it would be predicted from the
    previous example's last token (in a padded batch it is predicted from nothing)."""
    ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in input_ids])
    lab = np.concatenate([np.asarray(y, dtype=np.int64) for y in labels])
    lengths = [len(x) for x in input_ids]
    lab[np.cumsum([0] + lengths[:-1])] = IGNORE_INDEX
    pos = np.concatenate([np.arange(n, dtype=np.int64) for n in lengths])
    return {"input_ids": ids[None], "labels": lab[None], "position_ids": pos[None]}


def length_groups(lengths: list[int], micro_batch_size: int, seed: int) -> list[int]:
    """An order of ``lengths``' indices whose consecutive runs of ``micro_batch_size`` have similar
    lengths: sorted by length inside the (already shuffled) buffer, the micro-batches then shuffled so
    steps do not go from short to long (HF's ``group_by_length`` idea)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    runs = [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    np.random.default_rng(seed).shuffle(runs)
    return [i for r in runs for i in r]


def total_steps(
    rows: int, world: int, micro_batch_size: int, accumulation: int, epochs: int, max_steps: int | None
) -> int:
    """Optimizer steps of a phase, as the loop takes them: windows of ``accumulation`` micro-batches
    within an epoch, the epoch's last window possibly shorter (applied, not dropped)."""
    batches = math.ceil(rows / world / micro_batch_size)
    total = math.ceil(batches / accumulation) * epochs
    return min(total, max_steps) if max_steps else total


def target_tokens(labels) -> int:
    """Tokens a causal-LM loss is computed on: labels after the shift (the first position predicts
    nothing), not masked with -100."""
    return int((labels[..., 1:] != -100).sum())


def window_loss(model, batch: dict, n_window: int, world: int):
    """One micro-batch's share of its accumulation window's token-weighted loss, scaled for DeepSpeed.

    The window's loss is (sum of token losses over every micro-batch of every rank) / (target tokens of
    the window across ranks, ``n_window``), so every target token weighs the same whatever the lengths
    of the examples around it (a mean of per-micro-batch means over-weights short CoTs). transformers
    divides the summed loss by ``num_items_in_batch``; the data-parallel all-reduce averages gradients
    over ``world`` ranks, which the factor undoes. Returns (loss to backward, its unscaled value)."""
    loss = model(**batch, num_items_in_batch=n_window).loss
    return loss * world, loss
