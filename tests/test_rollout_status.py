"""Host status and the ``/status`` document (:mod:`deployer.rollout.status`) on the in-memory
etcd through the daemon's etcd client, with a Clock."""

from __future__ import annotations

from typing import Any

import pytest
from twisted.internet.defer import CancelledError
from twisted.internet.task import Clock

from deployer.errors import EtcdUnavailable
from deployer.rollout.fleet import FleetSlots
from deployer.rollout.gateway import KV_PUT
from deployer.rollout.keys import RolloutKeys
from deployer.rollout.lease import LeaseKeeper
from deployer.rollout.pause import EtcdPauses, MemoryPauses, PauseRecord
from deployer.rollout.slots import LocalSlots
from deployer.rollout.status import (
    AppState,
    EtcdStatus,
    HostState,
    InLine,
    LocalStatus,
    StatusPublisher,
    build_document,
)
from deployer.rollout.testing import MEMBERS, Link
from deployer.testing.fake_etcd import FakeEtcd
from tests.helpers import fired

APP = "myorg/app:qa"
OTHER = "127.0.0.1:5000/myorg/other:v1"
OLD, NEW = "sha256:" + "0" * 64, "sha256:" + "1" * 64
DIGEST = "sha256:" + "d" * 64
KEYS = RolloutKeys("/fleet")
TTL = 6


def state(image: str = OLD, health: str = "healthy", **more: Any) -> AppState:
    return AppState(image, more.pop("digest", None), more.pop("containers", ("web",)), health,
                    **more)


def test_app_and_host_state_json_round_trip() -> None:
    app = AppState(NEW, DIGEST, ("web-1", "web-2"), "starting", 12.5, "replaced web-1")
    host = HostState("h1", 13.0, {APP: app, OTHER: state()})
    assert HostState.from_json(host.to_json()) == host
    assert app.to_json() == {
        "image_id": NEW,
        "digest": DIGEST,
        "containers": ["web-1", "web-2"],
        "health": "starting",
        "last_round": {"time": 12.5, "result": "replaced web-1"},
    }
    assert state().to_json()["last_round"] is None
    for broken in ({"host": "h", "time": 1}, {"host": "h", "time": "x", "apps": {}},
                   {"host": "h", "time": 1, "apps": {APP: {"image_id": 5}}},
                   {"host": "h", "time": 1, "apps": {APP: {**app.to_json(), "containers": "w"}}},
                   {"host": "h", "time": 1, "apps": {APP: {**app.to_json(), "last_round": 1}}}):
        with pytest.raises(ValueError):
            HostState.from_json(broken)


def test_the_document_groups_hosts_by_image_and_shows_the_line() -> None:
    hosts = {
        "h1": HostState("h1", 10.0, {APP: state(NEW, digest=DIGEST), OTHER: state()}),
        "h2": HostState("h2", 11.0, {APP: state(OLD)}),
        "h3": HostState("h3", 12.0, {APP: state(OLD, "unhealthy")}),
    }
    pause = PauseRecord("myorg/gone:qa", NEW, None, "h9", "unhealthy", 5.0)
    queues = {APP: [InLine("h2", "web", 20.0, True), InLine("h3", "web", 21.0, False)]}
    doc = build_document(hosts, {pause.app: pause}, queues, 30.0)
    assert set(doc) == {"time", "hosts", "apps"}
    assert doc["time"] == 30.0
    assert doc["hosts"]["h1"] == {"time": 10.0, "apps": hosts["h1"].to_json()["apps"]}
    app = doc["apps"][APP]
    assert app["paused"] is None
    assert app["hosts"] == {h: hosts[h].apps[APP].to_json() for h in ("h1", "h2", "h3")}
    assert app["images"] == [
        {"image_id": OLD, "digest": None, "hosts": ["h2", "h3"]},
        {"image_id": NEW, "digest": DIGEST, "hosts": ["h1"]},
    ]
    assert app["converged"] is False
    assert app["replacing"] == [{"host": "h2", "container": "web", "since": 20.0}]
    assert app["waiting"] == [{"host": "h3", "container": "web", "since": 21.0}]
    assert doc["apps"][OTHER]["converged"] is True
    gone = doc["apps"]["myorg/gone:qa"]  # paused, and no host runs it any more
    assert gone["paused"] == pause.to_json() and gone["hosts"] == {} and gone["images"] == []


(MEMBER,) = MEMBERS


class Host:
    def __init__(self, name: str, fake: FakeEtcd, clock: Clock) -> None:
        etcd = Link(fake, clock).etcd
        self.keeper = LeaseKeeper(etcd, clock, ttl=TTL)
        self.status = StatusPublisher(etcd, self.keeper, KEYS, clock, name)
        self.slots = FleetSlots(etcd, self.keeper, KEYS, clock, hostname=name)


def test_publisher_writes_when_the_state_changes_bound_to_the_lease() -> None:
    clock = Clock()
    fake = FakeEtcd(clock, progress_interval=None)
    host = Host("h1", fake, clock)
    fired(host.status.publish({APP: state()}))  # no lease yet: written once one is granted
    assert fake.count(KV_PUT) == 0
    host.keeper.startService()
    lease = host.keeper.current
    assert lease is not None
    assert fake.value("/fleet/_/hosts/h1") == {"host": "h1", "time": 0.0,
                                               "apps": {APP: state().to_json()}}
    assert fake.kvs[b"/fleet/_/hosts/h1"].lease == lease.id
    clock.advance(1)
    fired(host.status.publish({APP: state()}))  # unchanged: nothing written
    assert fake.count(KV_PUT) == 1
    fired(host.status.publish({APP: state(NEW)}))
    assert fake.count(KV_PUT) == 2
    assert fake.value("/fleet/_/hosts/h1")["apps"][APP]["image_id"] == NEW
    host.keeper.invalidate(lease, "gone")  # a new lease: published again under it
    renewed = host.keeper.current
    assert renewed is not None and fake.kvs[b"/fleet/_/hosts/h1"].lease == renewed.id
    assert fake.count(KV_PUT) == 3
    fired(host.keeper.stopService())  # revoked: the key goes with the lease
    assert fake.value("/fleet/_/hosts/h1") is None


