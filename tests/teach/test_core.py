"""The teach loop, policy and accounting with a scripted engine (wiring only; real engines elsewhere)."""

import numpy as np
import pandas as pd
import pytest

from raycat.engines.base import Generation, Sampling
from raycat.teach.core import accounting, attempt_schedule, band_accounting, resolve, teach_rows


class ScriptedEngine:
    """Returns queued texts per prompt, in call order; records the sampling of each call."""

    def __init__(self, scripts: dict[int, list[str]]):
        self.scripts = {k: list(v) for k, v in scripts.items()}
        self.calls: list[Sampling] = []

    def generate(self, prompts, sampling):
        self.calls.append(sampling)
        out = []
        for p in prompts:
            text = self.scripts[p[0]].pop(0)
            if text.startswith("ERR:"):
                out.append(Generation("", 0, 0, "error", error=text[4:]))
            elif text.startswith("LEN:"):  # cut off by max_tokens
                out.append(Generation(text[4:], len(p), 10, "length"))
            else:
                out.append(Generation(text, len(p), 10, "stop"))
        return out


def test_schedule_uses_retry_temperatures_and_new_seeds():
    s = attempt_schedule(Sampling(0.0, 0.9, 100, 5), 3, [0.7, 1.0])
    assert [(x.temperature, x.seed) for x in s] == [(0.0, 5), (0.7, 6), (1.0, 7), (1.0, 8)]
    assert attempt_schedule(Sampling(0.0, 1.0, 10, 0), 0, [0.7]) == [Sampling(0.0, 1.0, 10, 0)]


def test_retries_until_verified_and_counts_every_attempt():
    eng = ScriptedEngine({1: ["[[B]]"], 2: ["[[A]]", "hmm", "[[C]]"], 3: ["no", "no", "no"]})
    rows = [
        {"prompt": [i, 0, 0], "n_options": 4, "gold": g, "skip_reason": ""} for i, g in ((1, "B"), (2, "C"), (3, "D"))
    ]
    rows.append({"prompt": [4], "n_options": 4, "gold": "A", "skip_reason": "prompt too long"})
    res = teach_rows(eng, rows, attempt_schedule(Sampling(0.0, 1.0, 50, 0), 2, [0.7]))
    # A prompt that does not fit is skipped, not failed: not a transient error to retry (issue 22 item 1).
    assert [r["status"] for r in res] == ["verified", "verified", "no_answer", "skipped"]
    assert [r["attempts"] for r in res] == [1, 3, 3, 0]
    assert [r["completion_tokens"] for r in res] == [10, 30, 30, 0]
    assert res[1]["prompt_tokens"] == 9 and res[1]["extracted"] == "C"
    assert res[3]["reason"] == "prompt too long" and res[3]["response"] is None
    assert [c.temperature for c in eng.calls] == [0.0, 0.7, 0.7]


def test_a_completion_cut_off_by_max_tokens_is_never_verified():
    # The right answer appears before the cut: still not a training target (it ends mid-sentence).
    eng = ScriptedEngine({1: ["LEN:so [[B]] because the", "[[B]]"], 2: ["LEN:[[B]] and then", "LEN:[[B]] but"]})
    rows = [{"prompt": [i], "n_options": 4, "gold": "B", "skip_reason": ""} for i in (1, 2)]
    res = teach_rows(eng, rows, attempt_schedule(Sampling(0.0, 1.0, 8, 0), 1, [0.7]))
    assert [r["status"] for r in res] == ["verified", "truncated"]
    assert res[0]["response"] == "[[B]]" and res[0]["finish_reason"] == "stop"
    final, target, reason = resolve("truncated", res[1]["response"], "B", "keep")
    assert (final, target) == ("dropped_truncated", None) and "max_tokens" in reason


