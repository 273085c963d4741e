# vla_jax: every target does its own set-up. VENV may point anywhere (CI uses a cache folder).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
REQS := requirements.txt requirements-dev.txt
# The stamp names the hash of the requirement files: editing them triggers a re-install, nothing else does.
REQ_HASH := $(shell cat $(REQS) | sha256sum | cut -c1-16)
STAMP := $(VENV)/.vla_jax-installed-$(REQ_HASH)
PYTEST_ARGS ?= -q

.PHONY: setup test test-slow test-all demo bench clean-venv

# The package itself is installed editable (so `python -m vla_jax...` and `python /path/to/train.py`
# work from any folder); its stamp names this checkout's path, so a venv shared between checkouts
# (CI's cache) always points at the checkout being tested.
EDITABLE := $(VENV)/.vla_jax-editable-$(shell echo "$(CURDIR)" | sha256sum | cut -c1-16)

setup: $(STAMP) $(EDITABLE)

$(STAMP): $(REQS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip check
	@rm -f $(VENV)/.vla_jax-installed-*
	@touch $(STAMP)

$(EDITABLE): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet --no-deps -e .
	@rm -f $(VENV)/.vla_jax-editable-*
	@touch $(EDITABLE)

# CI runs `make test`: every test but those marked slow (aimed at ~20 min on 2 cores; README has the measured time). The slow ones
# (end-to-end training runs, multi-process, simulation, servers under load, the 7B TPU compile, the
# trained-policy check) run with `make test-slow` (part of `make bench`) or all together, `make test-all`.
test: setup
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest tests -m slow $(PYTEST_ARGS)

test-all: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

demo: setup
	$(PY) -m vla_jax.demo

# CPU side by side with the PyTorch reference (timm + transformers) on the same cores (~10-12 min),
# then the slow tests.
bench: setup
	$(PY) bench/compare_torch.py
	$(PY) -m pytest tests -m slow $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
