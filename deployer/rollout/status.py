"""What each host runs, and the ``/status`` document.

Each host publishes a :class:`HostState` (per app: image id, digest when known, container
names, health, the last round's time and result) at ``<prefix>/_/hosts/<hostname>``, bound to
its lease (:class:`StatusPublisher`): written when it changes and again under every new lease,
gone when the host is. :class:`EtcdStatus` reads every host, every pause and every slot queue
and builds the document (:func:`build_document`)::

    {"time": <now>,
     "hosts": {"<host>": {"time": <published>, "apps": {"<repo:tag>": <app state>}}},
     "apps": {"<repo:tag>": {
         "paused": null | {"app", "image_id", "digest", "host", "reason", "time"},
         "hosts": {"<host>": <app state>},
         "images": [{"image_id", "digest", "hosts": [...]}],   most hosts first
         "converged": <every host on one image>,
         "replacing": [{"host", "container", "since"}],        holding a slot
         "waiting": [{"host", "container", "since"}]}}}        in line, in order

    <app state> = {"image_id", "digest", "containers": [...], "health",
                   "last_round": null | {"time", "result"}}

:class:`LocalStatus` is the same for a standalone host, from what it holds itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, FirstError, gatherResults, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from deployer.rollout.gateway import (
    Gateway,
    KeyValue,
    describe,
    get_prefix,
    is_lease_not_found,
    number_field,
    put,
    text_field,
)
from deployer.rollout.keys import RolloutKeys, check_hostname
from deployer.rollout.lease import Lease, LeaseKeeper
from deployer.rollout.pause import PauseRecord, Pauses, pause_records
from deployer.rollout.slots import LocalSlots


@attrs.frozen
class AppState:
    """What a host runs of one app. ``health`` is the engine's word for the app's containers
    (``healthy``, ``unhealthy``, ``starting``; ``running`` for an image without a health
    check), as the round sums it up; ``round_result`` is the round's own word."""

    image_id: str
    digest: str | None = None
    containers: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    health: str = "unknown"
    round_time: float | None = None
    round_result: str | None = None

    def to_json(self) -> dict[str, Any]:
        last_round = None
        if self.round_time is not None or self.round_result is not None:
            last_round = {"time": self.round_time, "result": self.round_result}
        return {
            "image_id": self.image_id,
            "digest": self.digest,
            "containers": list(self.containers),
            "health": self.health,
            "last_round": last_round,
        }

    @classmethod
    def from_json(cls, obj: object) -> AppState:
        if not isinstance(obj, Mapping):
            raise ValueError("an app state is a JSON object")
        containers = obj.get("containers")
        if not isinstance(containers, list) or not all(isinstance(c, str) for c in containers):
            raise ValueError("containers must be a list of strings")
        last_round = obj.get("last_round")
        time, result = None, None
        if last_round is not None:
            if not isinstance(last_round, Mapping):
                raise ValueError("last_round must be an object or null")
            time = None if last_round.get("time") is None else number_field(last_round, "time")
            result = text_field(last_round, "result", optional=True)
        return cls(
            text_field(obj, "image_id"),
            text_field(obj, "digest", optional=True),
            tuple(containers),
            text_field(obj, "health"),
            time,
            result,
        )


@attrs.frozen
class HostState:
    """What one host runs, by app, as published at ``time``."""

    host: str
    time: float
    apps: Mapping[str, AppState]

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "time": self.time,
            "apps": {app: state.to_json() for app, state in sorted(self.apps.items())},
        }

    @classmethod
    def from_json(cls, obj: object) -> HostState:
        if not isinstance(obj, Mapping) or not isinstance(obj.get("apps"), Mapping):
            raise ValueError("a host state is a JSON object with apps")
        apps = {str(app): AppState.from_json(state) for app, state in obj["apps"].items()}
        return cls(text_field(obj, "host"), number_field(obj, "time"), apps)