def test_publisher_retries_a_failed_write_and_keeps_the_newest() -> None:
    clock = Clock()
    fake = FakeEtcd(clock, progress_interval=None)
    host = Host("h1", fake, clock)
    host.keeper.startService()
    fake.down.add(MEMBER)
    fired(host.status.publish({APP: state(OLD)}))
    fired(host.status.publish({APP: state(NEW)}))
    fake.down.clear()
    clock.advance(2.0)
    assert fake.value("/fleet/_/hosts/h1")["apps"][APP]["image_id"] == NEW
    assert host.status.writes == 1
    host.keeper.stopService()


def test_the_fleet_document_from_etcd() -> None:
    clock = Clock()
    fake = FakeEtcd(clock, progress_interval=None)
    etcd = Link(fake, clock).etcd
    hosts = {name: Host(name, fake, clock) for name in ("h1", "h2", "h3")}
    for host in hosts.values():
        host.keeper.startService()
    fired(hosts["h1"].status.publish({APP: state(NEW, digest=DIGEST)}))
    fired(hosts["h2"].status.publish({APP: state(OLD)}))
    fired(hosts["h3"].status.publish({APP: state(OLD), OTHER: state()}))
    clock.advance(1)
    fired(hosts["h2"].slots.acquire(APP, "web"))
    clock.advance(1)
    waiting = hosts["h3"].slots.acquire(APP, "web")
    pause = PauseRecord(OTHER, NEW, None, "h3", "exited", 3.0)
    fired(EtcdPauses(etcd, KEYS).pause(pause))
    doc = fired(EtcdStatus(etcd, KEYS, clock, limit=1).document())
    assert sorted(doc["hosts"]) == ["h1", "h2", "h3"]
    app = doc["apps"][APP]
    assert sorted(app["hosts"]) == ["h1", "h2", "h3"]
    assert [i["hosts"] for i in app["images"]] == [["h2", "h3"], ["h1"]]
    assert app["replacing"] == [{"host": "h2", "container": "web", "since": 1.0}]
    assert app["waiting"] == [{"host": "h3", "container": "web", "since": 2.0}]
    assert app["paused"] is None
    assert doc["apps"][OTHER]["paused"] == pause.to_json()
    # a host that is gone is gone from the document once its lease expires
    fake.down.add(MEMBER)  # nobody keeps a lease alive: all expire
    clock.advance(TTL + 1)
    fake.down.clear()
    assert not fake.leases
    waiting.cancel()
    waiting.addErrback(lambda f: f.trap(CancelledError))
    doc = fired(EtcdStatus(etcd, KEYS, clock).document())
    assert doc["hosts"] == {} and APP not in doc["apps"]
    assert doc["apps"][OTHER]["paused"] == pause.to_json()  # a pause outlives its host
    for host in hosts.values():
        host.keeper.stopService()


def test_unreadable_entries_are_skipped_or_kept_paused() -> None:
    clock = Clock()
    fake = FakeEtcd(clock, progress_interval=None)
    for key, value in ((b"/fleet/_/hosts/h1", b"garbage"), (b"/fleet/_/paused/x:1", b"garbage"),
                       (b"/fleet/_/rollout/x:1/abc", b"garbage"), (b"/fleet/_/hosts/a/b", b"{}")):
        fake.put(key, value)
    doc = fired(EtcdStatus(Link(fake, clock).etcd, KEYS, clock).document())
    assert doc["hosts"] == {}
    assert "unreadable" in doc["apps"]["x:1"]["paused"]["reason"]
    assert doc["apps"]["x:1"]["replacing"] == [
        {"host": "?", "container": "/fleet/_/rollout/x:1/abc", "since": None}
    ]


def test_the_standalone_document() -> None:
    clock = Clock()
    slots = LocalSlots(clock, 1)
    pauses = MemoryPauses()
    local = LocalStatus("solo", clock, pauses, slots)
    assert fired(local.document()) == {"time": 0.0, "hosts": {}, "apps": {}}
    fired(local.publish({APP: state(OLD, containers=("web-1", "web-2"))}))
    clock.advance(1)
    fired(slots.acquire(APP, "web-1"))
    slots.acquire(APP, "web-2")
    fired(pauses.pause(PauseRecord(OTHER, NEW, None, "solo", "exited", 1.0)))
    doc = fired(local.document())
    assert list(doc["hosts"]) == ["solo"]
    assert doc["apps"][APP]["replacing"] == [{"host": "solo", "container": "web-1", "since": 1.0}]
    assert doc["apps"][APP]["waiting"] == [{"host": "solo", "container": "web-2", "since": 1.0}]
    assert doc["apps"][OTHER]["paused"]["reason"] == "exited"


def test_the_document_fails_with_etcds_own_error() -> None:
    clock = Clock()
    fake = FakeEtcd(clock, progress_interval=None)
    fake.down.add(MEMBER)
    with pytest.raises(EtcdUnavailable, match="no etcd member answered"):
        fired(EtcdStatus(Link(fake, clock).etcd, KEYS, clock).document())
