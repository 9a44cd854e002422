"""Prompt rendering with the student's own chat template, option labels and the template hash.

One renderer (the student's template, config.chat_template_kwargs) serves every stage. Scoring uses the
score prompt (``messages``); training and evaluation share the train prompt (``train_messages``), so a
model is evaluated on exactly the prompt it was trained on, which is not the scoring prompt.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from raycat.config import DEFAULT_CHAT_TEMPLATE_KWARGS
from raycat.errors import RaycatError

PROMPT_VERSION = "score-v1"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
IDK_LABEL = "0"

_LETTERS_SYSTEM = (
    "The following is a multiple choice question{about}. "
    "Write down ONLY the LETTER of the correct answer and nothing else."
)
# The paper's v1/v2 "fallback" prompt (arXiv 2506.21220 v1/v2, as the authors' code writes it): numeric ids
# and "0" for "I don't know" (tests/data/test_prompts.py::test_letter_and_paper_presets).
_PAPER_TAIL = (
    "If you are certain about the answer return the correct option number, otherwise return 0. "
    "Write down ONLY the NUMBER and nothing else."
)
_PAPER_SYSTEM = "The following are multiple choice questions{about}. " + _PAPER_TAIL
_FREE_FORM_SYSTEM = "Solve the following problem. Write down ONLY the final number and nothing else."


def option_labels(n: int, preset: str) -> list[str]:
    if preset == "paper":
        return [str(i + 1) for i in range(n)]
    return list(LETTERS[:n])


def answer_labels(n: int, preset: str) -> list[str]:
    """Labels the student may answer with: the option labels, plus "0" (don't know) for the paper preset."""
    return option_labels(n, preset) + ([IDK_LABEL] if preset == "paper" else [])


def messages_for(
    question: str, options: list[str], category: str, preset: str, system_prompt: str | None = None
) -> list[dict[str, str]]:
    about = f" about {category}" if category else ""
    # Only the user's system prompt has a {subject} slot; built-in texts are formatted once, so a
    # category containing braces is text, not a format field.
    custom = system_prompt.format(subject=category) if system_prompt is not None else None
    if not options:
        return [{"role": "system", "content": custom or _FREE_FORM_SYSTEM}, {"role": "user", "content": question}]
    labels = option_labels(len(options), preset)
    body = "\n".join(f"{lab}. {opt}" for lab, opt in zip(labels, options, strict=True))
    if preset == "paper":
        system = custom or _PAPER_SYSTEM.format(about=about)
        user = f"Question: {question}\nOptions:\n{body}\n{_PAPER_TAIL}"
    else:
        system = custom or _LETTERS_SYSTEM.format(about=about)
        user = f"Question: {question}\nOptions:\n{body}"
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def template_hash(
    tokenizer, preset: str, system_prompt: str | None, template_kwargs=None, answer_prefix: str = ""
) -> str:
    """Hash of everything that shapes the prompt tokens: chat template and its variables, preset
    texts, version, and the answer prefix (only when one is set, so hashes without one are unchanged)."""
    return _digest(
        (
            *((f"answer_prefix={answer_prefix}",) if answer_prefix else ()),
            tokenizer.chat_template or "",
            _kwargs_part(template_kwargs),
            PROMPT_VERSION,
            preset,
            system_prompt or "",
            _LETTERS_SYSTEM,
            _PAPER_SYSTEM,
            _FREE_FORM_SYSTEM,
            type(tokenizer).__name__,
        )
    )


def score_template_hash(cfg, tokenizer) -> str:
    """The scoring prompt's hash (score.prompt and the chat template): cache keys, and the check that
    training renders what was scored."""
    prompt = cfg.score.prompt
    return template_hash(tokenizer, prompt.preset, prompt.system_prompt, cfg.chat_template_kwargs, prompt.answer_prefix)


def template_kwargs_of(template_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The variables a chat template is rendered with; a caller that passes none (benches, tests) gets
    the config's default, so a prompt does not change with the day it is rendered on."""
    return DEFAULT_CHAT_TEMPLATE_KWARGS if template_kwargs is None else template_kwargs


def _digest(parts) -> str:
    """The short hash of a prompt's ingredients (template hashes: cache keys and phase hashes)."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _kwargs_part(template_kwargs: dict[str, Any] | None) -> str:
    return json.dumps(template_kwargs_of(template_kwargs), sort_keys=True, default=str)


def apply_template(tokenizer, messages: list[dict[str, str]], generation_prompt: bool, template_kwargs=None) -> str:
    """The chat template's text, rendered with ``template_kwargs`` (``config.chat_template_kwargs``)."""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, **template_kwargs_of(template_kwargs)
    )


def render_ids(
    tokenizer, messages: list[dict[str, str]], template_kwargs: dict[str, Any] | None = None, answer_prefix: str = ""
) -> list[int]:
    """The prompt's token ids; ``answer_prefix`` (score.prompt.answer_prefix) is the start of the answer,
    written after the generation prompt, so the next token is the answer itself."""
    # The template already writes BOS/role markers; add_special_tokens would add a second BOS.
    text = render_text(tokenizer, messages, template_kwargs) + answer_prefix
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def render_text(tokenizer, messages: list[dict[str, str]], template_kwargs: dict[str, Any] | None = None) -> str:
    """The prompt as inference renders it: the chat template with the generation prompt."""
    if not tokenizer.chat_template:
        raise RaycatError(
            "the student tokenizer has no chat template; raycat scores instruct/chat models with their "
            "own template. Use an instruct model, or set tokenizer.chat_template in the model directory."
        )
    return apply_template(tokenizer, messages, True, template_kwargs)


@dataclass(frozen=True)
class LabelTokens:
    """Token ids that spell each option label as the first answer token."""

    # label -> its single-token spellings ("A", " A")
    ids: dict[str, tuple[int, ...]]
    # Labels no single token spells: options using them cannot be scored.
    multi_token: tuple[str, ...]

    def groups(self, n_options: int, preset: str) -> list[list[int]] | None:
        labels = answer_labels(n_options, preset)
        if any(lab in self.multi_token for lab in labels):
            return None
        return [list(self.ids[lab]) for lab in labels]


def generation_context(
    tokenizer, preset: str, system_prompt: str | None, template_kwargs=None, answer_prefix: str = ""
) -> str:
    """The text a rendered prompt ends with (the chat template's generation prompt and the answer prefix):
    the context the answer label is written in."""
    messages = messages_for("?", ["x", "y"], "", preset, system_prompt)
    return apply_template(tokenizer, messages, True, template_kwargs) + answer_prefix


def _in_context(tokenizer, context: str, label: str) -> int | None:
    """The one token ``label`` adds after ``context``, if it adds exactly one and leaves the context's
    tokens as they were. SentencePiece-style tokenizers write "A" after a newline as "A", while
    ``encode("A")`` alone gives "▁A": the in-context spelling is the one the model answers with."""
    base = tokenizer(context, add_special_tokens=False)["input_ids"]
    both = tokenizer(context + label, add_special_tokens=False)["input_ids"]
    if len(both) == len(base) + 1 and both[: len(base)] == base:
        return both[-1]
    return None


def label_tokens(tokenizer, max_options: int, preset: str, context: str | None = None) -> LabelTokens:
    """The token ids of each answer label: its spellings alone ("A", " A") and, given the rendered
    generation prompt's ``context``, the token it is written as right after that prompt."""
    labels = answer_labels(max_options, preset)
    ids: dict[str, tuple[int, ...]] = {}
    multi: list[str] = []
    owner: dict[int, str] = {}
    for lab in labels:
        found = []
        for spelling in (lab, " " + lab):
            toks = tokenizer.encode(spelling, add_special_tokens=False)
            if len(toks) == 1 and toks[0] not in found:
                found.append(toks[0])
        # A label no single token spells alone stays multi-token.
        if context is not None and found:
            token = _in_context(tokenizer, context, lab)
            if token is not None and token not in found:
                found.append(token)
        if not found:
            multi.append(lab)
            continue
        for token in found:
            if token in owner:
                raise RaycatError(
                    f"option labels {owner[token]!r} and {lab!r} share token id {token} in this tokenizer: "
                    "their probabilities cannot be told apart; use the other score.prompt.preset"
                )
            owner[token] = lab
        ids[lab] = tuple(found)
    return LabelTokens(ids=ids, multi_token=tuple(multi))


TEACH_PROMPT_VERSION = "teach-v1"
_TEACH_MCQ = (
    "You are an expert{about}. Think through the question step by step, then give the final answer on "
    "the last line as [[LETTER]], where LETTER is the letter of the correct option."
)
_TEACH_FREE = (
    "You are an expert problem solver. Think through the problem step by step, then give the final answer "
    "on the last line as [[NUMBER]], where NUMBER is the final numeric answer."
)


def teach_messages(question: str, options: list[str], category: str) -> list[dict[str, str]]:
    """Chain-of-thought prompt ending in [[X]]; its text is hashed into the teacher cache key."""
    if not options:
        return [{"role": "system", "content": _TEACH_FREE}, {"role": "user", "content": question}]
    body = "\n".join(f"{lab}. {opt}" for lab, opt in zip(LETTERS, options, strict=False))
    about = f" in {category}" if category else ""
    return [
        {"role": "system", "content": _TEACH_MCQ.format(about=about)},
        {"role": "user", "content": f"Question: {question}\nOptions:\n{body}"},
    ]


def teach_template_hash(tokenizer, template_kwargs=None) -> str:
    """``tokenizer`` None: an HTTP teacher, whose server renders its own template (no variables of ours)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    variables = _kwargs_part(template_kwargs) if tokenizer is not None else ""
    return _digest((template, variables, TEACH_PROMPT_VERSION, _TEACH_MCQ, _TEACH_FREE))


# --- training and evaluation prompts (one renderer for both, so eval sees what training taught) ---
# Option labels here are always letters, whatever score.prompt.preset: the teacher's CoT ends in
# [[LETTER]], and numeric ids make "10" two tokens in Qwen-style tokenizers
# (tests/data/test_prompts.py::test_label_tokens_detect_multi_token_labels).
TRAIN_PROMPT_VERSION = "train-v1"
_TRAIN_ANSWER_MCQ = (
    "The following is a multiple choice question{about}. "
    "Answer with only the letter of the correct option in [[LETTER]] format."
)
_TRAIN_ANSWER_FREE = "Solve the following problem. Answer with only the final number in [[NUMBER]] format."
_TRAIN_COT_MCQ = (
    "The following is a multiple choice question{about}. Think step by step, then give the "
    "final answer on the last line as [[LETTER]]."
)
_TRAIN_COT_FREE = (
    "Solve the following problem. Think step by step, then give the final answer on the last line as [[NUMBER]]."
)


def train_messages(question: str, options: list[str], category: str, kind: str) -> list[dict[str, str]]:
    """The prompt a student is trained (and evaluated) on; ``kind`` is 'answer' or 'cot'."""
    if kind not in ("answer", "cot"):
        raise ValueError(f"prompt kind must be 'answer' or 'cot', got {kind!r}")
    if not options:
        system = _TRAIN_ANSWER_FREE if kind == "answer" else _TRAIN_COT_FREE
        return [{"role": "system", "content": system}, {"role": "user", "content": question}]
    about = f" about {category}" if category else ""
    system = (_TRAIN_ANSWER_MCQ if kind == "answer" else _TRAIN_COT_MCQ).format(about=about)
    body = "\n".join(f"{lab}. {opt}" for lab, opt in zip(LETTERS, options, strict=False))
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": f"Question: {question}\nOptions:\n{body}"},
    ]


def answer_target(gold: str) -> str:
    """Phase-1 target: the bare answer in the format the eval extracts."""
    return f"[[{gold}]]"


def train_template_hash(tokenizer, template_kwargs=None) -> str:
    return _digest(
        (
            tokenizer.chat_template or "",
            _kwargs_part(template_kwargs),
            TRAIN_PROMPT_VERSION,
            _TRAIN_ANSWER_MCQ,
            _TRAIN_ANSWER_FREE,
            _TRAIN_COT_MCQ,
            _TRAIN_COT_FREE,
        )
    )
