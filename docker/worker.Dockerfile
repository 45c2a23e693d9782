# syntax=docker/dockerfile:1
# LatentSieve GPU worker image: CUDA runtime, CUDA torch, GPU FAISS, non-root.
# Build from the repository root:
#   docker build -f docker/worker.Dockerfile -t latentsieve-worker .
# torch==2.13.0 (constraints.txt) from PyPI is the CUDA 12 build; faiss-gpu-cu12 brings GPU
# indexes (the gpu extra; never installed next to faiss-cpu). The host needs the NVIDIA driver
# and the NVIDIA Container Toolkit. Not built on CI (no Docker engine there); checked
# statically by tests/unit/test_docker_stack.py.
ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY latentsieve ./latentsieve
COPY service ./service
COPY workers ./workers
COPY index ./index
RUN pip install --upgrade pip
RUN pip install -c constraints.txt '.[gpu]'

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/*
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LATENTSIEVE_STORE=/store \
    LATENTSIEVE_DEVICE=cuda \
    LATENTSIEVE_METRICS_PORT=9100
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 sieve
USER 10001
WORKDIR /home/sieve
# The store is mounted read-only: a worker only reads index versions.
VOLUME ["/store"]
EXPOSE 9100

# Healthy once /metrics answers and the worker serves at least one model shard.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s --retries=3 \
  CMD ["python", "-m", "latentsieve.workers.healthcheck"]

# LATENTSIEVE_REDIS_URL must be set (docker-compose.yml does); every option has a variable.
CMD ["latentsieve", "worker"]