def test_a_hedged_or_invalid_last_answer_is_retried_not_verified():
    eng = ScriptedEngine({1: ["[[A]] or [[B]]", "[[B]] then [[E]]", "[[B]]"]})
    res = teach_rows(
        eng,
        [{"prompt": [1], "n_options": 4, "gold": "B", "skip_reason": ""}],
        attempt_schedule(Sampling(0.0, 1.0, 8, 0), 2, [0.7]),
    )
    assert res[0]["status"] == "verified" and res[0]["attempts"] == 3 and res[0]["response"] == "[[B]]"


@pytest.mark.parametrize(
    "status,policy,final,target",
    [
        ("verified", "drop", "verified", "COT"),
        ("wrong", "drop", "dropped_wrong", None),
        ("no_answer", "drop", "dropped_no_answer", None),
        ("wrong", "keep", "kept_wrong", "COT"),
        ("no_answer", "keep", "dropped_no_answer", None),
        ("wrong", "fallback_to_answer", "fallback_to_answer", "[[C]]"),
        ("no_answer", "fallback_to_answer", "fallback_to_answer", "[[C]]"),
        ("failed", "keep", "failed", None),
        ("truncated", "keep", "dropped_truncated", None),
        ("truncated", "fallback_to_answer", "fallback_to_answer", "[[C]]"),
    ],
)
def test_policy(status, policy, final, target):
    got_final, got_target, reason = resolve(status, "COT", "C", policy)
    assert (got_final, got_target) == (final, target)
    assert (reason == "") == (final == "verified")


def test_accounting_totals_and_costs():
    rows = pd.DataFrame(
        {
            "_key": ["a", "b", "a"],
            "teacher": ["t1", "t1", "t2"],
            "attempts": [1, 2, 1],
            "prompt_tokens": [100, 200, 100],
            "completion_tokens": [300, 600, 300],
            "engine_seconds": [1.0, 2.0, 1.0],
            "gpu_seconds": [1.0, 2.0, 0.0],
        }
    )
    a = accounting(rows, prices={"t1": (1.0, 2.0, "USD"), "t2": None})
    assert a["total_tokens"] == 1600 and a["per_teacher"]["t1"]["attempts"] == 3 and a["rows_taught"] == 2
    assert a["per_teacher"]["t1"]["cost"] == pytest.approx((300 * 1 + 900 * 2) / 1e6)


KEYS = [f"e{i}" for i in range(2)] + [f"m{i}" for i in range(4)] + ["h0", "h1"]
BANDS = np.array(["easy"] * 2 + ["medium"] * 4 + ["hard"] * 2)


def _tokens(spent: pd.DataFrame) -> np.ndarray:
    """Each pool row's tokens (NaN: no answer), from answers by key."""
    per_key = (spent["prompt_tokens"] + spent["completion_tokens"]).groupby(spent["_key"]).sum()
    return per_key.reindex(KEYS).to_numpy(dtype=float)


def test_saving_is_measured_when_every_band_was_taught():
    # A distill-all run earlier in the same cache answered every row: the saving is measured.
    spent = pd.DataFrame({"_key": KEYS, "prompt_tokens": 10, "completion_tokens": [10] * 6 + [90, 190]})
    b = band_accounting(BANDS, _tokens(spent), ["hard"])
    assert b["per_band"]["hard"]["tokens"] == 100 + 200 and b["per_band"]["easy"]["basis"] == "measured"
    assert b["saving"]["basis"] == "measured"
    assert b["saving"]["saving_pct"] == pytest.approx(100 * (1 - 300 / (300 + 6 * 20)))


def test_a_run_teaching_every_band_also_reports_the_hard_band_only_saving():
    # distill_all in --recipes teaches every band: that saving is 0 by construction; the method's own
    # saving (the hard band only) is measured from the same rows.
    spent = pd.DataFrame({"_key": KEYS, "prompt_tokens": 10, "completion_tokens": [10] * 6 + [90, 190]})
    every = band_accounting(BANDS, _tokens(spent), ["easy", "medium", "hard"])
    assert every["saving"]["saving_pct"] == 0.0
    hard_only = every["hard_only_saving"]
    assert hard_only["saving_pct"] == pytest.approx(100 * (1 - 300 / (300 + 6 * 20)))
    assert hard_only["basis"] == "measured" and hard_only["taught_bands_tokens"] == 300
    assert "hard_only_saving" not in band_accounting(BANDS, _tokens(spent), ["hard"])