@attrs.frozen
class InLine:
    """A host in an app's slot queue; ``holding`` when it holds a slot."""

    host: str
    container: str
    since: float | None
    holding: bool

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "container": self.container, "since": self.since}


def build_document(
    hosts: Mapping[str, HostState],
    paused: Mapping[str, PauseRecord],
    queues: Mapping[str, list[InLine]],
    now: float,
) -> dict[str, Any]:
    """The ``/status`` document (see the module docstring)."""
    names = sorted(set(paused) | set(queues) | {a for h in hosts.values() for a in h.apps})
    apps: dict[str, Any] = {}
    for app in names:
        running = {
            host: state.apps[app] for host, state in sorted(hosts.items()) if app in state.apps
        }
        images: dict[str, dict[str, Any]] = {}
        for host, state in running.items():
            image = images.setdefault(
                state.image_id, {"image_id": state.image_id, "digest": None, "hosts": []}
            )
            image["digest"] = image["digest"] or state.digest
            image["hosts"].append(host)
        queue = queues.get(app, [])
        pause = paused.get(app)
        apps[app] = {
            "paused": pause.to_json() if pause is not None else None,
            "hosts": {host: state.to_json() for host, state in running.items()},
            "images": sorted(images.values(), key=lambda i: (-len(i["hosts"]), i["image_id"])),
            "converged": len(images) <= 1 and not queue,
            "replacing": [entry.to_json() for entry in queue if entry.holding],
            "waiting": [entry.to_json() for entry in queue if not entry.holding],
        }
    return {
        "time": now,
        "hosts": {
            host: {"time": state.time, "apps": state.to_json()["apps"]}
            for host, state in sorted(hosts.items())
        },
        "apps": apps,
    }


class StatusReader(Protocol):
    def document(self) -> Deferred[dict[str, Any]]:
        """The ``/status`` document."""
        ...


class StatusPublisher:
    """Keeps ``<prefix>/_/hosts/<hostname>`` equal to the last :meth:`publish`, under the
    current lease: it writes when the apps change, when a new lease is granted, and again
    ``retry_delay`` seconds after a failed write. One write at a time; the newest state wins."""

    log = Logger()

    def __init__(
        self,
        gateway: Gateway,
        keeper: LeaseKeeper,
        keys: RolloutKeys,
        clock: IReactorTime,
        hostname: str,
        retry_delay: float = 2.0,
    ) -> None:
        self.gateway = gateway
        self.keeper = keeper
        self.clock = clock
        self.hostname = check_hostname(hostname)
        self.key = keys.host(hostname)
        self.retry_delay = retry_delay
        self.writes = 0
        self._wanted: dict[str, AppState] | None = None
        self._written: tuple[int, dict[str, AppState]] | None = None
        self._flight: Deferred[bool] | None = None
        self._waiting: list[Deferred[None]] = []
        self._retry: IDelayedCall | None = None
        keeper.observe(granted=lambda lease: self._kick())

    def publish(self, apps: Mapping[str, AppState]) -> Deferred[None]:
        """Publish ``apps``; fires once they are written, or once it is clear that they cannot
        be now (no lease, a failed write: they are written later). Never fails."""
        self._wanted = dict(apps)
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        self._kick()
        return d

    def _kick(self) -> None:
        if self._flight is not None:
            return
        lease = self.keeper.current
        wanted = self._wanted
        if lease is None or wanted is None or self._written == (lease.id, wanted):
            self._settle()
            return
        waiting, self._waiting = self._waiting, []
        flight = self._flight = Deferred.fromCoroutine(self._write(lease, wanted))

        def done(ok: bool) -> None:
            self._flight = None
            if ok:
                self._written = (lease.id, wanted)
            elif self._retry is None or not self._retry.active():
                self._retry = self.clock.callLater(self.retry_delay, self._kick)
            for d in waiting:
                d.callback(None)
            if ok:
                self._kick()

        flight.addCallback(done)

    def _settle(self) -> None:
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    async def _write(self, lease: Lease, apps: dict[str, AppState]) -> bool:
        state = HostState(self.hostname, self.clock.seconds(), apps)
        try:
            await put(self.gateway, self.key, state.to_json(), lease=lease.id)
        except Exception as e:
            if is_lease_not_found(e):
                self.keeper.invalidate(lease, "etcd no longer knows it (seen publishing status)")
            self.log.warn(
                "could not publish this host's status to {key}: {why}",
                key=self.key,
                why=describe(e),
            )
            return False
        self.writes += 1
        return True


