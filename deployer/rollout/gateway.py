"""The one thing rollouts need from etcd: a POST to its v3 JSON gateway.

:class:`Gateway` is what the etcd client offers (``Etcd.request``); the rest of this module is
the JSON of etcd's gateway: keys and values are base64, 64-bit integers are JSON strings, and a
zero or false field is left out of an answer.
"""

from __future__ import annotations

import json
import math
from base64 import b64decode, b64encode
from collections.abc import Awaitable, Mapping
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred

from deployer.errors import EtcdError

LEASE_GRANT = "/v3/lease/grant"
LEASE_KEEPALIVE = "/v3/lease/keepalive"
LEASE_REVOKE = "/v3/lease/revoke"
KV_RANGE = "/v3/kv/range"
KV_PUT = "/v3/kv/put"
KV_DELETE = "/v3/kv/deleterange"
KV_TXN = "/v3/kv/txn"


class Gateway(Protocol):
    """POSTs ``body`` as JSON to ``path`` (``/v3/...``) of the etcd member in use, failing over
    to the next member when that one does not answer. The answer is etcd's JSON object.

    Raises :class:`~deployer.errors.EtcdUnavailable` when no member answered, and another
    :class:`~deployer.errors.EtcdError` when etcd answered with an error (its message, e.g.
    ``etcdserver: requested lease not found``, in the exception's text). Cancelling the
    awaitable, when it is a Deferred, abandons the request.
    """

    def request(self, path: str, body: dict[str, Any]) -> Awaitable[dict[str, Any]]: ...


def call(gateway: Gateway, path: str, body: dict[str, Any]) -> Deferred[dict[str, Any]]:
    """``gateway.request(path, body)`` as a Deferred (cancelling it cancels the request)."""

    async def go() -> dict[str, Any]:
        return await gateway.request(path, body)

    return Deferred.fromCoroutine(go())


def is_lease_not_found(error: BaseException) -> bool:
    """Whether etcd refused a request because the lease it names is gone."""
    return "lease not found" in str(error)


def describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


# -- encoding ---------------------------------------------------------------------------------


def b64(text: str | bytes) -> str:
    return b64encode(text.encode() if isinstance(text, str) else text).decode("ascii")


def unb64(text: str) -> bytes:
    return b64decode(text.encode("ascii"))


def prefix_end(prefix: str) -> str:
    """The ``range_end`` (base64) that makes a range cover every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    while raw and raw[-1] == 0xFF:
        raw.pop()
    if not raw:
        return b64(b"\0")  # every key
    raw[-1] += 1
    return b64(bytes(raw))


def prefix_range(prefix: str, **options: Any) -> dict[str, Any]:
    """The body of a range (or delete range, or watch) over every key under ``prefix``."""
    return {"key": b64(prefix), "range_end": prefix_end(prefix), **options}


def as_int(value: object, default: int = 0) -> int:
    """A gateway integer (a JSON string, a number, or absent for zero)."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise EtcdError(f"not an integer in etcd's answer: {value!r}")
    try:
        return int(value)
    except ValueError:
        raise EtcdError(f"not an integer in etcd's answer: {value!r}") from None


def revision(reply: Mapping[str, Any]) -> int:
    """The revision in an answer's header."""
    header = reply.get("header")
    return as_int(header.get("revision")) if isinstance(header, Mapping) else 0


@attrs.frozen
class KeyValue:
    """One key of a range answer, decoded."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0

    @classmethod
    def parse(cls, obj: object) -> KeyValue:
        if not isinstance(obj, Mapping) or not isinstance(obj.get("key"), str):
            raise EtcdError(f"not a key-value in etcd's answer: {obj!r}")
        value = obj.get("value", "")
        if not isinstance(value, str):
            raise EtcdError(f"not a value in etcd's answer: {obj!r}")
        return cls(
            key=unb64(obj["key"]).decode("utf-8", "replace"),
            value=unb64(value),
            create_revision=as_int(obj.get("create_revision")),
            mod_revision=as_int(obj.get("mod_revision")),
            lease=as_int(obj.get("lease")),
        )

    def json(self) -> Any:
        """The value as JSON; :class:`ValueError` when it is not."""
        return json.loads(self.value)


def key_values(reply: Mapping[str, Any]) -> list[KeyValue]:
    """The keys of a range answer (``kvs`` is left out when there are none)."""
    kvs = reply.get("kvs", [])
    if not isinstance(kvs, list):
        raise EtcdError(f"not a list of keys in etcd's answer: {kvs!r}")
    return [KeyValue.parse(kv) for kv in kvs]


def json_value(obj: Any) -> str:
    """A JSON value as a gateway value (base64 of compact JSON)."""
    return b64(json.dumps(obj, separators=(",", ":"), sort_keys=True))


def number_field(obj: Mapping[str, Any], name: str) -> float:
    """The finite number ``obj[name]`` of a value read back; :class:`ValueError` if it is not."""
    value = obj.get(name)
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number")
    return float(value)


def text_field(obj: Mapping[str, Any], name: str, optional: bool = False) -> Any:
    """The string ``obj[name]`` (or None, when ``optional``) of a value read back;
    :class:`ValueError` if it is not."""
    value = obj.get(name)
    if not (isinstance(value, str) or (optional and value is None)):
        raise ValueError(f"{name} must be a string" + (" or null" if optional else ""))
    return value


# -- the requests rollouts make ---------------------------------------------------------------


async def get_prefix(
    gateway: Gateway, prefix: str, **options: Any
) -> tuple[int, list[KeyValue]]:
    """Every key under ``prefix`` (with range ``options``), and the revision of the read."""
    reply = await gateway.request(KV_RANGE, prefix_range(prefix, **options))
    return revision(reply), key_values(reply)


async def get_key(gateway: Gateway, key: str) -> KeyValue | None:
    reply = await gateway.request(KV_RANGE, {"key": b64(key)})
    kvs = key_values(reply)
    return kvs[0] if kvs else None


async def put(gateway: Gateway, key: str, value: Any, lease: int = 0) -> int:
    """Put the JSON ``value`` at ``key`` (bound to ``lease`` unless 0); the revision."""
    body: dict[str, Any] = {"key": b64(key), "value": json_value(value)}
    if lease:
        body["lease"] = str(lease)
    return revision(await gateway.request(KV_PUT, body))


def created_at(key: str, create_revision: int) -> dict[str, str]:
    """The compare of a transaction that acts only on ``key`` as it was created at revision
    ``create_revision`` (0: only while there is no such key), not a later key of that name."""
    return {"key": b64(key), "target": "CREATE", "result": "EQUAL",
            "create_revision": str(create_revision)}


async def delete(gateway: Gateway, key: str, mod_revision: int = 0,
                 create_revision: int = 0) -> bool:
    """Delete ``key`` (only while its ``mod_revision``, and its ``create_revision``, are the
    ones given, unless 0); whether a key was deleted."""
    request = {"request_delete_range": {"key": b64(key)}}
    compare = []
    if mod_revision:
        compare.append(
            {"key": b64(key), "target": "MOD", "result": "EQUAL",
             "mod_revision": str(mod_revision)}
        )
    if create_revision:
        compare.append(created_at(key, create_revision))
    reply = await gateway.request(KV_TXN, {"compare": compare, "success": [request]})
    if not reply.get("succeeded", False):
        return False
    responses = reply.get("responses") or [{}]
    deleted = responses[0].get("response_delete_range", {}).get("deleted")
    return as_int(deleted) > 0
