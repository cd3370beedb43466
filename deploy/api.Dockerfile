# The light image: the HTTP API and the webhook dispatcher (the producer side). It
# installs atelier WITHOUT the `worker` extra, so no torch, no diffusers: a test checks
# this file, and the build fails if torch got in anyway.
#   docker build -f deploy/api.Dockerfile -t atelier-api .
#   api:        atelier api --host 0.0.0.0 --port 8000   (the default command)
#   dispatcher: atelier dispatcher
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
# Both packages are part of the one distribution; only `producer` is imported here.
COPY producer ./producer
COPY worker ./worker
RUN pip install . \
 && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)" \
 && useradd --uid 10001 --create-home --shell /usr/sbin/nologin atelier

USER 10001
EXPOSE 8000
CMD ["atelier", "api", "--host", "0.0.0.0", "--port", "8000"]
