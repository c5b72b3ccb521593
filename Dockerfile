# syntax=docker/dockerfile:1
# Protégé service image: one image runs all four services; each Kubernetes workload sets the command
# (python -m protege.services.<generator|reward|reference|learner> --config /etc/protege/<name>.yaml).
#
#   docker build --target cpu  -t ghcr.io/protege-ml/protege:0.1.0 .
#   docker build --target cuda -t ghcr.io/protege-ml/protege-cuda:0.1.0 .
#
# Stages: `builder` builds the protege wheel (pure Python: it carries the generated gRPC stubs, so no protoc
# here); `cuda` and `cpu` install it with their own torch. `cpu` is last, so a plain `docker build .`
# gives the small CPU image. Both run as uid 10001 with /data writable, and have no ENTRYPOINT.
#
# Supply chain: nothing here floats.
# - Base images are pinned by digest in the FROM lines (the tag is kept for readers and for Renovate;
#   the digest is what is pulled). To move to a newer build of a tag, look its digest up and change it
#   (a bot such as Renovate does it):
#     docker buildx imagetools inspect python:3.11-slim --format '{{json .Manifest.Digest}}'
#     crane digest nvidia/cuda:12.8.1-runtime-ubuntu24.04
# - Every Python package comes from a hashed lock file in requirements/ (`pip install --require-hashes
#   --no-deps`, then `pip check`), regenerated from pyproject.toml by requirements/lock.sh; only the
#   protege wheel, built from this context in `builder`, is installed without a hash.
# - The CPU image runs Python 3.11, the version the lock's CPU torch wheel (cp311) is for and the one
#   the tests run on; the CUDA image runs Ubuntu 24.04's Python 3.12 (requirements/cuda.txt).

# ---------------------------------------------------------------------------------------------- python
# The one Python base of `builder` and `cpu`.
FROM python:3.11-slim@sha256:9c900dea9e8fb7e16277c179b555cc72d29a352dbc33cff48ad5a0412fd5bfc7 AS python-base

# ---------------------------------------------------------------------------------------------- builder
FROM python-base AS builder
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# The build backend from the lock too (no build isolation, which would fetch setuptools unhashed).
COPY requirements/build.txt /tmp/build.txt
RUN pip install --require-hashes --no-deps -r /tmp/build.txt
COPY . .
RUN pip wheel --no-deps --no-build-isolation --wheel-dir /wheels .

# ------------------------------------------------------------------------------------------------- cuda
# vLLM generator and GPU reference/learner. The CUDA libraries come with the torch wheel; the base image
# contributes the NVIDIA container-runtime settings and a matching userspace.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04@sha256:ebef3c171eeef0298e4eb2e4be843105edf3b8b0ac45e0b43acee358e8046867 AS cuda
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
# vLLM and its exact torch pin (a CUDA build from PyPI), with protege's [server,vllm] dependencies: all
# resolved once, at lock time (requirements/cuda.txt).
COPY requirements/cuda.txt /tmp/requirements.txt
RUN pip install --require-hashes --no-deps -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
COPY --from=builder /wheels /wheels
RUN pip install --no-deps --no-index /wheels/protege-*.whl \
 && pip check \
 && rm -rf /wheels
USER 10001:10001
WORKDIR /home/protege
EXPOSE 50051 9090
CMD ["protege", "--help"]

# -------------------------------------------------------------------------------------------------- cpu
FROM python-base AS cpu
# PyPI's Linux torch wheel is the CUDA build (several GB); the CPU build (torch==2.13.0+cpu in the lock)
# lives on PyTorch's own index. Only torch is looked up there: this page lists torch's files alone, and
# the lock's hash decides which file is accepted.
ARG TORCH_FIND_LINKS=https://download.pytorch.org/whl/cpu/torch/
ENV PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv \
 && groupadd --gid 10001 protege \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/protege --shell /usr/sbin/nologin protege \
 && mkdir -p /data \
 && chown 10001:10001 /data
COPY requirements/cpu.txt /tmp/requirements.txt
RUN pip install --require-hashes --no-deps --find-links "${TORCH_FIND_LINKS}" -r /tmp/requirements.txt \
 && rm /tmp/requirements.txt
COPY --from=builder /wheels /wheels
RUN pip install --no-deps --no-index /wheels/protege-*.whl \
 && pip check \
 && rm -rf /wheels
USER 10001:10001
WORKDIR /home/protege
EXPOSE 50051 9090
CMD ["protege", "--help"]