class EtcdStatus:
    """The ``/status`` document of the fleet, from etcd. ``limit`` is ``--max_unavailable``:
    the first ``limit`` hosts in an app's queue are the ones replacing (0: all of them)."""

    log = Logger()

    def __init__(
        self, gateway: Gateway, keys: RolloutKeys, clock: IReactorTime, limit: int = 1
    ) -> None:
        self.gateway = gateway
        self.keys = keys
        self.clock = clock
        self.limit = limit

    def document(self) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._document())

    async def _document(self) -> dict[str, Any]:
        reads = [
            Deferred.fromCoroutine(get_prefix(self.gateway, prefix))
            for prefix in (self.keys.hosts, self.keys.paused_all, self.keys.rollouts)
        ]
        try:
            (_, hosts), (_, paused), (_, slots) = await gatherResults(reads, consumeErrors=True)
        except FirstError as e:
            e.subFailure.raiseException()
        return build_document(
            self._hosts(hosts),
            pause_records(self.keys, paused),
            self._queues(slots),
            self.clock.seconds(),
        )

    def _hosts(self, kvs: list[KeyValue]) -> dict[str, HostState]:
        out = {}
        for kv in kvs:
            name = self.keys.hostname(kv.key)
            if name is None:
                continue
            try:
                out[name] = HostState.from_json(kv.json())
            except ValueError as e:
                self.log.warn("unreadable host status at {key}: {why}", key=kv.key, why=e)
        return out

    def _queues(self, kvs: list[KeyValue]) -> dict[str, list[InLine]]:
        lines: dict[str, list[KeyValue]] = {}
        for kv in kvs:
            owner = self.keys.slot_owner(kv.key)
            if owner is not None:
                lines.setdefault(owner[0], []).append(kv)
        out = {}
        for app, line in lines.items():
            line.sort(key=lambda kv: kv.create_revision)
            out[app] = [
                _in_line(kv, holding=self.limit == 0 or place < self.limit)
                for place, kv in enumerate(line)
            ]
        return out


def _in_line(kv: KeyValue, holding: bool) -> InLine:
    try:
        value = kv.json()
        since = value.get("since")
        return InLine(
            str(value["host"]),
            str(value["container"]),
            float(since) if isinstance(since, int | float) else None,
            holding,
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return InLine("?", kv.key, None, holding)


class LocalStatus:
    """The ``/status`` document of a standalone host: what it published to itself, its pauses
    and its slots."""

    def __init__(
        self, hostname: str, clock: IReactorTime, pauses: Pauses, slots: LocalSlots | None = None
    ) -> None:
        self.hostname = hostname
        self.clock = clock
        self.pauses = pauses
        self.slots = slots
        self.state: HostState | None = None

    def publish(self, apps: Mapping[str, AppState]) -> Deferred[None]:
        self.state = HostState(self.hostname, self.clock.seconds(), dict(apps))
        return succeed(None)

    def document(self) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._document())

    async def _document(self) -> dict[str, Any]:
        paused = await self.pauses.all()
        hosts = {self.hostname: self.state} if self.state is not None else {}
        queues: dict[str, list[InLine]] = {}
        if self.slots is not None:
            for app, holding in self.slots.holding().items():
                queues[app] = [
                    InLine(self.hostname, turn.container, turn.since, held)
                    for held, turns in ((True, holding.replacing), (False, holding.waiting))
                    for turn in turns
                ]
        return build_document(hosts, paused, queues, self.clock.seconds())
