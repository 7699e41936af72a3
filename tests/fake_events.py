"""An event source for fast tests: what :class:`deployer.events.EngineEvents` offers its
subscribers, driven by the test (each test module says how its events look)."""

from __future__ import annotations

from collections.abc import Callable

import attrs

from deployer.events import ContainerEvent


@attrs.define(eq=False)
class Subscription:
    events: FakeEventSource
    on_event: Callable[[ContainerEvent], object]
    on_resync: Callable[[], object] | None

    def cancel(self) -> None:
        if self in self.events.subscribers:
            self.events.subscribers.remove(self)


class FakeEventSource:
    """Subscribers hear :meth:`publish`\\ ed events in the order they subscribed; ``time`` is
    the last event's ``time_nano`` (:meth:`tick` moves it on)."""

    def __init__(self, time: int = 0) -> None:
        self.subscribers: list[Subscription] = []
        self.time = time

    def subscribe(self, on_event: Callable[[ContainerEvent], object],
                  on_resync: Callable[[], object] | None = None) -> Subscription:
        subscription = Subscription(self, on_event, on_resync)
        self.subscribers.append(subscription)
        return subscription

    def tick(self) -> int:
        self.time += 1
        return self.time

    def publish(self, event: ContainerEvent) -> None:
        for subscription in list(self.subscribers):
            subscription.on_event(event)

    def resync(self) -> None:
        for subscription in list(self.subscribers):
            if subscription.on_resync is not None:
                subscription.on_resync()
