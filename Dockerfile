# faissq worker / flower image. One Dockerfile, two variants:
#   docker build -t faissq:cpu .                         -> pip install .        (faiss-cpu)
#   docker build -t faissq:gpu --build-arg VARIANT=gpu . -> pip install .[gpu]   (faiss-gpu-cu12)
# It installs exactly what pyproject.toml declares. The GPU wheel brings the CUDA runtime and
# cuBLAS as pip packages, so the base image needs no CUDA; the host needs the NVIDIA driver and
# the NVIDIA Container Toolkit (docker-compose.yml reserves the device).
ARG PYTHON_IMAGE=python:3.12-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG VARIANT=cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# libgomp: OpenMP runtime the faiss wheels link against
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && python -m venv /opt/venv \
    && useradd --create-home --uid 10001 faissq \
    && mkdir -p /data /flower \
    && chown faissq:faissq /data /flower

WORKDIR /app
COPY pyproject.toml README.md ./
COPY faissq ./faissq

# faiss-gpu-cu12 and faiss-cpu both install the `faiss` module: as pyproject.toml's gpu extra says,
# the GPU wheel goes over the CPU one. Remove every file of faiss-cpu (its AVX builds would be
# loaded first), then put back the GPU wheel at the version the extra resolved to.
RUN case "$VARIANT" in \
      cpu) pip install . ;; \
      gpu) pip install ".[gpu]" \
           && GPU_WHEEL="faiss-gpu-cu12==$(pip show faiss-gpu-cu12 | sed -n 's/^Version: //p')" \
           && pip uninstall -y faiss-cpu \
           && pip install --force-reinstall --no-deps "$GPU_WHEEL" ;; \
      *) echo "VARIANT must be cpu or gpu, got $VARIANT" >&2; exit 1 ;; \
    esac \
    && python -c "import faiss; print('faiss', faiss.__version__, 'GPU support:', hasattr(faiss, 'StandardGpuResources'))"

USER faissq
VOLUME ["/data"]
ENV FAISSQ_STORAGE__URL=/data \
    FAISSQ_METRICS__PORT=9310
EXPOSE 9310
# SIGTERM: Celery's warm shutdown (finish the running job, stop the search loops, drop heartbeats)
STOPSIGNAL SIGTERM
CMD ["faissq", "worker"]
