# qsurgeon service image: one image, two roles (server, worker), chosen by the command.
#   docker build -t qsurgeon .                            (server role: [server] extra)
#   docker build -t qsurgeon-worker --build-arg EXTRAS=worker .
#   docker build -t qsurgeon-engine --build-arg EXTRAS=engine .  (embedded qsurgeon prune, no service)
# CPU-only torch comes from the PyTorch CPU index so the image does not pull CUDA.
FROM python:3.11-slim AS base

ARG EXTRAS=server
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    OMP_WAIT_POLICY=PASSIVE \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    NUMBA_CACHE_DIR=/tmp/numba-cache

WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY client ./client
COPY worker ./worker
COPY server ./server
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==$(grep -E '^torch==' constraints.txt | cut -d= -f3)" \
 && pip install -c constraints.txt ".[${EXTRAS}]" \
 && useradd --create-home --uid 10001 qsurgeon \
 && mkdir -p /data && chown qsurgeon /data
USER qsurgeon
EXPOSE 8000
# The server role by default; the worker service in docker-compose.yml overrides the command.
CMD ["qsurgeon", "serve", "--host", "0.0.0.0", "--port", "8000", "--data", "/data"]
