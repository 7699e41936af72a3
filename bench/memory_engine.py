"""``python -m bench.memory_engine SOCKET``: the in-memory Docker engine on a unix socket.

A daemon pointed at it answers /healthz and runs its rounds against an engine with no images
and no containers, so a load benchmark measures the webhook path and not a real engine.
"""

from __future__ import annotations

import sys

from twisted.internet import endpoints, task
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.server import Site

from deployer.testing.memory_docker import MemoryDocker

log = Logger()


async def serve(reactor: object, socket_path: str) -> None:
    engine = MemoryDocker()
    site = Site(engine.resource())
    site.noisy = False
    endpoint = endpoints.UNIXServerEndpoint(reactor, socket_path)
    await endpoint.listen(site)
    await Deferred()  # until SIGTERM stops the reactor


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit("usage: python -m bench.memory_engine SOCKET")
    task.react(lambda reactor: Deferred.fromCoroutine(serve(reactor, sys.argv[1])))


if __name__ == "__main__":
    main()
