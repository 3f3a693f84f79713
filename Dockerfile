# syntax=docker/dockerfile:1
# The Glow service in a container: one `python -m service` process (one uvicorn worker, one
# model copy, one batch queue) per container; scale with more containers (deploy/README.md).
#
#   docker build -t glow-service .                       # CPU build of PyTorch (the default)
#   docker build -t glow-service:cuda \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # CUDA build
#
# Build arguments:
#   TORCH_VERSION    the PyTorch release, pinned as in the Makefile and .ci/run (default 2.13.0).
#   TORCH_INDEX_URL  where torch comes from. The default is PyTorch's CPU wheel index (about
#                    200 MB of wheels instead of the several GB of a CUDA build). For the CUDA
#                    build give PyTorch's index of one CUDA variant that it publishes for
#                    TORCH_VERSION (https://download.pytorch.org/whl/cu126, .../cu128, ...), or
#                    the URL of PyPI's simple index for its default Linux wheel, which is a
#                    CUDA build. The CUDA runtime comes inside those wheels: the slim base stays, and
#                    the host needs only the NVIDIA driver and the NVIDIA Container Toolkit.
#   PYTHON_IMAGE     the base of both stages (default python:3.11-slim-bookworm).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- builder: the virtualenv
FROM ${PYTHON_IMAGE} AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

WORKDIR /src

# Layer 1, the virtualenv and torch alone: the largest download, and the one that changes
# least often.
RUN python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# Layer 2, the other dependencies, read from pyproject.toml alone: editing the source
# reuses this layer and the one above. torch>=... is already satisfied, so pip keeps it.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt

# Layer 3, the shipped checkpoints, made readable by every user whatever their mode in
# the working tree (the exporter writes its files 0600) and writable by none but root;
# before the project, which installs them as package data too (pyproject.toml, glow_weights).
COPY weights ./weights
RUN chmod -R a+rX,go-w weights

# Layer 4, the project itself (no dependencies left to resolve).
COPY README.md ./
COPY model ./model
COPY service ./service
RUN pip install --no-cache-dir --no-deps . \
    && python -c "import torch, service, model; print('torch', torch.__version__)"

# ---------------------------------------------------------------- runtime: venv + weights
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="glow-service" \
      org.opencontainers.image.description="Glow normalizing flows over HTTP: exact log-likelihood (anomaly score), sampling, encode, decode" \
      org.opencontainers.image.licenses="MIT"

# A fixed, unprivileged user (uid 10001), so Kubernetes' runAsNonRoot can check it by number.
RUN groupadd --system --gid 10001 glow \
    && useradd --system --uid 10001 --gid glow --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin glow

COPY --from=builder /opt/venv /opt/venv
# The shipped checkpoints, owned by root: readable, not writable, by the service's user.
# Serve another one by mounting its folder and pointing GLOW_WEIGHTS at it.
COPY --from=builder /src/weights /app/weights
WORKDIR /app

# GLOW_HOST: the service listens on 127.0.0.1 by default, unreachable from outside a
#   container; here it listens on every interface of the container's own network.
# GLOW_WEIGHTS: explicit, since the package's default path points inside site-packages
#   once installed non-editable.
# glibc's malloc thresholds are pinned by the service itself at start (mallopt, see
#   service/tuning.py: tune_process), so no MALLOC_* variables are needed here.
# Torch's intra-op threads are set by the service (GLOW_THREADS, default 0: the container's
#   CPU quota or affinity, less one for the event loop), not by OMP_NUM_THREADS.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    GLOW_HOST=0.0.0.0 \
    GLOW_PORT=8000 \
    GLOW_WEIGHTS=/app/weights/fashion-mnist

USER 10001:10001
EXPOSE 8000

# Ready = loaded, warmed up and not shutting down. The slim image has no curl: Python's
# urllib (an HTTP error such as 503 raises, so the exit code is 1).
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:%s/readyz' % os.environ.get('GLOW_PORT', '8000'), timeout=4).status == 200 else 1)"]

# Exec form: python is PID 1 and receives SIGTERM itself (no shell in between); the service
# then stops admitting, answers what is queued or running and exits 0. One process, one
# uvicorn worker. Flags given to `docker run IMAGE ...` are appended to the entrypoint.
STOPSIGNAL SIGTERM
ENTRYPOINT ["python", "-m", "service"]
CMD []
