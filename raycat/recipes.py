"""Which rows each training phase sees, and with which target, for every recipe. Pure numpy.

    complexity_aware  phase1: easy+medium, answer    phase2: hard, teacher CoT      (the method)
    sft_all           phase1: easy+medium+hard, answer                               (baseline)
    distill_all       phase1: easy+medium+hard, teacher CoT                          (baseline)
    curriculum        phase1: easy -> phase2: medium -> phase3: hard, answer         (baseline)
    random_split      phase1: |easy|+|medium| random rows, answer; phase2: the other |hard| rows, CoT

A CoT phase only trains rows with a teacher target (verified, or the teach.on_wrong fallback); the
others are skipped with the reason (``NO_COT``), never dropped silently (``train.examples``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

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
    other settings is not reported under this config's name. Save/log cadence, ``train.lora.merge``,
    ZeRO's communication knobs and engine settings are left out: they change no weights. The rows (data,
    split, teacher) are not compared: they are in the phase hash, which training checks, and eval follows
    their changes by row."""
    train = cfg.train
    names = [p.name for p in RECIPES[recipe]]
    tree = {
        "train": {
            "recipe": recipe,
            "method": train.method,
            "lora": train.lora.model_dump(exclude={"merge"}) if train.method == "lora" else None,
            "deepspeed": train.deepspeed.weight_settings(),
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


def phase_sources(
    recipe: str, sizes: dict[str, int], seed: int
) -> list[tuple[Phase, tuple[str, ...], np.ndarray | None]]:
    """Per phase: the bands it reads, in order, and the positions of their concatenation it keeps
    (None: every row). ``sizes``: rows per band. random_split draws |easy|+|medium| seeded positions of
    all three bands for phase 1 and gives phase 2 the rest, each in file order."""
    phases = RECIPES[recipe]
    if recipe != "random_split":
        return [(p, p.bands, None) for p in phases]
    order = np.random.default_rng(seed).permutation(sum(sizes[b] for b in BANDS))
    first = sizes["easy"] + sizes["medium"]
    return [(phases[0], BANDS, np.sort(order[:first])), (phases[1], BANDS, np.sort(order[first:]))]
