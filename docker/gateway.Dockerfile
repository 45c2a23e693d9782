# syntax=docker/dockerfile:1
# LatentSieve gateway (and CPU worker) image: CPU-only torch, faiss-cpu, non-root.
# Build from the repository root:
#   docker build -f docker/gateway.Dockerfile -t latentsieve-gateway .
# Versions come from constraints.txt (torch==2.13.0, taken from PyTorch's CPU wheel index so
# that no CUDA libraries are pulled in). Not built on CI: its machines have no Docker engine;
# tests/unit/test_docker_stack.py checks this file statically.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY constraints.txt pyproject.toml README.md ./
COPY latentsieve ./latentsieve
COPY service ./service
COPY workers ./workers
COPY index ./index
RUN pip install --upgrade pip
RUN pip install -c constraints.txt --index-url "$TORCH_INDEX_URL" torch
RUN pip install -c constraints.txt '.[cpu,demo]'

FROM ${PYTHON_IMAGE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    LATENTSIEVE_STORE=/store \
    LATENTSIEVE_HOST=0.0.0.0 \
    LATENTSIEVE_PORT=8000
COPY --from=build /opt/venv /opt/venv
RUN useradd --create-home --uid 10001 sieve && mkdir -p /store && chown sieve /store
USER 10001
WORKDIR /home/sieve
VOLUME ["/store"]
EXPOSE 8000

# Liveness: the process answers. Readiness (/readyz: indexes loaded, workers live) is for
# load balancers and Kubernetes probes; see docs/deployment.md.
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]

# Serves every model in the mounted store (LATENTSIEVE_STORE); docker-compose.yml builds the
# bundled demo first. Every option has a LATENTSIEVE_* variable (latentsieve serve --help).
CMD ["latentsieve", "serve"]
