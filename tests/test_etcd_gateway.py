"""One suite for etcd's v3 JSON gateway, run against two: the in-memory FakeEtcd
(deployer.testing.fake_etcd, on a loopback port) and a real etcd member. Whatever passes here
against both keeps the fake honest: every answer shape and error that deployer's client reads
(ranges, transactions with compares, deletes, compaction, the watch stream, progress
notifications, leases) is checked on the real one too.

Requests go through deployer's own client (:meth:`deployer.etcd.Etcd.request` and
:meth:`deployer.etcd.client.Gateway.open_stream`), each test under a fresh prefix.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from deployer.errors import EtcdHTTPError
from deployer.etcd import Etcd, EtcdConfig
from deployer.lines import JSONLinesReader
from tests.stack.etcd_stack import PROGRESS_INTERVAL, wait_for


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


class Client:
    """Raw gateway requests under one prefix, and the watch streams opened; closed after."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = url
        self.prefix = prefix.encode() + b"/"
        self.etcd = Etcd(reactor, EtcdConfig(nodes=(url,), prefix=prefix, dial_timeout=5.0))
        self.streams: list[Stream] = []

    def key(self, name: str) -> bytes:
        return self.prefix + name.encode()

    def everything(self) -> dict[str, str]:
        return {"key": b64(self.prefix), "range_end": b64(self.prefix[:-1] + b"0")}

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self.etcd.request(path, body)

    async def error(self, path: str, body: dict[str, Any]) -> EtcdHTTPError:
        with pytest.raises(EtcdHTTPError) as info:
            await self.post(path, body)
        return info.value

    async def put(self, name: str, value: bytes = b"v", lease: int = 0) -> int:
        op: dict[str, Any] = {"key": b64(self.key(name)), "value": b64(value)}
        if lease:
            op["lease"] = lease
        answer = await self.post("/v3/kv/txn", {"success": [{"request_put": op}]})
        assert answer["succeeded"] is True
        return int(answer["header"]["revision"])

    async def names(self) -> list[str]:
        answer = await self.post("/v3/kv/range", self.everything())
        return [unb64(kv["key"])[len(self.prefix):].decode() for kv in answer.get("kvs", [])]

    async def watch(self, start_revision: int = 0, progress: bool = False,
                    prev_kv: bool = False) -> Stream:
        create: dict[str, Any] = {**self.everything(), "start_revision": start_revision}
        if progress:
            create["progress_notify"] = True
        if prev_kv:
            create["prev_kv"] = True
        stream = Stream(self.prefix)
        self.streams.append(stream)
        await self.etcd.gateway.open_stream(self.url, "/v3/watch", {"create_request": create},
                                            stream.reader)
        await wait_for(lambda: bool(stream.messages), what="the created message")
        return stream

    async def close(self) -> None:
        for stream in self.streams:
            stream.close()
        await self.etcd.close()


class Stream:
    def __init__(self, prefix: bytes) -> None:
        self.prefix = prefix
        self.messages: list[dict[str, Any]] = []
        self.reader = JSONLinesReader(self.messages.append, strict=True)
        self.reader.done.addErrback(lambda _: None)

    @property
    def results(self) -> list[dict[str, Any]]:
        return [m["result"] for m in self.messages]

    def events(self) -> list[tuple[str, str, int]]:
        """(type, name under the prefix, mod_revision) of every event so far."""
        return [(e.get("type", "PUT"), unb64(e["kv"]["key"])[len(self.prefix):].decode(),
                 int(e["kv"]["mod_revision"]))
                for r in self.results for e in r.get("events", [])]

    def close(self) -> None:
        if not self.reader.done.called:
            self.reader.done.cancel()


@pytest_twisted.async_yield_fixture
async def client(etcd_gateway: str, etcd_prefix: str) -> AsyncIterator[Client]:
    c = Client(etcd_gateway, etcd_prefix)
    yield c
    await c.close()


