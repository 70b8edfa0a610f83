# The workshop's entry points. `make lab` and `make test` work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export LABS_BUILD_DIR ?= $(CURDIR)/build
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/build/torch_extensions
JUPYTER_ENV := JUPYTER_CONFIG_DIR=$(CURDIR)/build/jupyter/config JUPYTER_DATA_DIR=$(CURDIR)/build/jupyter/data \
	JUPYTER_RUNTIME_DIR=$(CURDIR)/build/jupyter/runtime IPYTHONDIR=$(CURDIR)/build/jupyter/ipython
PYTEST_ARGS ?=

.PHONY: setup lab run-all tensorboard test lint bench clean

setup: $(STAMP)

$(STAMP): requirements.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m labs_lib.train.deepspeed.setup  # JIT-build DeepSpeed's CPU ops once (~70 s), not in every job
	touch $@

lab: setup  ## JupyterLab on 127.0.0.1 with a token, opened at notebooks/ (and a Slurm cluster waiting)
	@mkdir -p build/jupyter
	@$(BIN)/python -m labs_lib.jobs.slurm up || echo "NOTICE: no Slurm cluster; the labs launch their jobs with torchrun"
	@[ -f build/slurm/env.sh ] && [ -z "$${SLURM_CONF:-}" ] && . build/slurm/env.sh; \
	token=$${JUPYTER_TOKEN:-$$($(BIN)/python -c 'import secrets; print(secrets.token_hex(24))')}; \
	echo "JupyterLab: http://127.0.0.1:$${JUPYTER_PORT:-8888}/lab?token=$$token"; \
	$(JUPYTER_ENV) PATH=$(CURDIR)/$(BIN):$$PATH exec $(BIN)/jupyter lab --no-browser --ip=127.0.0.1 \
		--port=$${JUPYTER_PORT:-8888} --ServerApp.root_dir=$(CURDIR)/notebooks \
		--IdentityProvider.token=$$token $$( [ "$$(id -u)" = 0 ] && echo --allow-root )

run-all: setup  ## every lab notebook headless under PROFILE (default ci), in order: build/executed/ + timings.md
	@mkdir -p build/jupyter
	@$(BIN)/python -m labs_lib.jobs.slurm up || echo "NOTICE: no Slurm cluster; the labs launch their jobs with torchrun"
	@[ -f build/slurm/env.sh ] && [ -z "$${SLURM_CONF:-}" ] && . build/slurm/env.sh; \
	$(JUPYTER_ENV) PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m labs_lib.labs.run_all --profile $(or $(PROFILE),ci) \
		$(if $(ONLY),--only $(ONLY))

tensorboard: setup  ## TensorBoard on 127.0.0.1:6006 over build/runs: every run's metrics and profiler traces
	$(BIN)/python -m labs_lib.measure.tensorboard $(or $(LOGDIR),) --port $${TENSORBOARD_PORT:-6006}

test: setup  ## the whole suite
	$(JUPYTER_ENV) PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m pytest -ra $(PYTEST_ARGS)

bench: setup  ## every benchmark; tables in benchmarks/results/README.md
	$(BIN)/python benchmarks/run_all.py

lint: setup
	$(BIN)/ruff check .

clean:  ## stop the local Slurm cluster, delete build/ (runs, caches, logs)
	-bash slurm/local/down.sh
	rm -rf build

# The assessment (docs/grader-guide.md). COURSE: the course folder (default assessment/); SUBMISSIONS: a folder or .zip.
GRADING := $(JUPYTER_ENV) PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/python -m labs_lib.grading $(if $(COURSE),--course $(COURSE))
.PHONY: assessment assess-validate assess-self grade-release grade-collect grade-autograde grade-feedback grade-export \
	certificates
assessment: setup  ## a learner's copy of the assessment: notebooks/assessment/assessment.ipynb (never overwritten)
	$(GRADING) student-copy
assess-validate: setup  ## run your assessment's visible tests before handing it in
	$(GRADING) validate notebooks/assessment/assessment.ipynb
assess-self: setup  ## self-paced: grade your own assessment (hidden tests), feedback and certificate; NAME="Your Name"
	@[ -n "$(NAME)" ] || { echo 'give your name: make assess-self NAME="Ada Lovelace"'; exit 2; }
	$(GRADING) self-check notebooks/assessment/assessment.ipynb --name "$(NAME)"
grade-release: setup  ## the student version, in <course>/release/
	$(GRADING) release
grade-collect: setup  ## copy SUBMISSIONS (a folder or .zip of <student>/assessment.ipynb or <student>.ipynb)
	@[ -n "$(SUBMISSIONS)" ] || { echo 'say where: make grade-collect SUBMISSIONS=path/to/folder-or.zip'; exit 2; }
	$(GRADING) collect "$(SUBMISSIONS)"
grade-autograde: setup  ## autograde every collected submission (runs their jobs through Slurm)
	$(GRADING) autograde
grade-feedback: setup  ## HTML feedback per learner, in <course>/feedback/
	$(GRADING) feedback
grade-export: setup  ## grades as CSV (GRADES=grades.csv)
	$(GRADING) export --to $(or $(GRADES),grades.csv)
certificates: setup  ## HTML + PDF certificates for every learner at or above the pass mark, in <course>/certificates/
	$(GRADING) certificates

.PHONY: survey-summary
survey-summary: setup  ## the workshop survey's responses summed up (lab 12 saves them in build/survey/; SURVEY=folder)
	$(BIN)/python -m labs_lib.labs.lab12 $(SURVEY)

.PHONY: slurm-up slurm-down
slurm-up:  ## the local 2-node Slurm cluster (installs Slurm as root); then `source build/slurm/env.sh`
	bash slurm/local/up.sh

slurm-down:  ## stop the local Slurm cluster (state and logs stay in build/slurm)
	bash slurm/local/down.sh
