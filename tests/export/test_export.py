"""``raycat export`` on a run dir: every format holds the rows each phase trains on, with the trained
conversation, and loads with ``datasets``, TRL's data functions and LLaMA-Factory's registry; the card
parses and names where the rows came from."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from raycat.cli import main
from raycat.config import load_config
from raycat.data.prompts import answer_target, train_messages
from raycat.export.run import export
from raycat.recipes import BANDS, NO_COT
from raycat.storage import rundir
from tests.helpers import DEMO, write_run


@pytest.fixture
def exported(tmp_path):
    run = tmp_path / "run"
    rows, taught = write_run(run)
    cfg = load_config(DEMO, [f"run_dir={run}"])
    summary = export(cfg, ["complexity_aware", "sft_all"])
    return run / "export", rows, taught, summary


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_phase_exports_the_rows_it_trains_on_with_their_target(exported):
    out, rows, taught, summary = exported
    by_id = rows.set_index("id")
    cot = taught.set_index("id")["target"]
    expected = {
        ("complexity_aware", "phase1"): rows[rows["band"] != "hard"]["id"].tolist(),
        ("complexity_aware", "phase2"): list(cot.index),
        ("sft_all", "phase1"): rows.sort_values("band", key=lambda b: b.map(BANDS.index), kind="stable")["id"].tolist(),
    }
    for (recipe, phase), ids in expected.items():
        got = pd.read_parquet(out / recipe / phase / "rows.parquet")
        assert sorted(got["id"]) == sorted(ids), (recipe, phase)
        kind = "cot" if phase == "phase2" else "answer"
        for row_id, messages in zip(got["id"], got["messages"], strict=True):
            r = by_id.loc[row_id]
            target = cot[row_id].strip() if kind == "cot" else answer_target(r["gold"])
            want = [
                *train_messages(r["question"], list(r["options"]), r["category"] or "", kind),
                {"role": "assistant", "content": target},
            ]
            assert [dict(m) for m in messages] == want
        for form in ("messages", "sharegpt", "alpaca"):
            assert len(jsonl(out / recipe / phase / f"{form}.jsonl")) == len(ids)
    # The hard row without a CoT and the one whose CoT is for other content are counted, not exported.
    assert summary["recipes"]["complexity_aware"]["phase2"]["not_exported"] == {NO_COT: 2}
    assert summary["taught"] == {"rows": 12, "final_status": {"verified": 12}}


def test_the_files_load_with_datasets_trl_and_llama_factory_registry(exported):
    out, _, _, summary = exported
    datasets = pytest.importorskip("datasets")
    from trl.data_utils import apply_chat_template, is_conversational, is_conversational_from_value

    phases = datasets.load_from_disk(str(out / "hf" / "complexity_aware"))
    assert {k: len(v) for k, v in phases.items()} == {"phase1": 27, "phase2": 11}
    assert len(datasets.load_from_disk(str(out / "hf" / "taught"))["train"]) == 12
    # The card's configs: the export dir loads as a Hub dataset repo would.
    # datasets caches a local dir's configs by the dir's name, not its files: every test's dir is "export".
    card_loaded = datasets.load_dataset(str(out), "complexity_aware", download_mode="force_redownload")
    assert {k: len(v) for k, v in card_loaded.items()} == {"phase1": 27, "phase2": 11}
    messages = datasets.load_dataset("json", data_files=str(out / "complexity_aware/phase2/messages.jsonl"))["train"]
    assert is_conversational(messages[0])
    from transformers import AutoTokenizer

    from raycat.testing.tiny_models import build_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(out.parent / "tok"))
    assert "[[" in apply_chat_template(messages[0], tokenizer)["text"]
    assert is_conversational_from_value(jsonl(out / "complexity_aware/phase1/sharegpt.jsonl")[0])
    info = json.loads((out / "dataset_info.json").read_text())
    assert len(info) == 3 * 3 + 3  # 3 phases and the taught rows, 3 formats each
    for name, entry in info.items():
        first = jsonl(out / entry["file_name"])[0]
        assert set(entry["columns"].values()) <= set(first), name


def test_the_card_parses_and_says_where_the_rows_came_from(exported):
    from huggingface_hub import DatasetCard

    out = exported[0]
    card = DatasetCard.load(out / "README.md")
    configs = {c["config_name"]: c for c in card.data.configs}
    assert set(configs) == {"complexity_aware", "sft_all", "taught"}
    assert [f["split"] for f in configs["complexity_aware"]["data_files"]] == ["phase1", "phase2"]
    text = card.text
    for fact in ("teacher-x", "teach.on_wrong = `drop`", "[0.5, 1.2]", "600 prompt + 240 completion", "70.0%"):
        assert fact in text, fact
    assert json.loads((out / "export.json").read_text())["taught"]["rows"] == 12


def test_the_cli_exports_to_a_chosen_place_replacing_what_was_there(tmp_path, capsys):
    run = tmp_path / "run"
    write_run(run)
    dest = tmp_path / "elsewhere"
    (dest / "stale").mkdir(parents=True)
    (dest / "stale" / "old.jsonl").write_text("{}\n")
    assert main(["export", "--config", str(DEMO), "--out", str(dest), f"run_dir={run}"]) == 0
    assert not (dest / "stale").exists()
    assert (dest / "complexity_aware/phase2/messages.jsonl").exists()
    said = " ".join(capsys.readouterr().err.split())
    assert "complexity_aware/phase2: 11 rows (2 without a teacher target)" in said


def test_an_unscored_run_dir_or_an_unknown_recipe_is_refused_with_the_fix(tmp_path, capsys):
    assert main(["export", "--config", str(DEMO), f"run_dir={tmp_path / 'none'}"]) == 1
    assert "run `raycat run`" in capsys.readouterr().err.replace("\n", " ")
    assert main(["export", "--config", str(DEMO), "--recipes", "complexity_aware,sft_al"]) == 1
    assert "unknown ['sft_al']; choose from complexity_aware" in " ".join(capsys.readouterr().err.split())


def write_adapter(phase_dir, base_dir):
    """A real PEFT LoRA adapter of the tiny model, saved as training saves it (its base: a local path)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(phase_dir / "model")
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(phase_dir / "model")
    (phase_dir / "done.json").write_text('{"hash": "x"}')


