# neonb: one entry point for a newcomer.
#   make study   set everything up, run the demo study on the synthetic cohort, build the book
#   make test    set everything up and run the tests (what CI runs)
# Variables: PARAMS=params/demo (or params/paper, params/smoke), DATA=/path/to/dhcp_release
# (empty: the synthetic cohort), PYTHON=python3.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PARAMS ?= params/demo
DATA ?=
# Where a CPU build of torch lies on local disk (the development and CI machines), install
# that one first; elsewhere pip picks the build that suits the machine.
TORCH_WHEEL := $(firstword $(wildcard /opt/wheels/torch-2.13.0+cpu-*.whl))

.PHONY: setup browser study test lint clean

setup: $(VENV)/.neonb-installed

$(VENV)/.neonb-installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
ifneq ($(TORCH_WHEEL),)
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
endif
	$(BIN)/python -m pip install --quiet -e ".[study,test]"
	touch $@

study: setup
	$(BIN)/neonb study --params $(PARAMS) $(if $(DATA),--data $(DATA),)

# The book test opens the built pages in Debian's chromium; without root to install it,
# that one test is skipped (CI sets NEONB_REQUIRE_BROWSER=1, which makes it fail instead).
browser:
	@command -v chromium >/dev/null 2>&1 || \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
	  echo "could not install chromium: the browser test will be skipped"

test: setup browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	# OpenVINO's tests and the smoke study run in processes of their own, a precaution: with
	# OpenVINO loaded, the one pytest process once died of SIGSEGV late in the suite (issue
	# 16). The likely cause, an ov.Core per compiled network, is gone
	# (neonb.inference.openvino_core): one-process runs with OpenVINO in use passed 3 of 3 on
	# an Intel CPU with AMX where 4 of 4 had died, and 2 of 2 on an AMD EPYC without AMX.
	$(BIN)/python -m pytest -q --ignore=tests/test_study.py --ignore=tests/test_openvino.py
	$(BIN)/python -m pytest -q tests/test_openvino.py
	$(BIN)/python -m pytest -q tests/test_study.py

clean:
	rm -rf $(VENV) book/_build book/notebooks results data
