"""The in-memory etcd (:class:`deployer.rollout.testing.MemoryEtcd`) answers the requests that
rollouts make as a real etcd 3.4 member does: one scenario, run on both, must see the same."""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from deployer.errors import EtcdError
from deployer.rollout.gateway import (
    KV_DELETE,
    KV_RANGE,
    KV_TXN,
    LEASE_GRANT,
    LEASE_KEEPALIVE,
    LEASE_REVOKE,
    Gateway,
    as_int,
    b64,
    delete,
    is_lease_not_found,
    json_value,
    key_values,
    prefix_end,
    prefix_range,
    put,
    revision,
    unb64,
)
from deployer.rollout.testing import MemoryEtcd, TreqGateway
from tests.helpers import fired
from tests.stack.etcd_stack import EtcdMember

UNKNOWN_LEASE = "1234567"


def without_headers(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: without_headers(v) for k, v in value.items() if k != "header"}
    if isinstance(value, list):
        return [without_headers(v) for v in value]
    return value


async def scenario(gw: Gateway, prefix: str) -> list[Any]:
    """What a gateway answers to the requests rollouts make, with revisions counted from the
    start and headers left out."""
    facts: list[Any] = []
    base = revision(await gw.request(KV_RANGE, {"key": b64(prefix + "/nothing")}))

    def rel(n: int) -> int:
        return n - base if n else 0

    def short(key: str) -> str:
        return key[len(prefix):]

    grant = await gw.request(LEASE_GRANT, {"TTL": 30})
    lease = as_int(grant["ID"])
    facts.append(("grant", grant["TTL"], lease > 0))

    def slot_txn(name: str) -> dict[str, Any]:
        key = b64(f"{prefix}/q/{name}")
        return {
            "compare": [{"key": key, "target": "CREATE", "result": "EQUAL",
                         "create_revision": "0"}],
            "success": [{"request_put": {"key": key, "value": json_value({"n": name}),
                                         "lease": str(lease)}}],
            "failure": [{"request_range": {"key": key}}],
        }

    created = await gw.request(KV_TXN, slot_txn("a"))
    facts.append(("created", created.get("succeeded", False), rel(revision(created)),
                  without_headers(created["responses"])))
    again = await gw.request(KV_TXN, slot_txn("a"))
    kvs = key_values(again["responses"][0]["response_range"])
    facts.append(("again", again.get("succeeded", False), rel(revision(again)),
                  [(short(kv.key), rel(kv.create_revision), kv.lease == lease, kv.json())
                   for kv in kvs]))
    revisions = {"a": revision(created)}
    for name in ("c", "b"):
        revisions[name] = revision(await gw.request(KV_TXN, slot_txn(name)))
    await put(gw, f"{prefix}/q/a", {"n": "a2"}, lease=lease)  # a is modified, not created again
    upto = await gw.request(KV_RANGE, prefix_range(
        f"{prefix}/q/", sort_order="ASCEND", sort_target="CREATE",
        max_create_revision=str(revisions["c"]), serializable=True))
    facts.append(("up to c", [short(kv.key) for kv in key_values(upto)], upto.get("count"),
                  rel(revision(upto))))
    by_create = await gw.request(KV_RANGE, prefix_range(
        f"{prefix}/q/", sort_order="DESCEND", sort_target="CREATE"))
    facts.append(("by create", [(short(kv.key), rel(kv.create_revision), rel(kv.mod_revision))
                                for kv in key_values(by_create)]))
    first = await gw.request(KV_RANGE, prefix_range(f"{prefix}/q/", limit=2, keys_only=True))
    facts.append(("first two", without_headers(first)["kvs"][0].get("value"),
                  [short(kv.key) for kv in key_values(first)], first.get("count"),
                  first.get("more", False)))
    missing = await gw.request(KV_DELETE, {"key": b64(f"{prefix}/missing")})
    facts.append(("delete missing", without_headers(missing), rel(revision(missing))))
    facts.append(("txn delete missing", await delete(gw, f"{prefix}/missing")))
    facts.append(("txn delete", await delete(gw, f"{prefix}/q/b")))
    stale = await delete(gw, f"{prefix}/q/c", mod_revision=revisions["c"] - 1)
    facts.append(("delete stale", stale, rel(revision(await gw.request(KV_RANGE, {
        "key": b64(prefix)})))))
    try:
        await put(gw, f"{prefix}/q/z", {}, lease=int(UNKNOWN_LEASE))
    except EtcdError as e:
        facts.append(("put unknown lease", is_lease_not_found(e)))
    unknown = await gw.request(LEASE_KEEPALIVE, {"ID": UNKNOWN_LEASE})
    facts.append(("keepalive unknown", without_headers(unknown)))
    known = await gw.request(LEASE_KEEPALIVE, {"ID": str(lease)})
    facts.append(("keepalive", known["result"]["TTL"]))
    ttl = await gw.request("/v3/lease/timetolive", {"ID": UNKNOWN_LEASE})
    facts.append(("timetolive unknown", ttl["TTL"]))
    await gw.request(LEASE_REVOKE, {"ID": str(lease)})
    gone = await gw.request(KV_RANGE, prefix_range(f"{prefix}/q/"))
    facts.append(("revoked", without_headers(gone), rel(revision(gone))))
    try:
        await gw.request(LEASE_REVOKE, {"ID": str(lease)})
    except EtcdError as e:
        facts.append(("revoke again", is_lease_not_found(e)))
    return facts


EXPECTED: list[Any] = [
    ("grant", "30", True),
    ("created", True, 1, [{"response_put": {}}]),
    ("again", False, 1, [("/q/a", 1, True, {"n": "a"})]),
    ("up to c", ["/q/a", "/q/c"], "3", 4),
    ("by create", [("/q/b", 3, 3), ("/q/c", 2, 2), ("/q/a", 1, 4)]),
    ("first two", None, ["/q/a", "/q/b"], "3", True),
    ("delete missing", {}, 4),
    ("txn delete missing", False),
    ("txn delete", True),
    ("delete stale", False, 5),
    ("put unknown lease", True),
    ("keepalive unknown", {"result": {"ID": UNKNOWN_LEASE}}),
    ("keepalive", "30"),
    ("timetolive unknown", "-1"),
    ("revoked", {}, 6),
    ("revoke again", True),
]


def test_memory_etcd_answers_as_etcd_did() -> None:
    assert fired(Deferred.fromCoroutine(scenario(MemoryEtcd(Clock()), "/p"))) == EXPECTED


@pytest.mark.real
@pytest_twisted.ensureDeferred
async def test_real_etcd_answers_as_recorded(etcd: EtcdMember, etcd_prefix: str) -> None:
    gateway = TreqGateway(reactor, [etcd.client_url])
    try:
        assert await scenario(gateway, etcd_prefix) == EXPECTED
    finally:
        await gateway.close()


def test_prefix_end() -> None:
    assert unb64(prefix_end("/a/")) == b"/a0"
    assert unb64(prefix_end("a\xff")) == "a\xff".encode()[:-1] + b"\xc0"
    assert unb64(prefix_end("")) == b"\0"
