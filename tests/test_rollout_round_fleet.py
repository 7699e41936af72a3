"""The rollout of a fleet, fast: three hosts (each on its own in-memory engine, see
:class:`tests.rollout_fakes.SimHost`), each with its own fleet rollout parts (lease, slots,
pauses, status) on one in-memory etcd, all on one Clock. The invariants are checked at every
step of the clock."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogEvent, capturedLogs, formatEvent

from deployer.rollout import wiring
from deployer.rollout.testing import Link
from deployer.rounds import Result
from deployer.testing.fake_etcd import FakeEtcd
from tests.helpers import fired
from tests.rollout_fakes import BAD, GOOD, Build, SimHost, health, health_check, run_until

APP = "registry.test:5000/myorg/app:qa"
PREFIX = "/d"
V2 = "sha256:" + "2" * 64
V3 = "sha256:" + "3" * 64


class Fleet:
    def __init__(self, clock: Clock, size: int = 3, max_unavailable: int = 1) -> None:
        self.clock = clock
        self.etcd = FakeEtcd(clock, progress_interval=None)
        self.links: list[Link] = []
        self.hosts: list[SimHost] = []
        for n in range(1, size + 1):
            link = Link(self.etcd, clock)
            parts = wiring.fleet(link.etcd, clock, prefix=PREFIX, hostname=f"h{n}",
                                 max_unavailable=max_unavailable, ttl=5)
            assert parts.keeper is not None
            parts.keeper.startService()
            self.links.append(link)
            self.hosts.append(SimHost(clock, f"h{n}", parts))
        self.old = ""
        for host in self.hosts:
            self.old = host.local(APP, GOOD, image_id="sha256:" + "1" * 64)
            host.run("web", APP)
        clock.advance(1.0)  # every instance healthy
        self.down_max = 0

    def healthy(self, host: SimHost) -> bool:
        web = host.named("web")
        return web is not None and web.running and health(web) == "healthy"

    def check(self) -> None:
        down = sum(1 for host in self.hosts if not self.healthy(host))
        self.down_max = max(self.down_max, down)

    def publish(self, image_id: str, build: Build) -> None:
        for host in self.hosts:
            host.publish(APP, build, image_id=image_id)

    def deploy(self) -> None:
        for host in self.hosts:  # what each host's etcd watch does, in this order
            host.deploy(APP)

    def settle(self, limit: float = 120.0) -> float:
        return run_until(self.clock, lambda: all(h.idle for h in self.hosts), limit=limit,
                         each=self.check)


@pytest.fixture
def logs() -> Iterator[list[LogEvent]]:
    with capturedLogs() as events:
        yield events


def test_a_push_rolls_through_the_fleet_one_host_at_a_time_in_the_order_they_asked() -> None:
    clock = Clock()
    fleet = Fleet(clock)
    fleet.publish(V2, GOOD)

    fleet.deploy()
    assert all(h.pulls == 1 for h in fleet.hosts)  # every host pulls at once
    fleet.check()
    fleet.settle()

    assert fleet.down_max == 1
    assert all(h.named("web").image_id == V2 for h in fleet.hosts)  # type: ignore[union-attr]
    stops = sorted((h.outcomes[0].waited, h.name) for h in fleet.hosts)
    assert [name for _, name in stops] == ["h1", "h2", "h3"]
    assert stops[0][0] < 0.5 < stops[1][0] < stops[2][0]
    assert all(h.outcomes[0].result is Result.REPLACED for h in fleet.hosts)
    assert fleet.etcd.keys(f"{PREFIX}/_/rollout/") == []
    doc = fired(fleet.hosts[0].rollouts.status.document())
    assert doc["apps"][APP]["converged"]
    assert {h: s["image_id"] for h, s in doc["apps"][APP]["hosts"].items()} == {
        "h1": V2, "h2": V2, "h3": V2
    }


def test_max_unavailable_zero_takes_every_host_down_at_once() -> None:
    clock = Clock()
    fleet = Fleet(clock, max_unavailable=0)
    fleet.publish(V2, GOOD)
    fleet.deploy()
    assert all(h.stops == 1 for h in fleet.hosts)
    fleet.settle()
    assert fleet.down_max == 3


def test_a_bad_build_stops_at_the_first_host_and_the_next_push_resumes(
    logs: list[LogEvent],
) -> None:
    clock = Clock()
    fleet = Fleet(clock)
    fleet.publish(V2, BAD)

    fleet.deploy()
    fleet.settle()

    first, *others = fleet.hosts
    assert [o.result for o in first.outcomes] == [Result.ROLLED_BACK]
    assert first.named("web").image_id == fleet.old  # type: ignore[union-attr]
    for host in others:
        assert host.stops == 0  # never stopped
        assert host.image_of(APP) == fleet.old  # the tag went back
        assert [o.result for o in host.outcomes] == [Result.PAUSED]
    assert fleet.down_max == 1
    pause = fleet.etcd.value(f"{PREFIX}/_/paused/{APP}")
    assert pause["image_id"] == V2 and pause["host"] == "h1"
    assert pause["reason"].startswith("unhealthy")
    assert [len(h.notices) for h in fleet.hosts] == [1, 0, 0]
    assert sum(1 for e in logs if "Rollout of" in formatEvent(e)) == 1
    doc = fired(others[0].rollouts.status.document())
    assert doc["apps"][APP]["paused"]["host"] == "h1"

    fleet.publish(V3, GOOD)
    fleet.deploy()
    fleet.settle()

    assert fleet.etcd.value(f"{PREFIX}/_/paused/{APP}") is None
    assert all(h.named("web").image_id == V3 for h in fleet.hosts)  # type: ignore[union-attr]
    assert all(h.outcomes[-1].result is Result.REPLACED for h in fleet.hosts)
    assert fleet.down_max == 1


def test_a_host_that_loses_its_lease_finishes_its_replacement_and_says_so(
    logs: list[LogEvent],
) -> None:
    clock = Clock()
    fleet = Fleet(clock, size=2)
    slow = Build(health_check(every=20.0))  # slow to be healthy: time to lose the lease
    fleet.publish(V2, slow)
    first, second = fleet.hosts
    first.deploy(APP)
    clock.advance(0.1)
    assert first.stops == 1
    fleet.links[0].cut = True  # etcd out of reach: no keepalive, the lease expires

    run_until(clock, lambda: first.idle, limit=60)

    [outcome] = first.outcomes
    assert outcome.result is Result.REPLACED
    assert first.named("web").image_id == V2  # type: ignore[union-attr]
    assert "lease of the rollout slot for web was lost" in "\n".join(
        formatEvent(e) for e in logs)
    # The slot went with the lease: another host may take its turn meanwhile.
    second.deploy(APP)
    run_until(clock, lambda: second.idle, limit=60)
    assert [o.result for o in second.outcomes] == [Result.REPLACED]
