# imaging_assets — every target sets itself up from a fresh clone (virtualenv, install, demo data).
# `make demo`  generate the demo cohort if missing and materialize every asset on it
# `make test`  lint (ruff) and run the whole test suite
# `make dev`   the Dagster UI (http://127.0.0.1:3000) with a persistent DAGSTER_HOME (yours, else .dagster_home),
#              and the pictures server (http://127.0.0.1:8321) its asset pages show plots and lesions from;
#              `make dev INSTANCE=postgres` uses the PostgreSQL profile (dagster-postgres.yaml, DAGSTER_PG_* env)
# `make cluster`      PostgreSQL + Redis + WORKERS Celery workers + the daemon + the UI on this machine
# `make demo-cluster` (another shell, while `make cluster` runs) the demo with the extraction on the workers
# `make workers`      WORKERS Celery workers on the broker of DAGSTER_CELERY_BROKER_URL (your own servers)

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# INSTANCE=postgres: the PostgreSQL instance profile (dagster-postgres.yaml) in its own .dagster_home-postgres
INSTANCE ?= sqlite
INSTANCE_FILE := $(if $(filter postgres,$(INSTANCE)),dagster-postgres.yaml,dagster.yaml)
DAGSTER_HOME_DIR := $(CURDIR)/.dagster_home$(if $(filter postgres,$(INSTANCE)),-postgres,)
WORKERS ?= 2
CLUSTER_DIR := $(CURDIR)/.cluster
DEMO_DIR ?= data/demo
DEMO_PATIENTS ?= 100
PORT ?= 3000
# imaging-assets serve: the pictures the asset pages show (make dev starts it; make demo links to it)
PICTURES_PORT ?= 8321
PICTURES_URL ?= http://127.0.0.1:$(PICTURES_PORT)/pictures
# Your DAGSTER_HOME (environment or `make dev DAGSTER_HOME=...`) when set and not empty, else .dagster_home
# in the repo (`?=` semantics); Dagster wants an absolute path, so a relative one is taken from the repo root.
ifeq ($(strip $(DAGSTER_HOME)),)
override DAGSTER_HOME := $(DAGSTER_HOME_DIR)
endif
override DAGSTER_HOME := $(abspath $(DAGSTER_HOME))
export DAGSTER_HOME
# The synthetic demo is pseudonymised with an explicit, public demo key (never used for real data: there is
# no built-in key; without IMAGING_ASSETS_PSEUDONYM_KEY the pipeline makes a random per-installation key file).
# `make dev` uses it too while neither DICOM roots nor a key of yours are configured (the demo warehouse).
DEMO_PSEUDONYM_KEY := imaging-assets-demo-key-for-synthetic-data-only
DEV_KEY_ENV := $(if $(strip $(IMAGING_ASSETS_DICOM_ROOTS)$(IMAGING_ASSETS_PSEUDONYM_KEY)),,IMAGING_ASSETS_PSEUDONYM_KEY=$(DEMO_PSEUDONYM_KEY))
# Quieter, reproducible installs: exact versions come from constraints.txt.
PIP := $(BIN)/python -m pip --disable-pip-version-check

.PHONY: help install demo test dev cluster demo-cluster workers clean-demo clean

help:
	@echo "make demo   - set up, generate data/demo if missing, materialize all assets, print a summary"
	@echo "make test   - set up and run the whole test suite"
	@echo "make dev    - Dagster UI on http://127.0.0.1:$(PORT) (DAGSTER_HOME=$(DAGSTER_HOME)), pictures on $(PICTURES_URL)"
	@echo "make cluster / demo-cluster / workers - PostgreSQL + Redis + Celery workers (README: Running on a cluster)"

install: $(STAMP)

# Reinstalls when pyproject.toml or constraints.txt change. pyradiomics has no wheel for Python >= 3.10
# and its sdist needs numpy at build time: build tools and numpy first, then pyradiomics without build
# isolation, then the project (editable) with its dev extras, everything pinned by constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || { echo "error: no python3.11/3.12 found" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade "pip>=24"
	$(PIP) install -q -c constraints.txt numpy setuptools wheel versioneer
	$(PIP) install -q -c constraints.txt --no-build-isolation pyradiomics
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

# The repo's own .dagster_home follows dagster.yaml; a DAGSTER_HOME of yours gets it only when it has none.
ifeq ($(DAGSTER_HOME),$(DAGSTER_HOME_DIR))
$(DAGSTER_HOME)/dagster.yaml: $(INSTANCE_FILE)
	@mkdir -p $(@D)
	@cp $(INSTANCE_FILE) $@
