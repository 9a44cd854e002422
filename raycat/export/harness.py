"""The held-out rows as people evaluate and query an exported model: an lm-evaluation-harness task per
recipe (``lm_eval_tasks/raycat_<recipe>.yaml``) and one OpenAI chat request (``models/<recipe>/request.json``),
both in the prompt the recipe's final phase was trained on (``train_messages``: its system prompt and the
question with its options; the answer as ``[[X]]``).

lm-eval sends the task's per-row ``description`` as the system turn under ``--apply_chat_template``, so
the model sees its training prompt; it scores the last ``[[...]]`` of the generation against the gold
as written (case and punctuation ignored). raycat's eval also reads ``[[ (b) ]]`` as B, numbers by
value and a hedge as no answer: its accuracy is the one the report uses, and lm-eval's can be lower.
The task's data file is named relative to the export dir: run ``lm_eval`` from there.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from raycat.config import RaycatConfig
from raycat.data.prompts import train_messages
from raycat.export.model import final_phase
from raycat.recipes import RECIPES
from raycat.storage import rundir
from raycat.train import examples

TASKS = "lm_eval_tasks"
_COLUMNS = ["id", "question", "options", "category", "gold", "band"]


def final_kind(cfg: RaycatConfig, recipe: str) -> str:
    """The prompt kind ('answer' or 'cot') of the recipe's result: its last trained phase's target
    (``model.final_phase``), else its last phase's."""
    final = final_phase(cfg, recipe)
    name = final[0] if final is not None else RECIPES[recipe][-1].name
    return next(p.target for p in RECIPES[recipe] if p.name == name)


def _prompt(row, kind: str) -> list[dict]:
    options = list(row.options) if row.options is not None else []
    return train_messages(row.question, options, row.category or "", kind)


def write_heldout(cfg: RaycatConfig, kinds: set[str], out: Path) -> dict[str, int]:
    """``out/lm_eval_tasks/heldout_<kind>.jsonl`` (id, band, gold, system, user) per prompt kind, streamed
    from split/test.parquet; rows per file ({} without held-out rows)."""
    path = rundir.join(cfg.run_dir, "split", "test.parquet")
    if not kinds or not rundir.exists(path):
        return {}
    (out / TASKS).mkdir(parents=True, exist_ok=True)
    files = {kind: (out / TASKS / f"heldout_{kind}.jsonl").open("w", encoding="utf-8") for kind in kinds}
    written = dict.fromkeys(kinds, 0)
    try:
        for batch in rundir.iter_parquet(path, _COLUMNS, batch_rows=examples.BATCH_ROWS):
            for row in batch.itertuples(index=False):
                for kind, f in files.items():
                    system, user = (m["content"] for m in _prompt(row, kind))
                    record = {"id": row.id, "band": row.band, "gold": row.gold, "system": system, "user": user}
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                    written[kind] += 1
    finally:
        for f in files.values():
            f.close()
    return written


def task(cfg: RaycatConfig, recipe: str) -> dict:
    """The lm-eval task config of ``recipe``: greedy generation within eval's budget for its prompt kind."""
    kind = final_kind(cfg, recipe)
    budget = cfg.eval.max_tokens_answer if kind == "answer" else cfg.eval.max_tokens_cot
    return {
        "task": f"raycat_{recipe}",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": f"{TASKS}/heldout_{kind}.jsonl"}},
        "test_split": "test",
        "output_type": "generate_until",
        "description": "system",
        "doc_to_text": "user",
        "doc_to_target": "gold",
        # No stop string: the model's end-of-turn token ends the answer (lm-eval adds it).
        "generation_kwargs": {"until": [], "max_gen_toks": budget, "do_sample": False, "temperature": 0.0},
        "filter_list": [
            {
                "name": "last_bracket",
                "filter": [
                    {"function": "regex", "regex_pattern": r"\[\[\s*([^\[\]]*?)\s*\]\]", "group_select": -1},
                    {"function": "take_first"},
                ],
            }
        ],
        "metric_list": [
            {
                "metric": "exact_match",
                "aggregation": "mean",
                "higher_is_better": True,
                "ignore_case": True,
                "ignore_punctuation": True,
            }
        ],
        "metadata": {"version": 1.0, "raycat_prompt_kind": kind},
    }


def write_tasks(cfg: RaycatConfig, recipes: list[str], out: Path) -> dict:
    """The held-out files and one task yaml per recipe; the summary's ``lm_eval`` entry."""
    rows = write_heldout(cfg, {final_kind(cfg, r) for r in recipes}, out)
    if not rows:
        return {"rows": 0, "tasks": []}
    for recipe in recipes:
        text = yaml.safe_dump(task(cfg, recipe), sort_keys=False)
        (out / TASKS / f"raycat_{recipe}.yaml").write_text(text, encoding="utf-8")
    return {"rows": max(rows.values()), "tasks": [f"raycat_{r}" for r in recipes], "dir": TASKS}


def request(cfg: RaycatConfig, recipe: str, out: Path) -> dict | None:
    """An OpenAI chat-completions body asking the served model (named ``recipe``) the first held-out
    question; None without held-out rows."""
    kind = final_kind(cfg, recipe)
    path = out / TASKS / f"heldout_{kind}.jsonl"
    if not path.exists():
        return None
    with path.open(encoding="utf-8") as f:
        first = json.loads(f.readline() or "null")
    if first is None:
        return None
    return {
        "model": recipe,
        "messages": [{"role": "system", "content": first["system"]}, {"role": "user", "content": first["user"]}],
        "max_tokens": cfg.eval.max_tokens_answer if kind == "answer" else cfg.eval.max_tokens_cot,
        "temperature": 0.0,
    }