# -- kv ---------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_range_answers(client: Client) -> None:
    empty = await client.post("/v3/kv/range", {**client.everything(), "serializable": True})
    assert set(empty) == {"header"}, "no kvs and no count when nothing matches"
    first = await client.put("a", b"1")
    second = await client.put("b", b"")
    await client.put("a", b"2")
    answer = await client.post("/v3/kv/range", {**client.everything(), "serializable": True})
    assert set(answer) == {"header", "kvs", "count"}
    assert answer["count"] == "2"
    assert int(answer["header"]["revision"]) == first + 2
    a, b = answer["kvs"]
    assert a == {"key": b64(client.key("a")), "value": b64(b"2"), "version": "2",
                 "create_revision": str(first), "mod_revision": str(first + 2)}
    assert "value" not in b, "an empty value is left out"
    assert b["create_revision"] == b["mod_revision"] == str(second)

    limited = await client.post("/v3/kv/range",
                                {**client.everything(), "limit": 1, "keys_only": True})
    assert limited["more"] is True and limited["count"] == "2"
    assert [set(kv) for kv in limited["kvs"]] == [
        {"key", "version", "create_revision", "mod_revision"}]
    counted = await client.post("/v3/kv/range", {**client.everything(), "count_only": True})
    assert "kvs" not in counted and counted["count"] == "2"
    single = await client.post("/v3/kv/range", {"key": b64(client.key("b"))})
    assert [unb64(kv["key"]) for kv in single["kvs"]] == [client.key("b")]
    # A sibling prefix is outside the range.
    await client.post("/v3/kv/txn", {"success": [{"request_put": {
        "key": b64(client.prefix[:-1] + b"2/x"), "value": b64(b"v")}}]})
    assert await client.names() == ["a", "b"]


