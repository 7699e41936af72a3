"""``python -m bench.fanout_watcher ETCD_URL PREFIX``: one watching deployer without an engine.

Runs only :meth:`deployer.etcd.Etcd.watch`; its callback prints ``<monotonic time> <pattern>``
for every update as it gets it. Prints ``live`` once the watch stream is established. Ends on
SIGTERM.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from twisted.internet import task
from twisted.internet.defer import Deferred

from deployer.etcd import Etcd, EtcdConfig
from deployer.model import Update


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def watch(reactor: Any, url: str, prefix: str) -> None:
    etcd = Etcd(reactor, EtcdConfig(nodes=(url,), prefix=prefix, retry_delay=0.2))

    def on_update(update: Update) -> None:
        emit(f"{time.monotonic():.6f} {update.pattern}")

    service = etcd.watch(on_update)

    def check_live() -> None:
        if service.live:
            emit("live")
            announce.stop()

    announce = task.LoopingCall(check_live)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.addSystemEventTrigger(
        "before", "shutdown", lambda: Deferred.fromCoroutine(etcd.close())
    )
    service.startService()
    announce.start(0.01)
    await Deferred()  # until SIGTERM stops the reactor


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: python -m bench.fanout_watcher ETCD_URL PREFIX")
    task.react(lambda reactor: Deferred.fromCoroutine(watch(reactor, sys.argv[1], sys.argv[2])))


if __name__ == "__main__":
    main()
