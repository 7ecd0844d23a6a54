# A Redis image for the container tests, where no registry can be pulled from: Debian's
# redis-server on the locally made base (scripts/base-image). Users get the official image.
ARG BASE_IMAGE=sidestep-base:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update -qq && apt-get install -y -qq --no-install-recommends redis-server >/dev/null \
    && rm -rf /var/lib/apt/lists/*
USER redis
