"""The host's etcd lease, kept alive: what binds its rollout slots and its status to its life.

:class:`LeaseKeeper` is a service. It asks etcd for a lease of ```ttl`` seconds, re-posts
``/v3/lease/keepalive`` every ``ttl / 3`` seconds (a tenth of the TTL after one failed), and
counts the lease as held until ``ttl``
seconds after it *sent* the last keepalive that etcd answered (etcd renewed it after that, so it
lives at least that long). The lease is lost when

- a keepalive answers TTL 0, or etcd says it does not know the lease (it expired, or an
  operator revoked it): at once;
- no keepalive was answered for ``ttl`` seconds (etcd unreachable, or answers hung): then etcd
  has let it expire, or will have by the time anyone else could act on that.

A lost lease is logged as an error, every holder learns of it (:meth:`Lease.when_lost`,
:meth:`LeaseKeeper.observe`), and the keeper asks for a new lease, with backoff, until etcd
grants one. Stopping the service revokes the lease, so that the host's keys go at once. Every
timer runs on the clock given.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from deployer.backoff import RetryPolicy, backoff, retrying
from deployer.errors import EtcdError
from deployer.loops import LoopService
from deployer.rollout.gateway import (
    LEASE_GRANT,
    LEASE_KEEPALIVE,
    LEASE_REVOKE,
    Gateway,
    as_int,
    call,
    describe,
    is_lease_not_found,
)
from deployer.timeouts import cancel_after

DEFAULT_TTL = 10
"""Seconds a lease outlives the last keepalive etcd answered: how long a dead host's slot
stays taken."""

RETRIES_PER_TTL = 10
"""After a failed keepalive the next goes out a tenth of the TTL later (not a third), so that
a short interruption of etcd costs no lease."""


T = TypeVar("T")


class NoLease(EtcdError):
    """The keeper stopped before it held a lease."""


def _waiter(waiting: list[Deferred[T]]) -> Deferred[T]:
    """A new Deferred, in ``waiting`` until its owner fires it; cancelling it takes it out."""

    def forget(d: Deferred[T]) -> None:
        if d in waiting:
            waiting.remove(d)

    d: Deferred[T] = Deferred(forget)
    waiting.append(d)
    return d


@attrs.define(eq=False)
class Lease:
    """One lease that etcd granted. ``granted`` is the clock's time when it was asked for."""

    id: int
    ttl: int
    granted: float
    lost_reason: str | None = None
    _losses: list[Deferred[str]] = attrs.field(factory=list, init=False, repr=False)

    @property
    def hex(self) -> str:
        """The id as etcdctl prints it."""
        return f"{self.id:x}"

    @property
    def alive(self) -> bool:
        """Whether the keeper still counts the lease as held."""
        return self.lost_reason is None

    def when_lost(self) -> Deferred[str]:
        """Fires with the reason once the lease is lost (at once when it is already)."""
        if self.lost_reason is not None:
            return succeed(self.lost_reason)
        return _waiter(self._losses)

    def mark_lost(self, reason: str) -> bool:
        """Count the lease as lost (done by its keeper); False when it was already."""
        if self.lost_reason is not None:
            return False
        self.lost_reason = reason
        waiting, self._losses = self._losses, []
        for d in waiting:
            d.callback(reason)
        return True


GrantedObserver = Callable[[Lease], object]
LostObserver = Callable[[Lease, str], object]


