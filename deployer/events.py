"""The Docker engine's event stream: one ``GET /events`` per engine, shared by every subscriber.

:class:`EngineEvents` is a Service that keeps one stream of container events open
(``filters={"type": ["container"], "event": [...]}``), reads its JSON lines with
:class:`~deployer.lines.JSONLinesReader`, parses each into a :class:`ContainerEvent` and hands it
to every subscriber. When the stream drops (the engine restarted, the socket closed) it
reconnects after a backoff, asking the engine for the events ``since`` the last one it
delivered, so that a short drop loses nothing the engine still remembers; the event at that very
instant, which the engine sends again, is not delivered twice.

An engine that restarted remembers nothing from before, so events can be lost across a drop.
Every time a stream is (re)established, subscribers are told to *resync*: to look at the state
they care about once more. A subscriber that subscribes, then inspects the current state, then
relies on events and resyncs, misses nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from deployer.backoff import RetryPolicy, backoff
from deployer.lines import JSONLinesReader
from deployer.loops import LoopService

log = Logger()

#: The container actions the daemon acts on. ``health_status`` matches every
#: ``health_status: <status>`` (the engine matches it by prefix); leaving out ``exec_*`` keeps
#: the stream free of the three events every health probe makes.
WATCHED_ACTIONS: tuple[str, ...] = (
    "create", "start", "restart", "die", "oom", "kill", "stop", "rename", "destroy",
    "health_status",
)

RETRY_BASE = 1.0
"""Seconds before the first reconnection of a dropped stream."""
RETRY_CAP = 30.0
"""The longest wait between reconnections."""


class BadEvent(ValueError):
    """An event message that lacks what every container event has (an id and an action)."""


@attrs.frozen
class ContainerEvent:
    """One container event of the engine.

    ``action`` is the engine's own (``start``, ``die``, ``health_status: healthy``, ``rename``,
    ...); ``image`` is the image as the container was created from it (a ``repo:tag`` or an id),
    not necessarily an id; ``name`` has no leading slash; ``exit_code`` is set for ``die``.
    """

    action: str
    id: str
    name: str = ""
    image: str = ""
    time_nano: int = 0
    exit_code: int | None = None
    attributes: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def verb(self) -> str:
        """The action without its detail: ``health_status``, ``exec_start``, ``start``."""
        return self.action.partition(":")[0].strip()

    @property
    def health(self) -> str | None:
        """``healthy``, ``unhealthy`` or ``starting`` for a ``health_status`` event, else None."""
        if self.verb != "health_status":
            return None
        return self.action.partition(":")[2].strip() or None

    @property
    def time(self) -> float:
        """The engine's time of the event, in seconds since the epoch."""
        return self.time_nano / 1e9

    @property
    def old_name(self) -> str | None:
        """The name before a ``rename``."""
        old = self.attributes.get("oldName")
        return old.lstrip("/") if old else None

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> ContainerEvent | None:
        """The event of one message of ``/events``; None for an event about something other
        than a container; :class:`BadEvent` for a container event without id or action."""
        kind = obj.get("Type", "container")
        if kind != "container":
            return None
        actor = obj.get("Actor")
        if not isinstance(actor, dict):
            actor = {}
        raw = actor.get("Attributes")
        attributes = {str(k): str(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
        action = str(obj.get("Action") or obj.get("status") or "")
        container_id = str(actor.get("ID") or obj.get("id") or "")
        if not action or not container_id:
            raise BadEvent(f"a container event without action or id: {dict(obj)!r:.200}")
        time_nano = obj.get("timeNano")
        if not isinstance(time_nano, int):
            seconds = obj.get("time")
            time_nano = int(seconds) * 10**9 if isinstance(seconds, int | float) else 0
        exit_code: int | None = None
        if "exitCode" in attributes:
            try:
                exit_code = int(attributes["exitCode"])
            except ValueError:
                exit_code = None
        return cls(
            action=action,
            id=container_id,
            name=attributes.get("name", "").lstrip("/"),
            image=attributes.get("image") or str(obj.get("from") or ""),
            time_nano=time_nano,
            exit_code=exit_code,
            attributes=attributes,
        )


def since_param(time_nano: int) -> str:
    """``time_nano`` in the form ``since=`` takes: ``seconds.nanoseconds``."""
    return f"{time_nano // 10**9}.{time_nano % 10**9:09d}"


class EventStreamOpener(Protocol):
    """What the service needs of an engine client (:meth:`DockerClient.events`)."""

    def events(
        self, filters: Mapping[str, list[str]], since: str = ""
    ) -> Awaitable[IResponse]:
        """The answer of ``GET /events`` (status 200; its body is the stream); ``since``
        empty: from now on."""


class Subscription(Protocol):
    def cancel(self) -> None:
        """No more calls to the subscriber."""


class EventSource(Protocol):
    """Where container events come from: :class:`EngineEvents`, or a fake in tests."""

    def subscribe(
        self,
        on_event: Callable[[ContainerEvent], object],
        on_resync: Callable[[], object] | None = None,
    ) -> Subscription:
        """Call ``on_event`` for every event from now on, ``on_resync`` whenever events may
        have been missed (a stream was (re)established)."""


@attrs.define(eq=False)
class _Subscriber:
    source: EngineEvents
    on_event: Callable[[ContainerEvent], object]
    on_resync: Callable[[], object] | None

    def cancel(self) -> None:
        self.source._subscribers.pop(self, None)


class EngineEvents(LoopService):
    """One engine's container events, for as long as the service runs (see the module).

    :attr:`live` is True while a stream is open, :attr:`reason` says why not;
    :attr:`reconnects` counts reconnection attempts; :attr:`last_time_nano` is the time of the
    last event delivered.
    """

    def __init__(
        self,
        clock: IReactorTime,
        engine: EventStreamOpener,
        *,
        retry: RetryPolicy | None = None,
        actions: Sequence[str] | None = WATCHED_ACTIONS,
        what: str = "the Docker engine",
    ) -> None:
        self._clock = clock
        self._engine = engine
        self._retry = retry or backoff(RETRY_BASE, RETRY_CAP, floor=0.1)
        self._filters: dict[str, list[str]] = {"type": ["container"]}
        if actions is not None:
            self._filters["event"] = list(actions)
        self.what = what
        self._subscribers: dict[_Subscriber, None] = {}  # in the order they came
        self._at_last: set[tuple[str, str]] = set()
        self.last_time_nano = 0
        self.live = False
        self.reason = "not started"
        self.reconnects = 0

    # -- subscribers ----------------------------------------------------------------------------

    def subscribe(
        self,
        on_event: Callable[[ContainerEvent], object],
        on_resync: Callable[[], object] | None = None,
    ) -> Subscription:
        subscriber = _Subscriber(self, on_event, on_resync)
        self._subscribers[subscriber] = None
        return subscriber

    @property
    def subscribers(self) -> int:
        return len(self._subscribers)

    # -- the service ----------------------------------------------------------------------------

    def stopService(self) -> Deferred[None]:
        self.live = False
        self.reason = "stopped"
        return super().stopService()

    def _crashed(self, failure: Failure) -> None:
        log.failure("the event stream of {what} ended", failure, what=self.what)

    async def _run(self) -> None:
        # stopService cancels what the loop awaits; a cancelled request fails with whatever the
        # agent makes of it, so the loop checks ``running`` after every step.
        failures = 0
        while self.running:
            since = since_param(self.last_time_nano) if self.last_time_nano else ""
            try:
                response = await self._engine.events(self._filters, since)
                reader = JSONLinesReader(self._message, strict=False, what="docker events")
                response.deliverBody(reader)
                if not self.running:  # stopped while the engine answered: close it again
                    reader.done.cancel()
                    reader.done.addErrback(lambda _: None)
                    return
                self.live, self.reason = True, ""
                failures = 0
                log.info("following the container events of {what}{since}", what=self.what,
                         since=f" since {since}" if since else "")
                self._resync()
                await reader.done  # stopService cancels it, which closes the stream
                why = "the engine ended the stream"
            except CancelledError:
                raise
            except Exception as e:
                if not self.running:
                    return
                why = str(e) or type(e).__name__
            if not self.running:
                return
            delay = self._retry(failures)
            failures += 1
            self.live, self.reason = False, why
            log.warn(
                "the event stream of {what} dropped: {why}; reconnecting in {delay:.1f}s"
                " (since {since})",
                what=self.what, why=why, delay=delay,
                since=since_param(self.last_time_nano) if self.last_time_nano else "now",
            )
            await deferLater(self._clock, delay)
            self.reconnects += 1

    def _message(self, obj: dict[str, Any]) -> None:
        try:
            event = ContainerEvent.from_json(obj)
        except BadEvent as e:
            log.warn("{what}: skipping an event: {why}", what=self.what, why=e)
            return
        if event is None:
            return
        key = (event.id, event.action)
        if event.time_nano == self.last_time_nano:
            if key in self._at_last:
                return  # sent again after a reconnection since this instant
            self._at_last.add(key)
        elif event.time_nano > self.last_time_nano:
            self.last_time_nano = event.time_nano
            self._at_last = {key}
        for subscriber in list(self._subscribers):
            if subscriber in self._subscribers:
                self._call(subscriber.on_event, event)

    def _resync(self) -> None:
        for subscriber in list(self._subscribers):
            if subscriber.on_resync is not None and subscriber in self._subscribers:
                self._call(subscriber.on_resync)

    def _call(self, function: Callable[..., object], *args: Any) -> None:
        try:
            result = function(*args)
        except Exception:
            log.failure("a subscriber of the events of {what} failed on {args!r}",
                        what=self.what, args=args)
            return
        if isinstance(result, Deferred):
            result.addErrback(lambda f: log.failure(
                "a subscriber of the events of {what} failed on {args!r}", f,
                what=self.what, args=args))
