"""Gateways for tests: :class:`TreqGateway` over real etcd members, and :class:`MemoryEtcd`, an
in-memory etcd of the few requests rollouts make, on a clock.

:class:`MemoryEtcd` answers as etcd 3.4's JSON gateway does (checked against a real member by
``tests/test_rollout_gateway.py``): 64-bit integers as strings, zero fields left out, a range's
``count`` taken before its revision filters, leases that expire on the clock with their keys,
``etcdserver: requested lease not found`` for a lease it does not know (as an
:class:`~deployer.errors.EtcdError`), and no ``TTL`` in the keepalive answer for such a lease.
Set :attr:`MemoryEtcd.down` to make every request fail with
:class:`~deployer.errors.EtcdUnavailable`, :attr:`MemoryEtcd.hang` to leave them unanswered.
:attr:`MemoryEtcd.max_requests` refuses requests beyond a number (a test of code that could
spin). :class:`Switch` cuts one simulated host off from either.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Sequence
from typing import Any

import attrs
from treq import content
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from deployer.errors import EtcdError, EtcdUnavailable
from deployer.rollout.gateway import Gateway, b64, call, describe, unb64
from deployer.timeouts import cancel_after


class TreqGateway:
    """POSTs to the first of ``urls`` that answers, each within ``timeout`` seconds."""

    def __init__(self, reactor: Any, urls: Sequence[str], timeout: float = 5.0) -> None:
        self.reactor = reactor
        self.urls = tuple(u.rstrip("/") for u in urls)
        self.timeout = timeout
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._http = HTTPClient(Agent(reactor, pool=self._pool))

    def request(self, path: str, body: dict[str, Any]) -> Deferred[dict[str, Any]]:
        return Deferred.fromCoroutine(self._request(path, body))

    async def _request(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        reasons = []
        for url in self.urls:
            try:
                code, raw = await cancel_after(
                    Deferred.fromCoroutine(self._post(url + path, body)),
                    self.timeout,
                    self.reactor,
                    url,
                )
            except CancelledError:
                raise
            except Exception as e:
                reasons.append(f"{url}: {describe(e)}")
                continue
            try:
                obj = json.loads(raw)
            except ValueError:
                obj = None
            if code >= 500:
                reasons.append(f"{url}: HTTP {code}: {raw[:200]!r}")
                continue
            if code != 200 or not isinstance(obj, dict) or "error" in obj:
                message = obj.get("message") if isinstance(obj, dict) else None
                message = message or raw[:200].decode("utf-8", "replace")
                raise EtcdError(f"{url} answered HTTP {code}: {message}")
            return obj
        raise EtcdUnavailable("no etcd member answered: " + "; ".join(reasons))

    async def _post(self, url: str, body: dict[str, Any]) -> tuple[int, bytes]:
        headers = Headers({"Grpc-Metadata-hasleader": ["true"]})
        response = await self._http.post(url, json=body, headers=headers)
        return response.code, await content(response)

    async def close(self) -> None:
        await self._pool.closeCachedConnections()


class Switch:
    """A host's way to etcd through ``gateway``, that a test can :attr:`cut` (every request
    then fails with :class:`~deployer.errors.EtcdUnavailable`, as when the host is cut off or
    frozen: its keepalives stop, so its lease expires in etcd). ``paths`` lists every request."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.cut = False
        self.paths: list[str] = []

    def request(self, path: str, body: dict[str, Any]) -> Deferred[dict[str, Any]]:
        self.paths.append(path)
        if self.cut:
            return fail(EtcdUnavailable("no etcd member answered (cut off by the test)"))
        return call(self.gateway, path, body)


# -- an etcd in memory ------------------------------------------------------------------------


class _Refused(Exception):
    """etcd's answer is an error."""


@attrs.define
class _KV:
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    def json(self, key: bytes, keys_only: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            "key": b64(key),
            "create_revision": str(self.create_revision),
            "mod_revision": str(self.mod_revision),
            "version": str(self.version),
        }
        if self.value and not keys_only:
            out["value"] = b64(self.value)
        if self.lease:
            out["lease"] = str(self.lease)
        return out


@attrs.define
class _Lease:
    ttl: int
    deadline: float


_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "EQUAL": lambda a, b: a == b,
    "GREATER": lambda a, b: a > b,
    "LESS": lambda a, b: a < b,
    "NOT_EQUAL": lambda a, b: a != b,
}


