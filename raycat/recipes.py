"""Which rows each training phase sees, and with which target, for every recipe. Pure pandas.

    complexity_aware  phase1: easy+medium, answer    phase2: hard, teacher CoT      (the method)
    sft_all           phase1: easy+medium+hard, answer                               (baseline)
    distill_all       phase1: easy+medium+hard, teacher CoT                          (baseline)
    curriculum        phase1: easy -> phase2: medium -> phase3: hard, answer         (baseline)
    random_split      phase1: |easy|+|medium| random rows, answer; phase2: the other |hard| rows, CoT

A CoT phase only trains rows with a teacher target (verified, or the teach.on_wrong fallback); the
others are returned as skipped with the reason, never dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from raycat.storage import rowkey

BANDS = ("easy", "medium", "hard")


@dataclass(frozen=True)
class Phase:
    name: str
    bands: tuple[str, ...]
    target: str  # "answer" | "cot"


RECIPES: dict[str, tuple[Phase, ...]] = {
    "complexity_aware": (Phase("phase1", ("easy", "medium"), "answer"), Phase("phase2", ("hard",), "cot")),
    "sft_all": (Phase("phase1", BANDS, "answer"),),
    "distill_all": (Phase("phase1", BANDS, "cot"),),
    "curriculum": (
        Phase("phase1", ("easy",), "answer"),
        Phase("phase2", ("medium",), "answer"),
        Phase("phase3", ("hard",), "answer"),
    ),
    "random_split": (Phase("phase1", ("easy", "medium"), "answer"), Phase("phase2", ("hard",), "cot")),
}

NO_COT = (
    "no teacher CoT for this row: the teacher failed on it (see teach/skipped.parquet) or teach.bands / "
    "teach.limit did not cover it"
)


def needs_cot(recipe: str) -> bool:
    return any(p.target == "cot" for p in RECIPES[recipe])


def select(
    recipe: str, bands: dict[str, pd.DataFrame], cot: pd.DataFrame | None, seed: int
) -> tuple[list[tuple[Phase, pd.DataFrame]], pd.DataFrame]:
    """(phase, rows) per phase in order, and the skipped rows with ``phase`` and ``skip_reason``.

    ``bands`` maps easy/medium/hard to the split stage's rows; ``cot`` has ``id, row_hash, target``
    (teach/cot.parquet).
    """
    phases = RECIPES[recipe]
    if recipe == "random_split":
        pool = pd.concat([bands[b] for b in BANDS], ignore_index=True)
        order = np.random.default_rng(seed).permutation(len(pool))
        phase1_size = len(bands["easy"]) + len(bands["medium"])
        chosen = [pool.iloc[np.sort(order[:phase1_size])], pool.iloc[np.sort(order[phase1_size:])]]
    else:
        chosen = [pd.concat([bands[b] for b in p.bands], ignore_index=True) for p in phases]
    out, skipped = [], []
    for phase, rows in zip(phases, chosen, strict=True):
        rows = rows.reset_index(drop=True).drop(columns=["target"], errors="ignore")
        if phase.target == "cot":
            # By id and content: a CoT written for another question under the same id is not this row's.
            targets = (
                cot.assign(_key=rowkey.keys(cot)).drop_duplicates("_key").set_index("_key")["target"]
                if cot is not None
                else pd.Series(dtype=object)
            )
            rows = rows.assign(target=rowkey.keys(rows).map(targets))
            missing = rows["target"].isna()
            skipped.append(rows.loc[missing, ["id"]].assign(phase=phase.name, skip_reason=NO_COT))
            rows = rows[~missing].reset_index(drop=True)
        out.append((phase, rows))
    skip = pd.concat(skipped, ignore_index=True) if skipped else pd.DataFrame(columns=["id", "phase", "skip_reason"])
    return out, skip
