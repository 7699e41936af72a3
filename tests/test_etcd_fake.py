"""What the in-memory etcd does on its clock and for a test (the shared suite in
test_etcd_gateway.py holds it to the real one's answers): leases expire and keepalives extend
them, progress notifications come every interval, a frozen member answers nothing until it
thaws, a member that is down refuses connections, a client can be cut off, and requests beyond
a budget are refused."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from deployer.errors import EtcdHTTPError, EtcdUnavailable
from deployer.etcd import Etcd, EtcdConfig
from deployer.model import Update
from deployer.testing.fake_etcd import FakeEtcd, FakeEtcdAgent
from tests.helpers import fired
from tests.stack.etcd_stack import Rig, make_rig


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def rig() -> Iterator[Rig]:
    made = make_rig()
    yield made
    made.stop()


def request(rig: Rig, path: str, body: dict[str, Any]) -> Any:
    d: Deferred[Any] = rig.etcd.request(path, body)
    rig.flush()
    return fired(d)


def test_a_lease_expires_on_the_clock_unless_kept_alive(rig: Rig) -> None:
    lease = int(request(rig, "/v3/lease/grant", {"TTL": 10})["ID"])
    put = {"key": b64(b"/deployer/_/host/a"), "value": b64(b"up"), "lease": lease}
    request(rig, "/v3/kv/txn", {"success": [{"request_put": put}]})
    service, _ = rig.watch()
    assert service.live
    rig.clock.advance(9)
    assert request(rig, "/v3/lease/timetolive", {"ID": lease})["TTL"] == "1"
    assert request(rig, "/v3/lease/keepalive", {"ID": lease})["result"]["TTL"] == "10"
    rig.clock.advance(9.9)
    rig.flush()
    assert b"/deployer/_/host/a" in rig.fake.kvs
    assert request(rig, "/v3/lease/timetolive", {"ID": lease})["TTL"] == "0"
    rig.clock.advance(0.2)
    rig.flush()
    assert b"/deployer/_/host/a" not in rig.fake.kvs
    assert request(rig, "/v3/lease/timetolive", {"ID": lease})["TTL"] == "-1"
    revision, events = rig.fake.history[-1]
    (expired,) = events
    assert expired["type"] == "DELETE"
    assert expired["kv"] == {"key": b64(b"/deployer/_/host/a"), "mod_revision": str(revision)}
    assert expired["prev_kv"]["lease"] == str(lease), "what a watch asking for it is sent"
    assert service.revision == revision, "the watch saw the expiry"


def test_progress_notifications_every_interval(rig: Rig) -> None:
    rig.fake.progress_interval = 600.0
    service, got = rig.watch()
    start = rig.fake.revision
    rig.fake.put(b"/elsewhere/x", b"x")  # a revision the watch has no event for
    rig.clock.advance(599)
    rig.flush()
    assert service.revision == start
    rig.clock.advance(1)
    rig.flush()
    assert service.revision == start + 1
    assert got == []
    (w,) = rig.fake.open_watches
    assert w.timer is not None and w.timer.getTime() == rig.clock.seconds() + 600
    service.stopService()
    rig.flush()
    assert not w.timer.active(), "a closed stream gets no more notifications"


def test_a_frozen_member_answers_nothing_until_it_thaws(rig: Rig) -> None:
    service, got = rig.watch()
    rig.fake.freeze("10.0.0.1")
    rig.fake.put(b"/deployer/myorg/during", b"x")
    d = rig.etcd.request("/v3/kv/range", {"key": b64(b"/deployer/x")})
    rig.flush()
    assert got == [] and not d.called
    rig.fake.thaw("10.0.0.1")
    rig.flush()
    assert [u.pattern for u in got] == ["myorg/during"], "the stream gets what it missed"
    assert not d.called, "a request sent while frozen stays unanswered"
    fired(rig.etcd.record(Update("myorg/after", source="test", received=1.0)))
    assert service.live


def client(fake: FakeEtcd, clock: Clock, *members: str) -> tuple[Etcd, FakeEtcdAgent]:
    """The daemon's etcd client over its own agent to ``fake``."""
    agent = fake.agent()
    config = EtcdConfig(nodes=tuple(f"http://{m}:2379" for m in members), dial_timeout=5.0)
    return Etcd(clock, config, http=fake.http_client(agent)), agent


def test_a_member_that_is_down_refuses_connections_and_the_client_fails_over() -> None:
    clock = Clock()
    fake = FakeEtcd(clock, progress_interval=None)
    etcd, agent = client(fake, clock, "10.0.0.1", "10.0.0.2")
    fake.down.add("10.0.0.1")
    answer = fired(etcd.request("/v3/kv/put", {"key": b64(b"/k"), "value": b64(b"v")}))
    assert answer["header"]["revision"] == "2"
    assert agent.paths == ["/v3/kv/put", "/v3/kv/put"]
    assert [member for member, _, _ in fake.requests] == ["10.0.0.2"]
    assert etcd.members.in_use == "http://10.0.0.2:2379"
    fake.down.add("10.0.0.2")
    with pytest.raises(EtcdUnavailable, match="ConnectionRefusedError"):
        fired(etcd.request("/v3/kv/range", {"key": b64(b"/k")}))
    fake.down.clear()
    assert fired(etcd.request("/v3/kv/range", {"key": b64(b"/k")}))["count"] == "1"
    assert fake.keys("/") == ["/k"]


def test_a_cut_client_reaches_no_member_and_the_others_still_do() -> None:
    clock = Clock()
    fake = FakeEtcd(clock, progress_interval=None)
    (cut, cut_agent), (other, _) = client(fake, clock, "10.0.0.1"), client(fake, clock,
                                                                            "10.0.0.1")
    cut_agent.cut = True
    with pytest.raises(EtcdUnavailable):
        fired(cut.request("/v3/lease/grant", {"TTL": 5}))
    assert cut_agent.count("/v3/lease/grant") == 1 and fake.count("/v3/lease/grant") == 0
    fired(other.request("/v3/kv/put", {"key": b64(b"/j"), "value": b64(b"[1]")}))
    assert fake.value("/j") == [1]


def test_requests_beyond_the_budget_are_refused_as_too_many() -> None:
    clock = Clock()
    fake = FakeEtcd(clock, progress_interval=None)
    etcd, _ = client(fake, clock, "10.0.0.1")
    fake.max_requests = 1
    fired(etcd.request("/v3/kv/range", {"key": b64(b"/k")}))
    with pytest.raises(EtcdHTTPError) as refused:
        fired(etcd.request("/v3/kv/range", {"key": b64(b"/k")}))
    assert (refused.value.status, refused.value.code) == (429, 8)
    assert "etcdserver: too many requests" in str(refused.value)
    assert etcd.members.in_use == "http://10.0.0.1:2379", "the request, not the member, failed"
