"""Analyses the paper did not run (issue: open-question studies). Pure pandas/numpy on stage outputs.

- ``band_migration``: the training pool re-scored by the phase-1 model, banded by the same rank rule;
  the before x after matrix says whether phase 2 still targets what is hard after phase 1.
- ``confident_wrong``: rows the student answered wrong with low entropy (the easy band): entropy
  routing never sends them to the teacher; how many, in which categories, and what trained models
  answer on the held-out ones.
- ``mode_agreement``: two entropy modes (options / full / top-k) on the same rows: rank correlation
  and how often they put a row in the same band.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from raycat.split.rules import rank_bands

BANDS = ["easy", "medium", "hard"]


def band_migration(before: pd.DataFrame, after: pd.DataFrame, quantiles: tuple[float, float]) -> dict:
    """``before``: ``id, band`` (the split's bands); ``after``: ``id, entropy`` (re-scored after phase 1);
    either may carry ``option_mass`` (the score stage's letter-token mass).

    Rows present in both are re-banded by rank among themselves with the split's quantiles. Returns the
    matrix (counts, rows = band before, columns = band after), the share of each band that stays, and
    ``hard_still_hard``: the share of the phase-2 (hard) rows that are still hard."""
    both = before[["id", "band"]].merge(after[["id", "entropy"]], on="id", how="inner")
    missing = int(len(before) - len(both))
    both["after"] = rank_bands(both["entropy"].to_numpy(), both["id"].to_numpy(), quantiles) if len(both) else []
    matrix = pd.crosstab(pd.Categorical(both["band"], BANDS), pd.Categorical(both["after"], BANDS), dropna=False)
    counts = {b: {a: int(matrix.loc[b, a]) for a in BANDS} for b in BANDS}
    stay = {b: (counts[b][b] / sum(counts[b].values()) if sum(counts[b].values()) else None) for b in BANDS}
    return {
        "rows": int(len(both)),
        "rows_not_rescored": missing,
        "matrix": counts,
        "stay_share": stay,
        "hard_still_hard": stay["hard"],
        # The phase-1 model was trained to open with "[[": its options-mode entropy is renormalised over
        # letter ids whose total mass may have collapsed. The mass says whether "after" is comparable.
        "option_mass": {"before": _median(before, both["id"]), "after": _median(after, both["id"])},
    }


def _median(frame: pd.DataFrame, ids: pd.Series) -> float | None:
    """Median ``option_mass`` of these rows (None without the column, e.g. full-vocabulary scores)."""
    if "option_mass" not in frame:
        return None
    mass = frame.loc[frame["id"].isin(ids), "option_mass"].dropna().astype(float)
    return float(mass.median()) if len(mass) else None


def confident_wrong(scores: pd.DataFrame, answers: dict[str, pd.DataFrame] | None = None) -> dict:
    """``scores``: ``id, band, correct, category`` (a split's rows); ``answers``: per trained model, its
    eval rows ``id, correct``. Confident-wrong = easy band and wrong."""
    confident = scores[(scores["band"] == "easy") & ~scores["correct"].astype(bool)]
    easy = int((scores["band"] == "easy").sum())
    by_category = confident["category"].fillna("").value_counts().sort_index()
    out: dict = {
        "rows": int(len(confident)),
        "share_of_easy": len(confident) / easy if easy else None,
        "share_of_all": len(confident) / len(scores) if len(scores) else None,
        "by_category": {str(k): int(v) for k, v in by_category.items()},
        "models": {},
    }
    for name, rows in (answers or {}).items():
        got = rows[rows["id"].isin(confident["id"])]
        out["models"][name] = {
            "rows": int(len(got)),
            "accuracy": float(got["correct"].astype(bool).mean()) if len(got) else None,
        }
    return out


def mode_agreement(a: pd.DataFrame, b: pd.DataFrame, quantiles: tuple[float, float]) -> dict:
    """Two modes' ``id, entropy`` on the same rows: Spearman rank correlation of the entropies and the
    share of rows both modes put in the same band (each banded by rank among the shared rows)."""
    both = a[["id", "entropy"]].merge(b[["id", "entropy"]], on="id", suffixes=("_a", "_b"))
    n = len(both)
    if n < 3:
        return {"rows": n, "spearman": None, "same_band": None, "matrix": None}
    ids = both["id"].to_numpy()
    bands_a = rank_bands(both["entropy_a"].to_numpy(), ids, quantiles)
    bands_b = rank_bands(both["entropy_b"].to_numpy(), ids, quantiles)
    rho = spearmanr(both["entropy_a"], both["entropy_b"]).statistic
    matrix = pd.crosstab(pd.Categorical(bands_a, BANDS), pd.Categorical(bands_b, BANDS), dropna=False)
    return {
        "rows": n,
        "spearman": None if np.isnan(rho) else float(rho),
        "same_band": float((bands_a == bands_b).mean()),
        "matrix": {x: {y: int(matrix.loc[x, y]) for y in BANDS} for x in BANDS},
    }
