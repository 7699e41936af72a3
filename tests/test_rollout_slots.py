"""Rollout slots (:mod:`deployer.rollout.slots`, :mod:`deployer.rollout.fleet`): in-process,
and shared by simulated hosts through the in-memory etcd (each with its own etcd client), on a
Clock."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock

from deployer.rollout.fleet import MAX_POLL_INTERVAL, POLL_INTERVAL, FleetSlots, SlotSweeper
from deployer.rollout.gateway import KV_RANGE, KV_TXN, LEASE_GRANT, Gateway, delete
from deployer.rollout.keys import RolloutKeys
from deployer.rollout.lease import LeaseKeeper
from deployer.rollout.slots import LocalSlots, Slot
from deployer.rollout.testing import Link
from deployer.testing.fake_etcd import FakeEtcd
from tests.helpers import fired

APP = "myorg/app:qa"
OTHER = "myorg/other:qa"
PREFIX = "/deployer"
KEYS = RolloutKeys(PREFIX)
TTL = 6
NEXT = POLL_INTERVAL + 0.05
"""Long enough for the host next in line to look at the queue."""


def advance(clock: Clock, seconds: float, step: float = 0.05) -> None:
    while seconds > 1e-9:
        clock.advance(min(step, seconds))
        seconds -= step


# -- LocalSlots -------------------------------------------------------------------------------


def test_local_slots_serve_one_at_a_time_first_come_first_served() -> None:
    clock = Clock()
    slots = LocalSlots(clock, 1)
    first = fired(slots.acquire(APP, "a"))
    second, third = slots.acquire(APP, "b"), slots.acquire(APP, "c")
    assert not second.called and not third.called
    holding = slots.holding()[APP]
    assert [t.container for t in holding.replacing] == ["a"]
    assert [t.container for t in holding.waiting] == ["b", "c"]
    clock.advance(3)
    fired(first.release())
    assert not third.called
    got = fired(second)
    assert got.container == "b" and got.waited == 3 and not got.lost
    fired(got.release())
    last = fired(third)
    assert last.container == "c"
    fired(last.release())
    assert slots.holding() == {} and slots._queues == {} and slots._waiters == {}


def test_local_slots_limit_two_and_apps_independent() -> None:
    slots = LocalSlots(Clock(), 2)
    a, b = fired(slots.acquire(APP, "a")), fired(slots.acquire(APP, "b"))
    c = slots.acquire(APP, "c")
    other = slots.acquire(OTHER, "x")
    assert not c.called and other.called
    fired(b.release())
    assert fired(c).container == "c"
    assert a.waited == 0


def test_local_slots_without_limit_never_wait() -> None:
    slots = LocalSlots(Clock(), 0)
    held = [fired(slots.acquire(APP, str(i))) for i in range(5)]
    assert len(slots.holding()[APP].replacing) == 5
    for slot in held:
        fired(slot.release())
    assert slots.holding() == {}


def test_local_slot_waiter_that_gives_up_leaves_the_queue() -> None:
    slots = LocalSlots(Clock(), 1)
    first = fired(slots.acquire(APP, "a"))
    leaving, staying = slots.acquire(APP, "b"), slots.acquire(APP, "c")
    leaving.cancel()
    with pytest.raises(CancelledError):
        fired(leaving)
    assert [t.container for t in slots.holding()[APP].waiting] == ["c"]
    fired(first.release())
    assert fired(staying).container == "c"


def test_release_twice_releases_once() -> None:
    slots = LocalSlots(Clock(), 1)
    first = fired(slots.acquire(APP, "a"))
    waiting = [slots.acquire(APP, "b"), slots.acquire(APP, "c")]
    fired(first.release())
    fired(first.release())
    assert first.released
    assert [d.called for d in waiting] == [True, False]


def test_negative_limits_are_refused() -> None:
    with pytest.raises(ValueError):
        LocalSlots(Clock(), -1)


# -- FleetSlots on the in-memory etcd ---------------------------------------------------------


class Host:
    def __init__(self, name: str, fake: FakeEtcd, clock: Clock, limit: int) -> None:
        self.name = name
        self.link = Link(fake, clock)
        self.keeper = LeaseKeeper(self.link.etcd, clock, ttl=TTL)
        self.slots = FleetSlots(self.link.etcd, self.keeper, KEYS, clock, hostname=name,
                                limit=limit)
        self.keeper.startService()


class Fleet:
    def __init__(self, limit: int = 1, hosts: int = 3) -> None:
        self.clock = Clock()
        self.fake = FakeEtcd(self.clock, progress_interval=None)
        self.hosts = [Host(f"h{i}", self.fake, self.clock, limit) for i in range(hosts)]

    def slot_keys(self, app: str = APP) -> list[str]:
        return self.fake.keys(KEYS.slots(app))

    def holders(self, got: dict[str, Deferred[Slot]]) -> set[str]:
        return {name for name, d in got.items() if d.called}

    def stop(self) -> None:
        for host in self.hosts:
            if host.keeper.running:
                host.keeper.stopService()


@pytest.fixture
def fleet() -> Iterator[Fleet]:
    fleet = Fleet()
    yield fleet
    fleet.stop()


def ask(fleet: Fleet, order: list[int], app: str = APP) -> dict[str, Deferred[Slot]]:
    """Each host in ``order`` asks for a slot, a moment after the one before."""
    got = {}
    for i in order:
        host = fleet.hosts[i]
        got[host.name] = host.slots.acquire(app, f"{host.name}-web")
        fleet.clock.advance(0.01)
    return got


def test_waiters_are_served_in_the_order_they_asked(fleet: Fleet) -> None:
    got = ask(fleet, [2, 0, 1])
    assert fleet.holders(got) == {"h2"}
    assert len(fleet.slot_keys()) == 3
    order = []
    for _ in range(3):
        [name] = fleet.holders(got) - set(order)
        order.append(name)
        advance(fleet.clock, 5)
        assert fleet.holders(got) == set(order)  # nobody else while it is held
        fired(fired(got[name]).release())
        advance(fleet.clock, NEXT)  # the next in line looks within one poll interval
    assert order == ["h2", "h0", "h1"]
    assert fleet.slot_keys() == []


def test_slot_value_names_host_container_and_time(fleet: Fleet) -> None:
    fleet.clock.advance(100)
    slot = fired(fleet.hosts[0].slots.acquire(APP, "web-1"))
    lease = fleet.hosts[0].keeper.current
    assert lease is not None and slot.lease is lease
    assert slot.key == f"{PREFIX}/_/rollout/{APP}/{lease.hex}"
    assert fleet.fake.value(slot.key) == {"host": "h0", "container": "web-1", "since": 100.0}
    assert fleet.fake.kvs[slot.key.encode()].lease == lease.id


def test_max_unavailable_two_lets_two_hold_at_once() -> None:
    fleet = Fleet(limit=2, hosts=4)
    got = ask(fleet, [0, 1, 2, 3])
    advance(fleet.clock, 3)
    assert fleet.holders(got) == {"h0", "h1"}
    fired(fired(got["h1"]).release())
    advance(fleet.clock, NEXT)
    assert fleet.holders(got) == {"h0", "h1", "h2"}
    assert not got["h3"].called
    fired(fired(got["h0"]).release())
    advance(fleet.clock, NEXT)
    assert got["h3"].called
    fleet.stop()


def test_apps_roll_independently(fleet: Fleet) -> None:
    got = ask(fleet, [0, 1])
    other = fleet.hosts[1].slots.acquire(OTHER, "h1-other")
    assert fleet.holders(got) == {"h0"} and other.called


def test_a_host_takes_one_slot_of_an_app_at_a_time(fleet: Fleet) -> None:
    host = fleet.hosts[0]
    first = host.slots.acquire(APP, "web-1")
    second = host.slots.acquire(APP, "web-2")
    elsewhere = fleet.hosts[1].slots.acquire(APP, "h1-web")
    advance(fleet.clock, 1)
    assert first.called and not second.called
    assert len(fleet.slot_keys()) == 2  # web-2 has not queued in etcd yet: h1 is ahead of it
    fired(fired(first).release())
    advance(fleet.clock, NEXT)
    assert elsewhere.called and not second.called
    fired(fired(elsewhere).release())
    advance(fleet.clock, NEXT)
    slot = fired(second)
    assert slot.container == "web-2" and slot.waited == pytest.approx(1 + 2 * NEXT, abs=0.15)
    assert fleet.fake.value(str(slot.key))["container"] == "web-2"


def test_giving_up_a_wait_deletes_the_key_and_the_next_moves_up(fleet: Fleet) -> None:
    got = ask(fleet, [0, 1, 2])
    got["h1"].cancel()
    with pytest.raises(CancelledError):
        fired(got["h1"])
    assert len(fleet.slot_keys()) == 2
    fired(fired(got["h0"]).release())
    advance(fleet.clock, 2 * POLL_INTERVAL + 0.05)  # h2 stood second in line
    assert got["h2"].called


def test_no_limit_asks_nothing_of_etcd() -> None:
    fleet = Fleet(limit=0)
    before = len(fleet.fake.requests)
    got = ask(fleet, [0, 1, 2])
    assert fleet.holders(got) == {"h0", "h1", "h2"}
    assert len(fleet.fake.requests) == before
    fleet.stop()


def test_a_holder_cut_off_loses_its_slot_after_the_ttl_and_the_next_takes_it(
    fleet: Fleet,
) -> None:
    got = ask(fleet, [0, 1])
    holder = fired(got["h0"])
    lost = holder.when_lost()
    fleet.hosts[0].link.cut = True  # its keepalives stop reaching etcd
    advance(fleet.clock, TTL - 1)
    assert not got["h1"].called and not holder.lost
    advance(fleet.clock, 1.5)
    assert holder.lost and "no keepalive answered" in str(holder.lost_reason)
    assert fired(lost) == holder.lost_reason
    advance(fleet.clock, 1.0)  # etcd let the lease go; the next waiter looks
    assert got["h1"].called
    # the cut-off host finishes its replacement; it takes no new slot without a lease
    again = fleet.hosts[0].slots.acquire(OTHER, "h0-other")
    advance(fleet.clock, 10)
    assert not again.called
    fired(holder.release())  # etcd is unreachable and the lease is gone: nothing to wait for
    fleet.hosts[0].link.cut = False
    advance(fleet.clock, 3)
    assert again.called and not fired(again).lost


def test_a_lease_revoked_while_waiting_queues_again_with_a_new_one(fleet: Fleet) -> None:
    got = ask(fleet, [0, 1, 2])
    waiter = fleet.hosts[1].keeper.current
    assert waiter is not None
    fleet.fake.revoke(waiter.id)  # as etcdctl lease revoke
    advance(fleet.clock, TTL)
    assert not waiter.alive
    renewed = fleet.hosts[1].keeper.current
    assert renewed is not None and renewed is not waiter
    assert fleet.slot_keys() == sorted(
        KEYS.slot(APP, h.keeper.current.id) for h in fleet.hosts if h.keeper.current
    )
    fired(fired(got["h0"]).release())
    advance(fleet.clock, NEXT)
    assert fleet.holders(got) == {"h0", "h2"}  # h1 queued again, behind h2
    fired(fired(got["h2"]).release())
    advance(fleet.clock, NEXT)
    assert got["h1"].called and fired(got["h1"]).lease is renewed


def test_a_key_deleted_by_hand_while_waiting_queues_again(fleet: Fleet) -> None:
    got = ask(fleet, [0, 1])
    lease = fleet.hosts[1].keeper.current
    assert lease is not None
    fleet.fake.delete(KEYS.slot(APP, lease.id).encode())  # as etcdctl del
    advance(fleet.clock, 3)
    assert len(fleet.slot_keys()) == 2  # queued again
    fired(fired(got["h0"]).release())
    advance(fleet.clock, NEXT)
    assert got["h1"].called


def test_etcd_down_while_queueing_is_retried(fleet: Fleet) -> None:
    host = fleet.hosts[0]
    host.link.cut = True
    d = host.slots.acquire(APP, "web")
    advance(fleet.clock, 2)
    assert not d.called
    host.link.cut = False
    advance(fleet.clock, 5)
    assert d.called and fired(d).lease is host.keeper.current


def test_a_release_that_fails_is_retried_while_the_lease_lives(fleet: Fleet) -> None:
    got = ask(fleet, [0, 1])
    holder = fired(got["h0"])
    fleet.hosts[0].link.cut = True
    released = holder.release()
    advance(fleet.clock, 1)
    assert not released.called and not got["h1"].called
    fleet.hosts[0].link.cut = False
    advance(fleet.clock, 5)
    assert released.called and got["h1"].called
    assert not holder.lost


def polls_in(fleet: Fleet, seconds: float) -> list[int]:
    """How many times each host reads its app's queue in the next ``seconds``."""
    before = [h.link.count(KV_RANGE) for h in fleet.hosts]
    advance(fleet.clock, seconds, step=0.01)
    return [h.link.count(KV_RANGE) - b for h, b in zip(fleet.hosts, before, strict=True)]


