# vla_jax: every target does its own set-up. VENV may point anywhere (CI uses a cache folder).
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
REQS := requirements.txt requirements-dev.txt
# The stamp names the hash of the requirement files: editing them triggers a re-install, nothing else does.
REQ_HASH := $(shell cat $(REQS) | sha256sum | cut -c1-16)
STAMP := $(VENV)/.vla_jax-installed-$(REQ_HASH)
PYTEST_ARGS ?= -q

.PHONY: setup test demo bench clean-venv

setup: $(STAMP)

$(STAMP): $(REQS)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt -r requirements-dev.txt
	$(PY) -m pip check
	@rm -f $(VENV)/.vla_jax-installed-*
	@touch $(STAMP)

test: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

demo: setup
	$(PY) -m vla_jax.demo

# CPU side by side with the PyTorch reference (timm + transformers) on the same cores; ~10-12 min.
bench: setup
	$(PY) bench/compare_torch.py

clean-venv:
	rm -rf $(VENV)
