"""What the in-memory etcd does on its clock (the shared suite in test_etcd_gateway.py holds it
to the real one's answers): leases expire and keepalives extend them, progress notifications
come every interval, and a frozen member answers nothing until it thaws."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import Deferred

from deployer.model import Update
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
    assert events == [{"type": "DELETE", "kv": {"key": b64(b"/deployer/_/host/a"),
                                                 "mod_revision": str(revision)}}]
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
