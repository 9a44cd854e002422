"""Pure pieces of the score stage: per-row results, the resume cache key, the deviation sample."""

import numpy as np
import pandas as pd
import pytest

from raycat.config import validate_config
from raycat.engines.base import ScoreResult, resolve_dtype
from raycat.score.core import cache_key, deviation_sample, row_result


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


def test_two_correctness_labels_options_argmax_and_the_decoded_token():
    groups = [[10, 11], [20], [30]]  # token ids spelling A ("A", " A"), B, C
    lp = list(np.log([0.1, 0.6, 0.1]))
    argmax_b = row_result(ScoreResult(option_logprobs=lp, greedy_token_id=20), 3, "B", "options", "letters", groups)
    assert argmax_b["correct"] and argmax_b["predicted_greedy"] == "B" and argmax_b["correct_greedy"]
    # The decoded token is no option label (e.g. "The"): invalid for the paper, still B by arg-max.
    other = row_result(ScoreResult(option_logprobs=lp, greedy_token_id=99), 3, "B", "options", "letters", groups)
    assert other["correct"] and other["predicted_greedy"] == "" and not other["correct_greedy"]
    spaced = row_result(ScoreResult(option_logprobs=lp, greedy_token_id=11), 3, "B", "options", "letters", groups)
    assert spaced["predicted_greedy"] == "A" and not spaced["correct_greedy"]


@pytest.mark.parametrize("text,want", [("10", "J"), (" 3.", "C"), ("0", "IDK"), ("The answer", "")])
def test_paper_preset_multi_token_labels_in_full_mode_read_the_decoded_answer(text, want):
    res = ScoreResult(greedy_text=text, greedy_token_id=16, entropy_full=1.5)  # "1": only the first token
    out = row_result(res, 10, "J", "full", "paper", None)
    assert out["predicted"] == out["predicted_greedy"] == want and out["correct"] == (want == "J")
    assert out["entropy"] == 1.5 and out["entropy_options"] is None and out["idk"] == (want == "IDK")


def test_greedy_accuracy_and_auc_drop_invalid_and_idk_rows_as_the_paper():
    from raycat.score.metrics import score_metrics

    df = pd.DataFrame(
        {
            "status": "scored",
            "skip_reason": "",
            "idk": False,
            "entropy": [0.1, 0.2, 0.9, 1.0, 0.5, 0.6],
            "correct": [True, True, False, False, True, False],
            "predicted": ["A", "A", "B", "B", "A", "B"],
            "predicted_greedy": ["A", "A", "B", "B", "", "IDK"],
            "correct_greedy": [True, True, False, False, False, False],
            "category": "c",
            "option_mass": 0.9,
            "entropy_full": None,
        }
    )
    m = score_metrics(df)
    assert m["greedy"] == {"rows": 4, "invalid": 1, "idk": 1, "agree_with_options_argmax": pytest.approx(4 / 6)}
    assert m["accuracy_greedy"] == 0.5 and m["roc_auc_greedy"] == 1.0
    assert m["accuracy"] == pytest.approx(0.5) and "paper" in m["correctness"]["correct_greedy"]


def test_report_plots_use_the_rows_of_the_metrics():
    from raycat.report import metric_rows
    from raycat.score.metrics import score_metrics

    df = pd.DataFrame(
        {
            "status": "scored",
            "skip_reason": "",
            "idk": [False, False, True, False],
            "entropy": [0.1, 0.9, 0.2, 0.4],
            "correct": [True, False, False, True],
            "category": "c",
            "option_mass": 0.9,
            "entropy_full": None,
        }
    )
    rows = metric_rows(df)
    assert len(rows) == 3 and rows["correct"].mean() == score_metrics(df)["accuracy"]


def test_cache_key_tracks_what_changes_the_numbers():
    base = cache_key(cfg(), "m", "t")
    assert base == cache_key(cfg(engine={"batch_size": 3, "num_engines": 2}), "m", "t")  # batching: same rows
    assert base != cache_key(cfg(entropy_mode="full"), "m", "t")
    assert base != cache_key(cfg(), "m", "other-template")
    assert base != cache_key(cfg(student={"path": "m", "revision": "abc"}), "m", "t")
    fp32 = cache_key(cfg(student={"path": "m", "dtype": "float32"}), "m", "t")
    assert fp32 != cache_key(cfg(student={"path": "m", "dtype": "bfloat16"}), "m", "t")
    # 'auto' is keyed by what it resolves to on this machine: the same numbers as naming that dtype
    assert base == cache_key(cfg(student={"path": "m", "dtype": resolve_dtype("auto", "cpu")}), "m", "t")
    assert base != cache_key(cfg(prompt={"preset": "paper"}), "m", "t")


def test_a_larger_max_model_len_rescores_rows_skipped_as_too_long():
    # A row over the prompt budget is written to the parts as skipped; the skip message says to raise
    # score.student.max_model_len, so a larger budget is a new key (the row is scored, not found done).
    base = cache_key(cfg(), "m", "t")
    longer = cache_key(cfg(student={"path": "m", "max_model_len": 4096}), "m", "t")
    assert base != longer
    assert base != cache_key(cfg(free_form_max_tokens=64), "m", "t")


def test_deviation_sample_is_stable_under_reordering():
    ids = pd.Series([f"q{i}" for i in range(100)])
    a = deviation_sample(ids, 10)
    assert len(a) == 10 and a == deviation_sample(ids[::-1], 10)
    assert deviation_sample(ids, 0) == frozenset()


def test_after_an_answer_prefix_a_free_form_answer_is_its_first_number():
    res = ScoreResult(greedy_text="12. Because 6 + 6 = 12, not 13", entropy_full=0.3)
    assert row_result(res, 0, "12", "full", "letters", None, "The answer is ")["correct"]
    # Without a prefix the model was asked for the number alone and may lead with words: the last number.
    assert row_result(res, 0, "13", "full", "letters")["predicted"] == "13"
    assert row_result(ScoreResult(greedy_text=" no idea"), 0, "1", "full", "letters", None, "A: ")["predicted"] == ""


def test_the_answer_prefix_changes_the_cache_key(tiny_tokenizer):
    from raycat.data.prompts import score_template_hash

    plain = cfg(entropy_mode="full")
    prefixed = cfg(entropy_mode="full", prompt={"answer_prefix": "The answer is "})
    a, b = score_template_hash(plain, tiny_tokenizer), score_template_hash(prefixed, tiny_tokenizer)
    assert a != b and cache_key(plain, "m", a) != cache_key(prefixed, "m", b)
