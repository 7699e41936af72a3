"""The event stream of the in-memory Docker engine: ``GET /events`` as dockerd 20.10 serves it.

:class:`EventLog` makes every event message (the shape dockerd sends, with ``status``/``id``/
``from`` for container and image events), remembers the last :data:`EVENTS_LIMIT` of them for
``since=`` (events at exactly that time included), and writes each new one as a JSON line to every
open stream whose filters take it. :class:`EventFilter` is dockerd's ``daemon/events/filter.go``:
``event`` matched exactly, or by prefix when the filter names ``health_status``, ``exec_create``
or ``exec_start``; ``type``, ``scope``, ``container``, ``image``, ``label`` and the other object
filters as dockerd matches them; unknown keys ignored.

Event times are the engine's clock in nanoseconds, made strictly increasing (a clock that does
not move still gives every event its own instant, as a real one does).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.web.server import Request

from deployer.reference import InvalidReference, parse_reference
from deployer.testing.memory_common import NANOS, ApiError

log = Logger()

EVENTS_LIMIT = 256
"""How many events dockerd remembers for ``since=``."""

_FUZZY_EVENTS = frozenset({"health_status", "exec_create", "exec_start"})
_NAMED_OBJECTS = ("daemon", "container", "plugin", "volume", "network", "service", "node",
                  "secret", "config")
_LEGACY = {"container": True, "image": False}  # types with status/id(/from) fields


def _strip_tag(image: str) -> str:
    try:
        return parse_reference(image).name
    except InvalidReference:
        return image


@attrs.frozen
class EventFilter:
    """The ``filters`` of ``GET /events``: values by key."""

    fields: Mapping[str, frozenset[str]] = attrs.field(factory=dict)

    @classmethod
    def parse(cls, text: str | None) -> EventFilter:
        """``{"key": ["value", …]}`` or ``{"key": {"value": true}}``; :class:`ApiError` (500,
        as dockerd answers) when it is not."""
        if not text:
            return cls()
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise ApiError(500, str(e)) from e
        if not isinstance(raw, dict):
            raise ApiError(500, f"json: cannot unmarshal {type(raw).__name__} into Go value of"
                                " type map[string]map[string]bool")
        fields: dict[str, frozenset[str]] = {}
        for key, values in raw.items():
            if isinstance(values, dict):
                fields[str(key)] = frozenset(str(v) for v, on in values.items() if on)
            elif isinstance(values, list):
                fields[str(key)] = frozenset(str(v) for v in values)
            else:
                raise ApiError(500, f"json: cannot unmarshal {type(values).__name__} into Go"
                                    " value of type map[string]bool")
        return cls(fields)

    def _exact(self, key: str, value: str) -> bool:
        values = self.fields.get(key)
        return not values or value in values

    def _fuzzy(self, key: str, value: str) -> bool:
        return self._exact(key, value) or any(value.startswith(v) for v in self.fields[key])

    def _labels(self, attributes: Mapping[str, str]) -> bool:
        wanted = self.fields.get("label")
        if not wanted:
            return True
        for item in wanted:
            key, eq, value = item.partition("=")
            if key not in attributes or (eq and attributes[key] != value):
                return False
        return True

    def _image(self, message: Mapping[str, Any]) -> bool:
        actor = message["Actor"]
        attributes = actor["Attributes"]
        name = attributes.get("name" if message["Type"] == "image" else "image", "")
        return any(self._exact("image", v) for v in
                   (actor["ID"], name, _strip_tag(actor["ID"]), _strip_tag(name)))

    def includes(self, message: Mapping[str, Any]) -> bool:
        action = message["Action"]
        actor = message["Actor"]
        if self.fields.get("event", frozenset()) & _FUZZY_EVENTS:
            if not self._fuzzy("event", action):
                return False
        elif not self._exact("event", action):
            return False
        if not (self._exact("type", message["Type"]) and self._exact("scope", message["scope"])):
            return False
        for kind in _NAMED_OBJECTS:
            if kind in self.fields and not (
                    self._fuzzy(kind, actor["ID"])
                    or self._fuzzy(kind, actor["Attributes"].get("name", ""))):
                return False
        return self._image(message) and self._labels(actor["Attributes"])


def parse_time(value: str) -> int:
    """``seconds[.fraction]`` (``since``/``until``) in nanoseconds, as dockerd's
    ``ParseTimestamps``; :class:`ApiError` 500 with Go's message otherwise."""
    seconds, dot, fraction = value.partition(".")
    for part in (seconds, fraction if dot else "0"):
        if not part.lstrip("-").isdigit():
            raise ApiError(500, f'strconv.ParseInt: parsing "{part}": invalid syntax')
    nanos = int(int(fraction) * 10 ** (9 - len(fraction))) if dot else 0
    return int(seconds) * NANOS + nanos


@attrs.define(eq=False)
class _Stream:
    request: Request
    filter: EventFilter
    until: int | None
    done: Deferred[bytes] | None = None
    timer: IDelayedCall | None = None


