# One image for workers, the demo and the CLI.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY config config
COPY registry registry
COPY workers workers
COPY producer producer
COPY examples examples
RUN pip install --no-cache-dir .
RUN useradd --system --uid 10001 scriptpool
USER scriptpool
ENTRYPOINT ["scriptpool"]
