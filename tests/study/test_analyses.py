"""The study analyses on constructed data whose answers are known by construction."""

import numpy as np
import pandas as pd
import pytest

from raycat.study.analyses import band_migration, confident_wrong, mode_agreement

Q = (0.25, 0.75)


def test_band_migration_counts_each_row_where_it_went():
    # 8 rows: ranks before give 2 easy / 4 medium / 2 hard (ceil(q * 7) rule); after phase 1 the two
    # hard rows became the two most confident, two easy rows the least confident.
    ids = [f"r{i}" for i in range(8)]
    before = pd.DataFrame({"id": ids, "band": ["easy", "easy", "medium", "medium", "medium", "medium", "hard", "hard"]})
    after = pd.DataFrame({"id": ids, "entropy": [0.9, 0.8, 0.3, 0.4, 0.5, 0.6, 0.01, 0.02]})
    m = band_migration(before, after.iloc[::-1], Q)  # order does not matter, ids do
    assert m["rows"] == 8 and m["rows_not_rescored"] == 0
    assert m["matrix"]["hard"] == {"easy": 2, "medium": 0, "hard": 0}
    assert m["matrix"]["easy"] == {"easy": 0, "medium": 0, "hard": 2}
    assert m["matrix"]["medium"] == {"easy": 0, "medium": 4, "hard": 0}
    assert m["hard_still_hard"] == 0.0 and m["stay_share"]["medium"] == 1.0
    # nothing moved: every band stays; a row not re-scored is counted, not silently dropped
    same = band_migration(before, pd.DataFrame({"id": ids[:7], "entropy": np.arange(7.0)}), Q)
    assert same["rows_not_rescored"] == 1 and same["stay_share"]["easy"] == 1.0


def test_confident_wrong_finds_low_entropy_mistakes_and_what_models_answer_on_them():
    scores = pd.DataFrame(
        {
            "id": ["a", "b", "c", "d", "e", "f"],
            "band": ["easy", "easy", "easy", "medium", "hard", "hard"],
            "correct": [True, False, False, False, True, False],
            "category": ["law", "law", "math", "law", "math", "math"],
        }
    )
    answers = {
        "phase1": pd.DataFrame({"id": ["b", "c", "d"], "correct": [True, False, True]}),
        "base": pd.DataFrame({"id": ["a", "d"], "correct": [True, True]}),  # none of the confident-wrong rows
    }
    cw = confident_wrong(scores, answers)
    assert (
        cw["rows"] == 2 and cw["share_of_easy"] == pytest.approx(2 / 3) and cw["share_of_all"] == pytest.approx(2 / 6)
    )
    assert cw["by_category"] == {"law": 1, "math": 1}
    assert cw["models"]["phase1"] == {"rows": 2, "accuracy": 0.5}
    assert cw["models"]["base"] == {"rows": 0, "accuracy": None}


def test_mode_agreement_is_one_for_a_monotone_transform_and_low_for_a_reversal():
    rng = np.random.default_rng(0)
    ids = [f"q{i}" for i in range(40)]
    e = rng.random(40)
    a = pd.DataFrame({"id": ids, "entropy": e})
    same = mode_agreement(a, pd.DataFrame({"id": ids, "entropy": np.log1p(e) * 3}), Q)
    assert same["spearman"] == pytest.approx(1.0) and same["same_band"] == 1.0
    rev = mode_agreement(a, pd.DataFrame({"id": ids, "entropy": -e}), Q)
    assert rev["spearman"] == pytest.approx(-1.0)
    assert rev["matrix"]["easy"]["hard"] == rev["matrix"]["hard"]["easy"] > 0 and rev["matrix"]["easy"]["easy"] == 0
    # only shared rows count; too few rows give no statistic rather than a misleading one
    assert mode_agreement(a.iloc[:2], a, Q) == {"rows": 2, "spearman": None, "same_band": None, "matrix": None}
