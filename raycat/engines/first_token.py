"""Full-vocabulary statistics of the first answer token, computed inside vLLM's sampler.

``logprobs=-1`` makes vLLM build one Python object per vocabulary entry per request (~1 s a row for a
49k vocabulary on CPU); this logits processor instead reduces each tagged request's first-step logits
to what scoring needs (the exact entropy in float64 and the top-k log-probabilities) with a few tensor
ops, and leaves the logits untouched. It sees the logits before penalties and temperature, and scoring
requests set neither, so these are the raw logits. Results go to a process-local dict: it only works
when the engine core runs in the caller's process (raycat's single-device engines do).
"""

from __future__ import annotations

import threading

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

# The SamplingParams.extra_args key that tags a request: {TAG: (request key, top_k)}.
TAG = "raycat_first_token"

_results: dict[str, tuple[float, list[float]]] = {}
_lock = threading.Lock()


def take(key: str) -> tuple[float, list[float]]:
    """(full entropy in nats, top-k log-probabilities, highest first) of a finished request."""
    with _lock:
        return _results.pop(key)


def discard(keys) -> None:
    """Drop the records of requests whose results will not be taken (a failed or aborted generate)."""
    with _lock:
        for key in keys:
            _results.pop(key, None)


class FirstTokenStats(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        del vllm_config, device, is_pin_memory
        # batch index -> (request key, top_k, the request's running output token list)
        self.rows: dict[int, tuple[str, int, list[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        # It does not change the argmax, but vLLM skips argmax-invariant processors for greedy
        # requests, and scoring is greedy: say False so apply() always runs.
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if not batch_update:
            return
        for index, params, _prompt, output in batch_update.added:
            tag = (params.extra_args or {}).get(TAG) if params is not None else None
            if tag is not None:
                self.rows[index] = (tag[0], int(tag[1]), output)
            else:
                self.rows.pop(index, None)
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for source, target, direction in batch_update.moved:
            moved, displaced = self.rows.pop(source, None), self.rows.pop(target, None)
            if moved is not None:
                self.rows[target] = moved
            if displaced is not None and direction.name == "SWAP":
                self.rows[source] = displaced

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        # Rows with no token yet. A prompt prefilled in chunks reaches this processor at each chunk, and
        # the samples of unfinished chunks are discarded, so a later chunk overwrites: the record kept is
        # the one from the step whose token was kept (after it, ``out`` is no longer empty).
        first = [(i, key, k) for i, (key, k, out) in self.rows.items() if not out]
        if not first:
            return logits
        idx = torch.tensor([i for i, _, _ in first], device=logits.device)
        logprobs = torch.log_softmax(logits.index_select(0, idx).double(), dim=-1)
        # 0 log 0 = 0 for tokens with no mass (-inf logits, e.g. padded vocabulary slots).
        entropies = -torch.where(logprobs.isfinite(), logprobs.exp() * logprobs, torch.zeros_like(logprobs)).sum(-1)
        k_max = max(k for _, _, k in first)
        top = logprobs.topk(min(k_max, logprobs.shape[-1]), dim=-1).values.cpu()
        entropies = entropies.cpu()
        with _lock:
            for j, (_, key, k) in enumerate(first):
                _results[key] = (float(entropies[j]), top[j, :k].tolist())
        return logits
