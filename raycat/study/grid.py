"""``raycat study``: a grid of run configs (dotted keys x seeds) over one base config.

Every variant is an ordinary run (its own run dir under ``<study>/variants/``, the same stage hashes
and manifest as ``raycat run``), and all variants share one ``cache_dir``: every row-level cache
(score parts, teacher answers, eval answers) is keyed by model, settings and row content, so a
split-ratio sweep scores each question once and teaches each hard question once. Variants run one
after another; each stage already uses the whole cluster. A rerun finds every stage up to date.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import posixpath
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from raycat import pipeline
from raycat.config import (
    ConfigError,
    RaycatConfig,
    Strict,
    dump_config,
    parse_overrides,
    set_dotted,
    validate_config,
)
from raycat.errors import RaycatError
from raycat.score import stage as score
from raycat.storage import rundir
from raycat.study import comparison, costs


class VariantSpec(Strict):
    name: str = Field(description="Label of the variant in the report.")
    set: dict[str, Any] = Field(default_factory=dict, description="Dotted keys this variant sets.")


class StudyConfig(Strict):
    name: str | None = Field(None, description="Study name (default: the config file's stem).")
    base: str | dict[str, Any] = Field(
        description="The run config every variant starts from: a YAML path (relative to the study file) "
        "or an inline mapping."
    )
    set: dict[str, Any] = Field(default_factory=dict, description="Dotted keys set for every variant.")
    axes: dict[str, list[Any]] = Field(
        default_factory=dict, description="Grid: every combination of these dotted keys' values is a variant."
    )
    variants: list[VariantSpec] = Field(
        default_factory=list, description="Explicit variants (crossed with the grid when both are given)."
    )
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="Each variant runs once per seed.")
    seed_keys: list[str] = Field(
        default_factory=lambda: ["train.seed"],
        min_length=1,
        description="Dotted keys a seed sets (training and data order by default; add "
        "teach.sampling.seed to vary the teacher too).",
    )
    baseline: str | None = Field(
        None, description="Variant label paired differences are taken against (default: first)."
    )
    run_dir: str | None = Field(None, description="Study directory (default: runs/studies/<name>).")
    recipes: list[str] | None = Field(
        None, description="Recipes each variant trains (default: the base's train.recipe)."
    )
    rescore_after: str | None = Field(
        None,
        description="Also score every question with the model after this phase of the first recipe (e.g. "
        "'phase1'): the report's band migration (does phase 2 still target what is hard after phase 1?). "
        "LoRA phases are merged for it (train.lora.merge).",
    )
    scaling: ScalingSpec | None = Field(
        None,
        description="Add the cost of each variant to --plan: devices and memory per worker per stage, tokens, "
        "device-hours (each labelled measured, extrapolated or unknown).",
    )


class ScalingSpec(Strict):
    reference: str | None = Field(
        None,
        description="A finished run dir whose rows give the tokens per question, per taught row, per training "
        "example and per eval answer (default: the first variant that has run); like any run_dir, relative "
        "to the current directory.",
    )
    throughput: list[str] = Field(
        default_factory=list,
        description="JSON files written by bench/*.py --json (relative to the study file): measured tokens/s "
        "per device, extrapolated across model sizes by FLOPs per token.",
    )


@dataclass(frozen=True)
class Variant:
    # What differs from the base, e.g. "split.quantiles=[0.1, 0.9]".
    label: str
    overrides: tuple[tuple[str, Any], ...]
    seed: int

    @property
    def slug(self) -> str:
        """A directory name: readable, and unique through a short hash of the label."""
        short = re.sub(r"[^A-Za-z0-9.=-]+", "_", self.label).strip("_")[:48] or "base"
        return f"{short}-{hashlib.sha1(self.label.encode()).hexdigest()[:6]}-seed{self.seed}"


@dataclass(frozen=True)
class Study:
    config: StudyConfig
    name: str
    root: str  # the study directory
    base_tree: dict[str, Any]
    # The study file: relative paths in it are relative to its folder.
    source: str = ""

    def variants(self) -> list[Variant]:
        return expand(self.config)

    def variant_config(self, variant: Variant) -> RaycatConfig:
        tree = copy.deepcopy(self.base_tree)
        for key, value in [*self.config.set.items(), *variant.overrides]:
            set_dotted(tree, key, copy.deepcopy(value))
        for key in self.config.seed_keys:
            set_dotted(tree, key, variant.seed)
        tree["run_dir"] = rundir.join(self.root, "variants", variant.slug)
        tree["cache_dir"] = rundir.join(self.root, "cache")
        if self.config.rescore_after:
            # The score engine loads plain weights.
            set_dotted(tree, "train.lora.merge", True)
        try:
            return validate_config(tree)
        except ConfigError as e:
            raise ConfigError(f"study variant {variant.label!r} (seed {variant.seed}): {e}") from None

    def recipes(self) -> list[str]:
        return self.config.recipes or [validate_config(copy.deepcopy(self.base_tree)).train.recipe]


def _label(pairs: list[tuple[str, Any]]) -> str:
    return ", ".join(f"{k}={json.dumps(v)}" for k, v in pairs) or "base"


def expand(config: StudyConfig) -> list[Variant]:
    """Grid x explicit variants x seeds, in that order (seeds innermost)."""
    keys = list(config.axes)
    grid = [list(zip(keys, combo, strict=True)) for combo in itertools.product(*(config.axes[k] for k in keys))]
    explicit = [(spec.name, list(spec.set.items())) for spec in config.variants] or [(None, [])]
    out = []
    for name, pairs in explicit:
        for point in grid:
            label = ", ".join(x for x in (name, _label(point) if point else None) if x) or "base"
            for seed in config.seeds:
                out.append(Variant(label, tuple(pairs + point), seed))
    labels = [(v.label, v.seed) for v in out]
    if len(set(labels)) != len(labels):
        raise ConfigError("study: two variants have the same label; give explicit variants distinct names")
    return out


def beside(study_file: str, path: str) -> str:
    """``path`` as written in a study file: absolute or a URI as is, else relative to the file's folder
    (which may itself be on an object store)."""
    if "://" in path or Path(path).is_absolute():
        return path
    if "://" in study_file:
        scheme, rest = rundir.join(study_file.rsplit("/", 1)[0], path).split("://", 1)
        # An object store does not resolve '..' itself.
        return f"{scheme}://{posixpath.normpath(rest)}"
    return str((Path(study_file).parent / path).resolve())


def split_overrides(overrides: list[str] | None) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]]]:
    """``study.*`` overrides (the study's own keys) and the others (the base config of every variant)."""
    study_keys, base_keys = [], []
    for key, value in parse_overrides(overrides or []):
        if key in ("run_dir", "cache_dir"):
            raise ConfigError(
                f"override {key}: a study sets every variant's {key} under study.run_dir; set study.run_dir=... instead"
            )
        if key.startswith("study."):
            study_keys.append((key.removeprefix("study."), value))
        else:
            base_keys.append((key, value))
    return study_keys, base_keys


def load_study(path, overrides: list[str] | None = None) -> Study:
    """The study at ``path`` with ``overrides`` (see ``split_overrides``) applied, every variant validated."""
    path = str(path)
    study_overrides, base_overrides = split_overrides(overrides)
    if not rundir.exists(path):
        raise ConfigError(f"study config not found: {path}")
    try:
        tree = yaml.safe_load(rundir.read_bytes(path).decode("utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(tree, dict) or "study" not in tree:
        raise ConfigError(f"{path}: a study config has one top-level section, study: (base, axes, seeds, ...)")
    for key, value in study_overrides:
        set_dotted(tree["study"], key, value)
    try:
        config = StudyConfig.model_validate(tree["study"])
    except ValidationError as err:
        raise ConfigError(
            "invalid study config:\n"
            + "\n".join(f"  study.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        ) from None
    if isinstance(config.base, str):
        base_path = beside(path, config.base)
        if not rundir.exists(base_path):
            raise ConfigError(f"study.base: {base_path} not found (a path is relative to the study file)")
        base = yaml.safe_load(rundir.read_bytes(base_path).decode("utf-8")) or {}
    else:
        base = copy.deepcopy(config.base)
    for key, value in base_overrides:
        set_dotted(base, key, value)
    name = config.name or Path(path).stem
    study = Study(config, name, config.run_dir or rundir.join("runs", "studies", name), base, path)
    labels = {v.label for v in study.variants()}
    if config.baseline is not None and config.baseline not in labels:
        raise ConfigError(f"study.baseline {config.baseline!r} is not a variant; variants: {sorted(labels)}")
    # Every variant validates before anything runs.
    for variant in study.variants():
        study.variant_config(variant)
    return study


def reachable(study: Study) -> None:
    """Fail with the fix, not a storage traceback, when the study directory cannot be read from here."""
    try:
        rundir.exists(study.root)
    except OSError as e:
        raise RaycatError(
            f"study.run_dir {study.root} cannot be reached from this machine ({costs.first_line(e)}); "
            "set study.run_dir to storage that this machine and the cluster can both reach"
        ) from None


def plan(study: Study) -> list[dict]:
    """Per variant and stage: 'done' (finished with the same hash), 'run', 'off' (not configured);
    ``same_as``: an earlier variant with the same stage hash, whose cached rows this one reuses.
    ``estimate``: the work the config implies (questions, optimizer steps); counts are upper bounds
    taken from the config, not measured. With ``study.scaling``: ``costs`` and ``memory`` per variant
    (raycat.study.costs)."""
    reachable(study)
    recipes = study.recipes()
    seen: dict[tuple[str, str], str] = {}
    out = []
    for variant in study.variants():
        cfg = pipeline.effective_config(study.variant_config(variant), recipes)
        steps = pipeline.plan(cfg, recipes, pipeline.read_manifest(cfg), None, None)
        row = {"variant": variant.label, "seed": variant.seed, "run_dir": cfg.run_dir, "stages": {}}
        row["estimate"] = estimate(cfg)
        name = f"{variant.label} (seed {variant.seed})"
        for stage, stage_hash, action in steps:
            first = seen.setdefault((stage, stage_hash), name)
            row["stages"][stage] = {"action": action, "hash": stage_hash, "same_as": None if first == name else first}
        out.append(row)
    if study.config.scaling is not None:
        _add_costs(study, recipes, out)
    return out


def _add_costs(study: Study, recipes: list[str], rows: list[dict]) -> None:
    scaling = study.config.scaling
    records = costs.load_records([beside(study.source, p) for p in scaling.throughput])
    ref_dir = scaling.reference or next(
        (r["run_dir"] for r in rows if rundir.exists(rundir.join(r["run_dir"], "score", "scores.parquet"))), None
    )
    ref = costs.reference_figures(ref_dir) if ref_dir else {"run_dir": None}
    ref_cfg = None
    if ref_dir and rundir.exists(rundir.join(ref_dir, "config.yaml")):
        try:
            ref_cfg = validate_config(yaml.safe_load(rundir.read_bytes(rundir.join(ref_dir, "config.yaml"))))
        except ConfigError:
            # An older run's config; its data section is then not compared.
            ref_cfg = None
    for variant, row in zip(study.variants(), rows, strict=True):
        cfg = pipeline.effective_config(study.variant_config(variant), recipes)
        row["costs"] = costs.costs(cfg, recipes, ref, ref_cfg, records)
        row["memory"] = costs.memory(cfg, recipes)


def estimate(cfg: RaycatConfig) -> dict:
    """Upper bounds from the config alone (before anything runs)."""
    questions = cfg.data.sample or cfg.data.limit
    train_rows = None if questions is None else int(questions * (1 - cfg.split.test_fraction))
    hard = None if train_rows is None else int(train_rows * (1 - cfg.split.quantiles[1]) + 1)
    phases = {}
    for name in ("phase1", "phase2"):
        phase = cfg.train.phase(name)
        phases[name] = phase.max_steps if phase.max_steps else None
    return {
        "questions": questions,  # None: the whole corpus
        "hard_rows": hard,
        "teach_rows_max": min(hard, cfg.teach.limit) if hard is not None and cfg.teach and cfg.teach.limit else hard,
        "max_steps": phases,
        "basis": "config (upper bounds, not measured)",
    }


def run(study: Study, say=print) -> dict:
    """Run every variant in order (each an ordinary ``raycat run``), then the comparison report."""
    reachable(study)
    recipes = study.recipes()
    # Self-contained (base inline, run_dir fixed): `raycat report <study dir>` rebuilds the report from it.
    frozen = {
        **study.config.model_dump(mode="json"),
        "name": study.name,
        "base": study.base_tree,
        # Absolute: `raycat report` may run from another directory.
        "run_dir": rundir.absolute(study.root),
    }
    if study.config.scaling is not None:
        scaling = study.config.scaling
        frozen["scaling"] = {
            "reference": rundir.absolute(scaling.reference) if scaling.reference else None,
            "throughput": [rundir.absolute(beside(study.source, p)) for p in scaling.throughput],
        }
    rundir.write_text(rundir.join(study.root, "study.yaml"), yaml.safe_dump({"study": frozen}, sort_keys=False))
    variants = study.variants()
    for i, variant in enumerate(variants, 1):
        cfg = study.variant_config(variant)
        say(f"study {study.name}: variant {i}/{len(variants)}: {variant.label} (seed {variant.seed}) -> {cfg.run_dir}")
        rundir.write_text(rundir.join(cfg.run_dir, "config.yaml"), dump_config(cfg))
        pipeline.run(cfg, recipes)
        if study.config.rescore_after:
            rescore(cfg, recipes[0], study.config.rescore_after, say)
    return comparison.build(study)


def rescore(cfg: RaycatConfig, recipe: str, phase: str, say=print) -> str | None:
    """Score every question with the model after ``phase`` into ``<run>/rescore/<phase>/``; skipped when
    that phase is not trained, or already rescored at its current hash."""
    phase_dir = rundir.join(cfg.run_dir, "train", recipe, phase)
    done = rundir.join(phase_dir, "done.json")
    model = rundir.join(phase_dir, "merged" if cfg.train.method == "lora" else "model")
    if not rundir.exists(done) or rundir.read_json(done).get("empty") or not rundir.exists(model):
        say(f"rescore: {recipe}/{phase} has no trained model; skipped")
        return None
    out = rundir.join(cfg.run_dir, "rescore", phase)
    mark = rundir.join(out, "phase.json")
    phase_hash = rundir.read_json(done)["hash"]
    if rundir.exists(mark) and rundir.read_json(mark).get("hash") == phase_hash:
        return out
    rescore_cfg = cfg.model_copy(deep=True)
    rescore_cfg.run_dir = out
    rescore_cfg.score.student.path, rescore_cfg.score.student.revision = rundir.absolute(model), None
    score.run(rescore_cfg)
    rundir.write_json(mark, {"recipe": recipe, "phase": phase, "hash": phase_hash})
    return out