def test_waiters_far_back_look_less_often() -> None:
    fleet = Fleet(limit=1, hosts=10)
    ask(fleet, list(range(10)))
    polls = polls_in(fleet, 10)
    # the holder looks no more; the next in line every POLL_INTERVAL, the second every two,
    # ... never less often than every MAX_POLL_INTERVAL
    expected = [0] + [10 / min(MAX_POLL_INTERVAL, POLL_INTERVAL * n) for n in range(1, 10)]
    assert polls == pytest.approx(expected, rel=0.1, abs=1)
    assert fleet.fake.count(KV_TXN) == 10  # one write each: waiting writes nothing
    fleet.stop()


def test_nudge_looks_at_once(fleet: Fleet) -> None:
    got = ask(fleet, [0, 1])
    fleet.fake.delete(str(fired(got["h0"]).key).encode())
    fleet.hosts[1].slots.nudge(APP)
    assert got["h1"].called


def test_an_app_whose_name_begins_another_does_not_share_its_queue(fleet: Fleet) -> None:
    short, long = "localhost:5000", "localhost:5000/foo:qa"
    held = fired(fleet.hosts[0].slots.acquire(long, "x"))
    assert fleet.hosts[1].slots.acquire(short, "y").called
    assert held.key is not None and held.key.startswith(KEYS.slots(short))