def test_the_final_lora_adapter_names_its_hub_base_and_carries_a_model_card(tmp_path, tiny_model_dir):
    from huggingface_hub import ModelCard
    from peft import PeftConfig

    run = tmp_path / "run"
    write_run(run)
    write_adapter(run / "train" / "complexity_aware" / "phase2", tiny_model_dir)
    assert json.loads((run / "train/complexity_aware/phase2/model/adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str(tiny_model_dir)
    models = {"base": {"overall": {"accuracy": 0.5, "n": 10, "ci95": [0.2, 0.8]}, "per_band": {}}}
    models["complexity_aware/phase2"] = {"overall": {"accuracy": 0.7, "n": 10, "ci95": [0.4, 0.9]}, "per_band": {}}
    rundir.write_json(str(run / "eval" / "metrics.json"), {"models": models})
    # The student as a cluster names it: a URI whose weights each node caches locally.
    cfg = load_config(DEMO, [f"run_dir={run}", "score.student.path=s3://models/student-1b"])
    summary = export(cfg, ["complexity_aware", "sft_all"])
    exported = run / "export" / "models" / "complexity_aware" / "model"
    assert summary["models"] == {
        "complexity_aware": {
            "model": {
                "path": str(exported),
                "kind": "adapter",
                "from": str(run / "train/complexity_aware/phase2/model"),
                "phase": "phase2",
            }
        }
    }
    assert PeftConfig.from_pretrained(exported).base_model_name_or_path == "s3://models/student-1b"
    card = ModelCard.load(exported / "README.md")
    assert card.data.base_model == "s3://models/student-1b" and card.data.library_name == "peft"
    assert "0.700 [0.400, 0.900] (n=10)" in card.text and "--max-lora-rank 8 " in card.text
    # The run's own adapter is left as training wrote it.
    assert json.loads((run / "train/complexity_aware/phase2/model/adapter_config.json").read_text())[
        "base_model_name_or_path"
    ] == str(tiny_model_dir)


def test_push_to_hub_sends_the_data_and_each_final_model_with_its_card(tmp_path, tiny_model_dir, monkeypatch):
    """Wiring only (no Hub here; the calls go to a recorder): the dataset configs and card to REPO, the
    adapter dir with its card to REPO-<recipe>, and export.json says where."""
    import datasets
    import huggingface_hub

    calls: list[tuple] = []

    class Api:
        def create_repo(self, repo_id, repo_type=None, exist_ok=False):
            calls.append(("create_repo", repo_id, repo_type, exist_ok))

        def upload_folder(self, folder_path, repo_id, repo_type, commit_message):
            files = sorted(p.name for p in Path(folder_path).iterdir())
            config = json.loads((Path(folder_path) / "adapter_config.json").read_text())
            calls.append(("upload_folder", repo_id, repo_type, files, config["base_model_name_or_path"]))

        def upload_file(self, path_or_fileobj, path_in_repo, repo_id, repo_type):
            calls.append(("upload_file", path_in_repo, repo_id, repo_type))

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(
        datasets.DatasetDict, "push_to_hub", lambda self, repo, config_name: calls.append(("data", repo, config_name))
    )
    run = tmp_path / "run"
    write_run(run)
    write_adapter(run / "train" / "complexity_aware" / "phase2", tiny_model_dir)
    cfg = load_config(DEMO, [f"run_dir={run}", "score.student.path=org/student"])
    summary = export(cfg, ["complexity_aware"], push_to_hub="me/cat")
    assert ("data", "me/cat", "complexity_aware") in calls and ("data", "me/cat", "taught") in calls
    assert ("upload_file", "README.md", "me/cat", "dataset") in calls
    assert ("create_repo", "me/cat-complexity_aware", "model", True) in calls
    (upload,) = [c for c in calls if c[0] == "upload_folder"]
    assert upload[1:3] == ("me/cat-complexity_aware", "model") and upload[4] == "org/student"
    assert {"README.md", "adapter_config.json", "adapter_model.safetensors"} <= set(upload[3])
    written = json.loads((run / "export" / "export.json").read_text())["pushed_to"]
    assert (
        written
        == summary["pushed_to"]
        == {
            "dataset": "me/cat",
            "models": {"me/cat-complexity_aware": str(run / "export/models/complexity_aware/model")},
        }
    )


def test_an_empty_last_phase_exports_the_phase_before_it_as_the_recipes_model(tmp_path, tiny_model_dir):
    """The demo's usual outcome: the teacher verified no CoT, phase 2 was skipped as empty, so the recipe's
    model is phase 1's; the card says why, and the request and lm-eval task use phase 1's answer prompt."""
    run = tmp_path / "run"
    write_run(run)
    write_adapter(run / "train" / "complexity_aware" / "phase1", tiny_model_dir)
    why = "no rows to train on (cot target, bands hard)"
    rundir.write_json(str(run / "train/complexity_aware/phase2/done.json"), {"hash": "y", "empty": why})
    summary = export(load_config(DEMO, [f"run_dir={run}"]), ["complexity_aware"])
    entry = summary["models"]["complexity_aware"]["model"]
    assert entry["phase"] == "phase1" and entry["not_trained"] == {"phase2": why}
    assert entry["from"] == str(run / "train/complexity_aware/phase1/model")
    card = (run / "export/models/complexity_aware/model/README.md").read_text()
    assert f"This is phase1's model: phase2 has none, {why}" in card
    request = json.loads((run / "export/models/complexity_aware/request.json").read_text())
    assert request["max_tokens"] == 16  # the demo's answer budget
    test = pd.read_parquet(run / "split" / "test.parquet").iloc[0]
    assert request["messages"] == train_messages(
        test["question"], list(test["options"]), test["category"] or "", "answer"
    )
    task = (run / "export/lm_eval_tasks/raycat_complexity_aware.yaml").read_text()
    assert "heldout_answer.jsonl" in task and "max_gen_toks: 16" in task


def test_a_recipe_still_training_exports_no_model(tmp_path, tiny_model_dir):
    run = tmp_path / "run"
    write_run(run)
    write_adapter(run / "train" / "complexity_aware" / "phase1", tiny_model_dir)
    assert export(load_config(DEMO, [f"run_dir={run}"]), ["complexity_aware"])["models"] == {}


def test_a_registry_base_is_named_by_its_upstream_hub_id():
    from raycat.storage.models import REGISTRY, base_reference

    name, spec = next(iter(REGISTRY.items()))
    assert base_reference(f"registry:{name}") == spec.upstream
    assert base_reference("org/model") == "org/model" and base_reference("s3://b/m") == "s3://b/m"


def test_an_s3_run_dir_exports_next_to_itself(monkeypatch, tmp_path, tiny_model_dir):
    """The cluster's path: run dir and export on an object store (moto's S3 server on loopback)."""
    import boto3

    from tests.helpers import moto_s3

    local = tmp_path / "run"
    write_run(local)
    write_adapter(local / "train" / "complexity_aware" / "phase2", tiny_model_dir)
    with moto_s3(tmp_path / "s3.log") as aws:
        for key, value in aws.items():
            monkeypatch.setenv(key, value)
        boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"]).create_bucket(Bucket="runs")
        rundir.upload_dir(str(local), "s3://runs/r")
        cfg = load_config(DEMO, ["run_dir=s3://runs/r", "score.student.path=org/student-1b"])
        summary = export(cfg, ["complexity_aware"])
        out = "s3://runs/r/export"
        assert summary["out"] == out
        lines = rundir.read_bytes(f"{out}/complexity_aware/phase2/messages.jsonl").decode().splitlines()
        assert len(lines) == 11 and json.loads(lines[0])["messages"][-1]["role"] == "assistant"
        adapter = rundir.read_json(f"{out}/models/complexity_aware/model/adapter_config.json")
        assert adapter["base_model_name_or_path"] == "org/student-1b"
        assert rundir.exists(f"{out}/hf/complexity_aware/dataset_dict.json")
        assert rundir.read_json(f"{out}/export.json")["models"]["complexity_aware"]["model"]["kind"] == "adapter"


def test_an_empty_phase_and_no_taught_rows_export_empty_files(tmp_path):
    """No CoT at all (the teacher was never right, teach.on_wrong=drop): phase 2 is empty, not missing."""
    datasets = pytest.importorskip("datasets")
    run = tmp_path / "run"
    write_run(run)
    cot = pd.read_parquet(run / "teach" / "cot.parquet")
    cot.iloc[:0].to_parquet(run / "teach" / "cot.parquet")
    summary = export(load_config(DEMO, [f"run_dir={run}"]), ["complexity_aware"])
    assert summary["recipes"]["complexity_aware"]["phase2"]["rows"] == 0 and summary["taught"]["rows"] == 0
    assert (run / "export/complexity_aware/phase2/messages.jsonl").read_text() == ""
    assert len(datasets.load_from_disk(str(run / "export/hf/complexity_aware"))["phase2"]) == 0
    # The card's configs hold the splits with rows: the dir loads as a Hub repo would (the demo's case).
    loaded = datasets.load_dataset(str(run / "export"), "complexity_aware", download_mode="force_redownload")
    assert {k: len(v) for k, v in loaded.items()} == {"phase1": 27}


def test_the_readme_command_with_the_demo_config_s_relative_run_dir(tmp_path, monkeypatch):
    """The user's path: `raycat export --config jobs/configs/demo-cpu.yaml` from the directory the run
    was made in, its run_dir relative (runs/demo-cpu)."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(DEMO, [])
    assert not cfg.run_dir.startswith("/")
    write_run(tmp_path / cfg.run_dir)
    assert main(["export", "--config", str(DEMO)]) == 0
    out = tmp_path / cfg.run_dir / "export"
    assert len(jsonl(out / "complexity_aware" / "phase2" / "messages.jsonl")) == 11
    assert json.loads((out / "export.json").read_text())["out"] == f"{cfg.run_dir}/export"


def test_the_held_out_rows_become_an_lm_eval_task_in_the_trained_prompt(exported, monkeypatch):
    """lm-eval's own TaskManager reads the exported task (run from the export dir, as README says), its
    docs are the held-out rows, the chat prompt is the recipe's training prompt, and its filter scores
    the last [[...]] against the gold."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager, get_task_dict

    out, _, _, summary = exported
    test = pd.read_parquet(out.parent / "split" / "test.parquet")
    assert summary["lm_eval"] == {
        "rows": len(test),
        "tasks": ["raycat_complexity_aware", "raycat_sft_all"],
        "dir": "lm_eval_tasks",
    }
    monkeypatch.chdir(out)
    manager = TaskManager(include_path=str(out / "lm_eval_tasks"))
    tasks = get_task_dict(["raycat_complexity_aware", "raycat_sft_all"], manager)
    for recipe, kind in (("complexity_aware", "cot"), ("sft_all", "answer")):
        task = tasks[f"raycat_{recipe}"]
        docs = list(task.test_docs())
        assert [d["id"] for d in docs] == test["id"].tolist()
        for doc, row in zip(docs, test.itertuples(), strict=True):
            chat: list = []
            task.fewshot_context(
                doc, 0, apply_chat_template=True, chat_template=lambda m, _c=chat, **kw: _c.append(m) or ""
            )
            assert chat[0] == train_messages(row.question, list(row.options), row.category or "", kind)
            assert task.doc_to_target(doc) == row.gold
        budget = task.config.generation_kwargs["max_gen_toks"]
        assert budget == (16 if kind == "answer" else 256)  # the demo's eval budgets
    ensemble = tasks["raycat_complexity_aware"]._filters[0]
    from lm_eval.api.instance import Instance

    inst = Instance("generate_until", docs[0], ("x", {}), 0)
    inst.resps = ["Think: [[A]] no, [[ b. ]]"]
    ensemble.apply([inst])
    assert inst.filtered_resps["last_bracket"] == "b."
    # Scored against the gold as written, case and punctuation ignored.
    task = tasks["raycat_complexity_aware"]
    assert task.process_results({**docs[0], "gold": "B"}, ["b."])["exact_match"] == 1.0
    assert task.process_results({**docs[0], "gold": "B"}, ["A"])["exact_match"] == 0.0
