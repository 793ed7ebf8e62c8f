# LocCa Serve images: `locca serve` with the default model (models/locca-tiny-shapes) exported to ONNX at
# build time, so a container is ready seconds after it starts. Two targets:
#
#   cpu (default)  PYTHON_BASE (python:3.11-slim), onnxruntime, no torch: the serving install only
#                  (requirements/serve.lock); CPU torch is in the export stage alone, which writes the bundle
#   gpu            CUDA_BASE (CUDA runtime + cuDNN), CUDA torch, onnxruntime-gpu, TensorRT (TENSORRT, from
#                  NVIDIA's index), the interpreter copied from PYTHON_BASE
#
#   docker build -t locca-serve:cpu .                        # torch from the PyTorch CPU index
#   docker build --target gpu -t locca-serve:gpu .
#   deploy/build_image.sh                                    # no Docker engine, no registry: podman (deploy/README.md)
#
# Where the CPU torch wheel comes from is a build argument: PIP_EXTRA_INDEX_URL (default: the PyTorch CPU
# index, as `pip install torch --index-url https://download.pytorch.org/whl/cpu`), or a wheel directory
# mounted into the build with PIP_FIND_LINKS (podman build -v /opt/wheels:/wheels:ro --build-arg
# PIP_FIND_LINKS=/wheels --build-arg PIP_EXTRA_INDEX_URL=). PIP_INDEX_URL points pip at a mirror and
# PIP_CERT at a CA bundle mounted the same way; all are unset in a plain build and never reach the final stage.
ARG PYTHON_BASE=python:3.11-slim-bookworm
# Ubuntu 24.04 (glibc 2.39) runs the interpreter of PYTHON_BASE (Debian 12, glibc 2.36) copied in below.
# The CUDA major must be the one that torch's and onnxruntime-gpu's wheels are built for.
ARG CUDA_BASE=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04

# ---- python: the interpreter and the settings every stage shares -----------------------------------------
FROM ${PYTHON_BASE} AS python
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
WORKDIR /opt/locca

# ---- deps-cpu: the serving dependencies, a layer of their own (source changes keep it) --------------------
FROM python AS deps-cpu
ARG PIP_INDEX_URL
ARG PIP_FIND_LINKS
ARG PIP_CERT
COPY requirements/serve.lock ./
# pyproject.toml's [project] dependencies resolved (`make lock`), without the train extra: serving an ONNX
# bundle needs no torch, matplotlib, onnx or CIDEr (issue 20): the venv is 291 MB instead of 1.38 GB.
RUN python -m venv /opt/venv \
 && pip install --quiet pip==26.3 \
 && pip install --quiet -r serve.lock \
 && python -c "import importlib.util as u; assert u.find_spec('torch') is None, 'torch in the serving venv'" \
 && rm serve.lock

# ---- export-cpu: CPU torch and the exporter, only to write the default model's ONNX bundle ---------------
# Nothing of this stage but models/locca-tiny-shapes/onnx/ reaches the image.
FROM python AS export-cpu
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PIP_FIND_LINKS
ARG PIP_CERT
ARG EXPORT_ARGS=""
COPY requirements/export-cpu.lock ./
# The serving pins and the train extra, resolved. torch==2.13.0+cpu comes from the CPU index or the wheel
# directory, so PyPI's CUDA build (GBs of nvidia-* wheels) is never chosen.
RUN python -m venv /opt/venv \
 && pip install --quiet pip==26.3 \
 && pip install --quiet -r export-cpu.lock \
 && python -c "import torch; assert not torch.version.cuda, 'the export stage got a CUDA torch: ' + torch.__version__" \
 && rm export-cpu.lock
# Only what `locca export` imports (the model and export layers import no serving code, tests/test_layers.py),
# so a change to the server reuses the bundle. Run from the source tree: this stage needs no install.
COPY locca/ locca/
COPY model/ model/
COPY export/ export/
COPY models/locca-tiny-shapes/checkpoint.safetensors models/locca-tiny-shapes/
# hadolint ignore=SC2086
RUN python -m locca.cli export models/locca-tiny-shapes/checkpoint.safetensors models/locca-tiny-shapes/onnx $EXPORT_ARGS

# ---- build-cpu: the source, the gRPC stubs and the exported bundle, over the serving venv -----------------
FROM deps-cpu AS build-cpu
ARG PIP_INDEX_URL
ARG PIP_CERT
COPY . .
COPY --from=export-cpu /opt/locca/models/locca-tiny-shapes/onnx models/locca-tiny-shapes/onnx
# Editable: the code stays in /opt/locca; building it generates the gRPC stubs into locca_grpc/ (setup.py).
# Everything the server would otherwise write at its first start is made here, so the root file system can
# be read-only: the stubs (locca_grpc/), the ONNX bundle (models/locca-tiny-shapes/onnx/) and bytecode.
# All readable by the runtime user, who owns none of it (protos.generate's directory comes out 0700).
RUN pip install --quiet --no-deps -e . \
 && python -c "from service import protos; print('gRPC stubs:', protos.load()[0].__file__)" \
 && python -m compileall -q /opt/locca \
 && chmod -R a+rX /opt/locca