class EventLog:
    """Every event of one engine (:attr:`history`), the ones it remembers, and its open
    streams. ``now`` gives the engine's time in seconds; ``deliver`` is called after lines were
    written (to push them to in-memory clients); ``clock`` (optional) ends streams at their
    ``until``."""

    def __init__(self, now: Callable[[], float], deliver: Callable[[], None],
                 clock: IReactorTime | None = None) -> None:
        self._now = now
        self._deliver = deliver
        self._clock = clock
        self._last = 0
        self._remembered: deque[dict[str, Any]] = deque(maxlen=EVENTS_LIMIT)
        self._streams: list[_Stream] = []
        #: Every event since the engine was made, oldest first (tests read it).
        self.history: list[dict[str, Any]] = []

    @property
    def streams(self) -> int:
        """How many ``GET /events`` answers are open."""
        return len(self._streams)

    def now_nano(self) -> int:
        return max(int(self._now() * NANOS), self._last)

    # -- events -------------------------------------------------------------------------------

    def emit(self, kind: str, action: str, actor_id: str,
             attributes: Mapping[str, str]) -> dict[str, Any]:
        """Make, remember and send one event; returns its message."""
        self._last = time_nano = max(int(self._now() * NANOS), self._last + 1)
        message: dict[str, Any] = {}
        if kind in _LEGACY:
            message["status"] = action
            message["id"] = actor_id
            if _LEGACY[kind]:
                message["from"] = attributes.get("image", "")
        message.update({
            "Type": kind, "Action": action,
            "Actor": {"ID": actor_id, "Attributes": dict(sorted(attributes.items()))},
            "scope": "local", "time": time_nano // NANOS, "timeNano": time_nano,
        })
        self.history.append(message)
        self._remembered.append(message)
        wrote = False
        for stream in list(self._streams):
            if stream.until is not None and time_nano > stream.until:
                continue
            if stream.filter.includes(message):
                self._write(stream.request, [message])
                wrote = True
        if wrote:
            self._deliver()
        return message

    def forget(self) -> None:
        """Remember nothing of the past (an engine that restarted)."""
        self._remembered.clear()

    def actions(self, container_id: str | None = None,
                kinds: Iterable[str] = ("container",)) -> list[str]:
        """The actions in :attr:`history` (of one actor when given), without the probes'
        ``exec_*`` ones: a test's view of what happened."""
        wanted = set(kinds)
        return [m["Action"] for m in self.history
                if m["Type"] in wanted and not m["Action"].startswith("exec_")
                and (container_id is None or m["Actor"]["ID"] == container_id)]

    # -- streams ------------------------------------------------------------------------------

    def open(self, request: Request, filters: EventFilter, since: int | None,
             until: int | None) -> Deferred[bytes]:
        """Answer ``GET /events``: headers at once, the remembered events between ``since`` and
        ``until`` (nanoseconds) that pass ``filters``, then every new one; the answer ends at
        ``until``, or when the engine drops it (:meth:`drop`)."""
        request.setHeader(b"Content-Type", b"application/json")
        request.write(b"")  # dockerd sends the headers before any event
        if since is not None or until is not None:
            low = since or 0
            self._write(request, [m for m in self._remembered if m["timeNano"] >= low
                                  and (until is None or m["timeNano"] <= until)
                                  and filters.includes(m)])
        now = self.now_nano()
        if until is not None and until <= now:
            self._deliver()
            return succeed(b"")
        stream = _Stream(request, filters, until)

        def cancelled(_: Deferred[bytes]) -> None:  # the client went away
            self._close(stream)

        stream.done = Deferred(cancelled)
        if until is not None:
            if self._clock is None:
                raise ApiError(500, "MemoryDocker: a future until= needs the engine's clock")
            stream.timer = self._clock.callLater((until - now) / NANOS, self._end, stream)
        self._streams.append(stream)
        self._deliver()
        return stream.done

    def drop(self, *, cleanly: bool = False) -> int:
        """End every open stream: ``cleanly`` as a finished answer, else by closing the
        connection (an engine that went away). Returns how many there were."""
        streams, self._streams = self._streams, []
        for stream in streams:
            self._close(stream)
            if cleanly:
                assert stream.done is not None
                stream.done.callback(b"")
            else:
                stream.request.loseConnection()
        self._deliver()
        return len(streams)

    def _end(self, stream: _Stream) -> None:
        stream.timer = None
        if stream in self._streams:
            self._close(stream)
            assert stream.done is not None
            stream.done.callback(b"")
            self._deliver()

    def _close(self, stream: _Stream) -> None:
        if stream in self._streams:
            self._streams.remove(stream)
        if stream.timer is not None and stream.timer.active():
            stream.timer.cancel()
        stream.timer = None

    @staticmethod
    def _write(request: Request, messages: list[dict[str, Any]]) -> None:
        for message in messages:
            request.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")


__all__ = ["EVENTS_LIMIT", "EventFilter", "EventLog", "parse_time"]
