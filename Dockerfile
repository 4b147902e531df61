# syntax=docker/dockerfile:1
# neuroexplain — gateway + TorchServe in one image.
#
#   docker build -t REGISTRY/neuroexplain:0.1.0 .                         # GPU (CUDA build of torch)
#   docker build --build-arg VARIANT=cpu -t REGISTRY/neuroexplain:0.1.0-cpu .   # CPU only
#
# The project is installed with the Makefile's own `install` and `models` targets (the same steps `make serve` runs),
# only with the image's paths and the CUDA (or CPU) index for torch; tests/test_deploy.py checks that.
# The CUDA base is NVIDIA's minimal `base` flavour: CUDA runtime, NVIDIA_* variables and the driver-version
# requirement the container toolkit enforces. cuDNN and cuBLAS come with the CUDA torch wheel, so they are not
# duplicated by a larger base.

ARG VARIANT=cuda
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-base-ubuntu22.04
ARG CPU_IMAGE=ubuntu:22.04
# The CUDA build of torch 2.13.0 that matches the base's CUDA 12.8 (the base's NVIDIA_REQUIRE_CUDA checks the driver).
ARG CUDA_TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG CPU_TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM ${CUDA_IMAGE} AS os-cuda
ARG CUDA_TORCH_INDEX
ENV TORCH_INDEX=${CUDA_TORCH_INDEX}

FROM ${CPU_IMAGE} AS os-cpu
ARG CPU_TORCH_INDEX
ENV TORCH_INDEX=${CPU_TORCH_INDEX}

