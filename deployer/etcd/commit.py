"""Group commit: the writes of :meth:`deployer.etcd.Etcd.record` go to etcd in shared
transactions, each write answered within its own deadline.

The first write goes out at once; every write that arrives while a transaction is in flight
joins the next one, sent as soon as the in-flight one ends (at most :data:`MAX_TXN_OPS` keys
each, etcd's default ``--max-txn-ops``; the same key twice keeps the last value). One
transaction is in flight at a time, to the member in use, within ``dial_timeout``.

When a transaction fails (a connection error, no answer within ``dial_timeout``, a 5xx), its
member is marked failed, so the member in use moves on, and its writes join the next transaction
together with the writes that arrived meanwhile: that one goes to the next member at once. So a
hung member holds later writes up for at most the rest of one ``dial_timeout``, never for the
whole failover of an earlier write. A write fails with
:class:`~deployer.errors.EtcdUnavailable` once every member failed it, or when its deadline
passes: ``members x dial_timeout`` after it arrived, however long it waited for a transaction in
flight. A transaction none of whose writes still waits is given up on. And while the watch
runs, the liveness check (:mod:`deployer.etcd.liveness`) moves the member in use off a member
that stopped answering, so that later transactions go to the next member at once.

A write that failed or timed out may still have been applied, and a write retried on another
member may be applied twice: writes are at least once. The watch does not deliver a repeat that
follows the first at once (same key, same value: :meth:`deployer.etcd.layout.KeyLayout.repeated`);
one applied after a newer write to the same key is an older update, which a host skips when it
knows a newer build of its tag (:mod:`deployer.freshness`) and otherwise deploys by tag, which
pulls the registry's current build.
"""

from __future__ import annotations

from base64 import b64encode
from collections.abc import Iterable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from deployer.errors import EtcdHTTPError, EtcdUnavailable
from deployer.etcd._txaioetcd import Header
from deployer.etcd.client import EXPECTED_FAILURES, Gateway, describe

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


@attrs.define(eq=False)
class _Write:
    key: bytes
    value: bytes
    done: Deferred[int]
    deadline: IDelayedCall | None = None
    failures: dict[str, str] = attrs.Factory(dict)  # member URL -> why, in order

    @property
    def waiting(self) -> bool:
        return not self.done.called

    def fail(self, error: Exception) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        if not self.done.called:
            self.done.errback(Failure(error))

    def succeed(self, revision: int) -> None:
        if self.deadline is not None and self.deadline.active():
            self.deadline.cancel()
        if not self.done.called:
            self.done.callback(revision)


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
        self._queue: list[_Write] = []
        self._in_flight: Deferred[None] | None = None
        self._sending: list[_Write] = []
        self._sending_to = ""
        self._sent_at = 0.0

    @property
    def budget(self) -> float:
        """How long a write may take, from its arrival: every member's ``dial_timeout``."""
        return len(self.gateway.members) * self.gateway.dial_timeout

    def put(self, key: bytes, value: bytes) -> Deferred[int]:
        """Write ``key`` = ``value``; fires with the etcd revision once etcd acknowledged it."""
        write = _Write(key, value, Deferred())
        write.deadline = self.reactor.callLater(self.budget, self._expired, write)
        self._queue.append(write)
        if self._in_flight is None:
            self._send_next()
        return write.done

    async def close(self) -> None:
        """Wait until every write has been answered."""
        while self._in_flight is not None:
            await self._in_flight

    def _expired(self, write: _Write) -> None:
        if not write.waiting:
            return
        reasons = [f"{url}: {why}" for url, why in write.failures.items()]
        if write in self._sending:
            waited = self.reactor.seconds() - self._sent_at
            reasons.append(f"{self._sending_to}: no answer within {waited:g}s")
        write.fail(EtcdUnavailable(
            f"no etcd member acknowledged the write within {self.budget:g}s"
            + (": " + "; ".join(reasons) if reasons else "")
        ))
        if write in self._queue:
            self._queue.remove(write)
        if self._in_flight is not None and not any(w.waiting for w in self._sending):
            self._in_flight.cancel()  # nobody waits for it: the next transaction goes now

    def _send_next(self) -> None:
        self._queue = [w for w in self._queue if w.waiting]
        if not self._queue:
            self._in_flight = None
            self._sending = []
            return
        keys: set[bytes] = set()
        taken = 0
        for write in self._queue:
            if write.key not in keys and len(keys) == self.max_txn_ops:
                break
            keys.add(write.key)
            taken += 1
        self._sending, self._queue = self._queue[:taken], self._queue[taken:]
        self._in_flight = Deferred.fromCoroutine(self._commit(self._sending))
        self._in_flight.addErrback(self._log_failure)
        self._in_flight.addBoth(lambda _: self._send_next())

    def _log_failure(self, failure: Failure) -> None:
        self.log.failure("etcd group commit failed", failure)

    async def _commit(self, batch: list[_Write]) -> None:
        index = self.gateway.members.current
        url = self._sending_to = self.gateway.members.nodes[index]
        self._sent_at = self.reactor.seconds()
        values = {w.key: w.value for w in batch}  # the last value for a key wins
        try:
            reply = await self.gateway.call(url, "/v3/kv/txn", put_transaction(values.items()))
        except Exception as e:
            if not any(w.waiting for w in batch):
                return  # given up on: every write expired (see _expired)
            self._failed(index, url, batch, e)
            return
        header = Header._parse(reply.get("header", {}))
        if not reply.get("succeeded", False) or header.revision is None:
            self._failed(index, url, batch, EtcdUnavailable(f"unexpected answer {reply!r}"))
            return
        self.transactions += 1
        for write in batch:
            write.succeed(int(header.revision))

    def _failed(self, index: int, url: str, batch: list[_Write], e: Exception) -> None:
        why = describe(e)
        self.log.warn("etcd write of {keys} key(s) to {url} failed: {why}",
                      keys=len({w.key for w in batch}), url=url, why=why)
        if not isinstance(e, EXPECTED_FAILURES):
            self.log.failure("unexpected error writing to {url}", Failure(e), url=url)
        if isinstance(e, EtcdHTTPError) and not e.member_failed:
            # The request itself is refused: no member would take it.
            for write in batch:
                write.fail(EtcdUnavailable(f"etcd refused the write: {url}: {why}"))
            return
        self.gateway.members.failed(index)
        self._retry(url, batch, why)

    def _retry(self, url: str, batch: list[_Write], why: str) -> None:
        """Put ``batch`` back at the head of the queue, except the writes that every member has
        now failed."""
        again = []
        for write in batch:
            if not write.waiting:
                continue
            write.failures[url] = why
            if len(write.failures) < len(self.gateway.members):
                again.append(write)
                continue
            reasons = "; ".join(f"{u}: {w}" for u, w in write.failures.items())
            write.fail(EtcdUnavailable(
                f"no etcd member acknowledged the write within"
                f" {self.gateway.dial_timeout:g}s each: {reasons}"
            ))
        self._queue[:0] = again