class LeaseKeeper(LoopService):
    """Holds one etcd lease at a time for as long as it runs (see the module docstring).

    ``held`` and ``reason`` say whether a lease is held, and why not (for ``/healthz``);
    :meth:`wait` gives the lease once one is held. ``request_timeout`` bounds a grant or a
    revoke (default: the TTL).
    """

    log = Logger()

    def __init__(
        self,
        gateway: Gateway,
        clock: IReactorTime,
        *,
        ttl: int = DEFAULT_TTL,
        retry: RetryPolicy | None = None,
        request_timeout: float | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if ttl < 2:
            raise ValueError(f"a lease TTL of {ttl}s is too short (at least 2s)")
        self.gateway = gateway
        self.clock = clock
        self.ttl = ttl
        self.retry = retry or backoff(
            0.5, max(1.0, ttl / 2), floor=0.1, rng=rng or random.Random()
        )
        self.request_timeout = request_timeout if request_timeout is not None else float(ttl)
        self.grants = 0
        self.losses = 0
        self._lease: Lease | None = None
        self._reason = "not started"
        self._last_loss = ""
        self._waiting: list[Deferred[Lease]] = []
        self._granted: list[GrantedObserver] = []
        self._lost: list[LostObserver] = []
        self._keeping: _Keepalive | None = None

    # -- what holders see ---------------------------------------------------------------------

    @property
    def current(self) -> Lease | None:
        """The lease held now, if any."""
        return self._lease if self._lease is not None and self._lease.alive else None

    @property
    def held(self) -> bool:
        return self.current is not None

    @property
    def reason(self) -> str:
        """Why no lease is held ("" while one is)."""
        return "" if self.held else self._reason

    def wait(self) -> Deferred[Lease]:
        """The lease, once one is held (at once when it is). Cancellable; fails with
        :class:`NoLease` when the keeper stops first."""
        lease = self.current
        if lease is not None:
            return succeed(lease)
        return _waiter(self._waiting)

    def observe(
        self, granted: GrantedObserver | None = None, lost: LostObserver | None = None
    ) -> None:
        """Call ``granted(lease)`` for every lease granted from now on, and ``lost(lease,
        reason)`` for every one lost."""
        if granted is not None:
            self._granted.append(granted)
        if lost is not None:
            self._lost.append(lost)

    def invalidate(self, lease: Lease, reason: str) -> None:
        """A request found that ``lease`` is gone (etcd: lease not found): count it lost now
        rather than at the next keepalive."""
        if self._keeping is not None and self._keeping.lease is lease:
            self._keeping.finish(reason)

    # -- the service --------------------------------------------------------------------------

    def startService(self) -> None:
        self._reason = "no lease yet: asking etcd for one"
        super().startService()

    def stopService(self) -> Deferred[None]:
        super().stopService()  # cancels the loop; stopping waits for the revoke below
        self._reason = "stopped"
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.errback(NoLease("the rollout lease keeper stopped"))
        lease = self.current
        if lease is None:
            return succeed(None)
        self._lose(lease, "stopped")
        return Deferred.fromCoroutine(self._revoke(lease))

    def _crashed(self, failure: Failure) -> None:
        self._reason = f"the lease keeper failed: {failure.getErrorMessage()}"
        self.log.failure("rollout lease keeper failed", failure)

    async def _revoke(self, lease: Lease) -> None:
        d = call(self.gateway, LEASE_REVOKE, {"ID": str(lease.id)})
        try:
            await cancel_after(d, self.request_timeout, self.clock, "lease revoke")
        except Exception as e:
            self.log.warn(
                "could not revoke rollout lease {lease}: {why}; its keys go when it expires"
                " in {ttl}s",
                lease=lease.hex,
                why=describe(e),
                ttl=lease.ttl,
            )
        else:
            self.log.info("rollout lease {lease} revoked", lease=lease.hex)

    async def _run(self) -> None:
        while True:
            lease = await self._grant()
            self._lease = lease
            self._keeping = _Keepalive(self, lease)  # before anyone hears of the lease
            try:
                self._hold(lease)
                await self._keeping.done
            finally:
                self._keeping = None

    def _grant(self) -> Coroutine[Any, Any, Lease]:
        """A new lease, asked for until etcd grants one."""
        return retrying(self.retry, self.clock, self._grant_once, self._not_granted)

    async def _grant_once(self) -> Lease:
        sent = self.clock.seconds()
        d = call(self.gateway, LEASE_GRANT, {"TTL": self.ttl})
        reply = await cancel_after(d, self.request_timeout, self.clock, "lease grant")
        lease_id, ttl = as_int(reply.get("ID")), as_int(reply.get("TTL"))
        if lease_id <= 0 or ttl <= 0:
            raise EtcdError(f"etcd granted no usable lease: {reply!r}")
        return Lease(lease_id, ttl, sent)

    def _not_granted(self, error: Exception, failures: int, delay: float) -> None:
        why = describe(error)
        self._reason = (
            f"{self._last_loss}; etcd did not grant a new one: {why}"
            if self._last_loss
            else f"no lease: etcd did not grant one: {why}"
        )
        self.log.warn(
            "rollout lease: etcd did not grant one ({attempt} failed): {why};"
            " trying again in {delay:.1f}s",
            attempt=failures,
            why=why,
            delay=delay,
        )

    def _hold(self, lease: Lease) -> None:
        self._last_loss = ""
        self.grants += 1
        self.log.info(
            "rollout lease {lease} granted (TTL {ttl}s)", lease=lease.hex, ttl=lease.ttl
        )
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(lease)
        for observer in list(self._granted):
            self._notify(observer, lease)

    def _lose(self, lease: Lease, reason: str) -> None:
        if not lease.mark_lost(reason):
            return
        self.losses += 1
        if reason != "stopped":
            self._last_loss = f"lease {lease.hex} lost: {reason}"
            self._reason = f"{self._last_loss}; asking etcd for a new one"
            self.log.error(
                "rollout lease {lease} lost: {reason}. A replacement in progress finishes;"
                " no new rollout slot is taken until etcd grants a new lease",
                lease=lease.hex,
                reason=reason,
            )
        for observer in list(self._lost):
            self._notify(observer, lease, reason)

    def _notify(self, observer: Callable[..., object], *args: object) -> None:
        try:
            observer(*args)
        except Exception:
            self.log.failure("a rollout lease observer ({observer!r}) failed", observer=observer)


class _Keepalive:
    """Keeps one lease alive; :attr:`done` fires with the reason once it is lost."""

    log = Logger()

    def __init__(self, keeper: LeaseKeeper, lease: Lease) -> None:
        self.keeper = keeper
        self.lease = lease
        self.clock = keeper.clock
        self.done: Deferred[str] = Deferred(lambda _: self._stop())
        self.failures = 0
        self.last_error = ""
        self._in_flight: Deferred[Any] | None = None
        now = self.clock.seconds()
        self._expiry: IDelayedCall = self.clock.callLater(
            max(0.0, lease.granted + lease.ttl - now), self._expired
        )
        self._retry: IDelayedCall | None = None
        self._tick = LoopingCall(self._send)
        self._tick.clock = self.clock
        self._tick.start(lease.ttl / 3, now=False)

    def finish(self, reason: str) -> None:
        """The lease is lost: count it so at once, then let the keeper ask for a new one."""
        if self.done.called:
            return
        self._stop()
        self.keeper._lose(self.lease, reason)
        self.done.callback(reason)

    def _stop(self) -> None:
        if self._tick.running:
            self._tick.stop()
        if self._expiry.active():
            self._expiry.cancel()
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        in_flight, self._in_flight = self._in_flight, None
        if in_flight is not None:
            in_flight.cancel()

    def _send(self) -> None:
        if self._in_flight is not None:  # the last one has not answered yet
            return
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        sent = self.clock.seconds()
        d = call(self.keeper.gateway, LEASE_KEEPALIVE, {"ID": str(self.lease.id)})
        self._in_flight = d  # before the callbacks, which clear it (at once if d has fired)
        d.addCallback(self._answered, sent).addErrback(self._failed)

    def _answered(self, reply: dict[str, object], sent: float) -> None:
        self._in_flight = None
        result = reply.get("result", reply)
        ttl = as_int(result.get("TTL")) if isinstance(result, dict) else 0
        if ttl <= 0:
            self.finish("etcd says it expired (keepalive answered TTL 0)")
            return
        if self.failures:
            self.log.info(
                "rollout lease {lease}: keepalive answered again after {n} failure(s)",
                lease=self.lease.hex,
                n=self.failures,
            )
            self.failures = 0
        if self._expiry.active():
            self._expiry.reset(max(0.0, sent + ttl - self.clock.seconds()))

    def _failed(self, failure: Failure) -> None:
        self._in_flight = None
        if self.done.called or failure.check(CancelledError):
            return
        if is_lease_not_found(failure.value):
            self.finish("etcd no longer knows it (expired or revoked)")
            return
        self.failures += 1
        self.last_error = describe(failure.value)
        delay = self.lease.ttl / RETRIES_PER_TTL
        self.log.warn(
            "rollout lease {lease}: keepalive failed ({n} in a row): {why}; again in"
            " {delay:.1f}s",
            lease=self.lease.hex,
            n=self.failures,
            why=self.last_error,
            delay=delay,
        )
        self._retry = self.clock.callLater(delay, self._send)

    def _expired(self) -> None:
        why = f" (last error: {self.last_error})" if self.last_error else ""
        self.finish(f"no keepalive answered within its TTL of {self.lease.ttl}s{why}")