# ---- deps-gpu / build-gpu: the same, with CUDA torch, onnxruntime-gpu and TensorRT ------------------------
FROM python AS deps-gpu
ARG PIP_INDEX_URL
# PyPI's torch for Linux x86_64 is the CUDA build, so nothing extra by default.
ARG PIP_EXTRA_INDEX_URL=""
ARG PIP_FIND_LINKS
ARG PIP_CERT
# TensorRT's Python wheels (libnvinfer for ONNX Runtime's TensorRT execution provider) come from NVIDIA's own
# index. Its major version must be the one the onnxruntime-gpu release was built against (ONNX Runtime's
# TensorRT EP requirements table). TENSORRT="" leaves it out: LOCCA_DEVICE=cuda still works.
ARG TENSORRT="tensorrt-cu13==10.16.1.11"
ARG TENSORRT_INDEX_URL=https://pypi.nvidia.com
COPY pyproject.toml deploy/requirements.py ./
# onnxruntime and onnxruntime-gpu install the same `onnxruntime` module: only the GPU one goes in.
# (DL3013: TENSORRT carries its pin, which hadolint cannot see through the variable.)
# hadolint ignore=SC2086,DL3013
RUN python -m venv /opt/venv \
 && pip install --quiet pip==26.3 \
 && python requirements.py --extra train --extra gpu --drop onnxruntime > /tmp/requirements.txt \
 && pip install --quiet -r /tmp/requirements.txt \
 && if [ -n "$TENSORRT" ]; then pip install --quiet --extra-index-url "$TENSORRT_INDEX_URL" $TENSORRT; fi \
 && rm /tmp/requirements.txt requirements.py

FROM deps-gpu AS build-gpu
ARG PIP_INDEX_URL
ARG PIP_CERT
ARG EXPORT_ARGS=""
COPY . .
# hadolint ignore=SC2086
RUN pip install --quiet --no-deps -e . \
 && python -c "from service import protos; print('gRPC stubs:', protos.load()[0].__file__)" \
 && locca export models/locca-tiny-shapes/checkpoint.safetensors models/locca-tiny-shapes/onnx $EXPORT_ARGS \
 && python -m compileall -q /opt/locca \
 && chmod -R a+rX /opt/locca

# ---- gpu: the runtime only, on the CUDA base ------------------------------------------------------------
FROM ${CUDA_BASE} AS gpu
# The shared libraries that PYTHON_BASE's interpreter and its standard modules link (ssl, ctypes, sqlite3).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3t64 libffi8 libexpat1 libsqlite3-0 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 locca \
 && useradd --system --uid 10001 --gid locca --create-home --home-dir /home/locca --shell /usr/sbin/nologin locca
COPY --from=build-gpu /usr/local /usr/local
RUN ldconfig
COPY --from=build-gpu /opt/venv /opt/venv
COPY --from=build-gpu /opt/locca /opt/locca
ENV PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:/usr/local/bin:/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LD_LIBRARY_PATH=/opt/venv/lib/python3.11/site-packages/tensorrt_libs:/usr/local/nvidia/lib:/usr/local/nvidia/lib64 \
    LOCCA_MODEL=/opt/locca/models/locca-tiny-shapes \
    LOCCA_BACKEND=onnxruntime \
    LOCCA_DEVICE=auto \
    LOCCA_HOST=0.0.0.0 \
    LOCCA_PORT=8000 \
    LOCCA_GRPC_PORT=50051
WORKDIR /opt/locca
USER 10001:10001
EXPOSE 8000 50051
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 CMD ["python", "/opt/locca/deploy/healthcheck.py"]
ENTRYPOINT ["locca"]
CMD ["serve"]

# ---- cpu: the runtime only (last, so a plain `docker build .` makes this one) ----------------------------
FROM python AS cpu
RUN groupadd --system --gid 10001 locca \
 && useradd --system --uid 10001 --gid locca --create-home --home-dir /home/locca --shell /usr/sbin/nologin locca
COPY --from=build-cpu /opt/venv /opt/venv
COPY --from=build-cpu /opt/locca /opt/locca
ENV LOCCA_MODEL=/opt/locca/models/locca-tiny-shapes \
    LOCCA_BACKEND=onnxruntime \
    LOCCA_DEVICE=cpu \
    LOCCA_HOST=0.0.0.0 \
    LOCCA_PORT=8000 \
    LOCCA_GRPC_PORT=50051
USER 10001:10001
EXPOSE 8000 50051
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 CMD ["python", "/opt/locca/deploy/healthcheck.py"]
ENTRYPOINT ["locca"]
CMD ["serve"]
