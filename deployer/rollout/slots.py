"""Rollout slots: the right to take one instance of an app offline, and the in-process kind.

An app is a ``repo:tag`` (:func:`deployer.rollout.keys.app_name`). A host takes a slot of the
app before it stops a stale container and releases it once the replacement is ready, so that at
most ``limit`` (``--max_unavailable``; 0: no limit) instances of the app are being replaced at
once. Waiters are served in the order they asked. :class:`Slots` is the interface; this module
has :class:`LocalSlots`, within one process (standalone mode, and one container of an app at a
time on a host); :class:`deployer.rollout.fleet.FleetSlots` shares slots across the fleet.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, DeferredSemaphore, succeed
from twisted.internet.interfaces import IReactorTime

from deployer.rollout.lease import Lease

ReleaseFunction = Callable[[], Deferred[None]]


def _nothing_to_release() -> Deferred[None]:
    return succeed(None)


def after(d: Deferred[Any]) -> Deferred[None]:
    """A Deferred that fires (with None) once ``d`` has, whatever ``d``'s result, which stays
    ``d``'s; cancelling it leaves ``d`` alone."""
    done: Deferred[None] = Deferred()

    def fired(result: object) -> object:
        if not done.called:
            done.callback(None)
        return result

    d.addBoth(fired)
    return done


@attrs.define(eq=False)
class Slot:
    """A slot held for replacing ``container`` of ``app``.

    ``waited`` is how long :meth:`Slots.acquire` waited for it, in seconds (the metric of time
    waiting for a slot). A fleet slot is bound to ``lease``; once that is lost, :attr:`lost`
    is true: another host may have the slot now, so the holder finishes the replacement it
    started and takes no new slot until it holds a lease again (which
    :class:`~deployer.rollout.fleet.FleetSlots` enforces).
    """

    app: str
    container: str
    waited: float
    key: str | None = None
    lease: Lease | None = None
    _release: ReleaseFunction = attrs.field(default=_nothing_to_release, repr=False)
    _released: Deferred[None] | None = attrs.field(default=None, init=False, repr=False)

    @property
    def lost(self) -> bool:
        """Whether the lease of this slot was lost while it was held."""
        return self.lease is not None and not self.lease.alive

    @property
    def lost_reason(self) -> str | None:
        return self.lease.lost_reason if self.lease is not None else None

    @property
    def released(self) -> bool:
        return self._released is not None

    def when_lost(self) -> Deferred[str]:
        """Fires with the reason if the slot's lease is lost (never for a local slot)."""
        return self.lease.when_lost() if self.lease is not None else Deferred()

    def release(self) -> Deferred[None]:
        """Give the slot back (once; later calls wait for the same release). Fires when the
        next waiter can have it; it never fails (a failure is logged where it happens)."""
        if self._released is None:
            self._released = self._release()
        return after(self._released)


class Slots(Protocol):
    """Where slots come from."""

    def acquire(self, app: str, container: str) -> Deferred[Slot]:
        """A slot of ``app`` for replacing ``container``, once it is this caller's turn.
        Cancelling the Deferred gives up the place in the queue."""
        ...


@attrs.frozen
class Turn:
    """A container in an app's line: ``since`` is when it asked for a slot."""

    container: str
    since: float


@attrs.frozen
class Holding:
    """What :meth:`LocalSlots.holding` reports of one app, each in the order they asked."""

    replacing: tuple[Turn, ...]
    waiting: tuple[Turn, ...]


class LocalSlots:
    """Slots within this process: per app, ``limit`` at once (0: no limit), first come first
    served; apps are independent. Every timer reads ``clock``."""

    def __init__(self, clock: IReactorTime, limit: int = 1) -> None:
        if limit < 0:
            raise ValueError(f"a slot limit cannot be negative: {limit}")
        self.clock = clock
        self.limit = limit
        self._queues: dict[str, DeferredSemaphore] = {}
        self._holders: dict[str, list[tuple[Turn, Slot]]] = {}
        self._waiters: dict[str, list[Turn]] = {}

    def acquire(self, app: str, container: str) -> Deferred[Slot]:
        turn = Turn(container, self.clock.seconds())
        if self.limit == 0:
            return succeed(self._held(app, turn, None))
        queue = self._queues.get(app)
        if queue is None:
            queue = self._queues[app] = DeferredSemaphore(self.limit)
        waiters = self._waiters.setdefault(app, [])
        waiters.append(turn)

        def left(result: object) -> object:
            waiters.remove(turn)
            if not waiters and self._waiters.get(app) is waiters:
                del self._waiters[app]
            return result

        return queue.acquire().addBoth(left).addCallback(lambda _: self._held(app, turn, queue))

    def _held(self, app: str, turn: Turn, queue: DeferredSemaphore | None) -> Slot:
        slot: Slot

        def release() -> Deferred[None]:
            self._holders[app].remove((turn, slot))
            if not self._holders[app]:
                del self._holders[app]
            if queue is not None:
                queue.release()
                if queue.tokens == queue.limit and self._queues.get(app) is queue:
                    del self._queues[app]
            return succeed(None)

        slot = Slot(app, turn.container, self.clock.seconds() - turn.since, release=release)
        self._holders.setdefault(app, []).append((turn, slot))
        return slot

    def holding(self) -> dict[str, Holding]:
        """Per app: the containers being replaced, and those waiting for a slot."""
        apps = set(self._holders) | set(self._waiters)
        return {
            app: Holding(
                replacing=tuple(turn for turn, _ in self._holders.get(app, ())),
                waiting=tuple(self._waiters.get(app, ())),
            )
            for app in sorted(apps)
        }
