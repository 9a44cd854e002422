"""The evaluation statistics: bootstrap intervals, accuracy tables, paired differences."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raycat.evaluate.core import accuracy_table, bootstrap_ci


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_n():
    rng = np.random.default_rng(0)
    small, big = rng.random(40) < 0.6, rng.random(4000) < 0.6
    lo, hi = bootstrap_ci(small, 2000, seed=1)
    assert lo < small.mean() < hi
    blo, bhi = bootstrap_ci(big, 2000, seed=1)
    assert blo < big.mean() < bhi and (bhi - blo) < (hi - lo) / 5
    assert bootstrap_ci(small, 2000, seed=1) == (lo, hi)  # seeded
    assert all(np.isnan(bootstrap_ci(np.array([]), 10, 0)))


def test_a_large_test_set_is_resampled_in_blocks_not_one_matrix(monkeypatch):
    """1000 resamples of a 100k-row test set drawn at once are 0.8 GB of indices: blocks of at most
    DRAW_BLOCK indices give the same kind of interval (the draws continue one seeded stream)."""
    from raycat.evaluate import core

    x = np.random.default_rng(0).random(5000) < 0.7
    whole = bootstrap_ci(x, 400, seed=3)
    sizes = []
    real = np.random.default_rng

    class Spy:
        def __init__(self, seed):
            self.rng = real(seed)

        def integers(self, low, high=None, size=None):
            sizes.append(int(np.prod(size)))
            return self.rng.integers(low, high, size=size)

    monkeypatch.setattr(np.random, "default_rng", Spy)
    monkeypatch.setattr(core, "DRAW_BLOCK", 12_000)
    lo, hi = bootstrap_ci(x, 400, seed=3)
    assert max(sizes) <= 12_000 and sum(sizes) == 400 * 5000 and len(sizes) == 200
    assert lo < x.mean() < hi and abs((hi - lo) - (whole[1] - whole[0])) < 0.01
    assert len(core.per_resample(5000, 400, real(0), lambda d: d.mean(axis=1))) == 400


def test_accuracy_table_per_band_and_category():
    df = pd.DataFrame(
        {
            "correct": [True, False, True, True] * 5,
            "extracted": ["A", None, "B", "C"] * 5,
            "band": ["easy", "easy", "hard", "medium"] * 5,
            "category": ["x"] * 12 + ["y"] * 8,
        }
    )
    t = accuracy_table(df, 100, 0)
    assert t["overall"]["n"] == 20 and t["overall"]["accuracy"] == 0.75 and t["overall"]["unparsed"] == 5
    assert t["per_band"]["easy"]["accuracy"] == 0.5 and t["per_band"]["hard"]["accuracy"] == 1.0
    assert set(t["per_category"]) == {"x"}  # y has n < 10


def test_paired_bootstrap_of_two_models_on_the_same_rows():
    from raycat.evaluate.core import paired_bootstrap

    a = np.array([1, 1, 0, 1, 0, 1, 1, 0] * 5, dtype=bool)
    same = paired_bootstrap(a, a, 500, 0)
    assert same["diff"] == 0 and same["ci95"] == [0.0, 0.0]  # unpaired CIs would not collapse to 0
    b = a.copy()
    b[:10] = False  # b loses seven of a's right answers
    d = paired_bootstrap(a, b, 2000, 0)
    assert d["diff"] == pytest.approx(7 / 40) and 0 < d["ci95"][0] < d["diff"] < d["ci95"][1]


def test_the_band_average_has_a_bootstrap_ci_resampled_within_each_band():
    from raycat.evaluate.core import band_average_ci

    rng = np.random.default_rng(0)

    def rows(n_per_band: int) -> pd.DataFrame:
        # easy 90 %, medium 60 %, hard 30 % correct: the band average is 0.6 whatever the band sizes.
        parts = [
            pd.DataFrame({"band": band, "correct": rng.random(n) < p, "category": "c", "extracted": "A"})
            for band, p, n in (("easy", 0.9, n_per_band), ("medium", 0.6, 2 * n_per_band), ("hard", 0.3, n_per_band))
        ]
        return pd.concat(parts, ignore_index=True)

    small, large = rows(40), rows(400)
    table = accuracy_table(small, 500, 0)
    low, high = table["band_average_ci95"]
    assert low < table["band_average"] < high
    assert (low, high) == band_average_ci(small, 500, 0)  # seeded
    big_low, big_high = band_average_ci(large, 500, 0)
    assert big_high - big_low < (high - low) / 2 and big_low < 0.6 < big_high
    # An empty band: no average, no interval.
    assert accuracy_table(small[small.band != "hard"], 100, 0)["band_average_ci95"] is None


def test_seeds_of_the_same_rows_do_not_narrow_the_paired_interval():
    from raycat.evaluate.core import clustered_paired_bootstrap, paired_bootstrap

    # Known answer: four seeds give exactly the same per-row differences on the same 200 rows, so
    # they carry the information of one seed: the interval must be one seed's, not half of it.
    rng = np.random.default_rng(1)
    one_seed = rng.choice([-1.0, 0.0, 0.0, 1.0, 1.0], size=200)
    rows = np.array([f"q{i}" for i in range(200)])
    pooled, clusters = np.tile(one_seed, 4), np.tile(rows, 4)
    clustered = clustered_paired_bootstrap(pooled, clusters, 2000, 0)
    single = paired_bootstrap(one_seed, np.zeros(200), 2000, 0)
    independent = paired_bootstrap(pooled, np.zeros_like(pooled), 2000, 0)

    def width(result):
        return result["ci95"][1] - result["ci95"][0]

    assert clustered["n"] == 800 and clustered["clusters"] == 200
    assert clustered["diff"] == pytest.approx(single["diff"])
    assert width(clustered) == pytest.approx(width(single), rel=0.15)
    assert width(independent) < 0.6 * width(clustered)  # the pooled-as-independent CI, √4 too narrow
    # Independent rows in each seed: clustering by row changes nothing material.
    fresh = np.concatenate([rng.choice([-1.0, 0.0, 1.0], size=200) for _ in range(4)])
    assert width(clustered_paired_bootstrap(fresh, np.arange(800), 2000, 0)) == pytest.approx(
        width(paired_bootstrap(fresh, np.zeros(800), 2000, 0)), rel=0.15
    )
