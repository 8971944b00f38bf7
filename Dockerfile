# syntax=docker/dockerfile:1
#
# NormBench images. One Dockerfile, two targets:
#   docker build --target api    -t normbench-api .     # FastAPI + migrations, no torch
#   docker build --target worker -t normbench-worker .  # Celery training worker, with torch
# docker-compose.yml builds both and runs `alembic upgrade head` from the api image.

# ---------------------------------------------------------------------------------------
# base: interpreter, non-root user, source tree. Nothing is installed here.
# ---------------------------------------------------------------------------------------
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    NORMBENCH_HOME=/data/home \
    NORMBENCH_STORAGE_URL=file:///data/storage

# Non-root runtime user. /data/storage and /data/home exist in the image and belong to it, so
# a fresh named volume mounted there is initialised with that ownership and stays writable.
RUN groupadd --system --gid 10001 normbench \
 && useradd --system --uid 10001 --gid normbench --home-dir /srv --shell /usr/sbin/nologin normbench \
 && mkdir -p /srv /data/storage /data/home \
 && chown -R normbench:normbench /data

WORKDIR /srv

COPY pyproject.toml README.md ./
COPY app ./app
COPY workers ./workers
COPY models ./models
COPY migrations ./migrations
COPY alembic.ini ./

# ---------------------------------------------------------------------------------------
# api: the HTTP service (and the one-shot `alembic upgrade head`). Must NOT contain torch.
# ---------------------------------------------------------------------------------------
FROM base AS api

RUN pip install --no-cache-dir . \
 && ! python -c "import torch" 2>/dev/null

USER normbench
# Listening on all interfaces: API keys on (create them with `normbench-admin create-key`).
ENV NORMBENCH_REQUIRE_API_KEYS=true
EXPOSE 8000
# /readyz: the database and the broker answer, not only the process.
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=5 \
    CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status == 200 else 1)"
# Keep-alive longer than clients' (app/devserver.py KEEP_ALIVE_SECONDS says why).
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000", "--timeout-keep-alive", "75"]

# ---------------------------------------------------------------------------------------
# worker: the Celery consumer of the `train` queue; trains with torch.
# ---------------------------------------------------------------------------------------
FROM base AS worker

# torch is installed before the package so this large layer is cached across code changes. The pin is the
# Makefile's (TORCH_SPEC there), so the image trains with the torch the tests ran with.
# PyPI's Linux x86_64 torch wheels are the CUDA builds (they pull the nvidia-* runtime wheels): the host needs
# the NVIDIA Container Toolkit and a driver that supports that CUDA version. Check which it is with
#   docker compose run --rm worker python -c "import torch; print(torch.version.cuda)"
# CUDA 13.x needs driver >= 580, CUDA 12.8 >= 570 (NVIDIA's CUDA compatibility table; `nvidia-smi` shows the
# host's). TORCH_INDEX_URL picks another build: https://download.pytorch.org/whl/cpu (the compose `cpu`
# profile), or .../whl/cu126 for an older driver (>= 560).
ARG TORCH_SPEC="torch==2.14.1"
ARG TORCHVISION_SPEC="torchvision==0.29.1"
ARG TORCH_INDEX_URL=""
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_SPEC" "$TORCHVISION_SPEC"
RUN pip install --no-cache-dir ".[worker]"
COPY scripts/worker_health.py ./scripts/

USER normbench
# Healthy while the worker answers a Celery ping, or while it trains a run whose lease it keeps renewing.
HEALTHCHECK --interval=30s --timeout=20s --start-period=60s --retries=3 CMD ["python", "scripts/worker_health.py"]
CMD ["celery", "-A", "workers.celery_app", "worker", "-Q", "train", "--pool", "solo", "--loglevel", "INFO", \
     "--hostname", "normbench@%h"]
