"""Waiting until the container that replaces another is ready.

:func:`wait_ready` waits for a container of a given *name* to run a given *image id*, however it
got there: a supervisor restarted it after the host stopped the old one (``--replace stop``), or
the host re-created and started it itself (``--replace recreate``). Then it is ready when it is
**healthy**, if it has a health check (the image's HEALTHCHECK, unless the container was run
without it), or when it has been **running for** ``min_ready`` without dying, if it has none; all
within ``ready_timeout``.

It subscribes to the engine's events first, then inspects the container of that name once, and
from then on follows the events: ``start`` (one inspect, to learn the image id the event does not
carry), ``health_status``, ``die``. No per-container polling. Whenever the event stream was
re-established (events may have been lost), it inspects once more. A replacement without a
health check is inspected once more when ``min_ready`` is up, and is ready only if it still runs
since the same start: a ``die`` lost with the stream (a dockerd restart loses the events it had
not sent) never makes a dead container ready. One found started again since it was last seen
(at that inspect, a resync or a ``start`` heard) has ``min_ready`` counted anew from that
start: it must run that long in one go.

The result is a value, never an exception: :class:`Ready`, or :class:`NotReady` with a
:class:`NotReadyReason`:

- ``unhealthy``: the new container's health check failed;
- ``exited``: the new container died (or was restarted) before it was ready;
- ``no_replacement``: no container of that name ran the new image in time: nothing supervises it;
- ``timeout``: it did, but was not ready in time.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Mapping
from typing import Any, ClassVar, Protocol

import attrs
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from deployer.errors import ContainerNotFound, DockerError
from deployer.events import ContainerEvent, EventSource

log = Logger()

DEFAULT_MIN_READY = 5.0
"""``--min_ready``: seconds a container without a health check must run to be ready."""
DEFAULT_READY_TIMEOUT = 300.0
"""``--ready_timeout``: seconds a replacement has to become ready."""
SETTLED_AGAIN = 1.0
"""Seconds before asking the engine again whether a replacement still runs, when it could not
answer once ``min_ready`` was up."""


class NotReadyReason(enum.Enum):
    UNHEALTHY = "unhealthy"
    EXITED = "exited"
    NO_REPLACEMENT = "no_replacement"
    TIMEOUT = "timeout"


@attrs.frozen
class ReadyRules:
    """When a replacement is ready: ``min_ready`` and ``ready_timeout``, in seconds."""

    min_ready: float = attrs.field(default=DEFAULT_MIN_READY, validator=attrs.validators.ge(0))
    ready_timeout: float = attrs.field(
        default=DEFAULT_READY_TIMEOUT, validator=attrs.validators.gt(0)
    )


@attrs.frozen
class Ready:
    """The container ``container_id`` named ``name`` runs ``image_id`` and is ready:
    healthy (``health_checked``) or running for ``min_ready``; after ``waited`` seconds."""

    name: str
    image_id: str
    container_id: str
    health_checked: bool
    waited: float
    ready: ClassVar[bool] = True

    def describe(self) -> str:
        how = "healthy" if self.health_checked else "running"
        return (f"{self.name} ({_short(self.container_id)}) on {_short(self.image_id)} is"
                f" {how} after {self.waited:.1f}s")


@attrs.frozen
class NotReady:
    """No container named ``name`` was ready on ``image_id``: ``reason``, and ``detail`` in
    words; ``container_id`` and ``exit_code`` when known."""

    name: str
    image_id: str
    reason: NotReadyReason
    detail: str
    waited: float
    container_id: str | None = None
    exit_code: int | None = None
    ready: ClassVar[bool] = False

    def describe(self) -> str:
        return f"{self.name} not ready on {_short(self.image_id)} ({self.reason.value}): " \
            f"{self.detail}"


Readiness = Ready | NotReady


class ContainerInspector(Protocol):
    """What is needed of the engine client (:meth:`DockerClient.inspect_container`)."""

    def inspect_container(self, container_id: str) -> Awaitable[dict[str, Any]]:
        """``GET /containers/{id or name}/json``; :class:`ContainerNotFound` if there is none."""


def wait_ready(
    clock: IReactorTime,
    engine: ContainerInspector,
    events: EventSource,
    name: str,
    image_id: str,
    rules: ReadyRules = ReadyRules(),
    *,
    healthcheck: bool | None = None,
) -> Deferred[Readiness]:
    """Wait until a container named ``name`` runs ``image_id`` and is ready (see the module).

    It subscribes to ``events`` before it returns, so it may be called before the action that
    brings the replacement (stopping the old container, starting the new one) as well as after.
    ``healthcheck``: whether to wait for health; None (the default): as the container's own
    configuration says. Cancelling the Deferred stops the wait.
    """
    return Deferred.fromCoroutine(_Wait(clock, engine, events, name, image_id, rules,
                                        healthcheck).run())


@attrs.frozen
class _Settled:
    container_id: str


class _Signal(enum.Enum):
    RESYNC = "resync"
    DEADLINE = "deadline"


@attrs.frozen
class _Seen:
    """One inspected container."""

    id: str
    name: str
    image_id: str
    running: bool
    created: bool
    exit_code: int | None
    health: str | None
    health_checked: bool
    last_probe: str
    started_at: str

    @classmethod
    def parse(cls, obj: Mapping[str, Any], healthcheck: bool | None) -> _Seen:
        state = obj.get("State") or {}
        config = obj.get("Config") or {}
        test = (config.get("Healthcheck") or {}).get("Test")
        health = state.get("Health") or {}
        probes = health.get("Log") or []
        exit_code = state.get("ExitCode")
        return cls(
            id=str(obj.get("Id", "")),
            name=str(obj.get("Name", "")).lstrip("/"),
            image_id=str(obj.get("Image", "")),
            running=bool(state.get("Running")) and not state.get("Restarting"),
            created=state.get("Status") == "created",
            exit_code=exit_code if isinstance(exit_code, int) else None,
            health=health.get("Status"),
            health_checked=(healthcheck if healthcheck is not None
                            else bool(test) and test != ["NONE"]),
            last_probe=str((probes[-1] or {}).get("Output", "")).strip()[:200] if probes else "",
            started_at=str(state.get("StartedAt", "")),
        )


class _Wait:
    """One wait: events and timers go through one queue, handled one at a time, so that an
    inspect in flight never races the events that follow it."""

    def __init__(self, clock: IReactorTime, engine: ContainerInspector, events: EventSource,
                 name: str, image_id: str, rules: ReadyRules, healthcheck: bool | None) -> None:
        self.clock = clock
        self.engine = engine
        self.events = events
        self.name = name
        self.image_id = image_id
        self.rules = rules
        self.healthcheck = healthcheck
        self.queue: DeferredQueue[ContainerEvent | _Settled | _Signal] = DeferredQueue()
        self.started = clock.seconds()
        self.candidate: _Seen | None = None  # the running container of the new image
        self.appeared = False
        self.vanished = 0  # containers of the name that were gone before they were inspected
        self.other = ""  # what the name ran instead, last seen
        self.settle: IDelayedCall | None = None

    async def run(self) -> Readiness:
        subscription = self.events.subscribe(self._heard, self._resync)
        deadline = self.clock.callLater(self.rules.ready_timeout, self.queue.put,
                                        _Signal.DEADLINE)
        try:
            result = await self._look(self.name)
            while result is None:
                result = await self._handle(await self.queue.get())
        finally:
            subscription.cancel()
            for call in (deadline, self.settle):
                if call is not None and call.active():
                    call.cancel()
        log.info("{result}", result=result.describe())
        return result

    # -- what arrives -------------------------------------------------------------------------

    def _heard(self, event: ContainerEvent) -> None:
        ours = self.candidate is not None and event.id == self.candidate.id
        if ours or self.name in (event.name, event.old_name):
            self.queue.put(event)

    def _resync(self) -> None:
        self.queue.put(_Signal.RESYNC)

    async def _handle(self, item: ContainerEvent | _Settled | _Signal) -> Readiness | None:
        if item is _Signal.DEADLINE:
            return self._too_late()
        if item is _Signal.RESYNC:
            return await self._look(self.name)
        if isinstance(item, _Settled):
            if self.candidate is not None and self.candidate.id == item.container_id:
                return await self._settled(self.candidate)
            return None
        assert isinstance(item, ContainerEvent)
        candidate = self.candidate
        if candidate is None or item.id != candidate.id:
            if item.verb == "start" or (item.verb == "rename" and item.name == self.name):
                return await self._look(item.id, started=item.verb == "start")
            return None
        if item.verb == "health_status" and candidate.health_checked:
            if item.health == "healthy":
                return self._ready(candidate)
            if item.health == "unhealthy":
                return await self._unhealthy(candidate)
        elif item.verb in ("die", "destroy"):
            return self._exited(candidate, item.exit_code)
        elif item.verb == "start":  # its own start heard again, or a start after a lost die
            return await self._look(item.id, started=True)
        elif item.verb == "rename" and item.name != self.name:
            log.info("{name}: the container {id} was renamed to {new}; waiting for another",
                     name=self.name, id=_short(item.id), new=item.name)
            self._forget()
        return None

    # -- what the engine says -----------------------------------------------------------------

    async def _look(self, ref: str, started: bool = False) -> Readiness | None:
        """Inspect ``ref`` (the name, or the id of a container that started or took the name)."""
        try:
            seen = _Seen.parse(await self.engine.inspect_container(ref), self.healthcheck)
        except ContainerNotFound:
            if started:
                self.vanished += 1
            elif ref == self.name and self.candidate is not None:
                return self._exited(self.candidate, None)
            return None
        except DockerError as e:
            log.warn("{name}: cannot inspect {ref} ({why}); waiting for the next event",
                     name=self.name, ref=ref, why=e)
            return None
        if seen.name != self.name:
            return None
        if seen.image_id != self.image_id:
            self.other = f"{_short(seen.id)} on {_short(seen.image_id)}"
            if self.candidate is not None and ref == self.name:
                return self._exited(self.candidate, None)  # its name went to another
            return None
        self.appeared = True
        if seen.running:
            return await self._running(seen)
        if seen.created:
            return None  # about to be started
        return self._exited(seen, seen.exit_code)

    async def _running(self, seen: _Seen) -> Readiness | None:
        candidate = self.candidate
        restarted = (candidate is not None and candidate.id == seen.id
                     and candidate.started_at != seen.started_at)
        if restarted:
            log.info("{name}: {id} was started again (its stop was not heard); it must run"
                     " {min_ready:g}s from this start", name=self.name, id=_short(seen.id),
                     min_ready=self.rules.min_ready)
        if candidate is None or candidate.id != seen.id or restarted:
            self._forget()
            self.candidate = seen
            if not seen.health_checked:
                self.settle = self.clock.callLater(
                    self.rules.min_ready, self.queue.put, _Settled(seen.id)
                )
        if seen.health_checked:
            if seen.health == "healthy":
                return self._ready(seen)
            if seen.health == "unhealthy":
                return await self._unhealthy(seen)
        return None

    async def _settled(self, candidate: _Seen) -> Readiness | None:
        """``min_ready`` is up for ``candidate``: ready if the engine says it still runs since
        the same start."""
        try:
            seen = _Seen.parse(await self.engine.inspect_container(candidate.id),
                               self.healthcheck)
        except ContainerNotFound:
            return self._exited(candidate, None)
        except DockerError as e:
            log.warn("{name}: cannot inspect {id} once it has run {min_ready:g}s ({why});"
                     " asking again in {again:g}s", name=self.name, id=_short(candidate.id),
                     min_ready=self.rules.min_ready, why=e, again=SETTLED_AGAIN)
            self.settle = self.clock.callLater(SETTLED_AGAIN, self.queue.put,
                                               _Settled(candidate.id))
            return None
        if not seen.running:
            return self._exited(seen, seen.exit_code)
        if seen.started_at != candidate.started_at:
            return await self._running(seen)  # restarted, its die unheard: counted anew
        return self._ready(seen)

    def _forget(self) -> None:
        self.candidate = None
        if self.settle is not None and self.settle.active():
            self.settle.cancel()
        self.settle = None

    # -- results ------------------------------------------------------------------------------

    def _waited(self) -> float:
        return self.clock.seconds() - self.started

    def _ready(self, seen: _Seen) -> Ready:
        return Ready(self.name, self.image_id, seen.id, seen.health_checked, self._waited())

    async def _unhealthy(self, seen: _Seen) -> NotReady:
        probe = seen.last_probe
        if not probe:
            try:
                probe = _Seen.parse(await self.engine.inspect_container(seen.id),
                                    self.healthcheck).last_probe
            except DockerError as e:
                log.debug("{name}: no health log ({why})", name=self.name, why=e)
        detail = f"{_short(seen.id)} turned unhealthy"
        return self._not_ready(NotReadyReason.UNHEALTHY,
                               detail + (f"; last check said: {probe}" if probe else ""), seen.id)

    def _exited(self, seen: _Seen, exit_code: int | None) -> NotReady:
        code = f" with code {exit_code}" if exit_code is not None else ""
        detail = f"{_short(seen.id)} stopped{code} after {self._waited():.1f}s, before it was ready"
        return self._not_ready(NotReadyReason.EXITED, detail, seen.id, exit_code)

    def _too_late(self) -> NotReady:
        timeout = f"{self.rules.ready_timeout:g}s"
        candidate = self.candidate
        if candidate is not None:
            wanted = (f"healthy (health: {candidate.health or 'unknown'})"
                      if candidate.health_checked else f"running for {self.rules.min_ready:g}s")
            detail = f"{_short(candidate.id)} runs it but was not {wanted} within {timeout}"
            return self._not_ready(NotReadyReason.TIMEOUT, detail, candidate.id)
        if self.appeared or self.vanished:
            detail = f"no container of it was ready within {timeout}"
            if self.vanished:
                detail += (f"; {self.vanished} container(s) named {self.name} started and were"
                           " gone before they could be inspected")
            return self._not_ready(NotReadyReason.TIMEOUT, detail)
        detail = f"no container named {self.name} ran it within {timeout}"
        if self.other:
            detail += f" (last seen: {self.other})"
        return self._not_ready(NotReadyReason.NO_REPLACEMENT, detail)

    def _not_ready(self, reason: NotReadyReason, detail: str, container_id: str | None = None,
                   exit_code: int | None = None) -> NotReady:
        return NotReady(self.name, self.image_id, reason, detail, self._waited(), container_id,
                        exit_code)


def _short(id_: str) -> str:
    """``sha256:0123456789ab`` or ``0123456789ab``: enough of an id to find it."""
    prefix, _, rest = id_.rpartition(":")
    return f"{prefix}:{rest[:12]}" if prefix else rest[:12]