# ---------------------------------------------------------------------------------------------------------------
# What both stages share: Python 3.11 (Ubuntu 22.04 universe), nothing else. (DL3006: `os-${VARIANT}` is one of
# the two stages above, not an image. DL3008: Ubuntu's archive drops superseded package versions, so exact apt pins
# break rebuilds; pin the base images by digest instead, e.g. --build-arg CUDA_IMAGE=nvidia/cuda@sha256:...)
# hadolint ignore=DL3006
FROM os-${VARIANT} AS os
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates python3.11 python3.11-venv \
 && rm -rf /var/lib/apt/lists/*

# ---------------------------------------------------------------------------------------------------------------
# Build stage: venv, project, model archives. make is only here.
FROM os AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends make \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . /src
# EXTRAS=full: the runtime extra (no test tools); EDITABLE=: a regular install, so the final stage needs no sources.
# Then, from outside the source tree: TorchServe's gRPC client is generated into the installed package (the root
# filesystem is read-only at run time) and the installed package must list the bundled models on its own.
RUN make install PYTHON=python3.11 VENV=/opt/neuroexplain/venv EXTRAS=full EDITABLE= \
        TORCH_SPEC=torch==2.13.0 TORCH_INDEX="${TORCH_INDEX}" \
 && make models PYTHON=python3.11 VENV=/opt/neuroexplain/venv EXTRAS=full EDITABLE= \
        TORCH_SPEC=torch==2.13.0 TORCH_INDEX="${TORCH_INDEX}" MODEL_STORE=/opt/neuroexplain/model-store

WORKDIR /
RUN /opt/neuroexplain/venv/bin/python -c "from service.backends import torchserve_proto as t; t.load()" \
 && /opt/neuroexplain/venv/bin/neuroexplain models --local --json | grep -q . \
 && /opt/neuroexplain/venv/bin/python -m compileall -q /opt/neuroexplain/venv/lib \
 && /opt/neuroexplain/venv/bin/python -m pip uninstall -y pip

# ---------------------------------------------------------------------------------------------------------------
# The PACS bridge image (`docker build --target bridge -t REGISTRY/neuroexplain-bridge:0.1.0 .`): the light client
# plus the [pacs] extra, no torch, numpy or Java. These stages come before the gateway's final stage, so a plain
# `docker build` still builds the gateway image; k8s/pacs-bridge-statefulset.yaml runs it (args only).
FROM os AS bridge-build
WORKDIR /src
COPY . /src
# The install must stay torch- and numpy-free: the build fails if either got pulled in.
RUN python3.11 -m venv /opt/neuroexplain-bridge/venv \
 && /opt/neuroexplain-bridge/venv/bin/pip install --no-cache-dir ".[pacs]" \
 && /opt/neuroexplain-bridge/venv/bin/python -c "import neuroexplain.pacs.bridge, neuroexplain.cli.commands.pacs_bridge" \
 && ! /opt/neuroexplain-bridge/venv/bin/python -c "import torch" 2>/dev/null \
 && ! /opt/neuroexplain-bridge/venv/bin/python -c "import numpy" 2>/dev/null \
 && /opt/neuroexplain-bridge/venv/bin/python -m compileall -q /opt/neuroexplain-bridge/venv/lib \
 && /opt/neuroexplain-bridge/venv/bin/python -m pip uninstall -y pip

FROM os AS bridge
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends tini \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
 && groupadd --system --gid 10001 neuroexplain \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/neuroexplain --create-home \
        --shell /usr/sbin/nologin neuroexplain \
 && install -d -o 10001 -g 10001 /var/spool/neuroexplain
COPY --from=bridge-build /opt/neuroexplain-bridge /opt/neuroexplain-bridge
# The only writable path is the spool (the StatefulSet's PersistentVolumeClaim; readOnlyRootFilesystem there).
ENV PATH=/opt/neuroexplain-bridge/venv/bin:$PATH \
    HOME=/home/neuroexplain \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /var/spool/neuroexplain
USER 10001:10001
EXPOSE 11112 9465
HEALTHCHECK --interval=30s --timeout=6s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import sys,urllib.request as u;sys.exit(u.urlopen('http://127.0.0.1:9465/ready',timeout=5).status!=200)"]
# tini forwards SIGTERM to the bridge, which finishes the C-STOREs in flight and keeps the spool.
ENTRYPOINT ["/usr/bin/tini", "--", "neuroexplain", "pacs-bridge"]
CMD ["--help"]

# ---------------------------------------------------------------------------------------------------------------
# Final stage: Java 17 runtime for TorchServe, tini as PID 1, the venv and the archives; no compilers, no caches.
FROM os AS final
ARG VARIANT
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends openjdk-17-jre-headless tini \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb \
 && groupadd --system --gid 10001 neuroexplain \
 && useradd --system --uid 10001 --gid 10001 --home-dir /home/neuroexplain --create-home \
        --shell /usr/sbin/nologin neuroexplain \
 && install -d -o 10001 -g 10001 /var/cache/neuroexplain /var/lib/neuroexplain
COPY --from=build /opt/neuroexplain /opt/neuroexplain
# Writable paths are exactly these (emptyDirs in k8s/deployment.yaml, readOnlyRootFilesystem there):
# /tmp (TMPDIR, TorchServe's per-instance working directory, logs), /var/cache/neuroexplain (disk cache),
# /home/neuroexplain (HOME: Java and matplotlib write small files there).
ENV PATH=/opt/neuroexplain/venv/bin:$PATH \
    HOME=/home/neuroexplain \
    TMPDIR=/tmp \
    MPLCONFIGDIR=/tmp/matplotlib \
    PYTHONDONTWRITEBYTECODE=1 \
    NEUROEXPLAIN_VARIANT=${VARIANT} \
    NEUROEXPLAIN_PORT=50051 \
    NEUROEXPLAIN_METRICS_PORT=9464 \
    NEUROEXPLAIN_HEALTH_PORT=50052 \
    NEUROEXPLAIN_MODEL_STORE=/opt/neuroexplain/model-store \
    NEUROEXPLAIN_CACHE_DIR=/var/cache/neuroexplain
WORKDIR /var/lib/neuroexplain
USER 10001:10001
EXPOSE 50051 50052 9464
# grpc.health.v1 on the plaintext health port, asking for the service (readiness), not only the process.
HEALTHCHECK --interval=30s --timeout=6s --start-period=300s --retries=3 \
  CMD ["python", "-c", "import os,sys,grpc;from grpc_health.v1 import health_pb2 as h,health_pb2_grpc as g;c=grpc.insecure_channel('127.0.0.1:'+os.environ.get('NEUROEXPLAIN_HEALTH_PORT','50052'));r=g.HealthStub(c).Check(h.HealthCheckRequest(service='neuroexplain.v1.NeuroExplain'),timeout=5);sys.exit(r.status!=h.HealthCheckResponse.SERVING)"]
# tini is PID 1: it reaps orphans and forwards SIGTERM to the gateway only (no -g), so the gateway drains in-flight
# calls first and then stops its TorchServe child itself.
ENTRYPOINT ["/usr/bin/tini", "--", "neuroexplain"]
CMD ["serve"]
