"""Pure pieces of the score stage: per-row results, the resume cache key, the deviation sample."""

import numpy as np
import pandas as pd
import pytest

from raycat.config import validate_config
from raycat.engine import ScoreResult
from raycat.score import cache_key, deviation_sample, row_result


def cfg(**score):
    return validate_config({"data": {"source": "synthetic"}, "score": {"student": {"path": "m"}, **score}})


def test_row_result_mcq_letters():
    res = ScoreResult(option_logprobs=list(np.log([0.1, 0.6, 0.1])), entropy_full=2.0)
    out = row_result(res, 3, "B", "options", "letters")
    assert out["predicted"] == "B" and out["correct"] and not out["idk"]
    assert out["option_mass"] == pytest.approx(0.8)
    q = np.array([0.125, 0.75, 0.125])
    assert out["entropy"] == out["entropy_options"] == pytest.approx(-(q * np.log(q)).sum())
    assert row_result(res, 3, "B", "full", "letters")["entropy"] == 2.0


def test_row_result_paper_idk_is_never_correct():
    res = ScoreResult(option_logprobs=list(np.log([0.1, 0.2, 0.6])))  # labels 1, 2, then "0" (IDK)
    out = row_result(res, 2, "A", "options", "paper")
    assert out["idk"] and out["predicted"] == "IDK" and not out["correct"]


def test_row_result_free_form_reads_the_number():
    res = ScoreResult(greedy_text=" 1,234 apples", entropy_topk=0.7, entropy_topk_bound=0.1)
    out = row_result(res, 0, "1234", "topk", "letters")
    assert out["predicted"] == "1234" and out["correct"] and out["entropy"] == 0.7
    assert out["option_mass"] is None


def test_cache_key_tracks_what_changes_the_numbers():
    base = cache_key(cfg(), "m", "t")
    assert base == cache_key(cfg(engine={"batch_size": 3, "num_engines": 2}), "m", "t")  # batching: same rows
    assert base != cache_key(cfg(entropy_mode="full"), "m", "t")
    assert base != cache_key(cfg(), "m", "other-template")
    assert base != cache_key(cfg(student={"path": "m", "revision": "abc"}), "m", "t")
    assert base != cache_key(cfg(student={"path": "m", "dtype": "bfloat16"}), "m", "t")
    assert base != cache_key(cfg(prompt={"preset": "paper"}), "m", "t")


def test_deviation_sample_is_stable_under_reordering():
    ids = pd.Series([f"q{i}" for i in range(100)])
    a = deviation_sample(ids, 10)
    assert len(a) == 10 and a == deviation_sample(ids[::-1], 10)
    assert deviation_sample(ids, 0) == frozenset()
