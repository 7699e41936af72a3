# deployer in a container: it talks to the host's engine through the mounted Docker socket.
#
# Build, with the internet (the base comes from Docker Hub, the packages from PyPI):
#   docker build -t deployer .
# Build without any network (an air-gapped site): make a wheelhouse where PyPI is reachable,
# and give any image that has python3 (>= 3.11) and its venv module as the base:
#   pip wheel . -w wheels
#   docker build --build-arg BASE=local/python3 -t deployer .
# Run (see systemd/deployer-docker.service for the unit):
#   docker run -d --name deployer --network host -v /var/run/docker.sock:/var/run/docker.sock \
#       -e DEPLOYER_WEBHOOK_TOKEN deployer --etcd_nodes=http://10.0.0.1:2379
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
COPY . /src
# With a wheels/ folder in the build context nothing is fetched: every package comes from it.
# Then out go the distributions that deployer's requirements do not reach (computed from the
# installed metadata by scripts/prune_venv.py): deployer loads only txaioetcd's _types.py, which
# needs six, so zlmdb, numpy, aiohttp and what they bring (about 100 MB) go; then pip itself
# and the packages' own test suites (Twisted's and the others': about 25 MB).
RUN set -eu; \
    python3 -m venv /opt/deployer; \
    if [ -d /src/wheels ]; then \
        /opt/deployer/bin/python -m pip install --no-cache-dir --no-index \
            --find-links /src/wheels deployer; \
    else \
        /opt/deployer/bin/python -m pip install --no-cache-dir /src; \
    fi; \
    /opt/deployer/bin/python /src/scripts/prune_venv.py deployer \
        --partial txaioetcd=txaioetcd/_types.py; \
    /opt/deployer/bin/python -m pip uninstall --yes --quiet pip setuptools; \
    find /opt/deployer/lib -depth -type d \( -name tests -o -name test \) \
        -path '*/site-packages/*' -exec rm -rf {} +

FROM ${BASE}
COPY --from=build /opt/deployer /opt/deployer
ENV PATH=/opt/deployer/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
# Every deployer module imports with what is left, or the build fails here (a module that a
# pruned distribution provided); not the test doubles (deployer.testing, deployer.rollout.testing:
# treq.testing needs Twisted's test suite). twistd finds its plugins through
# twisted/plugins/dropin.cache: write it now, as the image's user may not be able to at run time,
# and check that the deployer plugin is in it.
RUN python3 -c "import importlib, pkgutil, sys, deployer; [importlib.import_module(m.name) \
for m in pkgutil.walk_packages(deployer.__path__, 'deployer.', onerror=sys.exit) \
if 'testing' not in m.name.split('.')]" \
    && python3 -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && python3 -c "import pathlib, twisted.plugins as p; \
assert b'deployer' in pathlib.Path(p.__path__[0], 'dropin.cache').read_bytes()"
EXPOSE 4500
# The listen address is a flag; set DEPLOYER_HEALTHZ_URL when it is not :4500.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["python3", "-c", "import os, sys, urllib.request\nurl = os.environ.get('DEPLOYER_HEALTHZ_URL', 'http://127.0.0.1:4500/healthz')\ntry:\n    urllib.request.urlopen(url, timeout=4)\nexcept Exception as e:\n    sys.exit(f'{url}: {e}')"]
# twistd runs in the foreground as PID 1 and ends on SIGTERM (docker stop); it logs to stdout,
# as text, or as JSON lines with -e DEPLOYER_LOG_FORMAT=json. It runs as root to use the Docker
# socket (or run it with --user and the socket's group).
ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "--logger", "deployer.logs.stdout", "deployer"]
