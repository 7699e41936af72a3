"""Group commit: the writes of :meth:`deployer.etcd.Etcd.record` go to etcd in shared
transactions.

The first write goes out at once; every write that arrives while a transaction is in flight
joins the next one, sent as soon as the in-flight one ends (at most :data:`MAX_TXN_OPS` keys
each, etcd's default ``--max-txn-ops``; the same key twice keeps the last value). A transaction
tries every member once, starting with the member in use, each within ``dial_timeout``
(:meth:`deployer.etcd.client.Gateway.request`); its writes fail with
:class:`~deployer.errors.EtcdUnavailable` once every member failed it.

A write that timed out may still have been applied: writes are at least once.
"""

from __future__ import annotations

from base64 import b64encode
from collections.abc import Iterable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from deployer.errors import EtcdHTTPError, EtcdUnavailable
from deployer.etcd._txaioetcd import Header
from deployer.etcd.client import Gateway

MAX_TXN_OPS = 128
"""etcd's default ``--max-txn-ops``: the most keys one group-commit transaction carries."""


def put_transaction(items: Iterable[tuple[bytes, bytes]]) -> dict[str, Any]:
    """The JSON body of one ``/v3/kv/txn`` that puts every ``(key, value)``, unconditionally.

    Built as plain JSON rather than with txaioetcd's ``Transaction``/``OpSet``: their
    marshalling imports the whole txaioetcd package (see :mod:`deployer.etcd._txaioetcd`).
    """
    return {
        "success": [
            {"request_put": {"key": b64encode(key).decode(), "value": b64encode(value).decode()}}
            for key, value in items
        ]
    }


class GroupCommit:
    """Shares transactions among concurrent writes (see the module docstring)."""

    log = Logger()

    def __init__(
        self, reactor: IReactorTime, gateway: Gateway, max_txn_ops: int = MAX_TXN_OPS
    ) -> None:
        self.reactor = reactor
        self.gateway = gateway
        self.max_txn_ops = max_txn_ops
        self.transactions = 0
        self._queue: list[tuple[bytes, bytes, Deferred[int]]] = []
        self._in_flight: Deferred[None] | None = None

    def put(self, key: bytes, value: bytes) -> Deferred[int]:
        """Write ``key`` = ``value``; fires with the etcd revision once etcd acknowledged it."""
        done: Deferred[int] = Deferred()
        self._queue.append((key, value, done))
        if self._in_flight is None:
            self._send_next()
        return done

    async def close(self) -> None:
        """Wait until every write has been answered."""
        while self._in_flight is not None:
            await self._in_flight

    def _send_next(self) -> None:
        if not self._queue:
            self._in_flight = None
            return
        batch: dict[bytes, tuple[bytes, list[Deferred[int]]]] = {}
        taken = 0
        for key, value, done in self._queue:
            if key not in batch and len(batch) == self.max_txn_ops:
                break
            waiting = batch[key][1] if key in batch else []
            waiting.append(done)
            batch[key] = (value, waiting)  # the last value for a key wins
            taken += 1
        del self._queue[:taken]
        self._in_flight = Deferred.fromCoroutine(self._commit(batch))
        self._in_flight.addBoth(lambda _: self._send_next())

    async def _commit(self, batch: dict[bytes, tuple[bytes, list[Deferred[int]]]]) -> None:
        txn = put_transaction((key, value) for key, (value, _) in batch.items())
        waiting = [done for _, callers in batch.values() for done in callers]
        try:
            reply = await self.gateway.request("/v3/kv/txn", txn)
            header = Header._parse(reply.get("header", {}))
            if not reply.get("succeeded", False) or header.revision is None:
                raise EtcdUnavailable(f"unexpected answer to a write: {reply!r}")
        except EtcdHTTPError as e:
            failure = Failure(EtcdUnavailable(f"etcd refused the write: {e}"))
        except Exception:
            failure = Failure()
        else:
            self.transactions += 1
            for done in waiting:
                if not done.called:
                    done.callback(int(header.revision))
            return
        for done in waiting:
            if not done.called:
                done.errback(failure)
