# sidestep in a container: the gateway (supervisor, state service, ext_proc workers, Envoy) as a
# non-root user.
#
#   docker build -t sidestep .                      from source, with the package index (add
#                                                   --network host where builds get no network)
#   scripts/build-image                             offline, from wheels built on the host (dist/wheels)
#                                                   on a locally made base (scripts/base-image)
#   docker run --init --network host sidestep       built-in defaults, on 127.0.0.1:12000
#   docker run --init --network host -v $PWD/sidestep.yaml:/config/sidestep.yaml:ro sidestep
#
# Config: `sidestep up` reads ./sidestep.yaml, ./sidestep.yml or ./config.yaml, else its built-in
# defaults, and the working directory is /config: mount your file there (one of those names), or
# give a path: `docker run ... sidestep up --foreground /elsewhere/file.yaml`.
# Without host networking, the listener must be on `address: 0.0.0.0` to be reachable through a
# published port (the built-in defaults listen on 127.0.0.1 only).
# Run it with an init (`docker run --init`, compose `init: true`) to reap orphans; either way
# `docker stop` takes well under a second (the supervisor stops its children on SIGTERM).
# The mounted config must be readable by uid 10001 (a 0600 file of another user is not).
#
# Only Dockerfile syntax that the classic builder knows (no BuildKit-only flags), so it builds with
# any engine.

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS build
# scripts/build-image removes the stage images of earlier builds by this label.
LABEL org.sidestep.stage=build
# The whole build context (see .dockerignore); dist/wheels/ is in it when scripts/build-image made it.
COPY . /src
# From dist/wheels/ without the index when it holds sidestep's wheel (its dependencies must be there
# too), else from the source tree with the index (the build generates the gRPC stubs from protos/).
# pip and setuptools leave the venv afterwards: the image runs sidestep, it does not install things.
RUN set -eu; \
    python3 -m venv /opt/sidestep; \
    if ls /src/dist/wheels/sidestep-*.whl >/dev/null 2>&1; then \
        /opt/sidestep/bin/pip install --quiet --disable-pip-version-check --no-cache-dir \
            --no-index --find-links /src/dist/wheels sidestep; \
    else \
        /opt/sidestep/bin/pip install --quiet --disable-pip-version-check --no-cache-dir /src; \
    fi; \
    /opt/sidestep/bin/pip uninstall --quiet --yes pip setuptools; \
    stubs=$(find /opt/sidestep/lib -path '*/controlplane/*' -name '*_pb2_grpc.py'); \
    test -n "$stubs" || { echo "sidestep was built without its gRPC stubs" >&2; exit 1; }; \
    /opt/sidestep/bin/sidestep --help >/dev/null; \
    /opt/sidestep/bin/envoy --version >/dev/null

FROM ${BASE_IMAGE}
COPY --from=build /opt/sidestep /opt/sidestep
# uid/gid 10001; the state dir exists, owned by it and private, so a volume mounted on it starts so too.
RUN set -eu; \
    useradd --uid 10001 --user-group --create-home --home-dir /home/sidestep --shell /usr/sbin/nologin sidestep; \
    install -d -o 10001 -g 10001 -m 700 /home/sidestep/.sidestep; \
    install -d -m 755 /config
ENV PATH=/opt/sidestep/bin:$PATH \
    SIDESTEP_HOME=/home/sidestep/.sidestep \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /config
EXPOSE 12000
# GET /healthz on the running stack's listener: the port is $SIDESTEP_PORT if set, else the one the
# stack was started with (run/stack.json), else 12000. 200 is healthy; anything else, or no answer, not.
HEALTHCHECK --interval=5s --timeout=5s --start-period=30s --retries=3 \
    CMD ["/opt/sidestep/bin/python", "-c", "import json, os, sys, urllib.request\nport = os.environ.get('SIDESTEP_PORT')\nurl = f'http://127.0.0.1:{port}' if port else None\nif not url:\n    try:\n        with open(os.path.join(os.environ.get('SIDESTEP_HOME', ''), 'run', 'stack.json')) as f:\n            url = json.load(f)['listener_url']\n    except (OSError, ValueError, KeyError):\n        url = 'http://127.0.0.1:12000'\ntry:\n    sys.exit(0 if urllib.request.urlopen(url + '/healthz', timeout=4).status == 200 else 1)\nexcept OSError:\n    sys.exit(1)"]
ENTRYPOINT ["sidestep"]
CMD ["up", "--foreground"]
