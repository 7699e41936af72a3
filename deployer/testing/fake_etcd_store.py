"""The keyspace of the in-memory etcd (:class:`~deployer.testing.fake_etcd.FakeEtcd`) and the
gateway's JSON for what it answers from it.

:class:`EtcdStore` holds one cluster's keys with their revisions and versions, the history of
changes (each revision's events, until compacted) and the leases, which expire on a clock and
take their keys with them. Its request methods take a gateway request body and give the answer
etcd 3.4's gateway gives, or raise :class:`GatewayError` with etcd's gRPC code and message:
64-bit integers as JSON strings, zero and false fields left out, one revision per request that
changes something. :meth:`EtcdStore.published` hears every revision's events (the watch).
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Iterable
from typing import Any

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime

MAX_TXN_OPS = 128
INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, FAILED_PRECONDITION, OUT_OF_RANGE = 3, 5, 8, 9, 11
STATUS = {INVALID_ARGUMENT: 400, NOT_FOUND: 404, RESOURCE_EXHAUSTED: 429,
          FAILED_PRECONDITION: 412, OUT_OF_RANGE: 400}
"""The gateway's HTTP status for each gRPC code."""

Events = list[dict[str, Any]]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: object) -> bytes:
    return base64.b64decode(text) if isinstance(text, str) else b""


def as_int(value: object) -> int:
    return int(value) if isinstance(value, int | str) and str(value).lstrip("-").isdigit() else 0


def in_range(key: bytes, start: bytes, end: bytes) -> bool:
    """Whether ``key`` is in the range of a request: ``start`` alone without ``end``, every key
    from ``start`` with ``end`` ``\\0``, else ``start`` up to ``end`` (excluded)."""
    if not end:
        return key == start
    return key >= start and (end == b"\0" or key < end)


