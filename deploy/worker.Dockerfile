# GPU worker image. Not built on the development machines (no Docker engine there).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime
WORKDIR /app
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
RUN pip install --no-cache-dir ".[worker]"
USER 1000
ENTRYPOINT []
CMD ["atelier", "worker"]
