# syntax=docker/dockerfile:1
# Protégé service image: one image runs all four services; each Kubernetes workload sets the command
# (python -m protege.services.<generator|reward|reference|learner> --config /etc/protege/<name>.yaml).
#
#   docker build --target cpu  -t ghcr.io/protege-ml/protege:0.1.0 .
#   docker build --target cuda -t ghcr.io/protege-ml/protege:0.1.0-cuda .
#
# Stages: `builder` builds the protege wheel (pure Python: it carries the generated gRPC stubs, so no protoc
# here); `cuda` and `cpu` install it with their own torch. `cpu` is last, so a plain `docker build .`
# gives the small CPU image. Both run as uid 10001 with /data writable, and have no ENTRYPOINT.

ARG PYTHON_VERSION=3.12

# ---------------------------------------------------------------------------------------------- builder
FROM python:${PYTHON_VERSION}-slim AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY . .
RUN pip wheel --no-deps --wheel-dir /wheels .

# ------------------------------------------------------------------------------------------------- cuda
# vLLM generator and GPU reference/learner. The CUDA libraries come with the torch wheel; the base image
# contributes the NVIDIA container-runtime settings and a matching userspace.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04 AS cuda
ARG VLLM_VERSION=0.33.0
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# gcc and the Python headers are run-time needs: Triton (under vLLM and torch.compile) compiles a small C
# launcher against Python.h the first time it runs a kernel. Versions follow the Ubuntu release (security
# updates), hence no apt pins.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-dev gcc libc6-dev \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /opt/venv \
 && groupadd --gid 10001 protege \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/protege --shell /usr/sbin/nologin protege \
 && mkdir -p /data \
 && chown 10001:10001 /data
COPY --from=builder /wheels /wheels
# One resolver run, so vLLM's exact torch pin (a CUDA build from PyPI) decides the torch version; a torch
# installed beforehand would only be replaced.
RUN pip install "$(ls /wheels/protege-*.whl)[server,vllm]" "vllm==${VLLM_VERSION}" \
 && rm -rf /wheels
USER 10001:10001
WORKDIR /home/protege
EXPOSE 50051 9090
CMD ["protege", "--help"]

# -------------------------------------------------------------------------------------------------- cpu
FROM python:${PYTHON_VERSION}-slim AS cpu
ARG TORCH_VERSION=2.13.0
# PyPI's Linux torch wheel is the CUDA build (several GB); the CPU build lives on PyTorch's own index.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
 && groupadd --gid 10001 protege \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/protege --shell /usr/sbin/nologin protege \
 && mkdir -p /data \
 && chown 10001:10001 /data
# torch first, pinned, from the CPU index: `.[server]` then finds torch satisfied and pulls no CUDA build.
RUN pip install --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"
COPY --from=builder /wheels /wheels
RUN pip install "$(ls /wheels/protege-*.whl)[server]" \
 && rm -rf /wheels
USER 10001:10001
WORKDIR /home/protege
EXPOSE 50051 9090
CMD ["protege", "--help"]
