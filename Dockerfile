# capsa-serve container image.
#
#   CPU (default):  docker build -t capsa-serve:0.1.0 .
#   CUDA 12.8:      docker build --build-arg TORCH_VARIANT=cu128 -t capsa-serve:0.1.0-cu128 .
#   Air-gapped:     docker build --network host --build-arg PIP_INDEX_URL=http://127.0.0.1:8080/simple/ \
#                       --build-arg TORCH_INDEX_URL=http://127.0.0.1:8080/simple/ -t capsa-serve:0.1.0 .
#
# No `# syntax=` line on purpose: it makes BuildKit fetch a frontend image from Docker Hub, which fails offline.
# PIP_INDEX_URL (default PyPI) and TORCH_INDEX_URL (default the PyTorch index of TORCH_VARIANT) are the only places
# packages come from, so a mirror or a local wheelhouse served as a simple index builds the image with no Internet
# access (README, "Air-gapped builds"); CI builds it that way.
#
# TORCH_VARIANT picks the PyTorch wheel index (https://download.pytorch.org/whl/<variant>): "cpu" keeps the image
# small (no CUDA libraries); "cu128"/"cu126"/... installs a CUDA build whose wheels carry the CUDA runtime, cuDNN and
# NCCL, so the base image needs no CUDA of its own - only the host's NVIDIA driver, which the NVIDIA container
# toolkit mounts in (docker run --gpus all, or Kubernetes' nvidia.com/gpu resource). PYTHON_IMAGE may be overridden
# (e.g. by a CUDA runtime image that has Python 3.11 at /usr/local/bin/python); both stages use it so the
# virtual environment copied between them matches its interpreter.
#
# Only torch is installed on its own (from the PyTorch index, which PyPI can't replace for CPU-only or a given CUDA);
# every other dependency comes from pyproject.toml through `pip install .` - there is no second list to drift.
# No secret is baked in: tokens and S3 credentials come from the environment at run time.

# checkov:skip=CKV_DOCKER_7: checkov reads "FROM ${PYTHON_IMAGE}" without resolving the ARG; its default below is the pinned tag python:3.11-slim-bookworm, and tests/deploy checks that every FROM resolves to a pinned, non-latest tag.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_VARIANT}
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
# The runtime venv never gets pip, setuptools or wheel: a separate venv's pip installs into it (pip --python), and
# everything is installed without byte code (--no-compile), so the runtime stage copies no installer and no
# __pycache__ (the root filesystem is read-only there, so byte code could not be cached at run time either).
RUN python -m venv /opt/pip-tool \
    && python -m venv --without-pip /opt/venv
# torch first, in its own layer: it is by far the largest and changes least often.
RUN /opt/pip-tool/bin/pip --python /opt/venv/bin/python install --no-cache-dir --no-compile \
        --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
WORKDIR /src
COPY pyproject.toml README.md ./
COPY capsa ./capsa
COPY service ./service
# A regular (not editable) install: the runtime stage gets the venv only, not /src. The build backend (setuptools)
# lives only in pip's temporary build environment, fetched from the same index.
RUN /opt/pip-tool/bin/pip --python /opt/venv/bin/python install --no-cache-dir --no-compile \
        --index-url "${PIP_INDEX_URL}" . \
    && test -x /opt/venv/bin/capsa-serve
# Slim the runtime venv: torch's own C++ test binaries and protoc (not used at run time), and setuptools, which
# torch declares as a dependency but only imports to compile C++ extensions (torch.utils.cpp_extension), never
# to serve. No byte code, no pip.
RUN site=$(/opt/venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])") \
    && rm -rf "$site/torch/test" "$site"/torch/bin/test_* "$site"/torch/bin/*Test "$site"/torch/bin/protoc* \
              "$site"/setuptools "$site"/setuptools-*.dist-info "$site/_distutils_hack" \
              "$site/distutils-precedence.pth" "$site/pkg_resources" \
    && /opt/venv/bin/python -I -c "import torch, capsa, service.app" \
    && find /opt/venv -depth -name __pycache__ -type d -exec rm -rf {} + \
    && if /opt/venv/bin/python -c "import pip" 2>/dev/null; then echo "pip in the runtime venv" >&2; exit 1; fi

FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="capsa-serve" \
      org.opencontainers.image.description="Risk-aware PyTorch model server (KServe V2 protocol)" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed, high UID/GID (Kubernetes' runAsUser refers to it by number). The cache is sticky and world-writable like
# /tmp: `docker run --tmpfs /var/cache/capsa` copies this mode onto the tmpfs but makes it owned by root, and the
# server (any UID) must still be able to write there.
RUN groupadd --system --gid 10001 capsa \
    && useradd --system --uid 10001 --gid capsa --home-dir /home/capsa --create-home --shell /usr/sbin/nologin capsa \
    && mkdir -p /models /var/cache/capsa \
    && chown capsa:capsa /models /var/cache/capsa \
    && chmod 1777 /var/cache/capsa
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/home/capsa \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    CAPSA_HOST=0.0.0.0 \
    CAPSA_PORT=8000 \
    CAPSA_GRPC_PORT=8001 \
    CAPSA_MODEL_REPOSITORY=/models \
    CAPSA_CACHE_DIR=/var/cache/capsa
# The model registry: mount a local one here, or set CAPSA_MODEL_REPOSITORY=s3://bucket/prefix (with
# AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_ENDPOINT_URL from the environment) and leave it empty.
# The cache (bundles fetched from S3, the --demo model) is a volume too, so it stays writable under
# `docker run --read-only` (Docker creates an anonymous volume, owned by capsa); Kubernetes mounts an emptyDir there.
VOLUME ["/models", "/var/cache/capsa"]
WORKDIR /home/capsa
USER 10001:10001
# 8000: REST (and /metrics); 8001: the KServe V2 gRPC service and grpc.health.v1.
EXPOSE 8000 8001
# Liveness only: readiness (/v2/health/ready) is for load balancers, and a container that is still loading its
# models must not be marked unhealthy. python is used because the slim image has no curl or wget.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v2/health/live' % os.environ.get('CAPSA_PORT', '8000'), timeout=4)"]
# capsa-serve handles SIGTERM itself (drains in-flight requests for up to CAPSA_DRAIN_TIMEOUT_S, then exits 0);
# the exec form makes it PID 1 so it receives the signal.
ENTRYPOINT ["capsa-serve"]
CMD []
