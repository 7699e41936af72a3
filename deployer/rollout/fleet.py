"""Rollout slots shared by the fleet, in etcd (etcd's lock recipe with room for N holders).

A host that wants a slot of ``app`` writes ``<prefix>/_/rollout/<app>/<lease id hex>``, bound to
its lease, in a transaction that succeeds only when the key does not exist yet (value
``{"host", "container", "since"}``). The key's create revision is the host's place in the
queue: it holds a slot while fewer than ``limit`` of the app's keys were created before its
own. Releasing deletes the key; a host that dies frees its place when its lease expires.

Waiting is a short read of the keys created up to one's own (sorted by create revision,
serializable, so served by the member itself), repeated on the clock: every ``poll_interval``
seconds for the hosts next in line, ``k`` times that for a host about ``k`` replacements from a
slot (up to ``max_poll_interval``). Nothing is written while waiting, and a freed slot goes to
exactly the host next in line, so there is no thundering herd. :meth:`FleetSlots.nudge` wakes
the waiters of an app at once (for a caller that learns of a change some other way).

On one host, the containers of one app take their turns one at a time (a
:class:`~deployer.rollout.slots.LocalSlots` of 1 in front of etcd). While the lease is lost no
slot is taken: :meth:`FleetSlots.acquire` waits for the next lease and queues anew.

A queue write that timed out on a member that hung may still be applied when that member comes
back, after the host retried elsewhere, took its turn and deleted its key: the key is back,
bound to a lease that the host keeps alive, and holds the app's line up. So every
:data:`SWEEP_INTERVAL` seconds (:class:`SlotSweeper`), and after each release, the host deletes
the keys of its lease that no acquisition of its own uses (:meth:`FleetSlots.sweep`).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from typing import Any, TypeVar

from twisted.application.internet import TimerService
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from deployer.backoff import RetryPolicy, backoff, retrying
from deployer.errors import EtcdError
from deployer.rollout.gateway import (
    KV_TXN,
    Gateway,
    KeyValue,
    b64,
    call,
    created_at,
    describe,
    get_prefix,
    is_lease_not_found,
    json_value,
    key_values,
    revision,
)
from deployer.rollout.gateway import (
    delete as delete_key,
)
from deployer.rollout.keys import RolloutKeys, check_hostname
from deployer.rollout.lease import Lease, LeaseKeeper
from deployer.rollout.slots import LocalSlots, Slot, after

POLL_INTERVAL = 0.1
"""Seconds between two looks at the queue, for the host next in line."""

MAX_POLL_INTERVAL = 2.0
"""Seconds between two looks at the queue, at most (hosts far back in the line)."""

SWEEP_INTERVAL = 60.0
"""Seconds between two sweeps of this host's slot keys that nothing here uses."""

T = TypeVar("T")


