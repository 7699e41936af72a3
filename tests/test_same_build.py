"""Same build everywhere, fast: hosts of a fleet (:class:`tests.rollout_fakes.SimHost` on the
in-memory engine, each with its own fleet rollout parts on one in-memory etcd, all on one Clock)
deploy the build
that the first of them resolved for an update, whatever was pushed since
(:mod:`deployer.rollout.builds`, :mod:`deployer.fetch`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, capturedLogs, formatEvent

from deployer.docker import Image
from deployer.model import Update
from deployer.reference import parse_reference
from deployer.rollout import wiring
from deployer.rollout.builds import BuildRecord, EtcdBuilds
from deployer.rollout.gateway import b64
from deployer.rollout.keys import RolloutKeys
from deployer.rollout.testing import Link
from deployer.testing.fake_etcd import FakeEtcd
from tests.helpers import fired
from tests.rollout_fakes import Build, SimHost, health_check, manifest_digest, run_until

APP = "registry.test:5000/myorg/app:qa"
BY_DIGEST = "registry.test:5000/myorg/app@{}"
PREFIX = "/d"
GOOD = Build(health_check(every=3.0))
"""Healthy three seconds after the start: slow to be healthy, a long rollout."""
V1, V2, V3 = ("sha256:" + c * 64 for c in "123")


@pytest.fixture
def logs() -> Iterator[list[LogEvent]]:
    with capturedLogs() as events:
        yield events


def update(sent: float, source: str = "api", digest: str | None = None) -> Update:
    return Update.from_reference(parse_reference(APP), source, sent).evolve(digest=digest)


class Fleet:
    def __init__(self, clock: Clock, size: int = 2) -> None:
        self.clock = clock
        self.etcd = FakeEtcd(clock, progress_interval=None)
        self.hosts: list[SimHost] = []
        self.links: list[Link] = []
        for n in range(1, size + 1):
            link = Link(self.etcd, clock)
            self.links.append(link)
            parts = wiring.fleet(link.etcd, clock, prefix=PREFIX, hostname=f"h{n}", ttl=5)
            assert parts.keeper is not None
            parts.keeper.startService()
            host = SimHost(clock, f"h{n}", parts)
            host.local(APP, GOOD, image_id=V1)
            host.run("web", APP)
            self.hosts.append(host)
        clock.advance(5.0)

    def running(self, host: SimHost) -> str:
        web = host.named("web")
        assert web is not None and web.running
        return web.image_id

    def settle(self) -> None:
        run_until(self.clock, lambda: all(h.idle for h in self.hosts), limit=120)
        self.clock.advance(5.0)

    def record(self) -> dict[str, object]:
        value = self.etcd.value(f"{PREFIX}/_/builds/{APP}")
        assert isinstance(value, dict)
        return value


def test_a_push_mid_rollout_leaves_every_host_on_the_build_of_the_update(
    logs: list[LogEvent],
) -> None:
    clock = Clock()
    fleet = Fleet(clock)
    first, second = fleet.hosts
    for host in fleet.hosts:
        host.publish(APP, GOOD, image_id=V2)
    u1 = update(100.0)
    first.reconciler.request(u1)
    clock.advance(1.0)
    assert first.stops == 1  # the first host is mid-rollout
    record = fleet.record()
    assert (record["digest"], record["image_id"], record["host"]) == (
        manifest_digest(V2), V2, "h1")
    assert (record["time"], record["source"]) == (100.0, "api")

    for host in fleet.hosts:  # a push lands
        host.publish(APP, GOOD, image_id=V3)
    second.reconciler.request(u1)  # the second host comes to the update only now
    fleet.settle()

    assert [fleet.running(h) for h in fleet.hosts] == [V2, V2]  # one build for the update
    assert second.pulls_of(BY_DIGEST.format(manifest_digest(V2))) == 1
    assert second.pulls_of(APP) == 0  # never pulled by tag
    assert second.tags_from(BY_DIGEST.format(manifest_digest(V2))) == 1  # tagged APP
    assert any("the build that h1 recorded" in formatEvent(e) for e in logs)
    doc = fired(first.rollouts.status.document())
    assert {h: s["digest"] for h, s in doc["apps"][APP]["hosts"].items()} == {
        "h1": manifest_digest(V2), "h2": manifest_digest(V2)}

    u2 = update(200.0)  # the next update rolls out after it
    for host in fleet.hosts:
        host.reconciler.request(u2)
    fleet.settle()
    assert [fleet.running(h) for h in fleet.hosts] == [V3, V3]
    assert fleet.record()["digest"] == manifest_digest(V3)
    doc = fired(second.rollouts.status.document())
    assert {h: s["digest"] for h, s in doc["apps"][APP]["hosts"].items()} == {
        "h1": manifest_digest(V3), "h2": manifest_digest(V3)}


def test_hosts_that_resolve_at_once_follow_the_first_record() -> None:
    # The registry moves between the two hosts' pulls: the second's record is refused by the
    # transaction, and it pulls the first one's build by digest.
    clock = Clock()
    fleet = Fleet(clock)
    first, second = fleet.hosts
    first.publish(APP, GOOD, image_id=V2)
    second.publish(APP, GOOD, image_id=V2)
    second.publish(APP, GOOD, image_id=V3)  # what the second host's pull will find
    # The second host reads the record (none yet) and pulls, but looks at what it pulled only
    # once the first host has recorded its build.
    gate: Deferred[None] = Deferred()
    inspect = second.client.inspect_image

    async def slow_inspect(name: str) -> Image:
        await gate
        return await inspect(name)

    second.client.inspect_image = slow_inspect  # type: ignore[method-assign]
    u1 = update(100.0)
    second.reconciler.request(u1)
    first.reconciler.request(u1)
    clock.advance(0.1)
    assert fleet.record()["host"] == "h1"
    assert second.pulls_of(APP) == 1
    gate.callback(None)  # the second host's write is refused: the record changed
    fleet.settle()
    assert [fleet.running(h) for h in fleet.hosts] == [V2, V2]
    assert fleet.record()["host"] == "h1"
    # The second host pulled by tag (and found the newer build), then the first one's.
    assert second.pulls_of(APP) == 1
    assert second.pulls_of(BY_DIGEST.format(manifest_digest(V2))) == 1


def test_a_record_of_a_newer_update_is_followed_by_an_older_one() -> None:
    clock = Clock()
    fleet = Fleet(clock)
    first, second = fleet.hosts
    for host in fleet.hosts:
        host.publish(APP, GOOD, image_id=V2)
    first.reconciler.request(update(200.0))
    fleet.settle()
    for host in fleet.hosts:
        host.publish(APP, GOOD, image_id=V3)
    second.reconciler.request(update(100.0))  # an older update, late
    fleet.settle()
    assert fleet.running(second) == V2  # the newest recorded build, not the registry's now
    assert fleet.record()["time"] == 200.0


def test_a_record_from_another_source_is_not_ordered_by_its_time() -> None:
    # Each source has its own clock: an update from another source resolves the tag again.
    clock = Clock()
    fleet = Fleet(clock)
    first, second = fleet.hosts
    for host in fleet.hosts:
        host.publish(APP, GOOD, image_id=V2)
    first.reconciler.request(update(200.0, source="api"))
    fleet.settle()
    for host in fleet.hosts:
        host.publish(APP, GOOD, image_id=V3)
    second.reconciler.request(update(100.0, source="registry", digest=manifest_digest(V3)))
    fleet.settle()
    assert fleet.running(second) == V3
    record = fleet.record()
    assert (record["source"], record["host"], record["digest"]) == (
        "registry", "h2", manifest_digest(V3))


def test_the_periodic_repull_is_this_hosts_alone_and_records_nothing() -> None:
    clock = Clock()
    fleet = Fleet(clock)
    first, _ = fleet.hosts
    first.publish(APP, GOOD, image_id=V2)
    first.reconciler.request(Update("*", source="repull", received=clock.seconds()))
    fleet.settle()
    assert fleet.running(first) == V2
    assert fleet.etcd.value(f"{PREFIX}/_/builds/{APP}") is None
    # Served together with an update from elsewhere, that update decides (and is recorded).
    first.publish(APP, GOOD, image_id=V3)
    first.reconciler.request(update(100.0))
    first.reconciler.request(Update("*", source="repull", received=clock.seconds()))
    fleet.settle()
    assert fleet.record()["time"] == 100.0


def test_the_record_is_read_again_while_etcd_does_not_answer(logs: list[LogEvent]) -> None:
    clock = Clock()
    fleet = Fleet(clock)
    first, second = fleet.hosts
    for host in fleet.hosts:
        host.publish(APP, GOOD, image_id=V2)
    first.reconciler.request(update(100.0))
    fleet.settle()
    for host in fleet.hosts:
        host.publish(APP, GOOD, image_id=V3)
    fleet.links[1].cut = True
    second.reconciler.request(update(100.0))
    clock.advance(3.0)
    assert second.pulls == 0  # nothing pulled before it knows which build
    fleet.links[1].cut = False
    fleet.settle()
    assert fleet.running(second) == V2
    assert any("reading the build recorded for" in formatEvent(e) and "trying again"
               in formatEvent(e) for e in logs)


def test_standalone_hosts_record_nothing() -> None:
    clock = Clock()
    host = SimHost(clock, "h1", wiring.standalone(clock, hostname="h1"))
    assert host.rollouts.builds is None
    host.local(APP, GOOD, image_id=V1)
    host.run("web", APP)
    host.publish(APP, GOOD, image_id=V2)
    host.reconciler.request(update(100.0))
    run_until(clock, lambda: host.idle)
    assert host.pulls_of(APP) == 1 and host.tags_from("") == 0


# -- the records ----------------------------------------------------------------------------------


def builds(clock: Clock, fake: FakeEtcd) -> EtcdBuilds:
    return EtcdBuilds(Link(fake, clock).etcd, RolloutKeys(PREFIX))


def record(host: str, digest: str, sent: float, source: str = "api") -> BuildRecord:
    return BuildRecord(APP, digest, "sha256:" + "f" * 64, sent, source, host, 1.0, "e1")


def test_the_first_writer_wins_for_one_update() -> None:
    clock = Clock()
    fake = FakeEtcd(clock, progress_interval=None)
    a, b = builds(clock, fake), builds(clock, fake)
    assert fired(a.get(APP)) is None
    mine = record("h1", V2, 100.0)
    assert fired(a.claim(mine, None)) == mine
    theirs = record("h2", V3, 100.0)
    assert fired(b.claim(theirs, None)) == mine  # the same update: the first record stands
    seen = fired(b.get(APP))
    assert seen.record == mine and seen.mod_revision > 0
    assert BuildRecord.from_json(fake.value(f"{PREFIX}/_/builds/{APP}")) == mine
    newer = record("h2", V3, 200.0)
    assert fired(b.claim(newer, seen)) == newer  # a newer update records its own
    assert fired(a.claim(mine, None)) == newer  # and an older one never replaces it
    assert (a.writes, b.writes) == (1, 1)


def test_a_record_changed_since_it_was_read_is_read_again() -> None:
    clock = Clock()
    fake = FakeEtcd(clock, progress_interval=None)
    a, b = builds(clock, fake), builds(clock, fake)
    fired(a.claim(record("h1", V1, 50.0), None))
    seen = fired(b.get(APP))
    fired(a.claim(record("h1", V2, 150.0), seen))  # h1 moves on first
    mine = record("h2", V3, 100.0)
    assert fired(b.claim(mine, seen)).digest == V2  # the record for the newer update stands
    other = record("h2", V3, 100.0, source="registry")
    assert fired(b.claim(other, seen)) == other  # another source: not ordered, replaced


def test_an_unreadable_record_is_replaced(logs: list[LogEvent]) -> None:
    clock = Clock()
    fake = FakeEtcd(clock, progress_interval=None)
    link = Link(fake, clock)
    fired(link.etcd.request("/v3/kv/put", {"key": b64(f"{PREFIX}/_/builds/{APP}"),
                                           "value": b64("nope")}))
    b = EtcdBuilds(link.etcd, RolloutKeys(PREFIX))
    seen = fired(b.get(APP))
    assert seen.record is None and seen.mod_revision > 0
    mine = record("h1", V2, 100.0)
    assert fired(b.claim(mine, seen)) == mine
    assert any("unreadable build record" in formatEvent(e) for e in logs)


def test_a_record_stands_for_its_update_and_newer_ones_of_its_source() -> None:
    mine = record("h1", V2, 100.0)  # event id e1
    assert mine.covers("api", 100.0, "e1") and mine.covers("api", 100.0, None)
    assert mine.covers("api", 99.0, "e0")
    assert not mine.covers("api", 100.0, "e2")  # two events at the same time: two updates
    assert not mine.covers("api", 101.0, "e1") and not mine.covers("registry", 50.0, "e1")


@pytest.mark.parametrize("value", [
    [], {"app": APP}, {**record("h", V1, 1.0).to_json(), "time": "x"},
    {**record("h", V1, 1.0).to_json(), "event_id": 5},
    {**record("h", V1, 1.0).to_json(), "recorded": float("nan")},
])
def test_bad_records_are_refused(value: object) -> None:
    with pytest.raises(ValueError):
        BuildRecord.from_json(value)
