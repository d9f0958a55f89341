# The imgedit worker image: Prefect process worker with imgedit installed at /opt/imgedit.
# Build from the project root:  docker build -f infra/worker.Dockerfile -t imgedit-worker .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    IMGEDIT_HOME=/opt/imgedit \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

WORKDIR /opt/imgedit
# Optional extras: "[emulator]" for the image of the compose stack's emulator service; a worker
# needs none.
ARG IMGEDIT_EXTRAS=""
# Dependencies first, so code changes do not reinstall them.
COPY pyproject.toml README.md ./
COPY pipeline/__init__.py pipeline/__init__.py
COPY flows/__init__.py flows/__init__.py
RUN pip install ".${IMGEDIT_EXTRAS}" && pip uninstall -y imgedit
COPY pipeline pipeline
COPY flows flows
COPY manifests manifests
COPY prefect.yaml ./
# The compose stack's one-shot `setup` service runs this (only this: infra/.env may hold keys).
COPY infra/setup.sh infra/setup.sh
RUN pip install --no-deps .

RUN useradd --create-home --uid 1000 imgedit \
    && chmod 755 infra/setup.sh \
    && chown -R imgedit /opt/imgedit
USER imgedit

# Flow runs start in /opt/imgedit (prefect.yaml's pull step), so `flows/...` entrypoints resolve.
CMD ["prefect", "worker", "start", "--pool", "imgedit", "--type", "process"]
