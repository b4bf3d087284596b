# One image for workers, the demo and the CLI.
# BASE_IMAGE stays the published python:3.11-slim; only the offline CI check (.ci/compose-check)
# passes a local stand-in. The whole checkout is copied (filtered by .dockerignore) and installed
# as a package, so new top-level packages need no change here.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
WORKDIR /app
COPY . .
RUN pip install --no-cache-dir .
RUN useradd --system --uid 10001 scriptpool
USER scriptpool
ENTRYPOINT ["scriptpool"]
