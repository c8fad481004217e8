# syntax=docker/dockerfile:1
# csi-wasm node plugin image: the package and its runtime dependencies in a virtualenv on a slim
# Python base; no compiler, no pip, setuptools or wheel in the final stage.
#
#   docker build -t <your-registry>/csi-wasm:0.1.0 .
#
# Both stages use the same base (the virtualenv links to its interpreter). Pinned by tag and digest;
# refresh both together. NOT VERIFIED: this tag and digest were copied, never checked against a
# registry; none that serves python images was reachable where this file is built and tested
# (scripts/image.sh builds it on a local stand-in base through this ARG). Before relying on the pin,
# confirm it: `docker buildx imagetools inspect python:3.11.17-slim` prints the index digest.
ARG PYTHON_IMAGE=python:3.11.17-slim@sha256:45037981b62b34b44602584fccbc4d884d5f7dc92c7ee86bb38a698a79fe1e51

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY deploy/constraints.txt pyproject.toml README.md ./
COPY csi_wasm ./csi_wasm
# Dependencies first, exactly the pinned versions and only as wheels (every one ships a manylinux
# wheel for CPython 3.11, grpcio and rpds-py included), so nothing is compiled; then the package
# itself without resolving again; `pip check` proves the set is complete and consistent. The base
# image's pip installs into the virtualenv (--python), which never gets pip or setuptools of its own:
# on 3.11 `venv` seeds both, and uninstalling pip alone left setuptools in the image.
RUN python -m venv --without-pip /opt/csi-wasm \
 && python -m pip --python /opt/csi-wasm/bin/python install --no-cache-dir --only-binary=:all: --requirement constraints.txt \
 && python -m pip --python /opt/csi-wasm/bin/python install --no-cache-dir --no-deps . \
 && python -m pip --python /opt/csi-wasm/bin/python check \
 && /opt/csi-wasm/bin/python -m compileall -q /opt/csi-wasm/lib

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="csi-wasm" \
      org.opencontainers.image.description="CSI node plugin that mounts WebAssembly modules from OCI registries into pods" \
      org.opencontainers.image.licenses="Apache-2.0"
# The base image's own pip/setuptools are build tools the driver never runs.
RUN python -m pip uninstall --yes --no-cache-dir pip setuptools wheel
COPY --from=build /opt/csi-wasm /opt/csi-wasm
ENV PATH=/opt/csi-wasm/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Runs as root on purpose: the driver calls mount(2) into kubelet's pod directories (the DaemonSet
# runs it privileged). Flags come from the DaemonSet; these defaults match deploy/daemonset.yaml.
EXPOSE 9808
ENTRYPOINT ["csi-wasm"]
CMD ["--log-format=json", "serve", "--endpoint=unix:///csi/csi.sock", "--state-dir=/var/lib/csi-wasm", "--kubelet-dir=/var/lib/kubelet", "--metrics-address=0.0.0.0:9808"]
