"""Paused rollouts: an app whose new build failed on a host is replaced nowhere else.

A pause is kept at ``<prefix>/_/paused/<app>`` (:class:`EtcdPauses`), not bound to any lease:
it outlives the host that wrote it. It ends when an operator resumes the app (``deployer resume
APP``: :meth:`Pauses.resume`), or when another build of the app arrives
(:meth:`Pauses.supersede`). :class:`MemoryPauses` is the same for a standalone host.

A value under a pause key that cannot be read still pauses its app (the record then says so in
its reason): a pause is never lifted by accident.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, execute, succeed

from deployer.rollout.gateway import (
    KV_TXN,
    Gateway,
    KeyValue,
    b64,
    delete,
    get_key,
    get_prefix,
    json_value,
    key_values,
    number_field,
    text_field,
)
from deployer.rollout.keys import RolloutKeys, app_name


@attrs.frozen
class PauseRecord:
    """Why the rollout of ``app`` stopped: the bad build (``image_id``, and ``digest`` when
    known), the ``host`` where it failed, the ``reason`` and the ``time`` (Unix seconds)."""

    app: str
    image_id: str
    digest: str | None
    host: str
    reason: str
    time: float

    def to_json(self) -> dict[str, Any]:
        return {
            "app": self.app,
            "image_id": self.image_id,
            "digest": self.digest,
            "host": self.host,
            "reason": self.reason,
            "time": self.time,
        }

    @classmethod
    def from_json(cls, obj: object) -> PauseRecord:
        """The record :meth:`to_json` wrote; :class:`ValueError` says what is wrong."""
        if not isinstance(obj, Mapping):
            raise ValueError("a pause record is a JSON object")
        app, image_id, host, reason = (
            text_field(obj, name) for name in ("app", "image_id", "host", "reason")
        )
        digest = text_field(obj, "digest", optional=True)
        return cls(app, image_id, digest, host, reason, number_field(obj, "time"))

    @classmethod
    def unreadable(cls, app: str, value: bytes) -> PauseRecord:
        """What a pause key holds that is no record: the app stays paused."""
        text = value[:200].decode("utf-8", "replace")
        return cls(app, "", None, "", f"unreadable pause record: {text!r}", 0.0)

    def is_build(self, image_id: str, digest: str | None = None) -> bool:
        """Whether ``image_id`` (or ``digest``) is the build that was paused."""
        return (bool(image_id) and image_id == self.image_id) or (
            digest is not None and digest == self.digest
        )


def pause_record(app: str, kv: KeyValue) -> PauseRecord:
    """The record at ``app``'s pause key; one that cannot be read still pauses the app."""
    try:
        return PauseRecord.from_json(kv.json())
    except ValueError:
        return PauseRecord.unreadable(app, kv.value)


def pause_records(keys: RolloutKeys, kvs: Iterable[KeyValue]) -> dict[str, PauseRecord]:
    """The record of every pause key among ``kvs``, by app."""
    out = {}
    for kv in kvs:
        app = keys.paused_app(kv.key)
        if app is not None:
            out[app] = pause_record(app, kv)
    return out


class Pauses(Protocol):
    """Where pauses are kept. ``app`` arguments are ``repo:tag``, in any form Docker accepts
    (:func:`~deployer.rollout.keys.app_name`); a malformed one fails with
    :class:`~deployer.reference.InvalidReference` and nothing is read or written."""

    def pause(self, record: PauseRecord) -> Deferred[bool]:
        """Pause ``record.app``; False when it was paused for this build already (the first
        record stands)."""
        ...

    def get(self, app: str) -> Deferred[PauseRecord | None]:
        ...

    def all(self) -> Deferred[dict[str, PauseRecord]]:
        """Every pause, by app."""
        ...

    def resume(self, app: str) -> Deferred[bool]:
        """End the pause of ``app``; False (and nothing written) when it was not paused."""
        ...

    def supersede(self, app: str, image_id: str, digest: str | None = None) -> Deferred[bool]:
        """End the pause of ``app`` if it is for another build than this one (a new push);
        whether a pause ended."""
        ...


