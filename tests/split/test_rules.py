import numpy as np
import pandas as pd
import pytest

from raycat.config import SplitConfig
from raycat.errors import RaycatError
from raycat.split.holdout import holdout_mask
from raycat.split.plan import split_frame
from raycat.split.rules import assign_bands, quantile_thresholds


def frame(entropies):
    n = len(entropies)
    return pd.DataFrame(
        {
            "id": [f"q{i}" for i in range(n)],
            "question": [f"question {i}" for i in range(n)],
            "options": [["x", "y"]] * n,
            "entropy": entropies,
        }
    )


def test_exact_quantile_thresholds_on_known_input():
    e = np.arange(1, 101, dtype=float)  # 1..100
    lo, hi = quantile_thresholds(e, (0.25, 0.75))
    assert (lo, hi) == (pytest.approx(25.75), pytest.approx(75.25))  # numpy 'linear'
    bands = assign_bands(e, lo, hi)
    assert (bands == "easy").sum() == 25 and (bands == "medium").sum() == 50 and (bands == "hard").sum() == 25


def test_bands_are_bounded_and_disjoint_no_middle_band_bug():
    rng = np.random.default_rng(0)
    e = rng.exponential(size=1000)
    bands, test, info = split_frame(frame(e), SplitConfig(test_fraction=0))
    lo, hi = info["thresholds"]
    # The medium band of the paper's v1/v2 splits had no upper bound.
    assert bands["medium"]["entropy"].max() < hi
    assert bands["easy"]["entropy"].max() < lo <= bands["medium"]["entropy"].min()
    assert bands["hard"]["entropy"].min() >= hi
    ids = [set(b["id"]) for b in bands.values()]
    assert not (ids[0] & ids[1]) and not (ids[1] & ids[2]) and not (ids[0] & ids[2])
    assert sum(len(b) for b in bands.values()) == 1000 and len(test) == 0


def test_ties_land_in_the_same_band_deterministically():
    e = np.array([0.0] * 5 + [1.0] * 10 + [2.0] * 5)
    bands, _, info = split_frame(frame(e), SplitConfig(test_fraction=0))
    assert info["thresholds"] == [pytest.approx(0.75), pytest.approx(1.25)]
    assert set(bands["medium"]["entropy"]) == {1.0} and len(bands["medium"]) == 10
    shuffled = frame(e).sample(frac=1, random_state=3)
    bands2, _, _ = split_frame(shuffled, SplitConfig(test_fraction=0))
    assert {b: set(v["id"]) for b, v in bands.items()} == {b: set(v["id"]) for b, v in bands2.items()}


def test_absolute_thresholds_override_quantiles():
    bands, _, info = split_frame(frame([0.1, 0.5, 0.9, 1.5]), SplitConfig(thresholds=(0.5, 1.0)))
    assert info["method"] == "absolute"
    assert list(bands["easy"]["entropy"]) == [0.1]
    assert list(bands["medium"]["entropy"]) == [0.5, 0.9]
    assert list(bands["hard"]["entropy"]) == [1.5]


def test_thresholds_come_from_the_training_pool_only():
    e = np.arange(100, dtype=float)
    df = frame(e)
    bands, test, info = split_frame(df, SplitConfig(test_fraction=0.3, seed=1))
    pool = df[~df["id"].isin(test["id"])]
    assert info["thresholds"] == [pytest.approx(v) for v in np.quantile(pool["entropy"], [0.25, 0.75])]
    assert len(test) == 30 and "band" in test
    assert info["test_counts"] == {b: int((test["band"] == b).sum()) for b in ("easy", "medium", "hard")}


def test_holdout_is_seeded_and_independent_of_row_order():
    ids = pd.Series([f"q{i}" for i in range(50)])
    a = set(ids[holdout_mask(ids, 0.2, 7)])
    rev = ids[::-1].reset_index(drop=True)
    b = set(rev[holdout_mask(rev, 0.2, 7)])
    assert a == b and len(a) == 10
    assert a != set(ids[holdout_mask(ids, 0.2, 8)])


def test_balancing_samples_n_per_band_seeded():
    e = np.random.default_rng(0).normal(size=400)
    bands, _, info = split_frame(frame(e), SplitConfig(test_fraction=0, balance_per_band=30, seed=5))
    assert info["counts"] == {"easy": 30, "medium": 30, "hard": 30}
    assert info["counts_before_balancing"] == {"easy": 100, "medium": 200, "hard": 100}
    again, _, _ = split_frame(frame(e), SplitConfig(test_fraction=0, balance_per_band=30, seed=5))
    assert all(set(bands[b]["id"]) == set(again[b]["id"]) for b in bands)


def test_duplicate_questions_never_straddle_train_and_test():
    df = frame(list(np.linspace(0, 2, 60)))
    # Ten groups of three identical questions (case, spacing and option order differ).
    for g in range(10):
        for k, i in enumerate(range(3 * g, 3 * g + 3)):
            df.at[i, "question"] = [f"Same Q {g}?", f"same q {g}?", f"  same   Q {g}? "][k]
            df.at[i, "options"] = [["a", "b"], ["b", "a"], ["A", "b"]][k]
    for seed in range(5):
        bands, test, info = split_frame(df, SplitConfig(test_fraction=0.2, seed=seed))
        train_ids = set().union(*(set(v["id"]) for v in bands.values()))
        for g in range(10):
            members = {f"q{i}" for i in range(3 * g, 3 * g + 3)}
            assert members <= train_ids or members <= set(test["id"]), (seed, g)
        assert len(test) >= 12 and len(test) <= 14  # 20 % of 60, whole groups
    assert info["duplicate_groups"]["groups"] == 10 and info["duplicate_groups"]["rows"] == 30