class MemoryEtcd:
    """An etcd member in memory (see the module docstring); a :class:`Gateway`."""

    def __init__(self, clock: IReactorTime) -> None:
        self.clock = clock
        self.revision = 1
        self.kvs: dict[bytes, _KV] = {}
        self.leases: dict[int, _Lease] = {}
        self.down = False
        self.hang = False
        self.max_requests: int | None = None
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self._ids = itertools.count(0x694D7A9B00000001)

    def request(self, path: str, body: dict[str, Any]) -> Deferred[dict[str, Any]]:
        self.requests.append((path, body))
        if self.max_requests is not None and len(self.requests) > self.max_requests:
            return fail(EtcdError(f"memory etcd: more than {self.max_requests} requests"))
        if self.hang:
            return Deferred()
        if self.down:
            return fail(EtcdUnavailable("no etcd member answered (memory etcd is down)"))
        self.expire()
        handler = self._paths.get(path)
        if handler is None:
            return fail(EtcdError(f"memory etcd answered HTTP 404: no {path}"))
        try:
            return succeed(handler(self, body))
        except _Refused as e:
            return fail(EtcdError(f"memory etcd answered HTTP 404: {e}"))

    def count(self, path: str) -> int:
        """How many requests went to ``path``."""
        return sum(1 for p, _ in self.requests if p == path)

    def get(self, key: str) -> Any:
        """The JSON value of ``key``, or None."""
        self.expire()
        kv = self.kvs.get(key.encode())
        return json.loads(kv.value) if kv is not None else None

    def keys(self, prefix: str = "") -> list[str]:
        self.expire()
        return sorted(k.decode() for k in self.kvs if k.startswith(prefix.encode()))

    def expire(self) -> None:
        """Let every lease whose TTL has run out go, with its keys."""
        now = self.clock.seconds()
        for lease_id, lease in list(self.leases.items()):
            if lease.deadline <= now:
                self._drop_lease(lease_id)

    # -- requests -----------------------------------------------------------------------------

    def _header(self) -> dict[str, Any]:
        return {"header": {"revision": str(self.revision)}}

    def _grant(self, body: dict[str, Any]) -> dict[str, Any]:
        ttl = int(body.get("TTL", 0))
        lease_id = int(body.get("ID", 0)) or next(self._ids)
        self.leases[lease_id] = _Lease(ttl, self.clock.seconds() + ttl)
        return {**self._header(), "ID": str(lease_id), "TTL": str(ttl)}

    def _keepalive(self, body: dict[str, Any]) -> dict[str, Any]:
        lease_id = int(body.get("ID", 0))
        result = {**self._header(), "ID": str(lease_id)}
        lease = self.leases.get(lease_id)
        if lease is not None:
            lease.deadline = self.clock.seconds() + lease.ttl
            result["TTL"] = str(lease.ttl)
        return {"result": result}

    def _revoke(self, body: dict[str, Any]) -> dict[str, Any]:
        lease_id = int(body.get("ID", 0))
        if lease_id not in self.leases:
            raise _Refused("etcdserver: requested lease not found")
        self._drop_lease(lease_id)
        return self._header()

    def _timetolive(self, body: dict[str, Any]) -> dict[str, Any]:
        lease_id = int(body.get("ID", 0))
        lease = self.leases.get(lease_id)
        if lease is None:
            return {**self._header(), "ID": str(lease_id), "TTL": "-1"}
        out = {
            **self._header(),
            "ID": str(lease_id),
            "TTL": str(max(0, int(lease.deadline - self.clock.seconds()))),
            "grantedTTL": str(lease.ttl),
        }
        if body.get("keys"):
            out["keys"] = [b64(k) for k, kv in self.kvs.items() if kv.lease == lease_id]
        return out

    def _drop_lease(self, lease_id: int) -> None:
        del self.leases[lease_id]
        doomed = [k for k, kv in self.kvs.items() if kv.lease == lease_id]
        if doomed:
            self.revision += 1
            for k in doomed:
                del self.kvs[k]

    def _range(self, body: dict[str, Any]) -> dict[str, Any]:
        return {**self._header(), **self._read(body)}

    def _put(self, body: dict[str, Any]) -> dict[str, Any]:
        self._check_put(body)
        self.revision += 1
        self._write(body)
        return self._header()

    def _delete(self, body: dict[str, Any]) -> dict[str, Any]:
        doomed = self._select(body)
        if doomed:
            self.revision += 1
        for k in doomed:
            del self.kvs[k]
        out = self._header()
        if doomed:
            out["deleted"] = str(len(doomed))
        return out

    def _txn(self, body: dict[str, Any]) -> dict[str, Any]:
        succeeded = all(self._compare(c) for c in body.get("compare", []))
        ops = body.get("success" if succeeded else "failure", [])
        for op in ops:
            if "request_put" in op:
                self._check_put(op["request_put"])
        writes = any(
            "request_put" in op or ("request_delete_range" in op
                                    and self._select(op["request_delete_range"]))
            for op in ops
        )
        if writes:
            self.revision += 1
        responses = []
        for op in ops:
            if "request_put" in op:
                self._write(op["request_put"])
                responses.append({"response_put": self._header()})
            elif "request_range" in op:
                responses.append({"response_range": {**self._header(),
                                                     **self._read(op["request_range"])}})
            elif "request_delete_range" in op:
                doomed = self._select(op["request_delete_range"])
                for k in doomed:
                    del self.kvs[k]
                answer = self._header()
                if doomed:
                    answer["deleted"] = str(len(doomed))
                responses.append({"response_delete_range": answer})
        out: dict[str, Any] = {**self._header(), "responses": responses}
        if succeeded:
            out["succeeded"] = True
        return out

    # -- helpers ------------------------------------------------------------------------------

    def _select(self, body: dict[str, Any]) -> list[bytes]:
        key = unb64(body.get("key", ""))
        end = unb64(body["range_end"]) if body.get("range_end") else None
        if end is None:
            return [key] if key in self.kvs else []
        return sorted(k for k in self.kvs if k >= key and (end == b"\0" or k < end))

    def _read(self, body: dict[str, Any]) -> dict[str, Any]:
        selected = self._select(body)
        count = len(selected)
        bounds = {
            "min_create_revision": lambda kv, n: kv.create_revision >= n,
            "max_create_revision": lambda kv, n: kv.create_revision <= n,
            "min_mod_revision": lambda kv, n: kv.mod_revision >= n,
            "max_mod_revision": lambda kv, n: kv.mod_revision <= n,
        }
        for name, keep in bounds.items():
            bound = int(body.get(name, 0))
            if bound:
                selected = [k for k in selected if keep(self.kvs[k], bound)]
        target = body.get("sort_target", "KEY")
        sort_key: dict[str, Callable[[bytes], Any]] = {
            "KEY": lambda k: k,
            "CREATE": lambda k: self.kvs[k].create_revision,
            "MOD": lambda k: self.kvs[k].mod_revision,
            "VERSION": lambda k: self.kvs[k].version,
            "VALUE": lambda k: self.kvs[k].value,
        }
        order = body.get("sort_order", "NONE")
        if order in ("ASCEND", "DESCEND"):
            selected.sort(key=sort_key[target], reverse=order == "DESCEND")
        limit = int(body.get("limit", 0))
        more = bool(limit) and len(selected) > limit
        if limit:
            selected = selected[:limit]
        out: dict[str, Any] = {}
        if not body.get("count_only") and selected:
            keys_only = bool(body.get("keys_only"))
            out["kvs"] = [self.kvs[k].json(k, keys_only) for k in selected]
        if count:
            out["count"] = str(count)
        if more:
            out["more"] = True
        return out

    def _compare(self, compare: dict[str, Any]) -> bool:
        key = unb64(compare.get("key", ""))
        kv = self.kvs.get(key)
        target = compare.get("target", "VERSION")
        if target == "VALUE":
            if kv is None:
                return False
            actual: Any = kv.value
            expected: Any = unb64(compare.get("value", ""))
        else:
            field = {"CREATE": "create_revision", "MOD": "mod_revision",
                     "VERSION": "version", "LEASE": "lease"}[target]
            actual = getattr(kv, field) if kv is not None else 0
            expected = int(compare.get(field, 0))
        return _COMPARE[compare.get("result", "EQUAL")](actual, expected)

    def _check_put(self, body: dict[str, Any]) -> None:
        lease = int(body.get("lease", 0))
        if lease and lease not in self.leases:
            raise _Refused("etcdserver: requested lease not found")

    def _write(self, body: dict[str, Any]) -> None:
        key = unb64(body.get("key", ""))
        old = self.kvs.get(key)
        self.kvs[key] = _KV(
            value=unb64(body.get("value", "")),
            create_revision=old.create_revision if old is not None else self.revision,
            mod_revision=self.revision,
            version=old.version + 1 if old is not None else 1,
            lease=int(body.get("lease", 0)),
        )

    _paths: dict[str, Callable[[MemoryEtcd, dict[str, Any]], dict[str, Any]]] = {
        "/v3/lease/grant": _grant,
        "/v3/lease/keepalive": _keepalive,
        "/v3/lease/revoke": _revoke,
        "/v3/lease/timetolive": _timetolive,
        "/v3/kv/range": _range,
        "/v3/kv/put": _put,
        "/v3/kv/deleterange": _delete,
        "/v3/kv/txn": _txn,
    }
