"""Real Ray Train + DeepSpeed (2 CPU workers, gloo) on a tiny local model: two phases, export, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from raycat.config import validate_config
from raycat.testing.tiny_models import build_tiny_train_run as make_run

pytestmark = pytest.mark.filterwarnings("ignore")


def config(run: Path, model_dir: Path, **train) -> dict:
    base = {
        "method": "lora",
        "num_workers": 2,
        "deepspeed": {"zero_stage": 2},
        "save_steps": 2,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "phase1": {"epochs": 2, "lr": 0.003, "micro_batch_size": 4, "max_length": 256},
        "phase2": {"epochs": 2, "lr": 0.003, "micro_batch_size": 2, "max_length": 256},
    }
    for k, v in train.items():
        base[k] = {**base[k], **v} if isinstance(v, dict) and k in base else v
    return {
        "run_dir": str(run),
        "data": {"source": "synthetic"},
        "score": {"student": {"path": str(model_dir), "max_model_len": 512}},
        "train": base,
        "ray": {"num_cpus": 2},
    }


def _tensors(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (model_dir / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(model_dir / name)


def _assert_phase2_started_from_phase1(phases: dict) -> None:
    fp = phases["phase2"]["init_fingerprint"]
    trained = _tensors(Path(phases["phase1"]["model"]))
    assert fp and set(fp) <= set(trained)
    for name, total in fp.items():
        assert total == pytest.approx(float(trained[name].double().sum()), rel=1e-5, abs=1e-6), name
    # ... and phase 1 did move those weights away from where phase 1 started.
    assert any(abs(phases["phase1"]["init_fingerprint"][k] - v) > 1e-6 for k, v in fp.items())


def _generate_vllm(model_dir: Path, adapter: str | None = None) -> str:
    from transformers import AutoTokenizer

    from raycat.data.prompts import render_ids, train_messages
    from raycat.engines.base import Sampling
    from raycat.engines.vllm_engine import VLLMEngine

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = render_ids(tok, train_messages("What is 3 plus one?", ["x", "y", "z", "w"], "math", "answer"))
    llm = VLLMEngine(str(model_dir), dtype="float32", max_model_len=512, kv_cache_gib=0.25, lora_adapter=adapter)
    try:
        gen = llm.generate([ids], Sampling(0.0, 1.0, 8, 0, 1))
    finally:
        llm.close()
    assert gen[0].completion_tokens > 0
    return gen[0].text


@pytest.mark.vllm
@pytest.mark.integration
def test_lora_zero2_two_phases_export_merge_and_rerun(tmp_path, tiny_model_dir):
    from peft import AutoPeftModelForCausalLM

    from raycat.recipes import phase_settings
    from raycat.train.stage import run_train

    run = make_run(tmp_path / "run", tiny_model_dir)
    cfg = validate_config(config(run, tiny_model_dir, lora={"merge": True}))
    s = run_train(cfg, say=lambda m: None)
    p1, p2 = s["phases"]["phase1"], s["phases"]["phase2"]
    assert p1["status"] == p2["status"] == "trained"
    p2_history = json.loads((run / f"train/{cfg.train.recipe}/phase2/metrics.json").read_text())["history"]
    assert p1["examples"] == 18 and p2["examples"] == 6 and p1["steps"] == 6  # 18 rows / 2 workers / 4 -> 3 x 2 epochs
    assert p1["last_loss"] < 0.5 * p1["first_loss"]  # a memorisable toy set
    assert p2["last_loss"] < p2["first_loss"]
    _assert_phase2_started_from_phase1(s["phases"])
    # The adapter loads in transformers (peft) and generates; the merged model (a Ray task's output)
    # loads in vLLM, and vLLM serving the adapter on the base model (what eval does) answers the same.
    model = AutoPeftModelForCausalLM.from_pretrained(p2["model"])
    import torch

    out = model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 3
    assert _generate_vllm(Path(p2["merged"])) == _generate_vllm(tiny_model_dir, adapter=p2["model"])
    # Both phases ran in one worker group (one fit, named after phase 2): phase 2 paid no worker start.
    assert p2["startup"]["worker_group_s"] == 0 and p1["startup"]["worker_group_s"] > 0
    assert p1["checkpoints"] == p2["checkpoints"] and p2["checkpoints"].endswith(
        f"phase2/checkpoints/phase2-{p2['hash']}"
    )
    # A rerun of the same command trains nothing.
    t0 = time.time()
    again = run_train(cfg, say=lambda m: None)
    assert {v["status"] for v in again["phases"].values()} == {"cached"} and time.time() - t0 < 60
    # done.json records the settings eval checks; a change that makes the same weights (fp32 is what
    # 'auto' means on CPU) retrains nothing and records the new settings, so eval accepts the models.
    done = json.loads((run / f"train/{cfg.train.recipe}/phase2/done.json").read_text())
    assert done["settings"] == phase_settings(cfg, cfg.train.recipe, "phase2")
    fp32 = cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": "fp32"})})
    assert {v["status"] for v in run_train(fp32, say=lambda m: None)["phases"].values()} == {"cached"}
    done = json.loads((run / f"train/{cfg.train.recipe}/phase2/done.json").read_text())
    assert (
        done["settings"]
        == phase_settings(fp32, cfg.train.recipe, "phase2")
        != phase_settings(cfg, cfg.train.recipe, "phase2")
    )
    # Phase 2 fit on its own (a new worker group, from phase 1's export) trains exactly as it did after
    # phase 1 in the shared group.
    import shutil

    (run / f"train/{cfg.train.recipe}/phase2/done.json").unlink()
    shutil.rmtree(run / f"train/{cfg.train.recipe}/phase2/checkpoints")
    alone = run_train(cfg, say=lambda m: None)["phases"]
    assert alone["phase1"]["status"] == "cached" and alone["phase2"]["startup"]["worker_group_s"] > 0
    h_alone = json.loads((run / f"train/{cfg.train.recipe}/phase2/metrics.json").read_text())["history"]
    assert [h["loss"] for h in h_alone] == pytest.approx([h["loss"] for h in p2_history], rel=1e-5)


@pytest.mark.vllm
@pytest.mark.integration
def test_full_zero3_two_phases_gathers_weights_for_export(tmp_path, tiny_model_dir):
    from raycat.train.stage import run_train

    run = make_run(tmp_path / "run", tiny_model_dir)
    cfg = validate_config(
        config(
            run, tiny_model_dir, method="full", deepspeed={"zero_stage": 3}, phase1={"lr": 0.001}, phase2={"lr": 0.001}
        )
    )
    s = run_train(cfg, say=lambda m: None)
    p1, p2 = s["phases"]["phase1"], s["phases"]["phase2"]
    assert p1["last_loss"] < p1["first_loss"] and p2["last_loss"] < p2["first_loss"]
    _assert_phase2_started_from_phase1(s["phases"])
    weights = _tensors(Path(p2["model"]))
    base = _tensors(Path(tiny_model_dir))
    assert set(weights) == set(base) and all(weights[k].shape == base[k].shape for k in base)  # gathered, not shards
    # The gathered full weights load in vLLM and generate.
    _generate_vllm(Path(p2["model"]))


def _phase2_checkpointed(ckpts: Path) -> bool:
    """Ray Train registered a phase-2 checkpoint. Phases 1 and 2 run in one fit named after phase 2, so
    its snapshot lists phase 1's checkpoints first."""
    for snap in ckpts.glob("*/checkpoint_manager_snapshot.json"):
        try:
            if "phase2_step_" in snap.read_text():
                return True
        except OSError:
            pass
    return False