def test_a_lease_etcd_forgot_is_replaced_when_taking_a_slot(fleet: Fleet) -> None:
    host = fleet.hosts[0]
    old = host.keeper.current
    assert old is not None
    fleet.fake.revoke(old.id)  # gone in etcd; the keeper learns at the next keepalive
    slot = fired(host.slots.acquire(APP, "web"))
    assert not old.alive and "seen taking a slot" in str(old.lost_reason)
    assert slot.lease is host.keeper.current and slot.lease is not old
    assert fleet.slot_keys() == [slot.key]


class Phantom:
    """A gateway after which etcd forgets the next lease it grants at once (as if it expired
    before anyone used it)."""

    def __init__(self, gateway: Gateway, fake: FakeEtcd) -> None:
        self.gateway = gateway
        self.fake = fake
        self.armed = True

    async def request(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        answer = await self.gateway.request(path, body)
        if path == LEASE_GRANT and self.armed:
            self.armed = False
            self.fake.revoke(int(answer["ID"]))
        return answer


def test_a_lease_lost_as_soon_as_granted_is_not_used() -> None:
    clock = Clock()
    fake = FakeEtcd(clock, progress_interval=None)
    gateway = Phantom(Link(fake, clock).etcd, fake)
    keeper = LeaseKeeper(gateway, clock, ttl=TTL)
    slots = FleetSlots(gateway, keeper, KEYS, clock, hostname="h0")
    waiting = slots.acquire(APP, "web")
    fake.max_requests = 50  # a spin fails, not hangs
    keeper.startService()  # the waiter hears of the phantom lease first
    slot = fired(waiting)
    assert keeper.grants == 2 and keeper.losses == 1
    assert slot.lease is keeper.current and slot.lease is not None
    assert slot.lease.id in fake.leases
    assert fake.keys(KEYS.slots(APP)) == [slot.key]
    keeper.stopService()


def test_with_two_at_a_time_the_two_next_in_line_look_often() -> None:
    fleet = Fleet(limit=2, hosts=6)
    ask(fleet, list(range(6)))
    polls = polls_in(fleet, 10)
    # h0 and h1 hold; h2 and h3 are one release away, h4 and h5 two
    expected = [0, 0] + [10 / POLL_INTERVAL] * 2 + [10 / (2 * POLL_INTERVAL)] * 2
    assert polls == pytest.approx(expected, rel=0.1, abs=1)
    fleet.stop()


# -- sweeping keys nothing uses ---------------------------------------------------------------


def test_a_queue_write_applied_after_its_delete_is_swept(fleet: Fleet) -> None:
    h0, h1 = fleet.hosts[0], fleet.hosts[1]
    lease0, lease1 = h0.keeper.current, h1.keeper.current
    assert lease0 is not None and lease1 is not None
    fired(fired(h0.slots.acquire(APP, "h0-web")).release())
    assert (h0.slots.sweeps, h0.slots.swept) == (1, 0)  # the sweep after a release
    # h0's queue write to a member that hung is applied when it comes back, after the delete:
    late = KEYS.slot(APP, lease0.id)
    fleet.fake.put(late.encode(), b'{"host": "h0", "container": "h0-web", "since": 0}',
                   lease=lease0.id)
    other_app = KEYS.slot(OTHER, lease0.id)
    fleet.fake.put(other_app.encode(), b"{}", lease=lease0.id)
    waiting = h1.slots.acquire(APP, "h1-web")
    advance(fleet.clock, 2.0)
    assert not waiting.called, "the late key holds the line up"
    third = fired(h0.slots.acquire("myorg/third:qa", "h0-third"))  # in use here: kept
    assert fired(Deferred.fromCoroutine(h0.slots.sweep())) == 2
    assert fleet.slot_keys() == [KEYS.slot(APP, lease1.id)], "h1's own key is not h0's to sweep"
    assert fleet.fake.keys(KEYS.slots(OTHER)) == []
    assert fleet.fake.keys(KEYS.slots("myorg/third:qa")) == [
        KEYS.slot("myorg/third:qa", lease0.id)]
    advance(fleet.clock, NEXT)
    assert waiting.called
    assert fired(Deferred.fromCoroutine(h0.slots.sweep())) == 0
    assert (h0.slots.sweeps, h0.slots.swept) == (3, 2)
    fired(third.release())


def test_the_sweeper_runs_every_interval_and_survives_etcd_away(fleet: Fleet) -> None:
    host = fleet.hosts[0]
    lease = host.keeper.current
    assert lease is not None
    stale = KEYS.slot(APP, lease.id)
    fleet.fake.put(stale.encode(), b"{}", lease=lease.id)
    sweeper = SlotSweeper(host.slots, interval=1.0)
    host.link.cut = True
    sweeper.startService()  # a first sweep at once
    try:
        advance(fleet.clock, 1.5)
        assert fleet.slot_keys() == [stale], "etcd away: nothing swept, the sweeper goes on"
        assert sweeper.running
        host.link.cut = False
        advance(fleet.clock, 1.0)
        assert fleet.slot_keys() == []
        assert host.slots.swept == 1
    finally:
        sweeper.stopService()


def test_taking_its_own_leftover_key_rewrites_it_so_a_sweep_in_flight_misses(
    fleet: Fleet,
) -> None:
    host = fleet.hosts[0]
    lease = host.keeper.current
    assert lease is not None
    key = KEYS.slot(APP, lease.id)
    fleet.fake.put(key.encode(), b"{}", lease=lease.id)  # left by an earlier wait
    read = fleet.fake.kvs[key.encode()]
    slot = fired(host.slots.acquire(APP, "h0-web"))
    assert slot.key == key
    kept = fleet.fake.kvs[key.encode()]
    assert kept.create_revision == read.create_revision, "its place in line"
    assert kept.mod_revision > read.mod_revision
    # The delete of a sweep that read the key before it was taken: guarded, it misses.
    assert not fired(Deferred.fromCoroutine(delete(host.link.etcd, key, read.mod_revision)))
    assert fleet.slot_keys() == [key]
    fired(slot.release())
    assert fleet.slot_keys() == []


def test_a_release_deletes_only_the_key_it_created(fleet: Fleet) -> None:
    host = fleet.hosts[0]
    lease = host.keeper.current
    assert lease is not None
    slot = fired(host.slots.acquire(APP, "h0-web"))
    key = KEYS.slot(APP, lease.id)
    # As if the release were applied late, after a later wait of this host made the key anew:
    fleet.fake.delete(key.encode())
    fleet.fake.put(key.encode(), b"{}", lease=lease.id)
    fired(slot.release())
    assert fleet.slot_keys() == [key]


class HangingGateway:
    def __init__(self) -> None:
        self.asked: list[Deferred[Any]] = []

    def request(self, path: str, body: dict[str, Any]) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.asked.append(d)
        return d


def test_stopping_the_sweeper_gives_up_a_sweep_that_etcd_does_not_answer(
    fleet: Fleet,
) -> None:
    host = fleet.hosts[0]
    gateway = HangingGateway()
    slots = FleetSlots(gateway, host.keeper, KEYS, fleet.clock, hostname="h0")
    sweeper = SlotSweeper(slots, interval=60.0)
    sweeper.startService()
    assert len(gateway.asked) == 1
    stopped = sweeper.stopService()
    assert stopped.called, "not held up by the hung request"
    assert gateway.asked[0].called  # cancelled
