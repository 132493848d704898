# syntax=docker/dockerfile:1
# tickwire: one image for every worker and one-shot job (`tickwire run <worker>`,
# `tickwire db migrate`, `tickwire streams ensure`). See docker-compose.yml.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: the locked dependencies, verified by hash, then the package --------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/tickwire
WORKDIR /src
# The lock first: its layer is reused until the lock changes, whatever else moves.
COPY requirements.lock ./
RUN /opt/tickwire/bin/pip install --require-hashes -r requirements.lock
COPY pyproject.toml README.md* ./
COPY contracts ./contracts
COPY workers ./workers
COPY infra ./infra
COPY db ./db
RUN /opt/tickwire/bin/pip install --no-deps . \
 && /opt/tickwire/bin/tickwire --help > /dev/null

# --- runtime ---------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
# LightGBM's wheel links OpenMP (libgomp), which the slim image lacks.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 tickwire \
 && useradd --system --uid 10001 --gid tickwire --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin tickwire
COPY --from=build /opt/tickwire /opt/tickwire
ENV PATH=/opt/tickwire/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TICKWIRE_METRICS_HOST=0.0.0.0
# An empty working directory: no stray .env is picked up by the settings loader.
WORKDIR /app
USER tickwire:tickwire
ENTRYPOINT ["tickwire"]
CMD ["--help"]
