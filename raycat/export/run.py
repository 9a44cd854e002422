"""``raycat export``: a run dir's training data into every export format and each trained recipe's final
model with its card, next to the run (``export/``) or at ``--out`` (a local path or an object-store
URI), replaced as a whole, with ``lm_eval_tasks/`` and ``models/<recipe>/request.json`` (``harness``)
to evaluate and query the models on the held-out rows; ``--push-to-hub REPO`` also pushes each recipe
(a config of phase splits) and the taught rows to the Hugging Face Hub as the dataset REPO, and each
recipe's final model (with its card) as the model repo REPO-<recipe> (merged weights: REPO-<recipe>-merged).

Runs where it is called (the driver, or a job's entrypoint): it streams, so memory is a batch; the
files are built in a local temporary directory, then copied to their place.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from raycat.config import RaycatConfig
from raycat.errors import MissingInputError
from raycat.export import card, harness
from raycat.export.data import export_recipe, export_taught
from raycat.export.formats import FORMATS, dataset_info
from raycat.export.model import export_models
from raycat.pipeline import check_recipes
from raycat.storage import rundir


def default_out(cfg: RaycatConfig) -> str:
    return rundir.join(cfg.run_dir, "export")


def _facts(cfg: RaycatConfig) -> dict:
    """What the card says of the run, from its config and metrics files."""
    teach = rundir.read_json_if_exists(rundir.join(cfg.run_dir, "teach", "metrics.json")) or {}
    provenance = teach.get("provenance") or {}
    return {
        "run_dir": cfg.run_dir,
        "student": cfg.score.student.path,
        "student_revision": cfg.score.student.revision,
        "teach": provenance and {"teachers": provenance.get("teachers", []), "on_wrong": provenance.get("on_wrong")},
        "split": rundir.read_json_if_exists(rundir.join(cfg.run_dir, "split", "thresholds.json")),
        "accounting": teach.get("accounting"),
    }


def _hf_datasets(local: Path, recipes: dict[str, dict], taught: dict | None, cache: Path) -> None:
    """``hf/<recipe>`` (a DatasetDict of its phases) and ``hf/taught``, for ``datasets.load_from_disk``."""
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict
    from datasets.table import InMemoryTable

    def load(path: Path) -> Dataset:
        if pq.ParquetFile(path).metadata.num_rows == 0:  # datasets' Parquet builder refuses an empty file
            return Dataset(InMemoryTable(pq.read_table(path)))
        return Dataset.from_parquet(str(path), cache_dir=str(cache))

    def save(splits: dict[str, Dataset], where: Path) -> None:
        # An empty split gets one (empty) shard: saved as none, it cannot be loaded back.
        shards = {name: None if len(split) else 1 for name, split in splits.items()}
        DatasetDict(splits).save_to_disk(str(where), num_shards=shards)

    for recipe, phases in recipes.items():
        save({phase: load(local / recipe / phase / "rows.parquet") for phase in phases}, local / "hf" / recipe)
    if taught is not None:
        save({"train": load(local / "taught" / "rows.parquet")}, local / "hf" / "taught")


def _llama_factory(local: Path, recipes: dict[str, dict], taught: dict | None) -> dict:
    """dataset_info.json: every exported file registered under ``<recipe>_<phase>_<format>``."""
    units = [(f"{recipe}_{phase}", f"{recipe}/{phase}") for recipe, phases in recipes.items() for phase in phases]
    units += [("taught", "taught")] if taught is not None else []
    return {f"{name}_{form}": dataset_info(f"{where}/{form}.jsonl", form) for name, where in units for form in FORMATS}


def push(local: Path, repo: str, recipes: dict[str, dict], taught: dict | None) -> None:
    """Each recipe as a config of the Hub dataset ``repo``, then the card (``HF_TOKEN`` authenticates)."""
    from datasets import load_from_disk
    from huggingface_hub import HfApi

    for name in [*recipes, *(["taught"] if taught is not None else [])]:
        load_from_disk(str(local / "hf" / name)).push_to_hub(repo, config_name=name)
    HfApi().upload_file(
        path_or_fileobj=str(local / "README.md"), path_in_repo="README.md", repo_id=repo, repo_type="dataset"
    )


def model_repo(repo: str, recipe: str, sub: str) -> str:
    """The Hub model repo of a recipe's final model: ``<repo>-<recipe>``, merged weights ``...-merged``."""
    return f"{repo}-{recipe}" + ("-merged" if sub == "merged" else "")


def push_models(models: dict[str, dict], repo: str) -> dict[str, str]:
    """Each exported model dir (with its card) to its Hub model repo (``model_repo``), created if
    missing; a dir on an object store comes down to a local temporary copy first. Returns {repo: path}."""
    from huggingface_hub import HfApi

    api, pushed = HfApi(), {}
    for recipe, written in models.items():
        for sub, entry in written.items():
            target = model_repo(repo, recipe, sub)
            api.create_repo(target, repo_type="model", exist_ok=True)
            with tempfile.TemporaryDirectory(prefix="raycat-push-") as tmp:
                rundir.upload_dir(entry["path"], tmp)
                api.upload_folder(
                    folder_path=tmp,
                    repo_id=target,
                    repo_type="model",
                    commit_message=f"raycat export: {recipe}, {entry['kind']} ({sub}/)",
                )
            pushed[target] = entry["path"]
    return pushed


def export(cfg: RaycatConfig, recipes: list[str], out: str | None = None, push_to_hub: str | None = None) -> dict:
    """Every format for ``recipes`` (default: train.recipe) at ``out``; returns the summary (also
    written as export.json)."""
    check_recipes(recipes)
    if not rundir.exists(rundir.join(cfg.run_dir, "split")):
        raise MissingInputError(f"{cfg.run_dir} has no split/: run `raycat run` (or score and split) first")
    out = out or default_out(cfg)
    with tempfile.TemporaryDirectory(prefix="raycat-export-") as tmp:
        local, scratch = Path(tmp) / "export", Path(tmp) / "scratch"
        per_recipe = {recipe: export_recipe(cfg, recipe, local, scratch) for recipe in recipes}
        taught = export_taught(cfg, local)
        _hf_datasets(local, per_recipe, taught, scratch / "hf-cache")
        info = _llama_factory(local, per_recipe, taught)
        (local / "dataset_info.json").write_text(json.dumps(info, indent=2) + "\n")
        (local / "README.md").write_text(card.text(_facts(cfg), per_recipe, taught))
        lm_eval = harness.write_tasks(cfg, recipes, local)
        summary = {"out": out, "recipes": per_recipe, "taught": taught, "formats": [*FORMATS, "hf", "dataset_info"]}
        summary["lm_eval"] = lm_eval
        rundir.replace_dir(str(local), out)
        # Copied from the run dir to their place directly: full weights never pass through local disk.
        trained = {recipe: export_models(cfg, recipe, out) for recipe in recipes}
        summary["models"] = {recipe: m for recipe, m in trained.items() if m}
        for recipe in summary["models"]:
            body = harness.request(cfg, recipe, local)
            if body is not None:
                rundir.write_text(rundir.join(out, "models", recipe, "request.json"), json.dumps(body, indent=2) + "\n")
        rundir.write_json(rundir.join(out, "export.json"), summary)
        if push_to_hub:
            push(local, push_to_hub, per_recipe, taught)
            summary["pushed_to"] = {"dataset": push_to_hub, "models": push_models(summary["models"], push_to_hub)}
            rundir.write_json(rundir.join(out, "export.json"), summary)
    return summary
