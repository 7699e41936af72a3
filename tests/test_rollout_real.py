"""Rollout slots, leases, pauses and host status on real etcd 3.4 (tests/stack/etcd_stack.py):
several simulated hosts in this process, each with the daemon's own etcd client (its own
connection pool), lease and slots. A host whose network is to be cut reaches etcd through a TCP
proxy of its own."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from deployer.etcd import Etcd, EtcdConfig
from deployer.rollout.fleet import FleetSlots, SlotSweeper
from deployer.rollout.gateway import LEASE_KEEPALIVE, get_prefix, put
from deployer.rollout.keys import RolloutKeys
from deployer.rollout.lease import LeaseKeeper
from deployer.rollout.pause import EtcdPauses, PauseRecord
from deployer.rollout.slots import Slot
from deployer.rollout.status import AppState, EtcdStatus, StatusPublisher
from deployer.timeouts import cancel_after
from tests.stack.etcd_stack import EtcdCluster, EtcdMember, TCPProxy, current_revision, etcdctl

pytestmark = pytest.mark.real

APP = "127.0.0.1:5000/myorg/app:qa"
TTL = 2
IMAGE = "sha256:" + "1" * 64


def now() -> float:
    return float(reactor.seconds())  # type: ignore[attr-defined]


async def sleep(seconds: float) -> None:
    await deferLater(reactor, seconds)


async def wait_for(predicate: Callable[[], bool], timeout: float = 15.0, what: str = "") -> None:
    deadline = now() + timeout
    while not predicate():
        if now() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await sleep(0.02)


def with_timeout(d: Deferred[Any], seconds: float) -> Deferred[Any]:
    return cancel_after(d, seconds, reactor)


def in_thread(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    return deferToThread(f, *args)


def client(urls: list[str]) -> Etcd:
    """The daemon's etcd client, as a host in fleet mode has it."""
    return Etcd(reactor, EtcdConfig(nodes=tuple(urls), dial_timeout=1.0))


