"""The rollout lease keeper (:mod:`deployer.rollout.lease`) on the in-memory etcd through the
daemon's etcd client, with a Clock."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, succeed
from twisted.internet.task import Clock
from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher

from deployer.rollout.gateway import LEASE_GRANT, LEASE_KEEPALIVE, LEASE_REVOKE, Gateway
from deployer.rollout.lease import Lease, LeaseKeeper, NoLease
from deployer.rollout.testing import MEMBERS, Link
from deployer.testing.fake_etcd import FakeEtcd
from tests.helpers import fired

TTL = 9
(MEMBER,) = MEMBERS


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> FakeEtcd:
    return FakeEtcd(clock, progress_interval=None)


@pytest.fixture
def link(fake: FakeEtcd, clock: Clock) -> Link:
    return Link(fake, clock)


@pytest.fixture
def keeper(link: Link, clock: Clock) -> Iterator[LeaseKeeper]:
    keeper = LeaseKeeper(link.etcd, clock, ttl=TTL)
    yield keeper
    if keeper.running:
        keeper.stopService()


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


def advance(clock: Clock, seconds: float, step: float = 0.5) -> None:
    """Move the clock on in steps, as time passes for the reactor."""
    while seconds > 0:
        clock.advance(min(step, seconds))
        seconds -= step


def errors(events: list[LogEvent]) -> list[str]:
    return [formatEvent(e) for e in events if e.get("log_level") == LogLevel.error]


def test_grants_a_lease_when_started(keeper: LeaseKeeper, fake: FakeEtcd) -> None:
    assert not keeper.held
    assert keeper.reason == "not started"
    keeper.startService()
    assert keeper.held and keeper.reason == ""
    lease = keeper.current
    assert lease is not None and lease.ttl == TTL
    assert set(fake.leases) == {lease.id}
    assert fired(keeper.wait()) is lease


def test_keepalive_every_third_of_the_ttl_keeps_it_beyond_the_ttl(
    keeper: LeaseKeeper, link: Link, fake: FakeEtcd, clock: Clock
) -> None:
    keeper.startService()
    lease = keeper.current
    advance(clock, TTL / 3 - 0.5)
    assert link.count(LEASE_KEEPALIVE) == 0
    advance(clock, 0.5)
    assert link.count(LEASE_KEEPALIVE) == 1
    advance(clock, 10 * TTL)
    assert link.count(LEASE_KEEPALIVE) == 31
    assert keeper.current is lease and lease is not None and lease.alive
    assert lease.id in fake.leases
    assert keeper.grants == 1 and keeper.losses == 0


def test_etcd_away_for_less_than_the_ttl_loses_nothing(
    keeper: LeaseKeeper, link: Link, fake: FakeEtcd, clock: Clock, logged: list[LogEvent]
) -> None:
    keeper.startService()
    lease = keeper.current
    advance(clock, TTL / 3)  # keepalive answered at t=3: held until 12
    fake.down.add(MEMBER)
    advance(clock, TTL - 1.5)  # t=10.5; failures at 6, 6.9, ... retried every 0.9 s
    failed = link.count(LEASE_KEEPALIVE)
    assert failed >= 6
    fake.down.clear()
    advance(clock, 1.0)  # answered again before t=12
    assert link.count(LEASE_KEEPALIVE) == failed + 1
    advance(clock, 3 * TTL)
    assert keeper.current is lease and lease is not None and lease.alive
    assert keeper.losses == 0 and not errors(logged)
    assert link.count(LEASE_KEEPALIVE) == failed + 1 + 9  # back to every TTL/3


def test_a_member_going_down_costs_no_lease(fake: FakeEtcd, clock: Clock) -> None:
    link = Link(fake, clock, members=("10.0.0.1", "10.0.0.2"))
    keeper = LeaseKeeper(link.etcd, clock, ttl=TTL)
    keeper.startService()
    lease = keeper.current
    fake.down.add("10.0.0.1")
    advance(clock, 3 * TTL)
    assert keeper.current is lease and lease is not None and lease.alive
    assert keeper.losses == 0
    asked = [member for member, path, _ in fake.requests if path == LEASE_KEEPALIVE]
    assert set(asked) == {"10.0.0.2"} and len(asked) == 9, "failed over at the first refusal"
    keeper.stopService()


def test_etcd_unreachable_past_the_ttl_loses_the_lease_then_a_new_one_is_granted(
    keeper: LeaseKeeper, fake: FakeEtcd, clock: Clock, logged: list[LogEvent]
) -> None:
    lost: list[tuple[Lease, str]] = []
    granted: list[Lease] = []
    keeper.observe(granted=granted.append, lost=lambda lease, why: lost.append((lease, why)))
    keeper.startService()
    first = keeper.current
    assert first is not None and granted == [first]
    when_lost = first.when_lost()
    advance(clock, TTL / 3)  # answered at t=3: held until t=12
    fake.down.add(MEMBER)
    advance(clock, TTL - 0.5)  # t=11.5
    assert first.alive
    advance(clock, 0.5)  # t=12
    assert not first.alive and not keeper.held
    assert lost == [(first, first.lost_reason)]
    assert "no keepalive answered within its TTL of 9s" in str(first.lost_reason)
    assert "no etcd member answered" in str(first.lost_reason)  # the last error says why
    assert fired(when_lost) == first.lost_reason
    assert "lost" in keeper.reason
    [line] = errors(logged)
    assert first.hex in line and "no new rollout slot" in line
    waiting = keeper.wait()
    assert not waiting.called
    advance(clock, 30)
    assert not waiting.called
    assert keeper.reason.startswith(f"lease {first.hex} lost: no keepalive answered")
    assert "etcd did not grant a new one: no etcd member answered" in keeper.reason
    assert "Connection was refused" in keeper.reason
    fake.down.clear()
    advance(clock, 10)
    second = fired(waiting)
    assert second is keeper.current and second.id != first.id and second.alive
    assert granted == [first, second]
    assert keeper.grants == 2 and keeper.losses == 1


def test_keepalive_answering_ttl_zero_loses_the_lease_at_once(
    keeper: LeaseKeeper, fake: FakeEtcd, clock: Clock
) -> None:
    keeper.startService()
    first = keeper.current
    assert first is not None
    fake.revoke(first.id)  # gone behind our back (etcd answers keepalive without TTL)
    advance(clock, TTL / 3)
    assert not first.alive and "TTL 0" in str(first.lost_reason)
    second = keeper.current  # granted again at once: etcd answers
    assert second is not None and second.id != first.id


def test_a_hanging_keepalive_does_not_delay_the_loss(fake: FakeEtcd, clock: Clock) -> None:
    link = Link(fake, clock, dial_timeout=60.0)  # the client waits longer than the TTL
    keeper = LeaseKeeper(link.etcd, clock, ttl=TTL)
    keeper.startService()
    first = keeper.current
    assert first is not None
    fake.freeze(MEMBER)
    advance(clock, TTL - 0.5)
    assert first.alive
    assert link.count(LEASE_KEEPALIVE) == 1  # one at a time: the others wait for its answer
    advance(clock, 0.5)
    assert not first.alive
    keeper.stopService()


def test_invalidate_counts_the_lease_lost_at_once(keeper: LeaseKeeper) -> None:
    keeper.startService()
    first = keeper.current
    assert first is not None
    keeper.invalidate(first, "etcd no longer knows it")
    assert first.lost_reason == "etcd no longer knows it"
    assert keeper.current is not None and keeper.current is not first
    keeper.invalidate(first, "again")  # a lease lost already: nothing
    assert keeper.grants == 2 and keeper.losses == 1


def test_stop_revokes_the_lease_and_fails_waiters(
    link: Link, fake: FakeEtcd, clock: Clock
) -> None:
    keeper = LeaseKeeper(link.etcd, clock, ttl=TTL)
    fake.down.add(MEMBER)
    keeper.startService()
    waiting = keeper.wait()
    keeper.stopService()
    with pytest.raises(NoLease):
        fired(waiting)
    fake.down.clear()
    keeper.startService()
    lease = keeper.current
    assert lease is not None
    fired(keeper.stopService())
    assert link.count(LEASE_REVOKE) == 1 and not fake.leases
    assert lease.lost_reason == "stopped" and keeper.reason == "stopped"
    advance(clock, 5 * TTL)
    assert link.count(LEASE_KEEPALIVE) == 0
    assert link.count(LEASE_GRANT) == 2  # one failed while etcd was down, one granted


def test_a_grant_that_hangs_is_given_up_and_asked_again(
    link: Link, fake: FakeEtcd, clock: Clock
) -> None:
    keeper = LeaseKeeper(link.etcd, clock, ttl=TTL, request_timeout=2.0)
    fake.freeze(MEMBER)
    keeper.startService()
    advance(clock, 2.0)
    assert "lease grant: timed out after 2s" in keeper.reason
    fake.thaw(MEMBER)
    advance(clock, 5)
    assert keeper.held
    keeper.stopService()


def test_wait_can_be_cancelled(keeper: LeaseKeeper, fake: FakeEtcd) -> None:
    fake.down.add(MEMBER)
    keeper.startService()
    waiting = keeper.wait()
    waiting.cancel()
    with pytest.raises(CancelledError):
        fired(waiting)
    assert keeper._waiting == []


def test_a_failing_observer_is_logged_and_the_rest_still_hear(
    keeper: LeaseKeeper, logged: list[LogEvent]
) -> None:
    heard: list[Any] = []

    def broken(lease: Lease) -> None:
        raise RuntimeError("observer broke")

    keeper.observe(granted=broken)
    keeper.observe(granted=heard.append)
    keeper.startService()
    assert heard == [keeper.current]
    assert any("observer broke" in str(e.get("log_failure", "")) for e in logged)


def test_when_lost_of_a_lost_lease_fires_at_once_and_a_waiter_can_leave() -> None:
    lease = Lease(5, 10, 0.0)
    leaving = lease.when_lost()
    leaving.cancel()
    with pytest.raises(CancelledError):
        fired(leaving)
    staying = lease.when_lost()
    assert lease.mark_lost("gone") and not lease.mark_lost("again")
    assert fired(staying) == "gone" and fired(lease.when_lost()) == "gone"
    assert lease.hex == "5" and lease._losses == []


def test_ttl_too_short_is_refused(link: Link, clock: Clock) -> None:
    with pytest.raises(ValueError, match="too short"):
        LeaseKeeper(link.etcd, clock, ttl=1)


class Odd:
    """A gateway whose keepalives answer a TTL that is no number."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    def request(self, path: str, body: dict[str, Any]) -> Any:
        if path == LEASE_KEEPALIVE:
            return succeed({"result": {"TTL": ["nine"]}})
        return self.gateway.request(path, body)


def test_a_keepalive_answer_that_makes_no_sense_counts_as_a_failure(
    link: Link, clock: Clock, logged: list[LogEvent]
) -> None:
    keeper = LeaseKeeper(Odd(link.etcd), clock, ttl=TTL)
    keeper.startService()
    lease = keeper.current
    advance(clock, TTL / 3)
    assert any("not an integer" in formatEvent(e) for e in logged)
    assert lease is not None and lease.alive
    advance(clock, TTL)
    assert not lease.alive
    keeper.stopService()
