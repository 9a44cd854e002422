"""Entropy of the first answer token, in nats, from log-probabilities. Pure numpy.

Three modes, all computed from raw (unprocessed) logits:
- full: ``H = -sum p log p`` over the whole vocabulary (the paper's quantity);
- options: the distribution renormalised over the option-label tokens (each label may have several
  single-token spellings, e.g. "A" and " A", whose probabilities are summed);
- topk: top-k probabilities plus the tail mass, as an estimate with a guaranteed error bound.
"""

from __future__ import annotations

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def entropy_full(logprobs: np.ndarray) -> float:
    lp = np.asarray(logprobs, dtype=np.float64)
    lp = lp[np.isfinite(lp)]
    p = np.exp(lp)
    return float(-(p * lp).sum())


def group_logprobs(token_logprob: dict[int, float], groups: list[list[int]]) -> np.ndarray:
    """Log-probability of each option = logsumexp over its token spellings."""
    out = np.empty(len(groups))
    for i, group in enumerate(groups):
        out[i] = np.logaddexp.reduce(np.array([token_logprob[token] for token in group], dtype=np.float64))
    return out


def options_distribution(option_logprobs: np.ndarray) -> tuple[np.ndarray, float]:
    """(probabilities renormalised over the options, total mass the options get)."""
    lp = np.asarray(option_logprobs, dtype=np.float64)
    log_mass = np.logaddexp.reduce(lp)
    return np.exp(lp - log_mass), float(np.exp(log_mass))


def entropy_options(option_logprobs: np.ndarray) -> float:
    lp = np.asarray(option_logprobs, dtype=np.float64)
    q = lp - np.logaddexp.reduce(lp)
    p = np.exp(q)
    # 0 log 0 = 0: an option the model gives no mass at all (log p = -inf) adds nothing, not NaN.
    return float(-(p * np.where(p > 0, q, 0.0)).sum())


def entropy_topk(topk_logprobs: np.ndarray, vocab_size: int) -> tuple[float, float]:
    """(estimate, bound) with ``|estimate - H_full| <= bound`` for any distribution with that top-k.

    The tail (mass T over V-k tokens, none above the k-th probability) contributes least when packed
    into as few tokens as possible and most when spread uniformly; the estimate is the midpoint.
    """
    lp = np.sort(np.asarray(topk_logprobs, dtype=np.float64))[::-1]
    p = np.exp(lp)
    head = float(-(p * lp).sum())
    tail = max(0.0, 1.0 - float(p.sum()))
    n_tail = vocab_size - len(p)
    if tail <= 0.0 or n_tail <= 0:
        return float(head), 0.0
    p_min = p[-1]
    full_slots = int(np.floor(tail / p_min))
    rest = tail - full_slots * p_min
    low = full_slots * (-p_min * np.log(p_min)) + (-rest * np.log(rest) if rest > 0 else 0.0)
    high = -tail * np.log(tail / n_tail)
    return float(head + (low + high) / 2), float((high - low) / 2)
