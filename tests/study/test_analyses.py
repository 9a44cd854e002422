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
    assert same["option_mass"] == {"before": None, "after": None}  # no mass columns: unknown, not 0


def test_band_migration_reports_the_option_mass_before_and_after_re_scoring():
    """Review m12: after phase 1 the model opens with "[[", so the letter ids' mass may collapse and the
    options-mode entropy after is renormalised over almost nothing; the table must show it."""
    ids = [f"r{i}" for i in range(4)]
    before = pd.DataFrame({"id": ids, "band": ["easy", "medium", "medium", "hard"], "option_mass": [0.9, 0.8, 0.7, 1]})
    after = pd.DataFrame({"id": ids[:3], "entropy": [0.1, 0.2, 0.3], "option_mass": [0.02, 0.01, 0.03]})
    m = band_migration(before, after, Q)
    assert m["option_mass"] == {"before": pytest.approx(0.8), "after": pytest.approx(0.02)}  # rows in both only


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


def test_a_study_reads_the_option_mass_of_the_score_and_rescore_files(tmp_path):
    """The study's migration table reads both masses from the run dir's Parquet files; a scores file
    without the column (an older run) gives unknown, not an error."""
    from raycat.study.comparison import _band_migration

    run = tmp_path / "run"
    for d in ("split", "score", "rescore/phase1/score"):
        (run / d).mkdir(parents=True)
    for i, band in enumerate(("easy", "medium", "hard")):
        pd.DataFrame({"id": [f"r{i}"], "band": [band]}).to_parquet(run / f"split/{band}.parquet")
    ids = ["r0", "r1", "r2"]
    pd.DataFrame({"id": ids, "entropy": [0.1, 0.5, 1.0], "option_mass": [0.9, 0.8, 0.6]}).to_parquet(
        run / "score/scores.parquet"
    )
    pd.DataFrame({"id": ids, "entropy": [0.3, 0.2, 0.1], "option_mass": [0.05, 0.01, 0.02]}).to_parquet(
        run / "rescore/phase1/score/scores.parquet"
    )
    got = _band_migration(str(run), Q)["phase1"]
    assert got["rows"] == 3 and got["option_mass"] == {"before": pytest.approx(0.8), "after": pytest.approx(0.02)}
    pd.DataFrame({"id": ids, "entropy": [0.3, 0.2, 0.1]}).to_parquet(run / "rescore/phase1/score/scores.parquet")
    assert _band_migration(str(run), Q)["phase1"]["option_mass"]["after"] is None
