# One image for workers, the demo and the CLI.
# BASE_IMAGE stays the published python:3.11-slim; only the offline CI check (.ci/compose-check)
# passes a local stand-in. The whole checkout is copied (filtered by .dockerignore) and installed
# as a package, so new top-level packages need no change here.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}
WORKDIR /app
# The dependencies at the versions CI tested: uv.lock's runtime part, exported with hashes by
# `make lock`. A layer of its own, so that a change to the code does not reinstall them.
COPY deploy/requirements.txt deploy/requirements.txt
RUN pip install --no-cache-dir --require-hashes -r deploy/requirements.txt
COPY . .
RUN pip install --no-cache-dir --no-deps . && pip check
RUN useradd --system --uid 10001 scriptpool
# Where compose's artifact-key volume is mounted: a new volume takes this directory's owner, so
# `scriptpool key generate --file` can write the key there as this user, readable by it alone.
RUN mkdir -p /var/lib/scriptpool/keys && chown scriptpool /var/lib/scriptpool/keys \
 && chmod 0700 /var/lib/scriptpool/keys
USER scriptpool
ENTRYPOINT ["scriptpool"]
