"""An in-memory etcd: the v3 JSON gateway (``/v3/...``) of a cluster, as a web resource.

Serve it to the real client through :class:`treq.testing.RequestTraversalAgent` (tests on a
``Clock``; ``tests/stack/etcd_stack.py`` wraps it in an agent that can also refuse connections),
or in a ``twisted.web.server.Site`` on a real port.

What it serves follows etcd 3.4's gateway as observed (tests/test_etcd_gateway.py runs one suite
against both): ``/v3/kv/range`` (a key, a range or a prefix; ``limit``, ``keys_only``,
``count_only``; ``serializable`` is accepted; only the current revision), ``/v3/kv/txn``
(``compare`` on ``version``, ``create_revision``, ``mod_revision``, ``value`` and ``lease``;
``request_put`` with or without a lease, ``request_range``, ``request_delete_range``; one
revision per transaction that changes something; duplicate keys and more than 128 operations
refused), ``/v3/kv/deleterange``, ``/v3/kv/compaction``, ``/v3/watch`` (a stream of
``{"result": ...}`` lines: ``created``, events with ``mod_revision`` whose type is omitted for
PUT and ``DELETE`` otherwise, the history from ``start_revision`` in one message, progress
notifications every ``progress_interval`` seconds, and ``canceled`` with ``compact_revision``
for a compacted start), and ``/v3/lease/grant``, ``keepalive``, ``revoke`` and ``timetolive``,
leases expiring on the clock and deleting their keys. Integers are JSON strings and empty fields
are left out, as the gateway does. Errors are ``{"error", "message", "code"}`` with etcd's gRPC
code and the gateway's HTTP status.

Members are told apart by the Host header (without the port). A test steers them with
:meth:`~FakeEtcd.freeze` (a member that accepts requests and never answers, as one stopped with
SIGSTOP: its watch streams go silent too, and get what they missed on :meth:`~FakeEtcd.thaw`),
:attr:`~FakeEtcd.hold` (transactions wait for :meth:`~FakeEtcd.release`) and
:attr:`~FakeEtcd.reject`, and finds every request in :attr:`~FakeEtcd.requests`,
:attr:`~FakeEtcd.txns`, :attr:`~FakeEtcd.ranges` and :attr:`~FakeEtcd.watches`.
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

MAX_TXN_OPS = 128
INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, OUT_OF_RANGE = 3, 5, 9, 11
_STATUS = {INVALID_ARGUMENT: 400, NOT_FOUND: 404, FAILED_PRECONDITION: 412, OUT_OF_RANGE: 400}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: object) -> bytes:
    return base64.b64decode(text) if isinstance(text, str) else b""


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | str) and str(value).lstrip("-").isdigit() else 0


class GatewayError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _in(key: bytes, start: bytes, end: bytes) -> bool:
    if not end:
        return key == start
    return key >= start and (end == b"\0" or key < end)


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


@attrs.define(eq=False)
class FakeWatch:
    """One watch stream; :meth:`end` ends it cleanly, :meth:`drop` breaks its connection."""

    request: Request
    member: str
    key: bytes
    range_end: bytes
    start_revision: int
    frozen: Callable[[str], bool]
    open: bool = True
    backlog: list[dict[str, Any]] = attrs.Factory(list)
    timer: IDelayedCall | None = None

    def covers(self, key: bytes) -> bool:
        return _in(key, self.key, self.range_end)

    def send(self, message: dict[str, Any]) -> None:
        if self.open and self.frozen(self.member):
            self.backlog.append(message)
        elif self.open:
            self.request.write(json.dumps(message).encode() + b"\n")

    def thaw(self) -> None:
        backlog, self.backlog = self.backlog, []
        for message in backlog:
            self.send(message)

    def closed(self) -> None:
        self.open = False
        if self.timer is not None and self.timer.active():
            self.timer.cancel()

    def end(self) -> None:
        if self.open:
            self.closed()
            self.request.finish()

    def drop(self) -> None:
        self.closed()
        if self.request.transport is not None:
            self.request.transport.loseConnection()


class FakeEtcd(Resource):
    """One etcd cluster's store, and the gateway of each of its members as one resource (see
    the module docstring). ``clock`` times lease expiry and progress notifications
    (``progress_interval`` seconds, etcd's default 10 minutes; None for none)."""

    isLeaf = True

    def __init__(self, clock: IReactorTime, progress_interval: float | None = 600.0) -> None:
        super().__init__()
        self.clock = clock
        self.progress_interval = progress_interval
        self.revision = 1
        self.compacted = 0
        self.kvs: dict[bytes, StoredKV] = {}
        self.history: list[tuple[int, list[dict[str, Any]]]] = []
        self.leases: dict[int, Lease] = {}
        self._next_lease = 7587000000000000000
        self.watches: list[FakeWatch] = []
        self.silent: set[str] = set()
        self.hold = False
        self.held: list[tuple[Request, str, dict[str, Any]]] = []
        self.reject: str | None = None
        self.requests: list[tuple[str, str, Sequence[bytes] | None]] = []
        self.txns: list[tuple[str, dict[bytes, bytes]]] = []
        self.ranges: list[tuple[str, dict[str, Any]]] = []
        self._routes: dict[str, Callable[[Request, str, dict[str, Any]], Any]] = {
            "/v3/kv/range": self._range, "/v3/kv/txn": self._txn,
            "/v3/kv/deleterange": self._deleterange, "/v3/kv/compaction": self._compaction,
            "/v3/watch": self._watch, "/v3/lease/grant": self._grant,
            "/v3/lease/keepalive": self._keepalive, "/v3/lease/revoke": self._revoke,
            "/v3/lease/timetolive": self._timetolive,
        }

    # -- what a test does directly (as etcdctl would) ----------------------------------------

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        return self.commit({key: value}, lease=lease)

    def delete(self, key: bytes) -> int:
        return self.commit({}, (key,))

    def commit(self, puts: dict[bytes, bytes], deletes: Iterable[bytes] = (),
               lease: int = 0) -> int:
        """Puts, then deletes, in one revision; the revision."""
        events: list[dict[str, Any]] = []
        for key, value in puts.items():
            self._store(key, value, lease, events)
        for key in deletes:
            self._remove(key, b"", events)
        self._publish(events)
        return self.revision

    def compact(self, revision: int) -> None:
        self.compacted = revision
        self.history = [(rev, evs) for rev, evs in self.history if rev >= revision]

    def freeze(self, member: str) -> None:
        """``member`` accepts requests and never answers them; its watch streams go silent."""
        self.silent.add(member)

    def thaw(self, member: str) -> None:
        """``member`` answers new requests again; its watch streams get what they missed."""
        self.silent.discard(member)
        for w in self.watches:
            if w.member == member:
                w.thaw()

    def release(self) -> None:
        """Apply and answer the transactions held while :attr:`hold` was set."""
        held, self.held = self.held, []
        for request, member, body in held:
            try:
                answer = self._apply_txn(member, body)
            except GatewayError as e:
                answer = self._error(request, e)
            request.write(json.dumps(answer).encode())
            request.finish()

    @property
    def open_watches(self) -> list[FakeWatch]:
        return [w for w in self.watches if w.open]

    # -- serving ------------------------------------------------------------------------------

    def header(self, revision: bool = True) -> dict[str, str]:
        return {"cluster_id": "14841639068965178418", "member_id": "10276657743932975437",
                **({"revision": str(self.revision)} if revision else {}), "raft_term": "2"}

    def render_POST(self, request: Request) -> bytes | int:
        member = (request.getHeader("host") or "").rsplit(":", 1)[0].strip("[]")
        path = request.path.decode()
        self.requests.append(
            (member, path, request.requestHeaders.getRawHeaders(b"grpc-metadata-hasleader"))
        )
        if member in self.silent:
            return NOT_DONE_YET
        route = self._routes.get(path)
        if route is None:
            request.setResponseCode(404)
            request.setHeader("content-type", "text/plain; charset=utf-8")
            return b"Not Found\n"
        request.setHeader("content-type", "application/json")
        try:
            body = json.loads(request.content.read() if request.content else b"{}")
            if not isinstance(body, dict):
                raise GatewayError(INVALID_ARGUMENT, "json: cannot unmarshal into a request")
            answer = route(request, member, body)
        except ValueError as e:
            answer = self._error(request, GatewayError(INVALID_ARGUMENT, str(e)))
        except GatewayError as e:
            answer = self._error(request, e)
        if isinstance(answer, int):
            return answer
        return answer if isinstance(answer, bytes) else json.dumps(answer).encode()

    def _error(self, request: Request, e: GatewayError) -> dict[str, Any]:
        request.setResponseCode(_STATUS.get(e.code, 500))
        return {"error": e.message, "message": e.message, "code": e.code}

    # -- the store ----------------------------------------------------------------------------

    def _store(self, key: bytes, value: bytes, lease: int, events: list[dict[str, Any]]) -> None:
        old = self.kvs.get(key)
        if old is not None and old.lease in self.leases:
            self.leases[old.lease].keys.discard(key)
        rev = self.revision + 1
        kv = StoredKV(key, value, old.create_revision if old else rev, rev,
                      old.version + 1 if old else 1, lease)
        self.kvs[key] = kv
        if lease:
            self.leases[lease].keys.add(key)
        events.append({"kv": kv.to_json()})

    def _remove(self, start: bytes, end: bytes, events: list[dict[str, Any]]) -> int:
        keys = [key for key in sorted(self.kvs) if _in(key, start, end)]
        for key in keys:
            old = self.kvs.pop(key)
            if old.lease in self.leases:
                self.leases[old.lease].keys.discard(key)
            events.append({"type": "DELETE",
                           "kv": {"key": b64(key), "mod_revision": str(self.revision + 1)}})
        return len(keys)

    def _publish(self, events: list[dict[str, Any]]) -> None:
        if not events:
            return
        self.revision += 1
        self.history.append((self.revision, events))
        for w in self.watches:
            self.send_events(w, events)

    def send_events(self, w: FakeWatch, events: list[dict[str, Any]]) -> None:
        mine = [e for e in events if w.covers(unb64(e["kv"]["key"]))]
        if mine:
            w.send({"result": {"header": self.header(), "events": mine}})

    def _check_revision(self, revision: int, compacted: bool) -> None:
        if compacted or revision > self.revision:
            why = "has been compacted" if compacted else "is a future revision"
            raise GatewayError(OUT_OF_RANGE, f"etcdserver: mvcc: required revision {why}")

    def _check_lease(self, lease: int) -> None:
        if lease and lease not in self.leases:
            raise GatewayError(NOT_FOUND, "etcdserver: requested lease not found")

    # -- kv -----------------------------------------------------------------------------------

    def _range(self, request: Request, member: str, body: dict[str, Any]) -> dict[str, Any]:
        self.ranges.append((member, body))
        return self._range_answer(body, self.header())

    def _range_answer(self, body: dict[str, Any], header: dict[str, str]) -> dict[str, Any]:
        revision = _int(body.get("revision"))
        self._check_revision(revision, 0 < revision < self.compacted)
        if revision and revision != self.revision:
            raise GatewayError(INVALID_ARGUMENT, "the fake etcd keeps no past revisions")
        start, end = unb64(body.get("key")), unb64(body.get("range_end"))
        kvs = [kv for key, kv in sorted(self.kvs.items()) if _in(key, start, end)]
        answer: dict[str, Any] = {"header": header}
        limit = _int(body.get("limit"))
        shown = kvs[:limit] if limit else kvs
        if shown and not body.get("count_only"):
            answer["kvs"] = [kv.to_json(bool(body.get("keys_only"))) for kv in shown]
        if len(shown) < len(kvs):
            answer["more"] = True
        if kvs:
            answer["count"] = str(len(kvs))
        return answer

    def _deleterange(self, request: Request, member: str, body: dict[str, Any]) -> dict[str, Any]:
        events: list[dict[str, Any]] = []
        deleted = self._remove(unb64(body.get("key")), unb64(body.get("range_end")), events)
        self._publish(events)
        return {"header": self.header(), **({"deleted": str(deleted)} if deleted else {})}

    def _compaction(self, request: Request, member: str, body: dict[str, Any]) -> dict[str, Any]:
        revision = _int(body.get("revision"))
        self._check_revision(revision, revision <= self.compacted)
        self.compact(revision)
        return {"header": self.header()}

    def _txn(self, request: Request, member: str, body: dict[str, Any]) -> Any:
        if self.reject:
            raise GatewayError(INVALID_ARGUMENT, self.reject)
        for branch in ("success", "failure"):
            ops = body.get(branch) or []
            if len(ops) > MAX_TXN_OPS:
                raise GatewayError(INVALID_ARGUMENT,
                                   "etcdserver: too many operations in txn request")
            written = [unb64(op["request_put"].get("key")) for op in ops if "request_put" in op]
            deleted = [op["request_delete_range"] for op in ops if "request_delete_range" in op]
            if len(set(written)) != len(written) or any(
                _in(key, unb64(d.get("key")), unb64(d.get("range_end")))
                for key in written for d in deleted
            ):
                raise GatewayError(INVALID_ARGUMENT,
                                   "etcdserver: duplicate key given in txn request")
        if self.hold:
            self.held.append((request, member, body))
            return NOT_DONE_YET
        return self._apply_txn(member, body)

    def _apply_txn(self, member: str, body: dict[str, Any]) -> dict[str, Any]:
        succeeded = all(self._compare(c) for c in body.get("compare") or [])
        ops = body.get("success" if succeeded else "failure") or []
        for op in ops:
            self._check_lease(_int(op.get("request_put", {}).get("lease")))
        events: list[dict[str, Any]] = []
        results: list[tuple[str, dict[str, Any]]] = []
        puts: dict[bytes, bytes] = {}
        for op in ops:
            if "request_put" in op:
                put = op["request_put"]
                key, value = unb64(put.get("key")), unb64(put.get("value"))
                puts[key] = value
                self._store(key, value, _int(put.get("lease")), events)
                results.append(("response_put", {}))
            elif "request_delete_range" in op:
                d = op["request_delete_range"]
                n = self._remove(unb64(d.get("key")), unb64(d.get("range_end")), events)
                results.append(("response_delete_range", {"deleted": str(n)} if n else {}))
            elif "request_range" in op:
                results.append(("response_range", self._range_answer(op["request_range"], {})))
        self._publish(events)
        if puts:
            self.txns.append((member, puts))
        responses = [{kind: {**part, "header": {"revision": str(self.revision)}}}
                     for kind, part in results]
        answer: dict[str, Any] = {"header": self.header()}
        if succeeded:
            answer["succeeded"] = True
        if responses:
            answer["responses"] = responses
        return answer

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
            field = {"VERSION": "version", "CREATE": "create_revision",
                     "MOD": "mod_revision", "LEASE": "lease"}[target]
            ours, theirs = getattr(kv, field) if kv is not None else 0, _int(compare.get(field))
        result = compare.get("result", "EQUAL")
        return {"EQUAL": ours == theirs, "NOT_EQUAL": ours != theirs,
                "GREATER": ours > theirs, "LESS": ours < theirs}[result]

    # -- watch --------------------------------------------------------------------------------

    def _watch(self, request: Request, member: str, body: dict[str, Any]) -> int:
        create = body.get("create_request")
        if not isinstance(create, dict):
            raise GatewayError(INVALID_ARGUMENT, "the fake etcd serves only create_request")
        w = FakeWatch(request, member, unb64(create.get("key")), unb64(create.get("range_end")),
                      _int(create.get("start_revision")), self.silent.__contains__)
        request.notifyFinish().addBoth(lambda _: w.closed())
        self.watches.append(w)
        w.send({"result": {"header": self.header(), "created": True}})
        if w.start_revision and w.start_revision < self.compacted:
            w.send({"result": {"header": self.header(revision=False), "canceled": True,
                               "compact_revision": str(self.compacted)}})
            return NOT_DONE_YET
        if w.start_revision:
            self.send_events(w, [e for rev, evs in self.history if rev >= w.start_revision
                                  for e in evs])
        if create.get("progress_notify") and self.progress_interval:
            self._progress(w)
        return NOT_DONE_YET

    def _progress(self, w: FakeWatch) -> None:
        def tick() -> None:
            if w.open:
                w.send({"result": {"header": self.header()}})
                self._progress(w)

        assert self.progress_interval is not None
        w.timer = self.clock.callLater(self.progress_interval, tick)

    # -- leases -------------------------------------------------------------------------------

    def _grant(self, request: Request, member: str, body: dict[str, Any]) -> dict[str, Any]:
        ttl, lease_id = max(_int(body.get("TTL")), 1), _int(body.get("ID"))
        if not lease_id:
            self._next_lease += 1
            lease_id = self._next_lease
        if lease_id in self.leases:
            raise GatewayError(FAILED_PRECONDITION, "etcdserver: lease already exists")
        timer = self.clock.callLater(ttl, self.revoke, lease_id)
        self.leases[lease_id] = Lease(lease_id, ttl, self.clock.seconds() + ttl, timer)
        return {"header": self.header(), "ID": str(lease_id), "TTL": str(ttl)}

    def revoke(self, lease_id: int) -> bool:
        """End a lease (its expiry does this) and delete its keys, in one revision."""
        lease = self.leases.pop(lease_id, None)
        if lease is None:
            return False
        if lease.timer.active():
            lease.timer.cancel()
        events: list[dict[str, Any]] = []
        for key in sorted(lease.keys):
            self._remove(key, b"", events)
        self._publish(events)
        return True

    def _keepalive(self, request: Request, member: str, body: dict[str, Any]) -> bytes:
        lease_id = _int(body.get("ID"))
        result: dict[str, Any] = {"header": self.header(), "ID": str(lease_id)}
        lease = self.leases.get(lease_id)
        if lease is not None:
            lease.timer.reset(lease.ttl)
            lease.expires = self.clock.seconds() + lease.ttl
            result["TTL"] = str(lease.ttl)
        return json.dumps({"result": result}).encode() + b"\n"

    def _revoke(self, request: Request, member: str, body: dict[str, Any]) -> dict[str, Any]:
        if not self.revoke(_int(body.get("ID"))):
            raise GatewayError(NOT_FOUND, "etcdserver: requested lease not found")
        return {"header": self.header()}

    def _timetolive(self, request: Request, member: str, body: dict[str, Any]) -> dict[str, Any]:
        lease_id = _int(body.get("ID"))
        answer: dict[str, Any] = {"header": self.header(), "ID": str(lease_id)}
        lease = self.leases.get(lease_id)
        if lease is None:
            return {**answer, "TTL": "-1"}
        left = max(0, math.floor(lease.expires - self.clock.seconds()))
        answer.update(TTL=str(left), grantedTTL=str(lease.ttl))
        if body.get("keys") and lease.keys:
            answer["keys"] = [b64(k) for k in sorted(lease.keys)]
        return answer
