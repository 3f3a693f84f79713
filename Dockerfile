# The Glow service in a container: one `python -m service` process (one uvicorn worker, one
# model copy, one batch queue) per container; scale with more containers (deploy/README.md).
# No `# syntax=` line: the engine's built-in Dockerfile frontend builds this file, so nothing
# is fetched from a registry but the base image (and the legacy builder works too).
#
#   docker build -t glow-service .                       # CPU build of PyTorch (the default)
#   docker build -t glow-service:cuda \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .   # CUDA build
#
# Behind a mirror or offline (what deploy/check-image.sh does, with a local torch index):
#   cp /etc/ssl/certs/ca-certificates.crt deploy/certs/host-ca.pem
#   docker build --network host --build-arg PYPI_CA_BUNDLE=host-ca.pem \
#       --build-arg TORCH_INDEX_URL=http://127.0.0.1:18999/simple -t glow-service .
#
# Build arguments:
#   TORCH_VERSION    the PyTorch release, pinned as in constraints.txt and the Makefile
#                    (default 2.13.0; a test keeps the three in step).
#   TORCH_INDEX_URL  where the torch wheel comes from (only torch: its dependencies come from
#                    PYPI_INDEX_URL). The default is PyTorch's CPU wheel index (about 200 MB
#                    of wheels instead of the several GB of a CUDA build). For the CUDA build
#                    give PyTorch's index of one CUDA variant that it publishes for
#                    TORCH_VERSION (https://download.pytorch.org/whl/cu126, .../cu128, ...), or
#                    PyPI's simple index, whose default Linux wheel is a CUDA build. The CUDA
#                    runtime comes inside those wheels: the slim base stays, and the host needs
#                    only the NVIDIA driver and the NVIDIA Container Toolkit. A local PEP 503
#                    index (`python -m http.server` over simple/torch/index.html) works too.
#   PYPI_INDEX_URL   the index of every other package (default https://pypi.org/simple): a
#                    mirror or a proxy such as devpi or Artifactory.
#   PYPI_TRUSTED_HOST  one more host pip may reach without a valid certificate or over plain
#                    HTTP (pip's --trusted-host), for a mirror without TLS. Default: none.
#   PYPI_CA_BUNDLE   the name of a PEM file in deploy/certs/ that pip verifies TLS with instead
#                    of its own CA list (pip's --cert): the CA bundle of a TLS-intercepting
#                    proxy, or the host's /etc/ssl/certs/ca-certificates.crt copied there.
#                    Used by both indexes, in the builder only. Default: none.
#   PYTHON_IMAGE     the base of both stages (default python:3.11-slim-bookworm); any Debian
#                    or Ubuntu image with `python` 3.11 and its venv module on the PATH, such as
#                    the stand-in that deploy/base-image.sh makes where no registry is reachable.
#
# Versions: every package is pinned by constraints.txt, the file the Makefile and CI install
# with, so the image runs what the tests ran.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- builder: the virtualenv
FROM ${PYTHON_IMAGE} AS builder

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PYPI_INDEX_URL=https://pypi.org/simple
ARG PYPI_TRUSTED_HOST=""
ARG PYPI_CA_BUNDLE=""

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DEFAULT_TIMEOUT=120 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH=/opt/venv/bin:$PATH

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src

# The index options of every pip call below, from the build arguments, in pip's own
# configuration file (so no empty value ever reaches pip as an option).
COPY deploy/certs/ /etc/glow-build/certs/
RUN { echo "[global]"; \
      echo "index-url = ${PYPI_INDEX_URL}"; \
      if [ -n "${PYPI_TRUSTED_HOST}" ]; then echo "trusted-host = ${PYPI_TRUSTED_HOST}"; fi; \
      if [ -n "${PYPI_CA_BUNDLE}" ]; then echo "cert = /etc/glow-build/certs/${PYPI_CA_BUNDLE}"; fi; \
    } > /etc/glow-build/pip.conf \
    && if [ -n "${PYPI_CA_BUNDLE}" ]; then test -s "/etc/glow-build/certs/${PYPI_CA_BUNDLE}"; fi
ENV PIP_CONFIG_FILE=/etc/glow-build/pip.conf

# Layer 1, the virtualenv and the torch wheel alone: the largest download, and the one that
# changes least often. --no-deps: its dependencies come from PYPI_INDEX_URL, pinned, below.
RUN python -m venv /opt/venv \
    && pip install --no-deps --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"

# Layer 2, the other dependencies, read from pyproject.toml and pinned by constraints.txt:
# editing the source reuses this layer and the one above. The torch installed above already
# satisfies its pin, so pip keeps it and adds what it needs.
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt \
    && pip check

# Layer 3, the shipped checkpoints, made readable by every user whatever their mode in
# the working tree (the exporter writes its files 0600) and writable by none but root;
# before the project, which installs them as package data too (pyproject.toml, glow_weights).
COPY weights ./weights
RUN chmod -R a+rX,go-w weights

# Layer 4, the project itself (no dependencies left to resolve).
COPY README.md ./
COPY model ./model
COPY service ./service
RUN pip install --no-deps . \
    && python -c "import torch, service, model; print('torch', torch.__version__)"

# Layer 5, what serving does not use, out of the virtualenv: pip and setuptools (installs
# happen at build time; torch needs setuptools only to compile extensions); sympy, mpmath
# and networkx, which torch imports only for torch.compile and symbolic shapes (neither
# loading, tracing nor serving the model imports them: torch.compile is unavailable in this
# image); torch's test suite, test programs and test libraries, C++ headers and CMake files
# (for building extensions against it) and static libraries. Then a check that the service,
# the trainer and the exporter still import.
RUN pip uninstall -y -q setuptools sympy mpmath networkx \
    && python -m pip uninstall -y -q pip \
    && site=$(python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") \
    && find "$site/torch/bin" -mindepth 1 -maxdepth 1 ! -name torch_shm_manager -exec rm -rf {} + \
    && rm -rf "$site"/torch/test "$site"/torch/include "$site"/torch/share/cmake "$site"/torch/lib/*.a \
        "$site"/torch/lib/libtorchbind_test.so "$site"/torch/lib/libjitbackend_test.so \
        "$site"/torch/lib/libshm_windows /opt/venv/bin/pip* \
    && python -c "import torch, safetensors, fastapi, uvicorn, PIL, service.app, model.train, model.export; \
print('pruned: imports ok')"

# ---------------------------------------------------------------- runtime: venv + weights
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="glow-service" \
      org.opencontainers.image.description="Glow normalizing flows over HTTP: exact log-likelihood (anomaly score), sampling, encode, decode" \
      org.opencontainers.image.licenses="MIT"

# A fixed, unprivileged user (uid 10001), so Kubernetes' runAsNonRoot can check it by number.
RUN groupadd --system --gid 10001 glow \
    && useradd --uid 10001 --gid glow --no-create-home --home-dir /nonexistent \
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
