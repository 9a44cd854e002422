"""Pure core of the score stage: the resume cache key, the deviation sample, one engine result → one
scored row.

No Ray and no engine here (only the engine interface's result type and dtype rule), so each piece
runs the same inside a Ray Data actor or a unit test (tests/score/test_core.py).
"""

from __future__ import annotations

import hashlib
import heapq
import json
import re
from collections.abc import Iterable

import numpy as np

from raycat.config import RaycatConfig
from raycat.data.answers import canonical_number, normalize_number, numbers
from raycat.data.prompts import IDK_LABEL, LETTERS, PROMPT_VERSION, answer_labels
from raycat.engines.base import ScoreResult, resolve_dtype
from raycat.entropy import entropy_options, options_distribution
from raycat.storage import rundir


def cache_key(cfg: RaycatConfig, model_path: str, template_hash: str) -> str:
    """The key of the score parts: everything that changes a row's numbers, nothing that does not
    (batching, engine count)."""
    score = cfg.score
    parts = {
        "model": model_path,
        # A local or URI dir retrained in place is a new model.
        "model_files": rundir.fingerprint(model_path),
        "revision": score.student.revision,
        # What "auto" means on this machine.
        "dtype": resolve_dtype(score.student.dtype, score.engine.device),
        "template": template_hash,
        "prompt_version": PROMPT_VERSION,
        "mode": score.entropy_mode,
        "top_k": score.top_k if score.entropy_mode == "topk" else None,
        "preset": score.prompt.preset,
        "system_prompt": score.prompt.system_prompt,
        "free_form_max_tokens": score.free_form_max_tokens,
        # Rows over the prompt budget are cached as skipped: a larger budget must score them.
        "max_prompt_tokens": score.student.max_model_len - score.free_form_max_tokens,
        # The label spellings summed into the options distribution.
        "label_tokens": "alone+in-context",
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def deviation_sample(ids: Iterable[str], n: int) -> frozenset[str]:
    """A stable sample (by id hash, not row order) also scored in full mode. ``ids`` may be a stream:
    only the ``n`` best are held."""
    return frozenset(heapq.nsmallest(n, ids, key=lambda i: hashlib.sha1(i.encode()).hexdigest()))


def greedy_answer(result: ScoreResult, n_options: int, preset: str, label_ids: list[list[int]] | None) -> str:
    """The option the decoded answer names, as the paper reads it: a letter, "IDK" for the paper
    preset's "0", or "" when the decoded answer is no option label (invalid). Single-token labels: the
    greedy token; multi-token labels ("10"): the first word of the greedy text."""
    labels = answer_labels(n_options, preset)
    if label_ids:
        k = next((j for j, ids in enumerate(label_ids) if result.greedy_token_id in ids), None)
    else:
        match = re.match(r"\s*\(?([A-Za-z0-9]+)", result.greedy_text or "")
        k = labels.index(match.group(1)) if match and match.group(1) in labels else None
    if k is None:
        return ""
    return "IDK" if labels[k] == IDK_LABEL else LETTERS[k]


def row_result(
    result: ScoreResult,
    n_options: int,
    gold: str,
    mode: str,
    preset: str,
    label_ids: list[list[int]] | None = None,
    answer_prefix: str = "",
) -> dict:
    """Pure: one engine result → the part columns of one scored row.

    Two correctness labels: ``correct`` is the arg-max among the option tokens (always a valid option);
    ``correct_greedy`` is the paper's: the decoded token, a non-option answer counting as invalid.
    ``label_ids``: the token ids of each answer label (None: multi-token labels, read from the text)."""
    out: dict = {
        "entropy_full": result.entropy_full,
        "entropy_topk": result.entropy_topk,
        "entropy_topk_bound": result.entropy_topk_bound,
        "greedy_text": result.greedy_text,
        "idk": False,
    }
    if n_options:
        out["predicted_greedy"] = greedy_answer(result, n_options, preset, label_ids)
        out["correct_greedy"] = out["predicted_greedy"] == gold
    if n_options and result.option_logprobs:
        lp = np.asarray(result.option_logprobs)
        probs, mass = options_distribution(lp)
        k = int(probs.argmax())
        out["idk"] = preset == "paper" and k == n_options  # the appended "0" label
        out["predicted"] = "IDK" if out["idk"] else LETTERS[k]
        out["correct"] = out["predicted"] == gold
        out["option_mass"] = mass
        out["option_probs"] = probs.tolist()
        out["entropy_options"] = entropy_options(lp)
    elif n_options:
        # Multi-token labels in full/topk mode: no option distribution; the decoded answer.
        out["idk"] = out["predicted_greedy"] == "IDK"
        out["predicted"], out["correct"] = out["predicted_greedy"], out["correct_greedy"]
        out["option_mass"], out["option_probs"], out["entropy_options"] = None, [], None
    else:
        # After an answer prefix the answer comes first ("12. Because 6 + 6..."); a bare answer may follow words.
        found = numbers(result.greedy_text)
        first = canonical_number(found[0]) if found and answer_prefix else None
        out["predicted"] = (first if answer_prefix else normalize_number(result.greedy_text)) or ""
        out["correct"] = out["predicted"] == gold
        out["predicted_greedy"], out["correct_greedy"] = out["predicted"], out["correct"]
        out["option_mass"] = None
        out["option_probs"] = []
        out["entropy_options"] = None
    by_mode = {"options": out["entropy_options"], "full": result.entropy_full, "topk": result.entropy_topk}
    out["entropy"] = by_mode[mode]
    return out