def _train_workers(root_pid: int) -> list:
    import psutil

    procs = psutil.Process(root_pid).children(recursive=True)
    out = []
    for p in procs:
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()):
                out.append(p)
        except psutil.Error:
            pass
    return out


@pytest.mark.integration
def test_killed_worker_in_phase2_resumes_from_checkpoint_without_redoing_phase1(tmp_path, tiny_model_dir):
    run = make_run(tmp_path / "run", tiny_model_dir)
    tree = config(
        run, tiny_model_dir, save_steps=20, max_failures=2, phase2={"epochs": 30, "micro_batch_size": 1, "lr": 0.001}
    )
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tree))
    ckpts = run / "train/complexity_aware/phase2/checkpoints"
    proc = subprocess.Popen(
        [sys.executable, "-m", "raycat.cli", "train", "--config", str(cfg_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    killed = None
    try:
        deadline = time.time() + 400
        while time.time() < deadline and killed is None:
            assert proc.poll() is None, "raycat train exited before phase 2 wrote a checkpoint"
            # Ray Train writes its snapshot once a checkpoint is registered (every rank reported it); a
            # step_* directory alone may still be uploading, and a restart would then start over.
            if _phase2_checkpointed(ckpts):
                workers = _train_workers(proc.pid)
                if workers:
                    killed = workers[-1].pid
                    phase1_done = (run / "train/complexity_aware/phase1/done.json").stat().st_mtime_ns
                    # A process of the session this test started.
                    os.kill(killed, signal.SIGKILL)
            time.sleep(0.05)
        assert killed is not None, "no phase-2 checkpoint / train worker seen in time"
        assert proc.wait(timeout=400) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    m2 = json.loads((run / "train/complexity_aware/phase2/metrics.json").read_text())
    assert m2["resumed_from_step"] is not None and m2["resumed_from_step"] >= 20  # restarted from a checkpoint
    assert [h["step"] for h in m2["history"]] == list(range(1, m2["total_steps"] + 1))  # no step lost or doubled
    assert (run / "train/complexity_aware/phase1/done.json").stat().st_mtime_ns == phase1_done  # phase 1 not rerun


@pytest.mark.slow
@pytest.mark.parametrize("stage,method", [(3, "lora"), (2, "full")], ids=["zero3-lora", "zero2-full"])
def test_other_zero_stage_and_method_combinations(tmp_path, tiny_model_dir, stage, method):
    from raycat.train.stage import run_train

    run = make_run(tmp_path / "run", tiny_model_dir)
    lr = {"lr": 0.003 if method == "lora" else 0.001}
    s = run_train(
        validate_config(
            config(
                run,
                tiny_model_dir,
                method=method,
                deepspeed={"zero_stage": stage},
                gradient_checkpointing=True,
                phase1=lr,
                phase2=lr,
            )
        ),
        say=lambda m: None,
    )
    p1, p2 = s["phases"]["phase1"], s["phases"]["phase2"]
    assert p1["last_loss"] < p1["first_loss"] and p2["last_loss"] < p2["first_loss"]
    _assert_phase2_started_from_phase1(s["phases"])


@pytest.mark.slow
def test_curriculum_runs_three_phases_each_from_the_last(tmp_path, tiny_model_dir):
    from raycat.train.stage import run_train

    run = make_run(tmp_path / "run", tiny_model_dir)
    tree = config(
        run,
        tiny_model_dir,
        recipe="curriculum",
        num_workers=1,
        deepspeed={"zero_stage": 0},
        phase3={"epochs": 2, "lr": 0.003, "micro_batch_size": 2, "max_length": 256},
    )
    s = run_train(validate_config(tree), say=lambda m: None)
    assert [(k, v["target"], v["examples"]) for k, v in s["phases"].items()] == [
        ("phase1", "answer", 6),
        ("phase2", "answer", 12),
        ("phase3", "answer", 6),
    ]
    for prev, cur in (("phase1", "phase2"), ("phase2", "phase3")):
        _assert_phase2_started_from_phase1({"phase1": s["phases"][prev], "phase2": s["phases"][cur]})


@pytest.mark.slow
def test_an_empty_middle_phase_does_not_split_the_worker_group(tmp_path, tiny_model_dir):
    """Curriculum with an empty medium band: phase 2 is skipped, and phases 1 and 3 train in one fit
    (named after phase 3) with phase 3 starting from phase 1's export."""
    import pandas as pd

    from raycat.train.stage import run_train

    run = make_run(tmp_path / "run", tiny_model_dir)
    medium = pd.read_parquet(run / "split/medium.parquet")
    medium.iloc[:0].to_parquet(run / "split/medium.parquet")
    tree = config(run, tiny_model_dir, recipe="curriculum", num_workers=1, deepspeed={"zero_stage": 0})
    tree["train"]["phase3"] = {"epochs": 1, "lr": 0.003, "micro_batch_size": 2, "max_length": 256}
    s = run_train(validate_config(tree), say=lambda m: None)
    p1, p2, p3 = (s["phases"][k] for k in ("phase1", "phase2", "phase3"))
    assert (p1["status"], p2["status"], p3["status"]) == ("trained", "empty", "trained")
    assert json.loads((run / "train/curriculum/phase2/done.json").read_text())["empty"]
    assert p3["startup"]["worker_group_s"] == 0  # the same workers as phase 1
    assert p1["checkpoints"] == p3["checkpoints"] and p3["checkpoints"].endswith(f"phase3-{p3['hash']}")
    _assert_phase2_started_from_phase1({"phase1": p1, "phase2": p3})


@pytest.mark.slow
def test_rerun_after_the_whole_job_is_killed_resumes_phase2_from_its_checkpoint(tmp_path, tiny_model_dir):

    run = make_run(tmp_path / "run", tiny_model_dir)
    tree = config(run, tiny_model_dir, save_steps=20, phase2={"epochs": 30, "micro_batch_size": 1, "lr": 0.001})
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(tree))
    ckpts = run / "train/complexity_aware/phase2/checkpoints"
    cmd = [sys.executable, "-m", "raycat.cli", "train", "--config", str(cfg_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and not _phase2_checkpointed(ckpts):
            assert proc.poll() is None, "raycat train exited before phase 2 registered a checkpoint"
            time.sleep(0.05)
    finally:
        # Driver, Ray and workers: the session this test started.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    phase1_done = (run / "train/complexity_aware/phase1/done.json").stat().st_mtime_ns
    assert not (run / "train/complexity_aware/phase2/done.json").exists()
    _refuses_a_checkpoint_without_its_feed_layout(cmd, ckpts)
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "phase1: already trained" in again.stderr
    m2 = json.loads((run / "train/complexity_aware/phase2/metrics.json").read_text())
    assert m2["resumed_from_step"] is not None and m2["resumed_from_step"] >= 20
    assert [h["step"] for h in m2["history"]] == list(range(1, m2["total_steps"] + 1))
    assert (run / "train/complexity_aware/phase1/done.json").stat().st_mtime_ns == phase1_done


def _refuses_a_checkpoint_without_its_feed_layout(cmd: list, ckpts: Path) -> None:
    """The rerun the user makes over a mid-epoch checkpoint written before raycat recorded its feed
    layout (state.json without "feed"): the command fails with the refusal and its fix before any step
    (Ray Train's restarts, train.max_failures, refuse again); the checkpoints are left as they were."""
    states = sorted(ckpts.glob("*/phase2_step_*/state.json"))
    assert states, "no phase-2 checkpoint state"
    kept = {p: p.read_text() for p in states}
    for p, text in kept.items():
        state = json.loads(text)
        # 6 hard rows on 2 workers, one per micro-batch: 3 steps an epoch, checkpoints every 20, each
        # with micro-batches consumed in its epoch (an epoch's last step saves before the count resets).
        assert state["batch"] > 0, "the fixture's checkpoints count consumed micro-batches"
        del state["feed"]
        p.write_text(json.dumps(state))
    try:
        refused = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    finally:
        for p, text in kept.items():
            # A rerun that was not refused trained on and pruned old checkpoints.
            if p.parent.exists():
                p.write_text(text)
    assert refused.returncode != 0
    err = refused.stderr
    assert "phase2: the latest checkpoint stopped mid-epoch" in err and "did not record" in err, err[-3000:]
    assert f"remove the fit's checkpoints, {ckpts}" in err and "rerun the command to resume" not in err
    assert not (ckpts.parent / "done.json").exists()


def test_template_mismatch_with_scoring_is_an_error_unless_allowed(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from raycat.errors import RaycatError
    from raycat.train.stage import check_template, input_paths

    run = make_run(tmp_path / "run", tiny_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg = validate_config(config(run, tiny_model_dir))
    bands, _ = input_paths(cfg)
    assert check_template(cfg, tok, bands)  # scored with this very template
    tok.chat_template = tok.chat_template.replace("<|im_start|>", "<|im_start|> ")
    with pytest.raises(RaycatError, match="differs from the one the rows were scored with"):
        check_template(cfg, tok, bands)
    allowed = validate_config(config(run, tiny_model_dir, allow_template_mismatch=True))
    assert check_template(allowed, tok, bands)


def test_mlflow_default_uri_is_a_file_store_in_the_run_dir(tmp_path, tiny_model_dir, monkeypatch):
    from raycat.train.stage import tracking_uri

    monkeypatch.chdir(tmp_path)
    tree = config(Path("runs/x"), tiny_model_dir, tracking="mlflow")
    assert tracking_uri(validate_config(tree)) == (tmp_path / "runs/x/mlruns").as_uri()  # not a worker's ./mlruns
    tree["train"]["tracking_uri"] = "http://mlflow.internal:5000"
    assert tracking_uri(validate_config(tree)) == "http://mlflow.internal:5000"
    # MLflow's scheme-less Databricks URI is not a path (review m17); a plain relative path is.
    tree["train"]["tracking_uri"] = "databricks"
    assert tracking_uri(validate_config(tree)) == "databricks"
    tree["train"]["tracking_uri"] = "logs/mlflow"
    assert tracking_uri(validate_config(tree)) == (tmp_path / "logs/mlflow").as_uri()


@pytest.mark.integration
def test_mlflow_gets_one_run_per_phase_from_the_shared_worker_group(tmp_path, tiny_model_dir, monkeypatch):
    """A real MLflow file store, as a user gets it: tracking on, no URI, a relative run_dir. The two
    phases run in one worker process (whose cwd is not the driver's); each gets its own run in
    <run_dir>/mlruns with its own parameters and every step's loss."""
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    from raycat.train.stage import run_train

    make_run(tmp_path / "run", tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    uri = (tmp_path / "run" / "mlruns").as_uri()
    tree = config(
        Path("run"),
        tiny_model_dir,
        num_workers=1,
        tracking="mlflow",
        tracking_project="raycat-test",
        phase1={"epochs": 1, "max_steps": 3},
        phase2={"epochs": 1, "max_steps": 2},
    )
    tree["train"]["log_every_steps"] = 1
    s = run_train(validate_config(tree), say=lambda m: None)
    # This reader's opt-in, as the workers' own.
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("raycat-test")
    runs = {r.data.params["phase"]: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"phase1", "phase2"}
    for phase, r in runs.items():
        assert r.info.status == "FINISHED" and r.data.params["recipe"] == "complexity_aware"
        losses = client.get_metric_history(r.info.run_id, "loss")
        assert [m.step for m in losses] == list(range(1, s["phases"][phase]["steps"] + 1))
        assert losses[-1].value == pytest.approx(s["phases"][phase]["last_loss"], rel=1e-6)


@pytest.mark.integration
def test_train_cli_names_the_missing_stage(tmp_path, tiny_model_dir):
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config(tmp_path / "empty-run", tiny_model_dir)))
    r = subprocess.run(
        [sys.executable, "-m", "raycat.cli", "train", "--config", str(cfg_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1
    assert "pre-flight" in r.stderr and "run `raycat split`" in " ".join(r.stderr.split())


@pytest.mark.integration
def test_an_empty_phase_with_on_empty_phase_error_stops_before_any_training(tmp_path, tiny_model_dir):
    import pandas as pd

    run = make_run(tmp_path / "run", tiny_model_dir)
    pd.read_parquet(run / "teach/cot.parquet").iloc[:0].to_parquet(run / "teach/cot.parquet")  # nothing verified
    cfg_path = tmp_path / "cfg.yaml"
    cfg_path.write_text(yaml.safe_dump(config(run, tiny_model_dir, on_empty_phase="error")))
    r = subprocess.run(
        [sys.executable, "-m", "raycat.cli", "train", "--config", str(cfg_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    err = " ".join(r.stderr.split())
    assert r.returncode == 1 and "phase2: no rows to train on (cot target, bands hard)" in err
    assert "train.on_empty_phase=skip" in err
    assert not (run / "train/complexity_aware/phase1/done.json").exists()  # phase 1 did not train first
