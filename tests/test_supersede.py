"""A replacement that still waits for its rollout slot gives up when a newer build of its tag
arrives meanwhile (:mod:`deployer.pending`, :meth:`deployer.rollout_round.Rollout.replace`):
fast, on a Clock, with the in-memory engines of :class:`tests.rollout_fakes.SimHost`, in a
fleet on :class:`~deployer.testing.fake_etcd.FakeEtcd` and standalone."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from twisted.internet.task import Clock
from twisted.logger import LogEvent, capturedLogs, formatEvent

from deployer.freshness import TagHistory
from deployer.host_apps import round_result
from deployer.model import Update
from deployer.pending import Pending
from deployer.reference import parse_reference
from deployer.rollout import wiring
from deployer.rollout.slots import LocalSlots
from deployer.rounds import Outcome, Result, RoundReport
from tests.rollout_fakes import (
    GOOD,
    Build,
    SimHost,
    health,
    health_check,
    manifest_digest,
    run_until,
)
from tests.test_rollout_round_fleet import APP, PREFIX, V2, V3, Fleet

SLOW = Build(health_check(every=5.0))
"""Healthy five seconds after the start: the first host holds its slot that long."""


@pytest.fixture
def logs() -> Iterator[list[LogEvent]]:
    with capturedLogs() as events:
        yield events


def lines(events: list[LogEvent], part: str) -> list[str]:
    return [t for t in (formatEvent(e) for e in events) if part in t]


class Watched(Fleet):
    """A :class:`Fleet` that also records every image each host's ``web`` ran."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(clock)
        self.ran: dict[str, set[str]] = {h.name: set() for h in self.hosts}

    def check(self) -> None:
        super().check()
        for host in self.hosts:
            web = host.named("web")
            if web is not None and web.running:
                self.ran[host.name].add(web.image_id)


def update(host: SimHost, digest: str | None) -> Update:
    ref = parse_reference(APP + (f"@{digest}" if digest else ""))
    return Update.from_reference(ref, "registry", host.clock.seconds())


def v2_rolling(clock: Clock) -> Watched:
    """Three hosts; the first holds its slot for V2 (slow to be healthy), the others wait."""
    fleet = Watched(clock)
    fleet.publish(V2, SLOW)
    fleet.deploy()
    for _ in range(10):
        clock.advance(0.1)
        fleet.check()
    first, *others = fleet.hosts
    assert first.stops == 1 and all(h.stops == 0 for h in others)
    return fleet


def test_waiting_hosts_skip_a_build_superseded_while_they_wait(logs: list[LogEvent]) -> None:
    clock = Clock()
    fleet = v2_rolling(clock)
    first, *others = fleet.hosts

    fleet.publish(V3, GOOD)
    fleet.deploy()  # the update names no digest: it supersedes
    fleet.settle()

    for host in others:  # straight from V1 to V3, taken down once
        assert [o.result for o in host.outcomes] == [Result.SUPERSEDED, Result.REPLACED]
        assert host.outcomes[0].new_image == V2 and not host.outcomes[0].slot
        assert host.stops == 1
        assert V2 not in fleet.ran[host.name]
    # The holder of the slot was never interrupted: V2, then V3.
    assert [(o.result, o.new_image) for o in first.outcomes] == [
        (Result.REPLACED, V2), (Result.REPLACED, V3)]
    assert all(h.named("web").image_id == V3 for h in fleet.hosts)  # type: ignore[union-attr]
    assert all(health(h.named("web")) == "healthy" for h in fleet.hosts)
    assert fleet.down_max == 1
    assert fleet.etcd.keys(f"{PREFIX}/_/rollout/") == []
    superseded = lines(logs, "arrived while it waited for its rollout slot")
    assert len(superseded) == 2 and all("not replacing web with" in t for t in superseded)
    # Their places in the line gave the slot back as it came.
    assert len(lines(logs, "came after a newer build superseded its replacement")) == 2
    # The round of each waiting host said so.
    assert any(o.result is Result.SUPERSEDED for r in others[0].reports for o in r.outcomes)


def test_a_duplicate_update_of_the_build_being_deployed_does_not_supersede() -> None:
    clock = Clock()
    fleet = v2_rolling(clock)
    others = fleet.hosts[1:]
    for host in fleet.hosts:  # the same push heard again, naming its digest
        host.reconciler.request(update(host, manifest_digest(V2)))
    fleet.settle()

    for host in others:
        assert [o.result for o in host.outcomes] == [Result.REPLACED]
        assert host.named("web").image_id == V2  # type: ignore[union-attr]


def test_an_update_that_names_a_new_digest_supersedes() -> None:
    clock = Clock()
    fleet = v2_rolling(clock)
    fleet.publish(V3, GOOD)
    for host in fleet.hosts:
        host.reconciler.request(update(host, manifest_digest(V3)))
    fleet.settle()

    for host in fleet.hosts[1:]:
        assert [o.result for o in host.outcomes] == [Result.SUPERSEDED, Result.REPLACED]
        assert V2 not in fleet.ran[host.name]
    assert all(h.named("web").image_id == V3 for h in fleet.hosts)  # type: ignore[union-attr]


def test_a_superseded_wait_gives_its_slot_back_and_leaves_no_key() -> None:
    clock = Clock()
    fleet = v2_rolling(clock)
    second = fleet.hosts[1]
    second.reconciler.request(update(second, None))  # only this host hears of a newer push
    clock.advance(1.5)  # its next check finds it
    assert [o.result for o in second.outcomes] == [Result.SUPERSEDED]
    assert second.image_of(APP) == V2  # the tag is left where the round put it
    assert second.named("web").image_id == fleet.old  # type: ignore[union-attr]
    fleet.settle()
    # Its place came, was given back, and the host then replaced once, to what the registry
    # holds now (V2 still).
    assert [o.result for o in second.outcomes] == [Result.SUPERSEDED, Result.REPLACED]
    assert second.stops == 1
    assert all(h.named("web").image_id == V2 for h in fleet.hosts)  # type: ignore[union-attr]
    assert fleet.etcd.keys(f"{PREFIX}/_/rollout/") == []