else
$(DAGSTER_HOME)/dagster.yaml: | $(INSTANCE_FILE)
	@mkdir -p $(@D)
	@cp $(INSTANCE_FILE) $@
	@echo "copied $(INSTANCE_FILE) to $@"
endif

demo: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/imaging-assets demo-data --out $(DEMO_DIR) --patients $(DEMO_PATIENTS) --if-missing
	IMAGING_ASSETS_PSEUDONYM_KEY=$(DEMO_PSEUDONYM_KEY) \
	IMAGING_ASSETS_DICOM_ROOTS=$(CURDIR)/$(DEMO_DIR)/dicom IMAGING_ASSETS_PICTURES_URL=$(PICTURES_URL) \
	  $(BIN)/dagster job execute -m imaging_assets.definitions -j refresh_job
	IMAGING_ASSETS_PSEUDONYM_KEY=$(DEMO_PSEUDONYM_KEY) \
	IMAGING_ASSETS_DICOM_ROOTS=$(CURDIR)/$(DEMO_DIR)/dicom IMAGING_ASSETS_PICTURES_URL=$(PICTURES_URL) \
	  $(BIN)/imaging-assets cohort largest_lesion --largest -k 20
	$(BIN)/imaging-assets summary

test: $(STAMP)
	$(BIN)/ruff check imaging_assets tests benchmarks
	@rc=0; $(BIN)/python -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests" >&2; exit 1; fi; exit $$rc

# The pictures server (imaging-assets serve) runs beside the UI, so plots and lesion pictures show inline
# on asset pages; it stops with the UI.
dev: $(STAMP) $(DAGSTER_HOME)/dagster.yaml
	@echo "DAGSTER_HOME=$(DAGSTER_HOME)"
	@echo "pictures (imaging-assets serve): $(PICTURES_URL)"
	@$(BIN)/imaging-assets serve --host 127.0.0.1 --port $(PICTURES_PORT) & serve=$$!; \
	trap 'kill $$serve 2>/dev/null || true' EXIT INT TERM; \
	$(DEV_KEY_ENV) IMAGING_ASSETS_PICTURES_URL=$(PICTURES_URL) $(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p $(PORT)

# One machine as a cluster: real PostgreSQL and Redis servers in .cluster/ (loopback, free ports), WORKERS
# Celery workers, the daemon and the UI on the PostgreSQL instance; foreground, Ctrl-C stops everything.
cluster: $(STAMP)
	$(DEV_KEY_ENV) IMAGING_ASSETS_PICTURES_URL=$(PICTURES_URL) \
	  $(BIN)/python -m imaging_assets.localcluster up --dir $(CLUSTER_DIR) --workers $(WORKERS) --port $(PORT)

# The demo on the running `make cluster`: discovery and lesions, the extraction backfilled on the Celery
# workers (one run per batch of series), then the rest of the chain (which only loads the batches).
demo-cluster: $(STAMP)
	@test -f $(CLUSTER_DIR)/env.sh || { echo "error: start \`make cluster\` in another shell first" >&2; exit 1; }
	$(BIN)/imaging-assets demo-data --out $(DEMO_DIR) --patients $(DEMO_PATIENTS) --if-missing
	source $(CLUSTER_DIR)/env.sh; export IMAGING_ASSETS_PSEUDONYM_KEY=$(DEMO_PSEUDONYM_KEY) \
	  IMAGING_ASSETS_DICOM_ROOTS=$(CURDIR)/$(DEMO_DIR)/dicom IMAGING_ASSETS_PICTURES_URL=$(PICTURES_URL); \
	$(BIN)/dagster asset materialize -m imaging_assets.definitions --select dicom_files,imaging_series,segmentations,lesions && \
	$(BIN)/imaging-assets backfill --job extraction_celery_job --wait && \
	$(BIN)/dagster job execute -m imaging_assets.definitions -j refresh_job && \
	$(BIN)/imaging-assets summary

# Celery workers for your own broker and PostgreSQL instance (DAGSTER_HOME, DAGSTER_CELERY_BROKER_URL,
# DAGSTER_CELERY_BACKEND_URL set); start this on every worker machine.
workers: $(STAMP)
	$(BIN)/python -m imaging_assets.localcluster workers -n $(WORKERS) --dir $(CLUSTER_DIR)

clean-demo:
	rm -rf $(DEMO_DIR) data/warehouse

clean: clean-demo
	rm -rf $(VENV) $(DAGSTER_HOME_DIR)