class EtcdPauses:
    """Pauses in etcd, shared by the fleet."""

    def __init__(self, gateway: Gateway, keys: RolloutKeys) -> None:
        self.gateway = gateway
        self.keys = keys

    def pause(self, record: PauseRecord) -> Deferred[bool]:
        return Deferred.fromCoroutine(self._pause(record))

    def get(self, app: str) -> Deferred[PauseRecord | None]:
        return Deferred.fromCoroutine(self._get(app))

    def all(self) -> Deferred[dict[str, PauseRecord]]:
        return Deferred.fromCoroutine(self._all())

    def resume(self, app: str) -> Deferred[bool]:
        return Deferred.fromCoroutine(self._resume(app))

    def supersede(self, app: str, image_id: str, digest: str | None = None) -> Deferred[bool]:
        return Deferred.fromCoroutine(self._supersede(app, image_id, digest))

    async def _pause(self, record: PauseRecord) -> bool:
        record = attrs.evolve(record, app=app_name(record.app))
        key = b64(self.keys.paused(record.app))
        value = json_value(record.to_json())
        compare: dict[str, Any] = {
            "key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"
        }
        while True:
            reply = await self.gateway.request(
                KV_TXN,
                {
                    "compare": [compare],
                    "success": [{"request_put": {"key": key, "value": value}}],
                    "failure": [{"request_range": {"key": key}}],
                },
            )
            if reply.get("succeeded", False):
                return True
            responses = reply.get("responses") or [{}]
            existing = key_values(responses[0].get("response_range", {}))
            if not existing:
                compare = {**compare, "target": "CREATE", "create_revision": "0"}
                continue
            old = pause_record(record.app, existing[0])
            if old.is_build(record.image_id, record.digest):
                return False
            compare = {  # paused for another build: replace it, unless it changes meanwhile
                "key": key, "target": "MOD", "result": "EQUAL",
                "mod_revision": str(existing[0].mod_revision),
            }

    async def _get(self, app: str) -> PauseRecord | None:
        app = app_name(app)
        kv = await get_key(self.gateway, self.keys.paused(app))
        return pause_record(app, kv) if kv is not None else None

    async def _all(self) -> dict[str, PauseRecord]:
        _, kvs = await get_prefix(self.gateway, self.keys.paused_all)
        return pause_records(self.keys, kvs)

    async def _resume(self, app: str) -> bool:
        return await delete(self.gateway, self.keys.paused(app_name(app)))

    async def _supersede(self, app: str, image_id: str, digest: str | None) -> bool:
        app = app_name(app)
        key = self.keys.paused(app)
        kv = await get_key(self.gateway, key)
        if kv is None or pause_record(app, kv).is_build(image_id, digest):
            return False
        return await delete(self.gateway, key, mod_revision=kv.mod_revision)


class MemoryPauses:
    """Pauses of a standalone host, in memory; ``writes`` counts the changes made."""

    def __init__(self) -> None:
        self.records: dict[str, PauseRecord] = {}
        self.writes = 0

    def pause(self, record: PauseRecord) -> Deferred[bool]:
        return execute(self._pause, record)

    def get(self, app: str) -> Deferred[PauseRecord | None]:
        return execute(lambda: self.records.get(app_name(app)))

    def all(self) -> Deferred[dict[str, PauseRecord]]:
        return succeed(dict(self.records))

    def resume(self, app: str) -> Deferred[bool]:
        return execute(self._resume, app)

    def supersede(self, app: str, image_id: str, digest: str | None = None) -> Deferred[bool]:
        return execute(self._supersede, app, image_id, digest)

    def _pause(self, record: PauseRecord) -> bool:
        record = attrs.evolve(record, app=app_name(record.app))
        old = self.records.get(record.app)
        if old is not None and old.is_build(record.image_id, record.digest):
            return False
        self.records[record.app] = record
        self.writes += 1
        return True

    def _resume(self, app: str) -> bool:
        app = app_name(app)
        if app not in self.records:
            return False
        del self.records[app]
        self.writes += 1
        return True

    def _supersede(self, app: str, image_id: str, digest: str | None) -> bool:
        app = app_name(app)
        old = self.records.get(app)
        if old is None or old.is_build(image_id, digest):
            return False
        return self._resume(app)
