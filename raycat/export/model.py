"""Each recipe's final model as people use it: the last trained phase's model dir (a LoRA adapter, or
full weights) and, where ``train.lora.merge`` wrote one, the merged weights, copied to
``models/<recipe>/{model,merged}`` with a model card; an adapter's ``base_model_name_or_path`` names the
base as a hub id or URI (``models.base_reference``), never a node's cache path.
"""

from __future__ import annotations

import json

import yaml

from raycat import __version__
from raycat.config import RaycatConfig
from raycat.engines.vllm_engine import lora_rank_slot
from raycat.recipes import RECIPES
from raycat.storage import models, rundir


def final_phase(cfg: RaycatConfig, recipe: str) -> tuple[str, dict[str, str]] | None:
    """(the phase whose model is the recipe's result, {later phase: why it has no model}). The result
    is the last phase that trained: one after it can only be one ``train.on_empty_phase=skip`` left
    empty (the demo's phase 2 when the teacher verified no CoT). None while the recipe is unfinished."""
    empty: dict[str, str] = {}
    for phase in reversed(RECIPES[recipe]):
        done = rundir.join(cfg.run_dir, "train", recipe, phase.name, "done.json")
        if not rundir.exists(done):
            return None
        why = rundir.read_json(done).get("empty")
        if not why:
            return phase.name, empty
        empty = {phase.name: why, **empty}
    return None


def _eval_rows(metrics: dict | None, recipe: str) -> list[str]:
    """The card's accuracy table: the base student and this recipe's phases, with 95% CIs."""
    if not metrics:
        return ["No evaluation in this run dir (`raycat eval`)."]

    def cell(entry: dict | None) -> str:
        if not entry or entry.get("accuracy") is None:
            return "-"
        lo, hi = entry.get("ci95") or (None, None)
        ci = f" [{lo:.3f}, {hi:.3f}]" if lo is not None else ""
        return f"{entry['accuracy']:.3f}{ci} (n={entry['n']})"

    rows = ["| model | overall | easy | medium | hard |", "|---|---|---|---|---|"]
    for name, m in metrics.get("models", {}).items():
        if name == "base" or name.startswith(f"{recipe}/"):
            bands = m.get("per_band", {})
            rows.append(
                f"| {name} | {cell(m.get('overall'))} | "
                + " | ".join(cell(bands.get(b)) for b in ("easy", "medium", "hard"))
                + " |"
            )
    return rows + [
        "",
        "Accuracy on the held-out rows (bootstrap 95% CI), per band of the student's entropy before training.",
    ]


def card(
    cfg: RaycatConfig,
    recipe: str,
    kind: str,
    eval_metrics: dict | None,
    rank: int | None = None,
    phase: str | None = None,
    empty: dict[str, str] | None = None,
) -> str:
    """README.md of an exported model: Hub metadata (base model, library, tags), the recipe, which phase
    it is (``phase``; ``empty``: later phases left without a model, and why), eval, and how to serve it
    (``rank``: an adapter's LoRA rank)."""
    base = models.base_reference(cfg.score.student.path)
    meta = {
        "base_model": base,
        "library_name": "peft" if kind == "adapter" else "transformers",
        "tags": ["raycat", "complexity-aware-fine-tuning", recipe, *(["lora"] if kind == "adapter" else [])],
    }
    phases = ", ".join(f"{p.name}: {'+'.join(p.bands)} → {p.target}" for p in RECIPES[recipe])
    serve = f"vllm serve <this dir> --served-model-name {recipe}"
    if kind == "adapter":
        slot = lora_rank_slot(rank or 1)
        serve = f"vllm serve {base} --enable-lora --max-lora-rank {slot} --lora-modules {recipe}=<this dir>"
    body = [
        f"# {recipe} ({'LoRA adapter' if kind == 'adapter' else 'full weights'})",
        "",
        f"Fine-tuned from `{base}` by raycat {__version__} (complexity-aware fine-tuning, arXiv 2506.21220), "
        f"recipe `{recipe}` ({phases}).",
        *(
            [
                "",
                f"This is {phase}'s model: "
                + "; ".join(f"{name} has none, {why}" for name, why in empty.items())
                + " (train.on_empty_phase=skip).",
            ]
            if phase and empty
            else []
        ),
        "",
        "## Evaluation",
        "",
        *_eval_rows(eval_metrics, recipe),
        "",
        "## Use",
        "",
        f"`{serve}`; prompts as in training: the chat template with the system prompt asking for the answer "
        "as `[[X]]` (raycat/data/prompts.py `train_messages`). `../request.json` is one held-out question in "
        f"that form; `lm_eval --include_path lm_eval_tasks --tasks raycat_{recipe} --apply_chat_template` "
        "(from the export dir) evaluates on the run's held-out rows.",
    ]
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n\n" + "\n".join(body) + "\n"


def _fix_base(adapter_dir: str, base: str) -> int:
    """The adapter's base named by ``base``; returns its LoRA rank."""
    path = rundir.join(adapter_dir, "adapter_config.json")
    config = rundir.read_json(path)
    config["base_model_name_or_path"] = base
    rundir.write_text(path, json.dumps(config, indent=2) + "\n")
    return int(config["r"])


def export_models(cfg: RaycatConfig, recipe: str, out: str) -> dict | None:
    """``out/models/<recipe>/``: the final phase's model (and merged weights); None if not trained."""
    final = final_phase(cfg, recipe)
    if final is None:
        return None
    phase, empty = final
    phase_dir = rundir.join(cfg.run_dir, "train", recipe, phase)
    eval_metrics = rundir.read_json_if_exists(rundir.join(cfg.run_dir, "eval", "metrics.json"))
    written = {}
    for sub in ("model", "merged"):
        source = rundir.join(phase_dir, sub)
        if not rundir.exists(source):
            continue
        dest = rundir.join(out, "models", recipe, sub)
        rundir.replace_dir(source, dest)
        kind = "adapter" if rundir.exists(rundir.join(dest, "adapter_config.json")) else "full"
        rank = _fix_base(dest, models.base_reference(cfg.score.student.path)) if kind == "adapter" else None
        rundir.write_text(rundir.join(dest, "README.md"), card(cfg, recipe, kind, eval_metrics, rank, phase, empty))
        written[sub] = {"path": dest, "kind": kind, "from": source, "phase": phase}
        if empty:
            written[sub]["not_trained"] = empty
    return written
