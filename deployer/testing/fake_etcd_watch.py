"""One watch stream of the in-memory etcd (:class:`~deployer.testing.fake_etcd.FakeEtcd`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.interfaces import IDelayedCall
from twisted.web.server import Request

from deployer.testing.fake_etcd_store import in_range


@attrs.define(eq=False)
class FakeWatch:
    """One watch stream, on ``member``, of the keys from ``key`` to ``range_end``. While
    ``frozen(member)`` holds, what it is sent waits in :attr:`backlog` until :meth:`thaw`.
    :meth:`end` ends it cleanly, :meth:`drop` breaks its connection."""

    request: Request
    member: str
    key: bytes
    range_end: bytes
    start_revision: int
    frozen: Callable[[str], bool]
    open: bool = True
    backlog: list[dict[str, Any]] = attrs.Factory(list)
    timer: IDelayedCall | None = None
    prev_kv: bool = False

    def covers(self, key: bytes) -> bool:
        return in_range(key, self.key, self.range_end)

    def shown(self, event: dict[str, Any]) -> dict[str, Any]:
        """``event`` as this watch is sent it: with the key's previous value only if asked."""
        if self.prev_kv or "prev_kv" not in event:
            return event
        return {field: value for field, value in event.items() if field != "prev_kv"}

    def send(self, message: dict[str, Any]) -> None:
        if self.open and self.frozen(self.member):
            self.backlog.append(message)
        elif self.open:
            self.request.write(json.dumps(message).encode() + b"\n")

    def thaw(self) -> None:
        backlog, self.backlog = self.backlog, []
        for message in backlog:
            self.send(message)

    def closed(self) -> None:
        self.open = False
        if self.timer is not None and self.timer.active():
            self.timer.cancel()

    def end(self) -> None:
        if self.open:
            self.closed()
            self.request.finish()

    def drop(self) -> None:
        self.closed()
        if self.request.transport is not None:
            self.request.transport.loseConnection()