def test_standalone_a_waiting_container_skips_the_superseded_build(
    logs: list[LogEvent],
) -> None:
    clock = Clock()
    host = SimHost(clock, "h1", wiring.standalone(clock, hostname="h1", max_unavailable=1))
    old = host.local(APP, GOOD)
    for n in (1, 2):
        host.run(f"web-{n}", APP)
    host.publish(APP, SLOW, image_id=V2)
    clock.advance(1.0)
    ran: dict[str, set[str]] = {"web-1": set(), "web-2": set()}

    def watch() -> None:
        for name in ran:
            web = host.named(name)
            if web is not None and web.running:
                ran[name].add(web.image_id)

    watch()
    host.deploy(APP)
    clock.advance(1.0)
    slots = host.rollouts.slots
    assert isinstance(slots, LocalSlots)
    [holding] = slots.holding().values()
    assert [t.container for t in holding.waiting] == ["web-2"]
    host.publish(APP, GOOD, image_id=V3)
    host.deploy(APP)
    run_until(clock, lambda: host.idle, each=watch)

    assert [(o.name, o.result) for o in host.outcomes] == [
        ("web-2", Result.SUPERSEDED), ("web-1", Result.REPLACED),
        ("web-1", Result.REPLACED), ("web-2", Result.REPLACED)]
    assert ran == {"web-1": {old, V2, V3}, "web-2": {old, V3}}
    assert slots.holding() == {}
    assert len(lines(logs, "not replacing web-2 with")) == 1


# -- which pending update supersedes ---------------------------------------------------------------


TAG = "registry.test:5000/myorg/app:qa"
D2, D3 = "sha256:" + "a" * 64, "sha256:" + "b" * 64


def queued(digest: str | None, received: float = 10.0, pattern: str = TAG) -> Update:
    at = f"@{digest}" if digest else ""
    return Update.from_reference(parse_reference(pattern + at), "registry", received)


def test_only_an_update_that_came_after_the_round_and_is_another_build_supersedes() -> None:
    pending, known = Pending(10), TagHistory()
    pending.add(queued(D3))  # number 1: queued before the round noted its updates
    mark = pending.arrived
    assert pending.supersedes(TAG, mark, D2, known) is None
    pending.add(queued(D2))  # the build being deployed, heard again
    assert pending.supersedes(TAG, mark, D2, known) is None
    later = queued(D3)
    pending.add(later)
    assert pending.supersedes(TAG, mark, D2, known) is later
    assert pending.supersedes("registry.test:5000/myorg/app:prod", mark, D2, known) is None


def test_an_update_without_a_digest_or_against_an_unknown_one_supersedes() -> None:
    pending, known = Pending(10), TagHistory()
    pending.add(queued(D2))
    assert pending.supersedes(TAG, 0, None, known) is not None  # the round's digest unknown
    pending = Pending(10)
    pending.add(queued(None, pattern="registry.test:5000/myorg/app"))  # every tag, no digest
    assert pending.supersedes(TAG, 0, D2, known) is not None


def test_an_update_older_than_a_build_known_does_not_supersede() -> None:
    pending, known = Pending(10), TagHistory()
    known.learn(TAG, D2, 20.0, "registry")
    pending.add(queued(D3, received=5.0))  # a late notification of an earlier push
    assert pending.supersedes(TAG, 0, D2, known) is None


def test_requests_put_back_never_supersede() -> None:
    pending, known = Pending(10), TagHistory()
    pending.put_back({TAG: [queued(D3)]})
    assert pending.supersedes(TAG, 0, D2, known) is None


# -- what tells of it ------------------------------------------------------------------------------


def test_the_round_result_says_superseded() -> None:
    outcome = Outcome("web", "c1", TAG, "sha256:1", "sha256:2", Result.SUPERSEDED,
                      "a newer build arrived while it waited for its rollout slot")
    report = RoundReport(patterns=(TAG,), updates=(), pulled={TAG: "sha256:2"}, failed={},
                         pull_seconds={TAG: 1.0}, stopped=(), errors=(), started=0.0,
                         finished=1.0, outcomes=(outcome,))
    assert round_result(report, TAG).startswith("superseded: a newer build")
    assert report.ok and report.stopped == ()
    assert outcome.stopped is None and not Result.SUPERSEDED.taken_down


def test_a_container_skips_no_second_build_in_a_row() -> None:
    """Pushes faster than the rollout never keep a waiting host on its old build: after one
    skip, its next replacement goes through, and the build after that follows."""
    clock = Clock()
    fleet = v2_rolling(clock)
    second = fleet.hosts[1]
    fleet.publish(V3, GOOD)
    fleet.deploy()
    run_until(clock, lambda: len(second.outcomes) == 1, limit=5)
    clock.advance(1.0)  # its round for V3 waits in the line now
    v4 = "sha256:" + "4" * 64
    fleet.publish(v4, GOOD)
    fleet.deploy()
    fleet.settle()

    assert [(o.result, o.new_image) for o in second.outcomes] == [
        (Result.SUPERSEDED, V2), (Result.REPLACED, V3), (Result.REPLACED, v4)]
    assert all(h.named("web").image_id == v4 for h in fleet.hosts)  # type: ignore[union-attr]