def test_saving_is_an_estimate_labelled_when_bands_were_not_taught():
    spent = pd.DataFrame({"_key": ["h0", "h1", "m0"], "prompt_tokens": [10, 10, 5], "completion_tokens": [90, 190, 15]})
    b = band_accounting(BANDS, _tokens(spent), ["hard"])
    med, easy = b["per_band"]["medium"], b["per_band"]["easy"]
    assert med["measured_tokens"] == 20 and med["estimated_tokens"] == 3 * 20  # this band's own mean
    assert "estimated for 3 from this band's measured mean" in med["basis"]
    assert easy["estimated_tokens"] == pytest.approx(2 * (300 + 20) / 3)  # no easy row measured: all bands' mean
    assert b["saving"]["basis"] == "estimate" and "estimate" in b["saving"]["label"]


def test_request_errors_stop_the_row_and_keep_earlier_answers():
    eng = ScriptedEngine({1: ["ERR:APIConnectionError: down"], 2: ["[[A]]", "ERR:RateLimitError: 429"]})
    rows = [{"prompt": [i], "n_options": 4, "gold": "B", "skip_reason": ""} for i in (1, 2)]
    res = teach_rows(eng, rows, attempt_schedule(Sampling(0.0, 1.0, 50, 0), 3, [0.7]))
    assert res[0]["status"] == "failed" and res[0]["reason"] == "APIConnectionError: down"
    assert res[0]["attempts"] == 0
    assert res[1]["status"] == "wrong" and res[1]["attempts"] == 1 and "429" in res[1]["reason"]
    # No retries after a request failed for good.
    assert len(eng.calls) == 2


def test_n_samples_per_attempt_keep_a_verified_one_and_count_all_tokens():
    class NEngine:
        def generate(self, prompts, sampling):
            texts = {1: ["[[B]]", "[[A]]"], 2: ["none", "[[C]]"]}
            return [Generation(t, 5 if j == 0 else 0, 10, "stop") for p in prompts for j, t in enumerate(texts[p[0]])]

    rows = [{"prompt": [i], "n_options": 4, "gold": "A", "skip_reason": ""} for i in (1, 2)]
    res = teach_rows(NEngine(), rows, [Sampling(0.7, 1.0, 50, 0, n=2)])
    assert res[0]["status"] == "verified" and res[0]["response"] == "[[A]]"
    assert res[1]["status"] == "wrong" and res[1]["extracted"] == "C"  # an answer beats no answer
    assert res[0]["completion_tokens"] == 20 and res[0]["prompt_tokens"] == 5


def test_keep_wrong_keeps_the_first_wrong_attempt_not_the_last():
    # Row 1: wrong at the first (lowest) temperature, then no answer, then wrong again at the highest.
    # Row 2: no answer first, then a wrong answer: an answer beats none.
    eng = ScriptedEngine({1: ["cold [[A]]", "rambling", "hot [[D]]"], 2: ["rambling", "warm [[C]]", "hot [[D]]"]})
    rows = [{"prompt": [i], "n_options": 4, "gold": "B", "skip_reason": ""} for i in (1, 2)]
    schedule = attempt_schedule(Sampling(0.0, 1.0, 50, 0), 2, [0.7, 1.0])
    res = teach_rows(eng, rows, schedule)
    assert [c.temperature for c in eng.calls] == [0.0, 0.7, 1.0]
    assert res[0]["status"] == "wrong" and res[0]["response"] == "cold [[A]]" and res[0]["extracted"] == "A"
    assert res[1]["status"] == "wrong" and res[1]["response"] == "warm [[C]]" and res[1]["extracted"] == "C"
    assert [r["attempts"] for r in res] == [3, 3] and [r["completion_tokens"] for r in res] == [30, 30]
    final, target, _ = resolve(res[0]["status"], res[0]["response"], "B", "keep")
    assert (final, target) == ("kept_wrong", "cold [[A]]")