class GatewayError(Exception):
    """etcd refused the request: ``code`` is its gRPC code, ``message`` its text."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message

    def answer(self) -> dict[str, Any]:
        return {"error": self.message, "message": self.message, "code": self.code}


@attrs.define
class StoredKV:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int = 0

    def to_json(self, keys_only: bool = False) -> dict[str, str]:
        out = {"key": b64(self.key), "create_revision": str(self.create_revision),
               "mod_revision": str(self.mod_revision), "version": str(self.version)}
        if self.value and not keys_only:
            out["value"] = b64(self.value)
        if self.lease:
            out["lease"] = str(self.lease)
        return out


@attrs.define(eq=False)
class Lease:
    id: int
    ttl: int
    expires: float
    timer: IDelayedCall
    keys: set[bytes] = attrs.Factory(set)


_FIELDS = {"VERSION": "version", "CREATE": "create_revision", "MOD": "mod_revision",
           "LEASE": "lease", "VALUE": "value", "KEY": "key"}
"""The field of a key that a compare or a sort targets."""

_ENUMS = {"sort_order": ("NONE", "ASCEND", "DESCEND"),
          "sort_target": ("KEY", "VERSION", "CREATE", "MOD", "VALUE")}

_BOUNDS: tuple[tuple[str, str, Callable[[int, int], bool]], ...] = (
    ("min_mod_revision", "mod_revision", int.__ge__),
    ("max_mod_revision", "mod_revision", int.__le__),
    ("min_create_revision", "create_revision", int.__ge__),
    ("max_create_revision", "create_revision", int.__le__),
)

_RESULTS: dict[str, Callable[[Any, Any], bool]] = {
    "EQUAL": lambda a, b: a == b, "NOT_EQUAL": lambda a, b: a != b,
    "GREATER": lambda a, b: a > b, "LESS": lambda a, b: a < b,
}


def _enum(body: dict[str, Any], field: str) -> str:
    names = _ENUMS[field]
    value = body.get(field, 0)
    if isinstance(value, int) and 0 <= value < len(names):
        return names[value]
    if value in names:
        return str(value)
    raise GatewayError(INVALID_ARGUMENT, f"invalid value for enum {field}: {value!r}")


class EtcdStore:
    """One etcd cluster's keys and leases (see the module docstring); ``clock`` times lease
    expiry."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.revision = 1
        self.compacted = 0
        self.kvs: dict[bytes, StoredKV] = {}
        self.history: list[tuple[int, Events]] = []
        self.leases: dict[int, Lease] = {}
        self._next_lease = 7587000000000000000

    # -- what a test does directly (as etcdctl would) ----------------------------------------

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        return self.commit({key: value}, lease=lease)

    def delete(self, key: bytes) -> int:
        return self.commit({}, (key,))

    def commit(self, puts: dict[bytes, bytes], deletes: Iterable[bytes] = (),
               lease: int = 0) -> int:
        """Puts, then deletes, in one revision; the revision."""
        events: Events = []
        for key, value in puts.items():
            self._store(key, value, lease, events)
        for key in deletes:
            self._remove(key, b"", events)
        self._publish(events)
        return self.revision

    def compact(self, revision: int) -> None:
        self.compacted = revision
        self.history = [(rev, evs) for rev, evs in self.history if rev >= revision]

    def revoke(self, lease_id: int) -> bool:
        """End a lease (its expiry does this) and delete its keys, in one revision."""
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return False
        if lease.timer.active():
            lease.timer.cancel()
        events: Events = []
        for key in sorted(lease.keys):
            self._remove(key, b"", events)
        self._publish(events)
        return True

    def value(self, key: str) -> Any:
        """The JSON value at ``key``, or None when there is no such key."""
        kv = self.kvs.get(key.encode())
        return json.loads(kv.value) if kv is not None else None

    def keys(self, prefix: str = "") -> list[str]:
        """Every key that starts with ``prefix``, in order."""
        return sorted(k.decode() for k in self.kvs if k.startswith(prefix.encode()))

    def published(self, events: Events) -> None:
        """Called with the events of every new revision."""

    def header(self, revision: bool = True) -> dict[str, str]:
        return {"cluster_id": "14841639068965178418", "member_id": "10276657743932975437",
                **({"revision": str(self.revision)} if revision else {}), "raft_term": "2"}

    # -- changes ------------------------------------------------------------------------------

    def _store(self, key: bytes, value: bytes, lease: int, events: Events) -> None:
        old = self.kvs.get(key)
        if old is not None and old.lease in self.leases:
            self.leases[old.lease].keys.discard(key)
        rev = self.revision + 1
        kv = StoredKV(key, value, old.create_revision if old else rev, rev,
                      old.version + 1 if old else 1, lease)
        self.kvs[key] = kv
        if lease:
            self.leases[lease].keys.add(key)
        event: dict[str, Any] = {"kv": kv.to_json()}
        if old is not None:
            event["prev_kv"] = old.to_json()
        events.append(event)

    def _remove(self, start: bytes, end: bytes, events: Events) -> int:
        keys = [key for key in sorted(self.kvs) if in_range(key, start, end)]
        for key in keys:
            old = self.kvs.pop(key)
            if old.lease in self.leases:
                self.leases[old.lease].keys.discard(key)
            events.append({"type": "DELETE",
                           "kv": {"key": b64(key), "mod_revision": str(self.revision + 1)},
                           "prev_kv": old.to_json()})
        return len(keys)

    def _publish(self, events: Events) -> None:
        if not events:
            return
        self.revision += 1
        self.history.append((self.revision, events))
        self.published(events)

    def check_revision(self, revision: int, compacted: bool) -> None:
        if compacted or revision > self.revision:
            why = "has been compacted" if compacted else "is a future revision"
            raise GatewayError(OUT_OF_RANGE, f"etcdserver: mvcc: required revision {why}")

    def _check_lease(self, lease: int) -> None:
        if lease and lease not in self.leases:
            raise GatewayError(NOT_FOUND, "etcdserver: requested lease not found")

    # -- kv requests --------------------------------------------------------------------------

    def range(self, body: dict[str, Any], header: dict[str, str] | None = None) -> dict[str, Any]:
        """``/v3/kv/range`` (in a transaction, with ``header`` {}): ``count`` counts the keys
        in the range before the revision bounds leave some out; ``more`` says that ``limit``
        left some out after them; a ``sort_target`` other than KEY sorts ascending by
        default."""
        revision = as_int(body.get("revision"))
        self.check_revision(revision, 0 < revision < self.compacted)
        if revision and revision != self.revision:
            raise GatewayError(INVALID_ARGUMENT, "the fake etcd keeps no past revisions")
        start, end = unb64(body.get("key")), unb64(body.get("range_end"))
        kvs = [kv for key, kv in sorted(self.kvs.items()) if in_range(key, start, end)]
        count = len(kvs)
        order, target = _enum(body, "sort_order"), _enum(body, "sort_target")
        bounds = [(field, keep, as_int(body.get(name))) for name, field, keep in _BOUNDS]
        limit = as_int(body.get("limit"))
        if limit and order == "NONE" and not any(bound for _, _, bound in bounds):
            kvs = kvs[:limit + 1]  # etcd reads one more than the limit, then sorts
        for field, keep, bound in bounds:
            if bound:
                kvs = [kv for kv in kvs if keep(getattr(kv, field), bound)]
        if order == "NONE" and target != "KEY":
            order = "ASCEND"
        if order != "NONE":
            kvs.sort(key=lambda kv: getattr(kv, _FIELDS[target]), reverse=order == "DESCEND")
        answer: dict[str, Any] = {"header": self.header() if header is None else header}
        shown = kvs[:limit] if limit else kvs
        if shown and not body.get("count_only"):
            answer["kvs"] = [kv.to_json(bool(body.get("keys_only"))) for kv in shown]
        if len(shown) < len(kvs):
            answer["more"] = True
        if count:
            answer["count"] = str(count)
        return answer

    def kv_put(self, body: dict[str, Any]) -> dict[str, Any]:
        """``/v3/kv/put``."""
        lease = as_int(body.get("lease"))
        self._check_lease(lease)
        self.put(unb64(body.get("key")), unb64(body.get("value")), lease)
        return {"header": self.header()}

    def deleterange(self, body: dict[str, Any]) -> dict[str, Any]:
        events: Events = []
        deleted = self._remove(unb64(body.get("key")), unb64(body.get("range_end")), events)
        self._publish(events)
        return {"header": self.header(), **({"deleted": str(deleted)} if deleted else {})}

    def compaction(self, body: dict[str, Any]) -> dict[str, Any]:
        revision = as_int(body.get("revision"))
        self.check_revision(revision, revision <= self.compacted)
        self.compact(revision)
        return {"header": self.header()}

    def check_txn(self, body: dict[str, Any]) -> None:
        """Refuse a transaction as etcd does before it applies it: too many operations, or a
        key written twice (or written and deleted) in one branch."""
        for branch in ("success", "failure"):
            ops = body.get(branch) or []
            if len(ops) > MAX_TXN_OPS:
                raise GatewayError(INVALID_ARGUMENT,
                                   "etcdserver: too many operations in txn request")
            written = [unb64(op["request_put"].get("key")) for op in ops if "request_put" in op]
            deleted = [op["request_delete_range"] for op in ops if "request_delete_range" in op]
            if len(set(written)) != len(written) or any(
                in_range(key, unb64(d.get("key")), unb64(d.get("range_end")))
                for key in written for d in deleted
            ):
                raise GatewayError(INVALID_ARGUMENT,
                                   "etcdserver: duplicate key given in txn request")

    def apply_txn(self, body: dict[str, Any]) -> tuple[dict[str, Any], dict[bytes, bytes]]:
        """``/v3/kv/txn`` once checked: the answer, and what it put."""
        succeeded = all(self._compare(c) for c in body.get("compare") or [])
        ops = body.get("success" if succeeded else "failure") or []
        for op in ops:
            self._check_lease(as_int(op.get("request_put", {}).get("lease")))
        events: Events = []
        results: list[tuple[str, dict[str, Any]]] = []
        puts: dict[bytes, bytes] = {}
        for op in ops:
            if "request_put" in op:
                put = op["request_put"]
                key, value = unb64(put.get("key")), unb64(put.get("value"))
                puts[key] = value
                self._store(key, value, as_int(put.get("lease")), events)
                results.append(("response_put", {}))
            elif "request_delete_range" in op:
                d = op["request_delete_range"]
                n = self._remove(unb64(d.get("key")), unb64(d.get("range_end")), events)
                results.append(("response_delete_range", {"deleted": str(n)} if n else {}))
            elif "request_range" in op:
                results.append(("response_range", self.range(op["request_range"], {})))
        self._publish(events)
        responses = [{kind: {**part, "header": {"revision": str(self.revision)}}}
                     for kind, part in results]
        answer: dict[str, Any] = {"header": self.header()}
        if succeeded:
            answer["succeeded"] = True
        if responses:
            answer["responses"] = responses
        return answer, puts

    def _compare(self, compare: dict[str, Any]) -> bool:
        kv = self.kvs.get(unb64(compare.get("key")))
        target = compare.get("target", "VERSION")
        ours: Any
        theirs: Any
        if target == "VALUE":
            if kv is None:
                return False
            ours, theirs = kv.value, unb64(compare.get("value"))
        else:
            field = _FIELDS[target]
            ours, theirs = getattr(kv, field) if kv is not None else 0, as_int(compare.get(field))
        return _RESULTS[compare.get("result", "EQUAL")](ours, theirs)

    # -- lease requests -----------------------------------------------------------------------

    def grant(self, body: dict[str, Any]) -> dict[str, Any]:
        ttl, lease_id = max(as_int(body.get("TTL")), 1), as_int(body.get("ID"))
        if not lease_id:
            self._next_lease += 1
            lease_id = self._next_lease
        if lease_id in self.leases:
            raise GatewayError(FAILED_PRECONDITION, "etcdserver: lease already exists")
        timer = self.clock.callLater(ttl, self.revoke, lease_id)
        self.leases[lease_id] = Lease(lease_id, ttl, self.clock.seconds() + ttl, timer)
        return {"header": self.header(), "ID": str(lease_id), "TTL": str(ttl)}

    def keepalive(self, body: dict[str, Any]) -> dict[str, Any]:
        """One message of the keepalive stream: without a TTL for a lease etcd does not know."""
        lease_id = as_int(body.get("ID"))
        result: dict[str, Any] = {"header": self.header(), "ID": str(lease_id)}
        lease = self.leases.get(lease_id)
        if lease is not None:
            lease.timer.reset(lease.ttl)
            lease.expires = self.clock.seconds() + lease.ttl
            result["TTL"] = str(lease.ttl)
        return {"result": result}

    def revoke_request(self, body: dict[str, Any]) -> dict[str, Any]:
        if not self.revoke(as_int(body.get("ID"))):
            raise GatewayError(NOT_FOUND, "etcdserver: requested lease not found")
        return {"header": self.header()}

    def timetolive(self, body: dict[str, Any]) -> dict[str, Any]:
        lease_id = as_int(body.get("ID"))
        answer: dict[str, Any] = {"header": self.header(), "ID": str(lease_id)}
        lease = self.leases.get(lease_id)
        if lease is None:
            return {**answer, "TTL": "-1"}
        left = max(0, math.floor(lease.expires - self.clock.seconds()))
        answer.update(TTL=str(left), grantedTTL=str(lease.ttl))
        if body.get("keys") and lease.keys:
            answer["keys"] = [b64(k) for k in sorted(lease.keys)]
        return answer
