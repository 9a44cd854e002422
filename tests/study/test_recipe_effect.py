"""The method-effect numbers of a study: recipe against recipe within each run, seeds pooled, with
power; teacher tokens per recipe; the signal check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from raycat.storage import rundir
from raycat.study import recipe_effect, recipe_report

BANDS = np.array(["easy", "medium", "hard"])


def _run(root: Path, seed: int, correct: dict[str, np.ndarray], n: int = 60, single: np.ndarray | None = None) -> dict:
    """A run dir holding eval answers for ``correct``'s models on the same n test rows, and with ``single``
    the score stage's single-token answers on those rows (eval/rows.parquet)."""
    run = root / f"seed{seed}"
    if single is not None:
        rows = pd.DataFrame({"id": [f"q{i}" for i in range(n)], "row_hash": [f"h{i}" for i in range(n)]})
        rows = rows.assign(band=BANDS[np.arange(n) % 3], correct=single, question="q")
        # One row eval did not compare (not in eval.parquet) is left out of the pairing.
        extra = rows.iloc[:1].assign(id="other", row_hash="x")
        rundir.write_parquet(str(run / "eval" / "rows.parquet"), pd.concat([rows, extra], ignore_index=True))
    rows = [
        pd.DataFrame(
            {
                "id": [f"q{i}" for i in range(n)],
                "row_hash": [f"h{i}" for i in range(n)],
                "band": BANDS[np.arange(n) % 3],
                "correct": values,
                "compared": True,
                "model": model,
            }
        )
        for model, values in correct.items()
    ]
    rundir.write_parquet(str(run / "eval" / "eval.parquet"), pd.concat(rows, ignore_index=True))
    return {"label": "base", "seed": seed, "run_dir": str(run)}


def test_recipes_are_paired_row_by_row_within_each_run_and_pooled_over_seeds(tmp_path):
    n = 60
    base = np.zeros(n, bool)
    hard = np.arange(n) % 3 == 2
    variants = []
    for seed in (0, 1, 2):
        sft = np.arange(n) < 20 + seed  # 20, 21, 22 right
        method = sft | hard  # also every hard row
        variants.append(
            _run(
                tmp_path,
                seed,
                {
                    "base": base,
                    "complexity_aware/phase1": sft,
                    "complexity_aware/phase2": method,  # the final model is the last phase
                    "sft_all/phase1": sft,
                    "distill_all/phase1": method,
                },
                single=np.arange(n) < 10,
            )
        )
    out = {
        (p["a"], p["b"]): p
        for p in recipe_effect.recipe_paired(variants, ["complexity_aware", "sft_all", "distill_all"])
    }
    assert set(out) == {
        ("complexity_aware", b) for b in ("sft_all", "distill_all", "base", recipe_effect.SINGLE_TOKEN_BASE)
    }
    # The base's single-token answers (score stage) on the compared rows only.
    single = out[("complexity_aware", recipe_effect.SINGLE_TOKEN_BASE)]
    method_right = [((np.arange(n) < 20 + s) | hard).sum() for s in (0, 1, 2)]
    assert single["n"] == 3 * n and single["diff"] == pytest.approx((sum(method_right) - 3 * 10) / (3 * n))
    vs_sft = out[("complexity_aware", "sft_all")]
    gained = [((sft_ := np.arange(n) < 20 + s) | hard).sum() - sft_.sum() for s in (0, 1, 2)]
    assert vs_sft["seeds"] == 3 and vs_sft["n"] == 3 * n and vs_sft["clusters"] == n
    assert vs_sft["diff"] == pytest.approx(sum(gained) / (3 * n))
    assert [s["diff"] for s in vs_sft["per_seed"]] == pytest.approx([g / n for g in gained])
    low, high = vs_sft["ci95"]
    assert 0 < low < vs_sft["diff"] < high
    assert vs_sft["mde80"] == pytest.approx(2.801585 * vs_sft["se_seeds"])
    low_s, high_s = vs_sft["ci95_seeds"]
    assert low_s <= vs_sft["diff"] <= high_s
    # The gain is all in the hard band; easy and medium rows do not move.
    assert vs_sft["per_band"]["easy"]["diff"] == 0 and vs_sft["per_band"]["hard"]["diff"] > vs_sft["diff"]
    same = out[("complexity_aware", "distill_all")]
    assert same["diff"] == 0 and same["ci95"] == [0, 0]
    md = "\n".join(line for section in recipe_report.sections(_report(variants)) for line in section)
    assert "| base | complexity_aware | sft_all | 3 | 180 |" in md


