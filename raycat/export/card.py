"""The exported dataset's card (README.md): Hub metadata that loads each recipe as a config of
splits (one per phase) and the taught CoT as its own, then where the rows came from: student,
teachers, the verification rule, the split's thresholds and band sizes, the rows per phase, and the
teacher's tokens (measured or estimated, as teach/metrics.json labels them). Pure: dicts in, text out.
"""

from __future__ import annotations

import yaml

from raycat import __version__

_RULE = (
    "the teacher's answer is the last `[[X]]` of its response (an option letter, or one number in canonical "
    "form), equal to the gold answer; a response cut off at the token limit is never verified"
)


def metadata(recipes: dict[str, dict], taught: dict | None) -> dict:
    """The card's YAML header: each recipe a config whose splits are its phases' rows.parquet. An empty
    phase has no split (``load_dataset`` refuses a split without rows), nor a recipe or taught set
    without any a config; their files are still there, empty."""
    configs = []
    for recipe, phases in recipes.items():
        files = [{"split": p, "path": f"{recipe}/{p}/rows.parquet"} for p, s in phases.items() if s["rows"]]
        if files:
            configs.append({"config_name": recipe, "data_files": files})
    if taught is not None and taught["rows"]:
        configs.append({"config_name": "taught", "data_files": [{"split": "train", "path": "taught/rows.parquet"}]})
    return {
        "tags": ["raycat", "complexity-aware-fine-tuning", "chain-of-thought", "distillation"],
        "task_categories": ["question-answering", "text-generation"],
        "configs": configs,
    }


def _provenance(facts: dict) -> list[str]:
    teach = facts.get("teach") or {}
    teachers = [t["model"] + (f"@{t['revision']}" if t.get("revision") else "") for t in teach.get("teachers", [])]
    split = facts.get("split") or {}
    lines = [
        f"- raycat {__version__}; run dir `{facts['run_dir']}`",
        f"- student: `{facts['student']}`"
        + (f" (revision {facts['student_revision']})" if facts.get("student_revision") else ""),
        f"- teachers: {', '.join(f'`{t}`' for t in teachers) if teachers else 'none (no teach stage)'}",
    ]
    if teach:
        lines.append(f"- verification: {_RULE}; wrong or unverifiable rows: teach.on_wrong = `{teach['on_wrong']}`")
    if split:
        lines.append(
            f"- split: {split.get('method')} {split.get('quantiles') or ''} thresholds "
            f"{[round(t, 4) for t in split.get('thresholds', [])]} (entropy, nats); training rows per band "
            f"{split.get('counts')}, held-out rows per band {split.get('test_counts')} (held-out rows are not exported)"
        )
    return lines


def _tokens(accounting: dict | None) -> list[str]:
    if not accounting:
        return []
    lines = [
        f"- teacher tokens (measured, every attempt): {accounting.get('prompt_tokens', 0):,} prompt + "
        f"{accounting.get('completion_tokens', 0):,} completion for {accounting.get('rows_taught', 0):,} rows"
    ]
    if "cost" in accounting:
        lines.append(f"- teacher cost: {accounting['cost']:.4f} (from the configured prices)")
    saving = accounting.get("saving") or {}
    if saving.get("saving_pct") is not None:
        lines.append(
            f"- teacher tokens saved by teaching only the taught bands: {saving['saving_pct']:.1f}% ({saving['label']})"
        )
    return lines


def text(facts: dict, recipes: dict[str, dict], taught: dict | None) -> str:
    """README.md of the export. ``facts``: run_dir, student, student_revision, teach (provenance and
    on_wrong), split (thresholds.json), accounting (teach metrics); ``recipes``: recipe → phase →
    export summary; ``taught``: the taught rows' summary."""
    rows = [
        f"| {recipe} | {phase} | {s['target']} | {', '.join(s['bands'])} | {s['rows']:,} | "
        f"{sum(s['not_exported'].values()):,} |"
        for recipe, phases in recipes.items()
        for phase, s in phases.items()
    ]
    body = [
        "# raycat export",
        "",
        "Training conversations of a complexity-aware fine-tuning run (arXiv 2506.21220): each recipe's phases "
        "as the student was trained on them (system and user turns, then the target: the bare answer `[[X]]`, "
        "or the teacher's verified chain-of-thought), in training's row order before its shuffle.",
        "",
        "## Where the rows came from",
        "",
        *_provenance(facts),
        *_tokens(facts.get("accounting")),
        "",
        "## Rows",
        "",
        "| recipe | phase | target | bands | rows | not exported (no teacher target) |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    if taught is not None:
        body += ["", f"taught: {taught['rows']:,} rows of teach/cot.parquet, by final status {taught['final_status']}."]
    body += [
        "",
        "## Files",
        "",
        "- `<recipe>/<phase>/rows.parquet`: id, band, category, gold, messages (the Hub configs above)",
        "- `<recipe>/<phase>/messages.jsonl`: OpenAI-style chat `messages` (TRL `SFTTrainer`)",
        "- `<recipe>/<phase>/sharegpt.jsonl`, `alpaca.jsonl` and `dataset_info.json`: LLaMA-Factory",
        "- `hf/<recipe>`, `hf/taught`: `datasets.load_from_disk`",
        "",
        'Loaded from a local copy, `load_dataset(DIR, "<recipe>")` is cached by the directory\'s name and the '
        'config, not by the files: after a new export to the same place pass `download_mode="force_redownload"` '
        "(or use `load_from_disk`).",
    ]
    header = yaml.safe_dump(metadata(recipes, taught), sort_keys=False)
    return f"---\n{header}---\n\n" + "\n".join(body) + "\n"
