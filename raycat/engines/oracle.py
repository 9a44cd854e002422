"""An oracle teacher: no model, a deterministic solver (``raycat.data.solve``) that writes a correct
step-by-step solution for the synthetic arithmetic questions (``data.synthetic.kinds``).

It stands in for a teacher that is always right, so a study can measure what the method does with
correct chain-of-thought; it is labelled ``oracle`` wherever its rows go (backend name in the teach
plan, the cache key, the report). Tokens are counted with the configured model's tokenizer (the
teacher's ``model.path``), so the teacher-token accounting has the units of that tokenizer.
"""

from __future__ import annotations

from raycat.data.solve import solution
from raycat.engines.base import Generation, Sampling


class OracleEngine:
    vocab_size = 0

    def __init__(self, model: str, revision: str | None = None, trust_remote_code: bool = False, **_settings):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)

    def score(self, requests, mode, top_k, free_form_max_tokens):
        raise ValueError("backend 'oracle' writes teacher solutions only; score with vllm or transformers")

    def generate(self, prompts: list, sampling: Sampling) -> list[Generation]:
        out = []
        for prompt in prompts:
            text = self.tokenizer.decode(prompt) if isinstance(prompt, list) else prompt[-1]["content"]
            answer = solution(text)
            if answer is None:
                # Not a synthetic arithmetic question: a failed request, so teach names the row.
                error = "the oracle teacher solves only data.synthetic.kinds questions (What is <a + b ...>?)"
                failed = [
                    Generation("", len(prompt) if j == 0 else 0, 0, "error", error=error) for j in range(sampling.n)
                ]
                out += failed
                continue
            ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
            # The solution's own tokens (a model would add an end-of-sequence token: one per row, left out
            # so the accounting counts text only); one longer than max_tokens is cut there, as a model's is.
            completion, finish = len(ids), "stop"
            if completion > sampling.max_tokens:
                ids, completion, finish = ids[: sampling.max_tokens], sampling.max_tokens, "length"
                answer = self.tokenizer.decode(ids)
            # The prompt is counted once per prompt, on its first sample (as the vLLM engine does).
            out += [Generation(answer, len(prompt) if j == 0 else 0, completion, finish) for j in range(sampling.n)]
        return out

    def close(self) -> None:
        pass
