"""Training-example preparation as raycat did it before it streamed (raycat/train/stage.py and
recipes.select at d483cf0): every phase's rows read, encoded, shuffled and hashed whole in one task.
Kept as the reference the streamed preparation must reproduce: the same examples.parquet, counts,
skipped rows and phase hashes (tests/train/test_examples.py)."""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import pandas as pd

from raycat.config import COMM_KNOBS, RaycatConfig
from raycat.data.prompts import template_hash, train_template_hash
from raycat.errors import MissingInputError, RaycatError
from raycat.recipes import BANDS, NO_COT, RECIPES, Phase, needs_cot, phase_settings
from raycat.storage import rowkey, rundir
from raycat.train.batches import encode_rows, stop_token_ids
from raycat.train.loop import recorded
from raycat.train.memory import uses_bf16
from raycat.train.stage import PhasePlan, _student_identity, examples_path


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def load_inputs(cfg: RaycatConfig) -> tuple[dict[str, pd.DataFrame], pd.DataFrame | None]:
    split = rundir.join(cfg.run_dir, "split")
    bands = {}
    for band in ("easy", "medium", "hard"):
        path = rundir.join(split, f"{band}.parquet")
        if not rundir.exists(path):
            raise MissingInputError(f"{path} not found: run `raycat split` with this config first")
        bands[band] = rundir.read_parquet(path)
    cot_path = rundir.join(cfg.run_dir, "teach", "cot.parquet")
    cot = rundir.read_parquet(cot_path) if rundir.exists(cot_path) else None
    if cot is None and needs_cot(cfg.train.recipe):
        raise MissingInputError(
            f"{cot_path} not found: recipe '{cfg.train.recipe}' trains on teacher CoT; run "
            "`raycat teach` first (teach.bands=all for distill_all / random_split)"
        )
    return bands, cot


def check_template(cfg: RaycatConfig, tokenizer, bands: dict[str, pd.DataFrame]) -> str:
    """Training must render prompts with the chat template the rows were scored under."""
    mine = template_hash(tokenizer, cfg.score.prompt.preset, cfg.score.prompt.system_prompt, cfg.chat_template_kwargs)
    seen = set().union(*(set(b["template_hash"].dropna()) for b in bands.values() if "template_hash" in b))
    if seen and seen != {mine} and not cfg.train.allow_template_mismatch:
        raise RaycatError(
            f"the student's chat template (hash {mine}) differs from the one the rows were scored "
            f"with ({', '.join(sorted(seen))}): rescore with this student, or set "
            "train.allow_template_mismatch=true to train anyway"
        )
    return mine


def _stats(rows: pd.DataFrame, encoded: pd.DataFrame, repeated: int) -> dict:
    return {
        "rows": int(len(rows)),
        "examples": int(len(encoded)),
        "repeated": int(repeated),
        "truncated": int(encoded["truncated"].sum()) if len(encoded) else 0,
        "tokens": int(encoded["num_tokens"].sum()) if len(encoded) else 0,
        "target_tokens": int(encoded["num_target_tokens"].sum()) if len(encoded) else 0,
    }


EXAMPLE_BLOCK_ROWS = 4096


def plan_phases(cfg: RaycatConfig, tokenizer, model_dir: str) -> tuple[list[PhasePlan], pd.DataFrame]:
    """Every phase of the recipe: its rows encoded, shuffled and padded to the workers, written to the
    phase's examples.parquet (unless the phase is already trained), with its counts and hash; plus every
    skipped row. Runs where the rows are: ``prepare`` calls it on a worker."""
    train = cfg.train
    bands, cot = load_inputs(cfg)
    score_template = check_template(cfg, tokenizer, bands)
    selected, skipped = select(train.recipe, bands, cot, train.seed)
    del bands, cot
    stops = stop_token_ids(tokenizer, model_dir, revision=cfg.score.student.revision)
    plans, prev = [], None
    skipped_frames = [skipped]
    for phase, rows in selected:
        hp = train.phase(phase.name)
        encoded, skip = encode_rows(
            tokenizer, rows, phase.target, stops, hp.max_length, train.overlong, cfg.chat_template_kwargs
        )
        skipped_frames.append(skip.assign(phase=phase.name))
        encoded = encoded.sample(frac=1.0, random_state=train.seed).reset_index(drop=True)  # one seeded shuffle
        # Everything that changes the trained weights (not save/log cadence): rows, tokens, labels,
        # hyper-parameters, parallel layout, the student, and the previous phase's hash.
        phase_hash = _hash(
            {
                "prev": prev,
                "phase": phase.name,
                "target": phase.target,
                "rows": encoded["id"].tolist(),
                "inputs": _hash(encoded["input_ids"].map(list).tolist()),
                "labels": _hash(encoded["labels"].map(list).tolist()),
                "hp": hp.model_dump(),
                "method": train.method,
                # A merge is its own step after training: flipping it retrains nothing.
                "lora": train.lora.model_dump(exclude={"merge"}) if train.method == "lora" else None,
                "deepspeed": train.deepspeed.model_dump(exclude=COMM_KNOBS),
                # 'grouped' composes steps differently.
                "batching": train.batching,
                "precision": uses_bf16(cfg),
                "workers": train.num_workers,
                # The student's weights, not its scoring engine's settings (max_model_len, dtype).
                "student": _student_identity(cfg),
                "template": train_template_hash(tokenizer, cfg.chat_template_kwargs),
                "seed": train.seed,
            }
        )
        padded, repeated = pad_to_world(encoded, train.num_workers, train.seed)
        path = examples_path(cfg, phase.name)
        # The training workers read these (never the driver); a trained phase needs none.
        if len(padded) and not recorded(rundir.join(cfg.run_dir, "train", train.recipe, phase.name), phase_hash):
            block = max(1, min(math.ceil(len(padded) / 8), EXAMPLE_BLOCK_ROWS))
            rundir.write_parquet(path, padded[["input_ids", "labels"]], row_group_size=block)
        plans.append(
            PhasePlan(
                phase=phase,
                stats=_stats(rows, encoded, repeated),
                examples=path,
                hash=phase_hash,
                score_template_hash=score_template,
                settings=phase_settings(cfg, train.recipe, phase.name),
            )
        )
        prev = phase_hash
    return plans, pd.concat(skipped_frames, ignore_index=True)


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


def pad_to_world(frame: pd.DataFrame, world: int, seed: int) -> tuple[pd.DataFrame, int]:
    """Repeat a few seeded rows so every worker gets the same number of rows (DistributedSampler's
    rule): DeepSpeed ranks must run the same number of steps. Returns (frame, rows repeated)."""
    extra = (-len(frame)) % world
    if extra == 0 or len(frame) == 0:
        return frame, 0
    pick = np.random.default_rng(seed).choice(len(frame), size=extra, replace=len(frame) < extra)
    return pd.concat([frame, frame.iloc[pick]], ignore_index=True), extra
