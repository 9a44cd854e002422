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

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from raycat.storage import rowkey

if TYPE_CHECKING:
    from raycat.config import RaycatConfig

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


def phase_settings(cfg: RaycatConfig, recipe: str, phase_name: str) -> dict[str, object]:
    """What the config says about how a phase's model is made, as dotted keys: the training settings
    (this phase's and every earlier phase's hyper-parameters), the student and the template variables.
    Training writes it into done.json; eval compares it with its own config, so a model trained under
    other settings is not reported under this config's name. Save/log cadence, ``train.lora.merge`` and
    engine settings are left out: they change no weights. The rows (data, split, teacher) are not
    compared: they are in the phase hash, which training checks, and eval follows their changes by row."""
    train = cfg.train
    names = [p.name for p in RECIPES[recipe]]
    tree = {
        "train": {
            "recipe": recipe,
            "method": train.method,
            "lora": train.lora.model_dump(exclude={"merge"}) if train.method == "lora" else None,
            "deepspeed": train.deepspeed.model_dump(),
            "precision": train.precision,
            "device": train.device,
            "batching": train.batching,
            "num_workers": train.num_workers,
            "overlong": train.overlong,
            "seed": train.seed,
            **{name: train.phase(name).model_dump() for name in names[: names.index(phase_name) + 1]},
        },
        "score": {"student": {"path": cfg.score.student.path, "revision": cfg.score.student.revision}},
        "chat_template_kwargs": cfg.chat_template_kwargs,
    }
    # Through JSON: the shape done.json gives back (tuples become lists).
    return json.loads(json.dumps(_dotted(tree), sort_keys=True, default=str))


def settings_changes(recorded: dict[str, object], current: dict[str, object]) -> list[str]:
    """``key: recorded -> current`` for every setting that differs (a key on one side only included)."""
    missing = "(unset)"
    return [
        f"{key}: {recorded.get(key, missing)!r} -> {current.get(key, missing)!r}"
        for key in sorted(set(recorded) | set(current))
        if recorded.get(key, missing) != current.get(key, missing)
    ]


def _dotted(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "chat_template_kwargs":
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


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
