"""Same build everywhere: the digest that the rollout of an app's update deploys, in etcd.

A push that lands while an update rolls through the fleet moves the tag in the registry; a host
that pulled the tag after that would run another build than the hosts before it, under the same
update, without the health gate of the first host. So in a fleet, the first host that resolves
the tag of an update records the digest it found at ``<prefix>/_/builds/<app>``
(:class:`BuildRecord`: digest, image id, the update's time, source and event id, the host, when),
and every other host that handles that update, or an older one, pulls that digest and tags it
(:mod:`deployer.fetch`). The next update of the app records its own build after it.

One key per app, never bound to a lease (it outlives the host that wrote it), replaced by each
newer update: what etcd holds stays bounded by the number of apps. "First" is decided by an
etcd transaction on the key's revision (:meth:`EtcdBuilds.claim`): a host that finds the key
changed since it read it reads it again, and follows the record if it is for the same update or
a newer one.

Which update a record is for: its ``time``, ``source`` and ``event_id`` (the update's own, see
:mod:`deployer.freshness`); a record *stands for* an update when both come from the same source
and the record's time is later, or the same with no other event id. Updates of different
sources are never ordered by their times (each source has its own clock): the host resolves the
tag itself, and records that.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from deployer.model import Update
from deployer.rollout.gateway import KV_TXN, Gateway, KeyValue, b64, get_key, json_value, key_values
from deployer.rollout.keys import RolloutKeys, app_name

log = Logger()


@attrs.frozen
class BuildRecord:
    """The build (``digest``, ``image_id``) that the rollout of ``app`` deploys for the update
    of ``time`` from ``source`` (``event_id`` when it has one), as ``host`` resolved it at
    ``recorded`` (Unix seconds)."""

    app: str
    digest: str
    image_id: str
    time: float
    source: str
    host: str
    recorded: float
    event_id: str | None = None

    @classmethod
    def of(cls, app: str, digest: str, image_id: str, update: Update, host: str,
           recorded: float) -> BuildRecord:
        return cls(app, digest, image_id, update.received, update.source, host, recorded,
                   update.event_id)

    def stands_for(self, update: Update) -> bool:
        """Whether this record is for ``update`` or for a newer update of the same source."""
        return self.covers(update.source, update.received, update.event_id)

    def covers(self, source: str, time: float, event_id: str | None = None) -> bool:
        """Whether this record is for the update of ``time`` from ``source`` (whose id is
        ``event_id``, when it has one), or for a newer one."""
        if self.source != source:
            return False
        if self.time != time:
            return self.time > time
        return self.event_id is None or event_id is None or self.event_id == event_id

    def to_json(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "digest": self.digest,
            "image_id": self.image_id,
            "time": self.time,
            "source": self.source,
            "event_id": self.event_id,
            "host": self.host,
            "recorded": self.recorded,
        }

    @classmethod
    def from_json(cls, obj: object) -> BuildRecord:
        """The record :meth:`to_json` wrote; :class:`ValueError` says what is wrong."""
        if not isinstance(obj, Mapping):
            raise ValueError("a build record is a JSON object")
        for name in ("app", "digest", "image_id", "source", "host"):
            if not isinstance(obj.get(name), str):
                raise ValueError(f"{name} must be a string")
        event_id = obj.get("event_id")
        if event_id is not None and not isinstance(event_id, str):
            raise ValueError("event_id must be a string or null")
        numbers = []
        for name in ("time", "recorded"):
            value = obj.get(name)
            if (not isinstance(value, int | float) or isinstance(value, bool)
                    or not math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number")
            numbers.append(float(value))
        return cls(obj["app"], obj["digest"], obj["image_id"], numbers[0], obj["source"],
                   obj["host"], numbers[1], event_id)


@attrs.frozen
class Recorded:
    """A record as read, with the revision of its key (for the transaction that replaces
    it); ``record`` is None when the key holds no readable record."""

    record: BuildRecord | None
    mod_revision: int


class Builds(Protocol):
    """Where the fleet's build records are kept (see the module docstring)."""

    def get(self, app: str) -> Deferred[Recorded | None]:
        """The record of ``app``, or None when there is none."""
        ...

    def claim(self, record: BuildRecord, seen: Recorded | None) -> Deferred[BuildRecord]:
        """Record ``record`` unless a record that stands for its update is there (``seen``:
        what was read before, or None); the record that stands afterwards."""
        ...


class EtcdBuilds:
    """Build records in etcd, shared by the fleet."""

    def __init__(self, gateway: Gateway, keys: RolloutKeys) -> None:
        self.gateway = gateway
        self.keys = keys
        self.writes = 0

    def get(self, app: str) -> Deferred[Recorded | None]:
        return Deferred.fromCoroutine(self._get(app))

    def claim(self, record: BuildRecord, seen: Recorded | None) -> Deferred[BuildRecord]:
        return Deferred.fromCoroutine(self._claim(record, seen))

    async def _get(self, app: str) -> Recorded | None:
        kv = await get_key(self.gateway, self.keys.build(app_name(app)))
        return self._read(kv) if kv is not None else None

    async def _claim(self, record: BuildRecord, seen: Recorded | None) -> BuildRecord:
        record = attrs.evolve(record, app=app_name(record.app))
        key = b64(self.keys.build(record.app))
        value = json_value(record.to_json())
        revision = seen.mod_revision if seen is not None else 0
        while True:
            compare: dict[str, Any] = (
                {"key": key, "target": "MOD", "result": "EQUAL", "mod_revision": str(revision)}
                if revision else
                {"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}
            )
            reply = await self.gateway.request(KV_TXN, {
                "compare": [compare],
                "success": [{"request_put": {"key": key, "value": value}}],
                "failure": [{"request_range": {"key": key}}],
            })
            if reply.get("succeeded", False):
                self.writes += 1
                return record
            responses = reply.get("responses") or [{}]
            existing = key_values(responses[0].get("response_range", {}))
            if not existing:
                revision = 0
                continue
            current = self._read(existing[0])
            if current.record is not None and current.record.covers(
                    record.source, record.time, record.event_id):
                return current.record
            revision = current.mod_revision

    def _read(self, kv: KeyValue) -> Recorded:
        try:
            record: BuildRecord | None = BuildRecord.from_json(kv.json())
        except ValueError as e:
            log.warn("unreadable build record at {key} ({why}); it will be replaced",
                     key=kv.key, why=str(e))
            record = None
        return Recorded(record, kv.mod_revision)