def test_band_balanced_test_set():
    e = list(np.linspace(0, 1, 200) ** 3)  # skewed: most rows at low entropy
    _, test, info = split_frame(frame(e), SplitConfig(test_fraction=0.3, seed=3, test_balance=True))
    counts = test["band"].value_counts().to_dict()
    assert len(set(counts.values())) == 1 and info["test_counts"] == {b: counts[b] for b in ("easy", "medium", "hard")}
    before = info["test_counts_before_balancing"]
    assert sum(before.values()) == 60 and min(before.values()) == counts["easy"] and len(test) < 60


def test_ties_at_a_threshold_are_split_by_id_so_band_sizes_follow_the_quantiles():
    # Coarse entropies: 40 % of rows at exactly 0.0 (confident answers). By value alone every one of
    # them would be medium (0.0 is the 25 % quantile) and the easy band would be empty.
    e = [0.0] * 40 + list(np.linspace(0.1, 2.0, 60))
    bands, _, info = split_frame(frame(e), SplitConfig(test_fraction=0))
    sizes = {b: len(v) for b, v in bands.items()}
    assert sizes == {"easy": 25, "medium": 50, "hard": 25} and info["rows_at_a_threshold"] == 40
    assert set(bands["easy"]["id"]) == set(sorted(f"q{i}" for i in range(40))[:25])  # zeros, lowest ids
    again, _, _ = split_frame(frame(e).sample(frac=1, random_state=3), SplitConfig(test_fraction=0))
    assert set(again["easy"]["id"]) == set(bands["easy"]["id"])  # by id, not by row order


def test_per_category_bands_use_each_categorys_own_quantiles():
    """Law is hard for the student everywhere (entropy 1.0-1.9), math easy (0.0-0.9): globally all law
    rows are hard or medium; per category each subject gets its own easy / medium / hard quarter."""
    e = [i / 10 for i in range(10)] + [1 + i / 10 for i in range(10)]
    df = frame(e).assign(category=["math"] * 10 + ["law"] * 10)
    glob, _, _ = split_frame(df, SplitConfig(test_fraction=0))
    assert set(glob["easy"]["category"]) == {"math"} and set(glob["hard"]["category"]) == {"law"}
    per, _, info = split_frame(df, SplitConfig(test_fraction=0, per_category=True))
    for cat in ("math", "law"):
        counts = {b: int((per[b]["category"] == cat).sum()) for b in ("easy", "medium", "hard")}
        assert counts == {"easy": 3, "medium": 4, "hard": 3}  # ceil(q * 9) rule within the 10 rows
    assert info["per_category_thresholds"]["law"] == pytest.approx([1.225, 1.675])
    assert info["per_category_thresholds"]["math"] == pytest.approx([0.225, 0.675])
    # held-out rows are banded with their category's thresholds
    _, test, info = split_frame(df, SplitConfig(per_category=True, test_fraction=0.2, seed=0))
    assert len(test) == 4
    for cat, part in test.groupby("category"):
        lo, hi = info["per_category_thresholds"][cat]
        assert (part["band"] == assign_bands(part["entropy"].to_numpy(), lo, hi)).all()


def test_held_out_rows_are_banded_by_the_training_rows_rule_under_ties():
    # 40 % of entropies at 0.0 (the 25 % quantile): by value alone no held-out row would be easy.
    e = [0.0] * 400 + list(np.linspace(0.1, 2.0, 600))
    bands, test, info = split_frame(frame(e), SplitConfig(test_fraction=0.2, seed=1))
    assert info["test_counts"]["easy"] > 0
    sizes = {band: count / len(test) for band, count in info["test_counts"].items()}
    assert abs(sizes["easy"] - 0.25) < 0.08 and abs(sizes["hard"] - 0.25) < 0.08
    # A held-out zero is easy exactly when a training zero with that id would be.
    pool_zero_ids = sorted(pd.concat(bands.values()).query("entropy == 0.0")["id"])
    cut = sorted(bands["easy"]["id"])[-1]
    for row in test[test.entropy == 0.0].itertuples():
        assert (row.band == "easy") == (row.id < cut), (row.id, row.band, cut, len(pool_zero_ids))
    # Balanced, the test set is not emptied.
    _, balanced, _ = split_frame(frame(e), SplitConfig(test_fraction=0.2, seed=1, test_balance=True))
    assert len(balanced) > 0 and balanced["band"].value_counts().nunique() == 1


def test_a_balanced_test_set_that_would_be_empty_is_refused_with_the_fix():
    e = list(np.linspace(0, 1, 40))
    with pytest.raises(RaycatError, match=r"has no (easy|medium|hard).*raise split.test_fraction"):
        split_frame(frame(e), SplitConfig(test_fraction=0.05, seed=0, test_balance=True))
