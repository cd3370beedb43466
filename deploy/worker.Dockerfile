# The GPU worker image, on a CUDA base that brings its own torch build. atelier's
# `worker` extra is installed with torch pinned to the base image's version, so pip
# never swaps it for another build.
#   docker build -f deploy/worker.Dockerfile -t atelier-worker .
#   docker run --gpus all -v hf-cache:/models atelier-worker atelier worker --model playground-v2.5
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # Hub downloads (weights) and the locally built models live on the /models volume:
    # a restarted or rescheduled worker loads them instead of downloading them again.
    HF_HOME=/models/huggingface \
    ATELIER_MODELS_DIR=/models/atelier

WORKDIR /app
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
RUN TORCH="$(python -c 'import torch; print(torch.__version__)')" \
 && pip install ".[worker]" "torch==${TORCH}" \
 && python -c "import diffusers, torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin atelier \
 && mkdir -p /models && chown 10001:10001 /models

USER 10001
VOLUME ["/models"]
# Metrics (ATELIER_METRICS_PORT) when enabled.
EXPOSE 9100
# SIGTERM is Celery's warm shutdown: running jobs finish, no new one is taken. Give the
# container at least Settings.visibility_floor_s to stop (compose stop_grace_period,
# Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
ENTRYPOINT []
CMD ["atelier", "worker"]