class Keepalives:
    """The etcd client as the lease keeper uses it, noting when each keepalive that etcd
    answered was sent: etcd renewed the lease after that, so it lives at least TTL longer."""

    def __init__(self, etcd: Etcd) -> None:
        self.etcd = etcd
        self.answered: list[float] = []

    async def request(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        sent = now()
        reply = await self.etcd.request(path, body)
        if path == LEASE_KEEPALIVE:
            self.answered.append(sent)
        return reply


class Host:
    """One simulated host: its etcd client (a pool of its own), lease, slots and status
    publisher. With a ``proxy`` (to the one member in ``urls``) its network can be cut."""

    def __init__(self, name: str, urls: list[str], prefix: str, limit: int,
                 proxy: TCPProxy | None = None) -> None:
        self.name = name
        self.proxy = proxy
        self.etcd = client([proxy.url] if proxy is not None else urls)
        self.keys = RolloutKeys(prefix)
        self.keepalives = Keepalives(self.etcd)
        self.keeper = LeaseKeeper(self.keepalives, reactor, ttl=TTL, request_timeout=2.0)
        self.slots = FleetSlots(
            self.etcd, self.keeper, self.keys, reactor, hostname=name, limit=limit
        )
        self.status = StatusPublisher(self.etcd, self.keeper, self.keys, reactor, name)

    def cut(self) -> None:
        """The host loses its network: open connections break, new ones are refused."""
        assert self.proxy is not None, f"{self.name} has no proxy to cut"
        self.proxy.block()

    def reconnect(self) -> None:
        assert self.proxy is not None
        self.proxy.unblock()

    async def close(self) -> None:
        if self.proxy is not None:
            self.proxy.unblock()
        if self.keeper.running:
            await self.keeper.stopService()
        await self.etcd.close()


class Fleet:
    def __init__(self) -> None:
        self.hosts: list[Host] = []

    async def start(self, count: int, urls: list[str], prefix: str, limit: int = 1,
                    proxy: Callable[..., TCPProxy] | None = None) -> list[Host]:
        """``count`` hosts; with ``proxy`` (the ``tcp_proxy`` fixture), each behind its own
        proxy to ``urls[0]``."""
        hosts = [
            Host(f"h{i}", urls, prefix, limit,
                 proxy(urls[0], byte_by_byte=False) if proxy is not None else None)
            for i in range(count)
        ]
        self.hosts += hosts
        for host in hosts:
            host.keeper.startService()
        for host in hosts:
            await host.keeper.wait()
        return hosts

    async def close(self) -> None:
        for host in self.hosts:
            await host.close()


@pytest_twisted.async_yield_fixture
async def fleet() -> Any:
    f = Fleet()
    yield f
    await f.close()


class Recorder:
    """Who holds a slot, over time: the order they got it, and the most at once."""

    def __init__(self) -> None:
        self.order: list[str] = []
        self.holding: set[str] = set()
        self.most = 0
        self.got_at: list[float] = []
        self.freed_at: list[float] = []

    def got(self, name: str) -> None:
        self.got_at.append(now())
        self.order.append(name)
        self.holding.add(name)
        self.most = max(self.most, len(self.holding))

    def released(self, name: str) -> None:
        """``name`` gives its slot back (counted from here on as not holding it)."""
        self.holding.discard(name)

    def freed(self, name: str) -> None:
        """``name``'s release returned: its key is deleted in etcd."""
        self.freed_at.append(now())

    @property
    def handoffs(self) -> list[float]:
        """One at a time: from each release's delete done to the next holder's slot (an etcd
        write, whose fsync a loaded machine can stall for a second, is not counted; the next in
        line's answer, on another connection, can even come first)."""
        return [got - freed for freed, got in zip(self.freed_at, self.got_at[1:], strict=False)]


async def replace(host: Host, record: Recorder, hold: float, container: str = "web") -> Slot:
    """What a round does with a slot: take it, replace (here: wait ``hold``), release."""
    slot = await host.slots.acquire(APP, container)
    record.got(host.name)
    await sleep(hold)
    record.released(host.name)
    await slot.release()
    record.freed(host.name)
    return slot


async def ask_in_order(hosts: list[Host], order: list[int], record: Recorder,
                       hold: float) -> list[Deferred[Slot]]:
    """Each host in ``order`` asks once the one before has its key in etcd."""
    rounds = []
    for count, i in enumerate(order, 1):
        rounds.append(Deferred.fromCoroutine(replace(hosts[i], record, hold)))
        deadline = now() + 10
        while len(await slot_keys(hosts[i])) < count - len(record.order):
            assert now() < deadline, f"{hosts[i].name} did not queue"
            await sleep(0.02)
    return rounds


async def slot_keys(host: Host) -> list[str]:
    """The app's slot keys in etcd, in the order of the line."""
    _, kvs = await get_prefix(host.etcd, host.keys.slots(APP), sort_order="ASCEND",
                              sort_target="CREATE")
    return [kv.key for kv in kvs]


@pytest_twisted.ensureDeferred
async def test_four_hosts_are_served_in_the_order_they_asked(
    etcd: EtcdMember, etcd_prefix: str, fleet: Fleet
) -> None:
    hosts = await fleet.start(4, [etcd.client_url], etcd_prefix)
    record = Recorder()
    rounds = await ask_in_order(hosts, [2, 0, 3, 1], record, hold=0.3)
    for d in rounds:
        await with_timeout(d, 30)
    assert record.order == ["h2", "h0", "h3", "h1"]
    assert record.most == 1
    assert len(record.handoffs) == 3
    assert max(record.handoffs) < 0.5  # the next in line looks every 0.1 s
    print(f"handoffs: {', '.join(f'{h * 1000:.0f} ms' for h in record.handoffs)}")
    assert await slot_keys(hosts[0]) == []


@pytest_twisted.ensureDeferred
async def test_max_unavailable_two_holds_two_at_once_never_three(
    etcd: EtcdMember, etcd_prefix: str, fleet: Fleet
) -> None:
    hosts = await fleet.start(5, [etcd.client_url], etcd_prefix, limit=2)
    record = Recorder()
    hold = 1.5
    started = now()
    rounds = await ask_in_order(hosts, [0, 1, 2, 3, 4], record, hold=hold)
    for d in rounds:
        await with_timeout(d, 30)
    took = now() - started
    assert record.most == 2
    assert record.order[:2] == ["h0", "h1"] and sorted(record.order) == [f"h{i}" for i in range(5)]
    # three waves of two (3 holds and two handoffs), not five in a row (at least 5 holds,
    # which no run one at a time can beat)
    assert took < 5 * hold
    print(f"5 hosts, 2 at a time, {hold} s each: {took:.2f} s")


@pytest_twisted.ensureDeferred
async def test_a_holder_cut_off_frees_its_slot_after_the_ttl(
    etcd: EtcdMember, etcd_prefix: str, fleet: Fleet, tcp_proxy: Callable[..., TCPProxy]
) -> None:
    h0, h1 = await fleet.start(2, [etcd.client_url], etcd_prefix, proxy=tcp_proxy)
    held = await h0.slots.acquire(APP, "web")
    lease = h0.keeper.current
    assert lease is not None and held.lease is lease
    waiting = h1.slots.acquire(APP, "web")
    await wait_for(lambda: h1.slots.polls > 0, what="h1 to wait")
    cut = now()
    h0.cut()  # as if the host lost its network: no more keepalives
    slot = await with_timeout(waiting, 10)
    taken = now()
    took = taken - cut
    # Not before etcd can have let the lease expire: TTL after it renewed the lease for the
    # last time, which is after h0 sent the last keepalive that etcd answered (however late
    # a loaded machine sent it). At the latest TTL after the cut it expires, etcd's expiry
    # runs every 500 ms and revokes through raft, and the next in line looks every 0.1 s.
    renewed = max(h0.keepalives.answered, default=held.lease.granted)
    assert taken > renewed + TTL - 0.05, f"taken {renewed + TTL - taken:.2f}s before expiry"
    assert took < TTL + 3.0
    print(f"slot of a cut-off holder taken over {took:.2f} s after the cut, "
          f"{taken - renewed - TTL:.2f} s after the lease could expire (TTL {TTL} s)")
    await wait_for(lambda: held.lost, what="the holder to learn of the loss")
    assert "no keepalive answered" in str(held.lost_reason)
    assert "lost" in h0.keeper.reason and not h0.keeper.held
    assert await slot_keys(h1) == [slot.key]  # h0's key expired with its lease
    out = await in_thread(etcdctl, etcd.client_url, "lease", "timetolive", lease.hex)
    assert "already expired" in out
    # h0 finishes its replacement, and takes no new slot until it holds a lease again
    await held.release()  # etcd is out of reach, and the key went with the lease
    again = h0.slots.acquire(APP, "web-2")
    await slot.release()
    await sleep(0.5)
    assert not again.called
    h0.reconnect()
    renewed = await with_timeout(again, 10)
    assert renewed.lease is not None and renewed.lease is not lease and not renewed.lost
    await renewed.release()


@pytest_twisted.ensureDeferred
async def test_a_holder_whose_lease_is_revoked_learns_of_it_and_the_next_takes_over(
    etcd: EtcdMember, etcd_prefix: str, fleet: Fleet
) -> None:
    h0, h1 = await fleet.start(2, [etcd.client_url], etcd_prefix)
    held = await h0.slots.acquire(APP, "web")
    lost = held.when_lost()
    waiting = h1.slots.acquire(APP, "web")
    await wait_for(lambda: h1.slots.polls > 0)
    assert held.lease is not None
    await in_thread(etcdctl, etcd.client_url, "lease", "revoke", held.lease.hex)
    revoked = now()  # etcd has revoked it (starting etcdctl is not counted)
    await with_timeout(waiting, 5)
    assert now() - revoked < 1.0  # the next in line looks every 0.1 s
    reason = await with_timeout(lost, 5)
    assert now() - revoked < TTL / 3 + 1.0  # the holder's next keepalive tells it
    assert "TTL 0" in reason or "no longer knows" in reason
    await wait_for(lambda: h0.keeper.held, what="a new lease")
    assert h0.keeper.current is not held.lease


@pytest_twisted.ensureDeferred
async def test_giving_up_a_wait_deletes_the_key(
    etcd: EtcdMember, etcd_prefix: str, fleet: Fleet
) -> None:
    h0, h1 = await fleet.start(2, [etcd.client_url], etcd_prefix)
    held = await h0.slots.acquire(APP, "web")
    waiting = h1.slots.acquire(APP, "web")
    await wait_for(lambda: h1.slots.polls > 0)
    assert len(await slot_keys(h0)) == 2
    waiting.cancel()
    waiting.addErrback(lambda f: None)
    deadline = now() + 5
    while len(await slot_keys(h0)) != 1:
        assert now() < deadline, "the waiter's key is still there"
        await sleep(0.02)
    assert await slot_keys(h0) == [held.key]
    await held.release()


@pytest_twisted.ensureDeferred
async def test_a_queue_write_applied_after_its_delete_is_swept_and_the_line_moves(
    etcd: EtcdMember, etcd_prefix: str, fleet: Fleet
) -> None:
    h0, h1 = await fleet.start(2, [etcd.client_url], etcd_prefix)
    held = await h0.slots.acquire(APP, "web")
    key = held.key
    assert key is not None and held.lease is not None
    await held.release()
    # The sweep that follows a release (not waited for by it) is done before the late write:
    # this test is about the sweeps that come after.
    await wait_for(lambda: h0.slots.sweeps == 1, what="the sweep after the release")
    assert h0.slots.swept == 0
    # The queue write that a hung member applies when it comes back, after the delete:
    await put(h0.etcd, key, {"host": "h0", "container": "web", "since": now()}, held.lease.id)
    waiting = h1.slots.acquire(APP, "web")
    await sleep(1.0)
    assert not waiting.called, "the late key holds the line up"
    sweeper = SlotSweeper(h0.slots, interval=0.5)
    sweeper.startService()
    try:
        slot = await with_timeout(waiting, 5)
        assert h0.slots.swept == 1
        assert await slot_keys(h0) == [slot.key]
        await slot.release()
    finally:
        await sweeper.stopService()


@pytest_twisted.ensureDeferred
async def test_pause_round_trip_and_resume_of_an_app_not_paused(
    etcd: EtcdMember, etcd_prefix: str
) -> None:
    etcd_client = client([etcd.client_url])
    pauses = EtcdPauses(etcd_client, RolloutKeys(etcd_prefix))
    try:
        record = PauseRecord(APP, IMAGE, "sha256:" + "d" * 64, "h1", "unhealthy", 1.7e9)
        assert await pauses.pause(record) is True
        assert await pauses.get(APP) == record
        stored = etcdctl(etcd.client_url, "get", f"{etcd_prefix}/_/paused/{APP}",
                         "--print-value-only")
        assert json.loads(stored) == record.to_json()
        assert await pauses.all() == {APP: record}
        before = current_revision(etcd.client_url)
        assert await pauses.resume("myorg/other:qa") is False
        assert current_revision(etcd.client_url) == before  # nothing written
        assert await pauses.supersede(APP, IMAGE) is False
        assert await pauses.supersede(APP, "sha256:" + "2" * 64, None) is True
        assert await pauses.get(APP) is None
        assert await pauses.pause(record) is True
        assert await pauses.resume(APP) is True
        assert await pauses.all() == {}
    finally:
        await etcd_client.close()


@pytest_twisted.ensureDeferred
async def test_host_status_is_published_collected_and_goes_with_the_host(
    etcd: EtcdMember, etcd_prefix: str, fleet: Fleet, tcp_proxy: Callable[..., TCPProxy]
) -> None:
    hosts = await fleet.start(3, [etcd.client_url], etcd_prefix, proxy=tcp_proxy)
    for i, host in enumerate(hosts):
        await host.status.publish(
            {APP: AppState(IMAGE if i else "sha256:" + "0" * 64, None, ("web",), "healthy",
                           now(), "ok")}
        )
    held = await hosts[1].slots.acquire(APP, "web")
    waiting = hosts[2].slots.acquire(APP, "web")
    await wait_for(lambda: hosts[2].slots.polls > 0)
    etcd_client = client([etcd.client_url])
    status = EtcdStatus(etcd_client, RolloutKeys(etcd_prefix), reactor, limit=1)
    try:
        doc = await status.document()
        assert sorted(doc["hosts"]) == ["h0", "h1", "h2"]
        app = doc["apps"][APP]
        assert [i["hosts"] for i in app["images"]] == [["h1", "h2"], ["h0"]]
        assert [e["host"] for e in app["replacing"]] == ["h1"]
        assert [e["host"] for e in app["waiting"]] == ["h2"]
        assert app["paused"] is None
        hosts[2].cut()  # h2 goes: its status and its place in line expire
        await wait_for(lambda: not hosts[2].keeper.held, timeout=TTL + 3)
        # etcd lets the lease expire TTL after it received the last keepalive (later than
        # h2's count, from when it sent it); its expiry runs every 500 ms, then a revoke
        # through raft.
        deadline = now() + TTL + 3
        while True:
            doc = await status.document()
            gone = "h2" not in doc["hosts"] and not doc["apps"][APP]["waiting"]
            if gone or now() > deadline:
                break
            await sleep(0.1)
        assert sorted(doc["hosts"]) == ["h0", "h1"]
        assert doc["apps"][APP]["waiting"] == []
    finally:
        waiting.cancel()
        waiting.addErrback(lambda f: None)
        await held.release()
        await etcd_client.close()


@pytest_twisted.ensureDeferred
async def test_three_member_cluster_the_line_survives_the_loss_of_a_member(
    etcd_cluster: Callable[..., EtcdCluster], etcd_prefix: str, fleet: Fleet
) -> None:
    cluster = await in_thread(etcd_cluster, 3)
    leader, follower = await in_thread(cluster.leader_first_follower)
    other = 3 - leader - follower
    # Every host talks to a follower first: its loss costs no election, which under load could
    # take longer than a lease's slack (TTL 2 s, keepalives every 2/3 s).
    urls = [cluster.urls[i] for i in (follower, leader, other)]
    hosts = await fleet.start(3, urls, etcd_prefix)
    record = Recorder()
    rounds = await ask_in_order(hosts, [1, 2, 0], record, hold=1.0)
    await in_thread(cluster.members[follower].kill)  # the member every host talks to first
    for d in rounds:
        await with_timeout(d, 30)
    assert record.order == ["h1", "h2", "h0"] and record.most == 1
    assert all(h.keeper.losses == 0 for h in hosts)


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_fifty_hosts_three_at_a_time(
    etcd: EtcdMember, etcd_prefix: str, fleet: Fleet
) -> None:
    hosts = await fleet.start(50, [etcd.client_url], etcd_prefix, limit=3)
    record = Recorder()
    started = now()
    # Holds of 0.5 s: under load a handoff (a delete, then the next poll) took 0.44 s a wave,
    # which against holds of 0.2 s brought 17 waves past 50 holds.
    hold = 0.5
    rounds = [Deferred.fromCoroutine(replace(h, record, hold=hold)) for h in hosts]
    for d in rounds:
        await with_timeout(d, 60)
    took = now() - started
    assert record.most == 3
    assert sorted(record.order) == sorted(h.name for h in hosts)
    polls = sum(h.slots.polls for h in hosts)
    print(f"50 hosts, 3 at a time, {hold} s each: {took:.2f} s (ideal {50 / 3 * hold:.2f} s),"
          f" {polls} queue reads ({polls / took:.0f}/s)")
    # Faster than one at a time (50 holds, before any handoff); record.most says three at once.
    assert took < 50 * hold
