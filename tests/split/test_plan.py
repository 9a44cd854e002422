"""``split_frame`` (the array rules of raycat.split.plan) decides exactly what the in-memory split
decided, on random frames with ties, duplicate groups, categories and every balancing option."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from raycat.config import SplitConfig
from raycat.split.plan import split_frame
from tests.split import reference


def random_frame(rng, n):
    coarse = rng.random() < 0.5
    return pd.DataFrame(
        {
            "id": [f"q{int(x)}" for x in rng.permutation(n * 3)[:n]],
            "question": [f"dup {rng.integers(0, n // 2 + 1)}" if rng.random() < 0.2 else f"q {i}" for i in range(n)],
            "options": [list(rng.permutation(["a", "b", "c"])) for _ in range(n)],
            "entropy": rng.choice([0.0, 0.0, 0.5, 1.0, 1.25], n) if coarse else rng.exponential(size=n),
            "category": rng.choice(["math", "law", None, "bio"], n),
        }
    )


def random_settings(rng) -> SplitConfig:
    return SplitConfig(
        test_fraction=float(rng.choice([0, 0.1, 0.3])),
        seed=int(rng.integers(0, 5)),
        per_category=bool(rng.random() < 0.4),
        test_balance=bool(rng.random() < 0.3),
        balance_per_band=int(rng.integers(1, 40)) if rng.random() < 0.3 else None,
        thresholds=(0.4, 1.1) if rng.random() < 0.15 else None,
    )


@pytest.mark.parametrize("seed", range(4))
def test_the_same_rows_bands_and_summary_as_the_in_memory_split(seed):
    rng = np.random.default_rng(seed)
    compared = 0
    for _ in range(60):
        rows, cfg = random_frame(rng, int(rng.integers(5, 300))), random_settings(rng)
        try:
            expected = reference.split_frame(rows, cfg)
        except Exception as e:  # an empty balanced test set: refused the same way
            with pytest.raises(type(e), match="split.test_balance"):
                split_frame(rows, cfg)
            continue
        bands, test, info = split_frame(rows, cfg)
        for band, frame in expected[0].items():
            assert list(bands[band]["id"]) == list(frame["id"]) and set(bands[band]["band"]) <= {band}
        assert list(test["id"]) == list(expected[1]["id"]) and list(test["band"]) == list(expected[1]["band"])
        assert info == expected[2]
        compared += 1
    assert compared > 40