def _report(variants: list[dict]) -> dict:
    recipes = ["complexity_aware", "sft_all", "distill_all"]
    return {
        "recipe_paired": recipe_effect.recipe_paired(variants, recipes),
        "recipe_costs": recipe_effect.recipe_costs(variants, recipes),
        "signal": [],
    }


def test_a_recipe_pays_for_the_cot_of_the_bands_its_cot_phases_read():
    per_band = {
        "easy": {"rows": 10, "tokens": 1000.0, "basis": "measured"},
        "medium": {"rows": 20, "tokens": 2400.0, "basis": "measured"},
        "hard": {"rows": 10, "tokens": 1600.0, "basis": "measured for 5 rows, estimated for 5 from x"},
    }
    accounting = {"per_band": per_band}
    assert recipe_effect.teacher_tokens("sft_all", accounting)["tokens"] == 0
    method = recipe_effect.teacher_tokens("complexity_aware", accounting)
    assert method["tokens"] == 1600 and method["basis"].startswith("estimate: hard: measured for 5")
    assert recipe_effect.teacher_tokens("distill_all", accounting)["tokens"] == 5000
    assert recipe_effect.teacher_tokens("random_split", accounting)["tokens"] == pytest.approx(10 * 5000 / 40)
    assert recipe_effect.teacher_tokens("complexity_aware", None)["tokens"] is None


def test_the_signal_check_reads_the_held_out_entropy_and_the_base_accuracy(tmp_path):
    rng = np.random.default_rng(0)
    correct = rng.random(200) < 0.4
    entropy = np.where(correct, rng.normal(0.5, 0.3, 200), rng.normal(1.5, 0.3, 200))  # well separated
    variant = _run(tmp_path, 0, {"base": np.zeros(60, bool)}, single=correct[:60])
    rundir.write_parquet(
        str(Path(variant["run_dir"]) / "split" / "test.parquet"), pd.DataFrame({"entropy": entropy, "correct": correct})
    )
    found = recipe_effect.signal(variant["run_dir"])
    assert found["rows"] == 200 and found["auc"] > 0.95 and 0.9 < found["auc_ci95"][0] <= found["auc"]
    assert found["score_accuracy"] == pytest.approx(correct.mean())
    assert found["base_accuracy"] == pytest.approx(correct[:60].mean())
    assert recipe_effect.signal(str(tmp_path / "nothing")) is None


def test_the_seeds_x_rows_interval_widens_with_the_spread_between_seeds_and_not_without_it():
    rng = np.random.default_rng(1)
    base = rng.integers(-1, 2, 200).astype(float)  # one seed's per-row differences
    frames = [pd.DataFrame({"row": np.arange(200), "difference": base}) for _ in range(3)]
    rows_only = recipe_effect.clustered_paired_bootstrap(np.tile(base, 3), np.tile(np.arange(200), 3), 2000, 0)
    same = recipe_effect.seeds_rows_bootstrap(frames, 2000, 0)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    # Seeds that agree: the training seeds add nothing; the interval is the rows' one.
    assert width(same["ci95_seeds"]) == pytest.approx(width(rows_only["ci95"]), rel=0.15)
    # Seeds that disagree (one run +0.3 better on every row): the seeds' spread widens the interval.
    spread = [f.assign(difference=f["difference"] + shift) for f, shift in zip(frames, (-0.3, 0.0, 0.3), strict=True)]
    apart = recipe_effect.seeds_rows_bootstrap(spread, 2000, 0)
    assert width(apart["ci95_seeds"]) > 2 * width(rows_only["ci95"]) and apart["se_seeds"] > 2 * same["se_seeds"]
    assert recipe_effect.seeds_rows_bootstrap([frames[0].iloc[:0]], 10, 0)["ci95_seeds"] == [None, None]