class FleetSlots:
    """Slots of each app shared by every host under one etcd prefix (see the module
    docstring); ``limit`` is ``--max_unavailable`` (0: no limit, nothing is asked of etcd)."""

    log = Logger()

    def __init__(
        self,
        gateway: Gateway,
        keeper: LeaseKeeper,
        keys: RolloutKeys,
        clock: IReactorTime,
        *,
        hostname: str,
        limit: int = 1,
        poll_interval: float = POLL_INTERVAL,
        max_poll_interval: float = MAX_POLL_INTERVAL,
        retry: RetryPolicy | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if limit < 0:
            raise ValueError(f"--max_unavailable cannot be negative: {limit}")
        self.gateway = gateway
        self.keeper = keeper
        self.keys = keys
        self.clock = clock
        self.hostname = check_hostname(hostname)
        self.limit = limit
        self.poll_interval = poll_interval
        self.max_poll_interval = max(poll_interval, max_poll_interval)
        self.retry = retry or backoff(0.25, 5.0, floor=0.05, rng=rng or random.Random())
        self.local = LocalSlots(clock, 1)
        self.polls = 0
        self._deleting: dict[str, Deferred[None]] = {}
        self._sleepers: dict[str, list[Deferred[None]]] = {}
        self._in_use: set[str] = set()
        self.sweeps = 0
        """Sweeps done (each a read of this host's keys, then their deletes)."""
        self.swept = 0
        """Keys deleted by the sweeps."""

    # -- the interface ------------------------------------------------------------------------

    def acquire(self, app: str, container: str) -> Deferred[Slot]:
        """A slot of ``app`` for replacing ``container``, once this host's turn has come.
        Cancelling the Deferred gives up the place in the queue (the key is deleted)."""
        if self.limit == 0:
            return succeed(Slot(app, container, 0.0))
        return Deferred.fromCoroutine(self._acquire(app, container))

    def nudge(self, app: str) -> None:
        """Look at ``app``'s queue now instead of at the next poll."""
        for d in self._sleepers.pop(app, []):
            d.callback(None)

    # -- taking a slot ------------------------------------------------------------------------

    async def _acquire(self, app: str, container: str) -> Slot:
        started = self.clock.seconds()
        turn = await self.local.acquire(app, container)
        try:
            key, lease, created = await self._take(app, container)
        except BaseException:
            turn.release()
            raise
        waited = self.clock.seconds() - started
        self.log.info(
            "rollout slot of {app} taken for {container} after {waited:.2f}s (key {key})",
            app=app,
            container=container,
            waited=waited,
            key=key,
        )

        def release() -> Deferred[None]:
            done = self._forget(app, key, lease, created)  # before the next local turn
            turn.release()
            return done

        return Slot(app, container, waited, key=key, lease=lease, release=release)

    async def _take(self, app: str, container: str) -> tuple[str, Lease, int]:
        while True:
            lease = await self.keeper.wait()
            key = self.keys.slot(app, lease.id)
            pending = self._deleting.get(key)
            if pending is not None:  # an earlier release of this very key is still going
                await after(pending)
                continue
            self._in_use.add(key)
            created: int | None = None
            try:
                created = await self._enqueue(app, key, container, lease)
                if created is not None and await self._wait_turn(
                    app, key, container, created, lease
                ):
                    return key, lease, created
            except BaseException:
                self._forget(app, key, lease, created)
                raise
            self._forget(app, key, lease, created)

    async def _enqueue(self, app: str, key: str, container: str, lease: Lease) -> int | None:
        """Write this host's key; its create revision, or None once the lease is lost."""
        value = {"host": self.hostname, "container": container, "since": self.clock.seconds()}
        put = [{"request_put": {"key": b64(key), "value": json_value(value),
                                "lease": str(lease.id)}}]
        create = {
            "compare": [created_at(key, 0)],  # no such key yet
            "success": put,
            "failure": [{"request_range": {"key": b64(key)}}],
        }

        async def txn(body: dict[str, Any]) -> dict[str, Any] | None:
            """etcd's answer to ``body``; None once the lease is lost."""
            if not lease.alive:
                return None
            try:
                return await call(self.gateway, KV_TXN, body)
            except Exception as e:
                if not is_lease_not_found(e):
                    raise
                self.keeper.invalidate(lease, "etcd no longer knows it (seen taking a slot)")
                return None

        while True:
            reply = await self._retrying(partial(txn, create),
                                         "queue for a rollout slot of {app}", app=app)
            if reply is None:
                return None
            if reply.get("succeeded", False):
                return revision(reply)
            responses = reply.get("responses") or [{}]
            existing = key_values(responses[0].get("response_range", {}))
            if not existing:
                continue  # deleted between the compare and the read: try again
            if existing[0].lease != lease.id:
                raise EtcdError(f"{key} is bound to lease {existing[0].lease:x}, not ours")
            # Ours, left by an earlier wait: our place. Written again (while it is that key),
            # so that a sweep's delete of it, guarded by the revision it read, misses.
            place = existing[0].create_revision
            rewrite = {"compare": [created_at(key, place)], "success": put}
            reply = await self._retrying(partial(txn, rewrite),
                                         "queue for a rollout slot of {app}", app=app)
            if reply is None:
                return None
            if reply.get("succeeded", False):
                return place
            # gone or changed meanwhile: queue anew

    async def _wait_turn(
        self, app: str, key: str, container: str, created: int, lease: Lease
    ) -> bool:
        """True once this host holds a slot; False when its key or its lease is gone."""

        async def read() -> tuple[int, list[KeyValue]] | None:
            """The revision of the read and the app's keys created up to ours, oldest first;
            None once the lease is lost."""
            if not lease.alive:
                return None
            return await get_prefix(
                self.gateway,
                self.keys.slots(app),
                sort_order="ASCEND",
                sort_target="CREATE",
                max_create_revision=str(created),
                serializable=True,
            )

        place = -1
        while True:
            got = await self._retrying(read, "read the rollout queue of {app}", app=app)
            if got is None:
                return False
            read_at, kvs = got
            self.polls += 1
            if read_at < created:  # a member that has not applied our write yet
                await self._sleep(app, self.poll_interval)
                continue
            queue = [kv for kv in kvs if self.keys.slot_lease(app, kv.key) is not None]
            if not any(kv.key == key for kv in queue):
                self.log.warn(
                    "rollout slot key {key} is gone before its turn (lease lost, or deleted by"
                    " hand); queueing again",
                    key=key,
                )
                return False
            ahead = [kv for kv in queue if kv.create_revision < created]
            if len(ahead) < self.limit:
                return True
            behind = len(ahead) - self.limit + 1
            if behind != place:
                place = behind
                self.log.info(
                    "waiting for a rollout slot of {app} for {container}: {behind} ahead of"
                    " this host; replacing now: {holders}",
                    app=app,
                    container=container,
                    behind=behind,
                    holders=", ".join(_describe(kv) for kv in ahead[: self.limit]),
                )
            await self._sleep(app, self._interval(behind))

    def _interval(self, behind: int) -> float:
        """How long to wait before the next look, ``behind`` releases away from a slot: the
        ``limit`` holders release in parallel, so about ``behind / limit`` replacements."""
        rounds = -(-behind // self.limit)
        return min(self.max_poll_interval, self.poll_interval * rounds)

    def _sleep(self, app: str, seconds: float) -> Deferred[None]:
        timer: IDelayedCall | None = None

        def cancel(d: Deferred[None]) -> None:
            if timer is not None and timer.active():
                timer.cancel()
            sleepers = self._sleepers.get(app, [])
            if d in sleepers:
                sleepers.remove(d)

        def wake() -> None:
            sleepers = self._sleepers.get(app, [])
            if d in sleepers:
                sleepers.remove(d)
                d.callback(None)

        def woken(result: object) -> object:
            if timer is not None and timer.active():
                timer.cancel()
            return result

        d: Deferred[None] = Deferred(cancel)
        self._sleepers.setdefault(app, []).append(d)
        timer = self.clock.callLater(seconds, wake)
        d.addBoth(woken)
        return d

    # -- keys nothing here uses ---------------------------------------------------------------

    async def sweep(self) -> int:
        """Delete the slot keys of this host's lease that no acquisition here uses (see the
        module docstring); how many. Each is deleted only while it is the key that was read."""
        lease = self.keeper.current
        if lease is None:
            return 0
        _, kvs = await get_prefix(self.gateway, self.keys.rollouts, keys_only=True)
        swept = 0
        for kv in kvs:
            owner = self.keys.slot_owner(kv.key)
            if owner is None or owner[1] != lease.id or kv.key in self._in_use:
                continue
            if await delete_key(self.gateway, kv.key, kv.mod_revision):
                swept += 1
                self.log.warn(
                    "rollout slot key {key} of this host was in no queue of its own (a queue"
                    " write applied late, after its delete): deleted, so that it holds no line up",
                    key=kv.key,
                )
        self.swept += swept
        self.sweeps += 1
        return swept

    async def sweep_logged(self) -> None:
        """:meth:`sweep`, its failure logged (etcd away: the next sweep tries again)."""
        try:
            await self.sweep()
        except CancelledError:
            pass  # the daemon stops
        except Exception as e:
            self.log.warn("could not sweep this host's rollout slot keys: {why}",
                          why=describe(e))

    # -- giving a slot back -------------------------------------------------------------------

    def _forget(self, app: str, key: str, lease: Lease,
                created: int | None = None) -> Deferred[None]:
        """Delete ``key``, retrying until etcd did or the lease is lost (the key then goes
        with it); fires when done, and never fails."""
        pending = self._deleting.get(key)
        if pending is None:
            pending = Deferred.fromCoroutine(self._delete(app, key, lease, created))
            self._deleting[key] = pending

            def done(result: object) -> object:
                if self._deleting.get(key) is pending:
                    del self._deleting[key]
                    self._in_use.discard(key)
                return result

            pending.addBoth(done)
        return after(pending)

    async def _delete(self, app: str, key: str, lease: Lease, created: int | None) -> None:
        """Delete ``key``: only while it is the one created at ``created`` when that is known,
        so that a delete applied late never takes a later wait's key."""

        async def delete() -> bool:
            """Whether this deleted the key (False: it goes with its lost lease)."""
            try:
                await delete_key(self.gateway, key, create_revision=created or 0)
            except Exception as e:
                if lease.alive:
                    raise
                self.log.info(
                    "rollout slot key {key} goes with its lost lease ({why})",
                    key=key,
                    why=describe(e),
                )
                return False
            return True

        if await self._retrying(delete, "free the rollout slot {key}", key=key):
            self.log.debug("rollout slot of {app} freed ({key})", app=app, key=key)
        Deferred.fromCoroutine(self.sweep_logged())  # never fails; not waited for

    def _retrying(self, attempt: Callable[[], Awaitable[T]], what: str, **fields: object
                  ) -> Coroutine[Any, Any, T]:
        """``attempt()`` until it returns (see :func:`~deployer.backoff.retrying`), each failure
        logged as "could not <what>: <why>; again in <delay>s" (``what`` a log format, with
        ``fields``)."""

        def failed(error: Exception, failures: int, delay: float) -> None:
            self.log.warn("could not " + what + ": {why}; again in {delay:.1f}s",
                          why=describe(error), delay=delay, **fields)

        return retrying(self.retry, self.clock, attempt, failed)


def _describe(kv: KeyValue) -> str:
    """``host (container)`` of a slot key, for the log."""
    try:
        value = kv.json()
        return f"{value['host']} ({value['container']})"
    except (ValueError, KeyError, TypeError):
        return kv.key


class SlotSweeper(TimerService):
    """Runs :meth:`FleetSlots.sweep` every ``interval`` seconds while the daemon runs; a sweep
    in flight when it stops is given up."""

    def __init__(self, slots: FleetSlots, interval: float = SWEEP_INTERVAL) -> None:
        super().__init__(interval, self._sweep)
        self.clock = slots.clock
        self.slots = slots
        self._sweeping: Deferred[None] | None = None

    def _sweep(self) -> Deferred[None]:
        self._sweeping = Deferred.fromCoroutine(self.slots.sweep_logged())
        return self._sweeping

    def stopService(self) -> Deferred[None]:
        if self._sweeping is not None and not self._sweeping.called:
            self._sweeping.cancel()
        stopped: Deferred[None] = super().stopService()
        return stopped