@pytest_twisted.ensureDeferred
async def test_txn_compare_create_if_absent(client: Client) -> None:
    lease = int((await client.post("/v3/lease/grant", {"TTL": 30}))["ID"])
    key = b64(client.key("slot"))
    txn = {
        "compare": [{"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
        "success": [{"request_put": {"key": key, "value": b64(b"mine"), "lease": str(lease)}}],
        "failure": [{"request_range": {"key": key}}],
    }
    won = await client.post("/v3/kv/txn", txn)
    assert won["succeeded"] is True
    revision = int(won["header"]["revision"])
    assert won["responses"] == [{"response_put": {"header": {"revision": str(revision)}}}]

    lost = await client.post("/v3/kv/txn", {**txn, "success": [{"request_put": {
        "key": key, "value": b64(b"theirs")}}]})
    assert "succeeded" not in lost, "false is left out"
    assert int(lost["header"]["revision"]) == revision, "nothing written"
    ((kind, seen),) = lost["responses"][0].items()
    assert kind == "response_range"
    assert seen["count"] == "1"
    assert seen["kvs"][0]["value"] == b64(b"mine")
    assert seen["kvs"][0]["create_revision"] == str(revision)
    assert seen["kvs"][0]["lease"] == str(lease)
    await client.post("/v3/lease/revoke", {"ID": lease})


@pytest_twisted.ensureDeferred
async def test_txn_compare_targets_and_mixed_operations(client: Client) -> None:
    revision = await client.put("k", b"v1")
    await client.put("k", b"v2")
    key = b64(client.key("k"))

    async def holds(compare: dict[str, Any]) -> bool:
        answer = await client.post("/v3/kv/txn", {"compare": [{"key": key, **compare}]})
        return answer.get("succeeded", False) is True

    assert await holds({"target": "VERSION", "result": "EQUAL", "version": 2})
    assert await holds({"target": "VERSION", "result": "GREATER", "version": 1})
    assert not await holds({"target": "VERSION", "result": "LESS", "version": 2})
    assert await holds({"target": "CREATE", "result": "EQUAL", "create_revision": revision})
    assert await holds({"target": "MOD", "result": "GREATER", "mod_revision": revision})
    assert await holds({"target": "VALUE", "result": "EQUAL", "value": b64(b"v2")})
    assert await holds({"target": "VALUE", "result": "NOT_EQUAL", "value": b64(b"v1")})
    assert await holds({"target": "LEASE", "result": "EQUAL", "lease": 0})
    missing = b64(client.key("missing"))
    answer = await client.post("/v3/kv/txn", {"compare": [
        {"key": missing, "target": "VALUE", "result": "NOT_EQUAL", "value": b64(b"x")}]})
    assert "succeeded" not in answer, "a value compare on a missing key never holds"

    answer = await client.post("/v3/kv/txn", {"success": [
        {"request_put": {"key": b64(client.key("n")), "value": b64(b"x")}},
        {"request_range": {"key": b64(client.key("n"))}},
        {"request_delete_range": {"key": key}},
        {"request_delete_range": {"key": missing}},
    ]})
    new = int(answer["header"]["revision"])
    header = {"header": {"revision": str(new)}}
    put, seen, deleted, nothing = answer["responses"]
    assert put == {"response_put": header}
    assert seen["response_range"]["kvs"][0]["mod_revision"] == str(new), "sees the put before it"
    assert deleted == {"response_delete_range": {**header, "deleted": "1"}}
    assert nothing == {"response_delete_range": header}
    assert await client.names() == ["n"]


@pytest_twisted.ensureDeferred
async def test_delete_only_while_unchanged(client: Client) -> None:
    first = await client.put("k", b"1")
    second = await client.put("k", b"2")
    key = b64(client.key("k"))

    def delete_if(mod_revision: int) -> dict[str, Any]:
        return {"compare": [{"key": key, "target": "MOD", "result": "EQUAL",
                             "mod_revision": str(mod_revision)}],
                "success": [{"request_delete_range": {"key": key}}]}

    stale = await client.post("/v3/kv/txn", delete_if(first))
    assert set(stale) == {"header"}, "no succeeded, no responses"
    assert int(stale["header"]["revision"]) == second
    done = await client.post("/v3/kv/txn", delete_if(second))
    assert done["succeeded"] is True
    assert done["responses"] == [{"response_delete_range": {
        "header": {"revision": str(second + 1)}, "deleted": "1"}}]
    missing = await client.post("/v3/kv/txn", {"success": [{"request_delete_range": {
        "key": key}}]})
    assert missing["succeeded"] is True
    assert missing["responses"] == [{"response_delete_range": {
        "header": {"revision": str(second + 1)}}}], "nothing deleted: no count, no revision"
    assert await client.names() == []


@pytest_twisted.ensureDeferred
async def test_kv_put(client: Client) -> None:
    key = b64(client.key("p"))
    answer = await client.post("/v3/kv/put", {"key": key, "value": b64(b"1")})
    assert set(answer) == {"header"}
    revision = int(answer["header"]["revision"])
    lease = int((await client.post("/v3/lease/grant", {"TTL": 30}))["ID"])
    again = await client.post("/v3/kv/put", {"key": key, "value": b64(b"2"),
                                             "lease": str(lease)})
    assert int(again["header"]["revision"]) == revision + 1
    (kv,) = (await client.post("/v3/kv/range", {"key": key}))["kvs"]
    assert kv == {"key": key, "value": b64(b"2"), "version": "2", "lease": str(lease),
                  "create_revision": str(revision), "mod_revision": str(revision + 1)}
    unknown = await client.error("/v3/kv/put", {"key": b64(client.key("q")),
                                                "value": b64(b"x"), "lease": "12345"})
    assert (unknown.status, unknown.code) == (404, 5)
    assert "requested lease not found" in str(unknown)
    assert await client.names() == ["p"]
    await client.post("/v3/lease/revoke", {"ID": str(lease)})
    assert await client.names() == [], "the key went with the lease it was put with last"


@pytest_twisted.ensureDeferred
async def test_range_sorted_and_bounded_by_revision(client: Client) -> None:
    created = {name: await client.put(name) for name in ("c", "a", "b")}
    await client.put("c", b"again")  # c was created first and changed last

    async def names(**options: Any) -> tuple[list[str], str | None, bool]:
        answer = await client.post("/v3/kv/range", {**client.everything(), **options})
        found = [unb64(kv["key"])[len(client.prefix):].decode()
                 for kv in answer.get("kvs", [])]
        return found, answer.get("count"), answer.get("more", False)

    assert await names(sort_order="DESCEND", sort_target="CREATE") == (["b", "a", "c"], "3",
                                                                     False)
    assert await names(sort_order=2, sort_target=2) == (["b", "a", "c"], "3", False)
    assert await names(sort_target="MOD") == (["a", "b", "c"], "3", False), "ascending"
    assert await names(sort_target="CREATE", limit=1) == (["a"], "3", True), (
        "without an order, only the first keys (limit + 1) are sorted: a and b, not c")
    assert await names(sort_order="ASCEND", sort_target="CREATE", serializable=True,
                       max_create_revision=str(created["a"])) == (["c", "a"], "3", False), (
        "count is taken before the revision bounds")
    assert await names(sort_order="ASCEND", sort_target="CREATE", limit=1,
                       max_create_revision=str(created["a"])) == (["c"], "3", True)
    assert await names(min_mod_revision=str(created["b"])) == (["b", "c"], "3", False)
    assert await names(max_mod_revision=str(created["b"]), min_create_revision=str(
        created["a"])) == (["a", "b"], "3", False)
    assert await names(sort_order="DESCEND", keys_only=True, limit=1) == (["c"], "3", True)


@pytest_twisted.ensureDeferred
async def test_txn_refusals(client: Client) -> None:
    put = {"request_put": {"key": b64(client.key("d")), "value": b64(b"x")}}
    twice = await client.error("/v3/kv/txn", {"success": [put, put]})
    assert (twice.status, twice.code) == (400, 3)
    assert "duplicate key given in txn request" in str(twice)
    overlap = await client.error("/v3/kv/txn", {"success": [
        put, {"request_delete_range": client.everything()}]})
    assert "duplicate key" in str(overlap)
    many = [{"request_put": {"key": b64(client.key(f"k{i}")), "value": b64(b"x")}}
            for i in range(129)]
    too_many = await client.error("/v3/kv/txn", {"success": many})
    assert (too_many.status, too_many.code) == (400, 3)
    assert "too many operations in txn request" in str(too_many)
    no_lease = await client.error("/v3/kv/txn", {"success": [
        {"request_put": {**put["request_put"], "lease": 12345}}]})
    assert (no_lease.status, no_lease.code) == (404, 5)
    assert "requested lease not found" in str(no_lease)
    assert await client.names() == []
    unknown = await client.error("/v3/no/such/path", {})
    assert unknown.status == 404


@pytest_twisted.ensureDeferred
async def test_deleterange(client: Client) -> None:
    await client.put("a")
    revision = await client.put("b")
    nothing = await client.post("/v3/kv/deleterange", {"key": b64(client.key("zz"))})
    assert set(nothing) == {"header"}
    assert int(nothing["header"]["revision"]) == revision, "deleting nothing writes nothing"
    both = await client.post("/v3/kv/deleterange", client.everything())
    assert both["deleted"] == "2"
    assert int(both["header"]["revision"]) == revision + 1
    assert await client.names() == []


# -- watch ------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_watch_stream(client: Client) -> None:
    before = await client.put("old")
    stream = await client.watch(start_revision=before)
    created = stream.results[0]
    assert created["created"] is True
    assert int(created["header"]["revision"]) >= before
    await wait_for(lambda: len(stream.events()) == 1, what="the history from start_revision")
    assert stream.events() == [("PUT", "old", before)]

    await client.put("a", b"1")
    answer = await client.post("/v3/kv/txn", {"success": [
        {"request_put": {"key": b64(client.key("b")), "value": b64(b"2")}},
        {"request_delete_range": {"key": b64(client.key("a"))}},
    ]})
    both = int(answer["header"]["revision"])
    await client.post("/v3/kv/txn", {"success": [{"request_put": {
        "key": b64(client.prefix[:-1] + b"2/x"), "value": b64(b"v")}}]})
    await wait_for(lambda: len(stream.events()) == 4, what="the live events")
    assert stream.events()[1:] == [("PUT", "a", both - 1), ("PUT", "b", both),
                                   ("DELETE", "a", both)]
    last = stream.results[-1]
    assert int(last["header"]["revision"]) == both
    put, delete = last["events"]
    assert "type" not in put, "PUT is the default type: left out"
    assert put["kv"]["value"] == b64(b"2") and put["kv"]["version"] == "1"
    assert delete == {"type": "DELETE", "kv": {"key": b64(client.key("a")),
                                               "mod_revision": str(both)}}

    # A watch from an older revision gets the history, every event once, in order.
    replay = await client.watch(start_revision=before)
    await wait_for(lambda: len(replay.events()) == 4, what="the replayed history")
    assert replay.events() == stream.events()


@pytest_twisted.ensureDeferred
async def test_watch_with_previous_values(client: Client) -> None:
    first = await client.put("a", b"1")
    plain = await client.watch(start_revision=first + 1)
    stream = await client.watch(start_revision=first + 1, prev_kv=True)
    again = await client.put("a", b"1")
    await client.put("fresh", b"2")
    gone = (await client.post("/v3/kv/deleterange", {"key": b64(client.key("a"))}))
    await wait_for(lambda: len(stream.events()) == 3 and len(plain.events()) == 3,
                   what="the events")
    events = [e for r in stream.results for e in r.get("events", [])]
    repeat, fresh, delete = events
    assert repeat["kv"]["value"] == repeat["prev_kv"]["value"] == b64(b"1")
    assert repeat["prev_kv"]["mod_revision"] == str(first)
    assert int(repeat["kv"]["mod_revision"]) == again
    assert repeat["kv"]["version"] == "2" and repeat["prev_kv"]["version"] == "1"
    assert "prev_kv" not in fresh, "a new key has no previous value"
    assert delete["type"] == "DELETE" and delete["prev_kv"]["value"] == b64(b"1")
    assert int(delete["kv"]["mod_revision"]) == int(gone["header"]["revision"])
    assert all("prev_kv" not in e for r in plain.results for e in r.get("events", [])), \
        "only a watch that asks is sent previous values"


@pytest_twisted.ensureDeferred
async def test_progress_notifications(client: Client) -> None:
    revision = await client.put("quiet")
    stream = await client.watch(start_revision=revision + 1, progress=True)
    await wait_for(lambda: len(stream.messages) >= 2, timeout=10 * PROGRESS_INTERVAL,
                   what="a progress notification")
    progress = stream.results[1]
    assert set(progress) == {"header"}, "nothing but a header"
    assert int(progress["header"]["revision"]) >= revision


@pytest_twisted.ensureDeferred
async def test_compaction(client: Client) -> None:
    first = await client.put("a")
    await client.put("b")
    third = await client.put("c")
    compacted = await client.post("/v3/kv/compaction", {"revision": third})
    assert set(compacted) == {"header"}
    again = await client.error("/v3/kv/compaction", {"revision": first})
    assert (again.status, again.code) == (400, 11)
    assert "required revision has been compacted" in str(again)
    future = await client.error("/v3/kv/compaction", {"revision": third + 1000})
    assert "required revision is a future revision" in str(future)
    old_read = await client.error("/v3/kv/range", {**client.everything(), "revision": first})
    assert "required revision has been compacted" in str(old_read)

    gone = await client.watch(start_revision=first)
    await wait_for(lambda: len(gone.messages) == 2, what="the cancellation")
    created, canceled = gone.results
    assert created["created"] is True
    assert canceled["canceled"] is True
    assert canceled["compact_revision"] == str(third)
    assert "revision" not in canceled["header"]

    kept = await client.watch(start_revision=third)
    await wait_for(lambda: len(kept.events()) == 1, what="the compacted revision's event")
    assert kept.events() == [("PUT", "c", third)]


# -- leases -----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_lease_life(client: Client) -> None:
    granted = await client.post("/v3/lease/grant", {"TTL": 30})
    lease = int(granted["ID"])
    assert lease > 0 and granted["TTL"] == "30"
    stream = await client.watch(start_revision=await client.put("plain") + 1)
    await client.put("held", lease=lease)
    stored = await client.post("/v3/kv/range", {"key": b64(client.key("held"))})
    assert stored["kvs"][0]["lease"] == str(lease)

    ttl = await client.post("/v3/lease/timetolive", {"ID": lease, "keys": True})
    assert ttl["ID"] == str(lease) and ttl["grantedTTL"] == "30"
    assert 28 <= int(ttl["TTL"]) <= 30
    assert ttl["keys"] == [b64(client.key("held"))]
    alive = await client.post("/v3/lease/keepalive", {"ID": lease})
    assert alive["result"]["ID"] == str(lease) and alive["result"]["TTL"] == "30"

    await client.put("held too", lease=lease)
    before = int((await client.post("/v3/kv/range", {"key": b64(client.key("x"))}))[
        "header"]["revision"])
    revoked = await client.post("/v3/lease/revoke", {"ID": lease})
    assert set(revoked) == {"header"}
    assert await client.names() == ["plain"]
    after = await client.post("/v3/kv/range", {"key": b64(client.key("x"))})
    assert int(after["header"]["revision"]) == before + 1, "both keys go in one revision"
    await wait_for(lambda: [t for t, *_ in stream.events()] == ["PUT", "PUT", "DELETE",
                                                                "DELETE"])
    assert [e[:2] for e in stream.events()[2:]] == [("DELETE", "held"), ("DELETE", "held too")]

    again = await client.error("/v3/lease/revoke", {"ID": lease})
    assert (again.status, again.code) == (404, 5)
    assert "requested lease not found" in str(again)
    gone = await client.post("/v3/lease/timetolive", {"ID": lease})
    assert gone["TTL"] == "-1"
    dead = await client.post("/v3/lease/keepalive", {"ID": lease})
    assert "TTL" not in dead["result"]


@pytest_twisted.ensureDeferred
async def test_lease_ids_and_expiry(client: Client) -> None:
    mine = 0x5EED0000 + (hash(client.prefix) & 0xFFFF)
    granted = await client.post("/v3/lease/grant", {"TTL": 1, "ID": mine})
    assert granted["ID"] == str(mine)
    taken = await client.error("/v3/lease/grant", {"TTL": 1, "ID": mine})
    assert (taken.status, taken.code) == (412, 9)
    assert "lease already exists" in str(taken)
    await client.put("short", lease=mine)
    await client.put("kept")
    for _ in range(100):  # etcd checks expiry every 500 ms
        if await client.names() == ["kept"]:
            break
        await deferLater(reactor, 0.1)
    assert await client.names() == ["kept"], "the lease expired and took its key"
    ttl = await client.post("/v3/lease/timetolive", {"ID": mine})
    assert ttl["TTL"] == "-1"
