"""deployer.etcd against real etcd 3.4 processes (see tests/stack/etcd_stack.py)."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThread

from deployer.errors import EtcdUnavailable
from deployer.etcd import Etcd, EtcdConfig, WatchService
from deployer.etcd.watch import MAX_BACKOFF
from deployer.model import Update
from tests.stack.etcd_stack import (
    EtcdCluster,
    EtcdMember,
    TCPProxy,
    current_revision,
    etcdctl,
    free_port,
    wait_for,
)

pytestmark = pytest.mark.real


class Collector:
    """The on_update callback of a watch: keeps every update, in order."""

    def __init__(self) -> None:
        self.updates: list[Update] = []

    def __call__(self, update: Update) -> None:
        self.updates.append(update)

    def count(self, pattern: str) -> int:
        return sum(1 for u in self.updates if u.pattern == pattern)

    def counts(self) -> collections.Counter[str]:
        return collections.Counter(u.pattern for u in self.updates)


class Clients:
    """Etcd instances and watches of one test; all stopped and closed after it."""

    def __init__(self) -> None:
        self.etcds: list[Etcd] = []
        self.watches: list[WatchService] = []

    def etcd(self, nodes: tuple[str, ...] | list[str], prefix: str,
             max_backoff: float = MAX_BACKOFF, **config: Any) -> Etcd:
        # The daemon's default: a write's budget (members x dial_timeout) covers the batches
        # ahead of it, each of them one fsync that a loaded machine can stall for a second.
        config.setdefault("dial_timeout", 5.0)
        config.setdefault("retry_delay", 0.1)
        settings = EtcdConfig(nodes=tuple(nodes), prefix=prefix, **config)
        etcd = Etcd(reactor, settings, max_backoff=max_backoff)
        self.etcds.append(etcd)
        return etcd

    def watch(self, etcd: Etcd, on_update: Callable[[Update], object]) -> WatchService:
        service = etcd.watch(on_update)
        self.watches.append(service)
        service.startService()
        return service

    async def close(self) -> None:
        for service in self.watches:
            if service.running:
                await service.stopService()
        for etcd in self.etcds:
            await etcd.close()


@pytest_twisted.async_yield_fixture
async def clients() -> Any:
    c = Clients()
    yield c
    await c.close()


def in_thread(f: Callable[..., Any], *args: Any) -> Deferred[Any]:
    """Blocking stack helpers (process start/stop, etcdctl) without blocking the reactor."""
    return deferToThread(f, *args)


def update(repository: str, tag: str | None = None, **kw: Any) -> Update:
    kw.setdefault("source", "test")
    kw.setdefault("received", 1700000000.25)
    return Update(repository=repository, tag=tag, **kw)


@pytest_twisted.ensureDeferred
async def test_record_is_delivered_to_another_instance(
    etcd: EtcdMember, etcd_prefix: str, clients: Clients
) -> None:
    writer = clients.etcd([etcd.client_url], etcd_prefix)
    reader = clients.etcd([etcd.client_url], etcd_prefix)
    got = Collector()
    watch = clients.watch(reader, got)
    await wait_for(lambda: watch.live, what="the watch to be live")
    assert watch.reason == ""

    sent = update("myorg/foo", "qa", registry="127.0.0.1:5000",
                  digest="sha256:" + "ab" * 32, event_id="ev-1", source="registry")
    revision = await writer.record(sent)
    assert revision > 0
    await wait_for(lambda: len(got.updates) == 1)
    assert got.updates == [sent]
    assert watch.revision >= revision
    assert writer.key_for(sent) == f"{etcd_prefix}/127.0.0.1:5000/myorg/foo:qa"
    stored = etcdctl(etcd.client_url, "get", writer.key_for(sent), "--print-value-only")
    assert json.loads(stored)["event_id"] == "ev-1"


@pytest_twisted.ensureDeferred
async def test_etcdctl_put_deploys_and_del_does_not(
    etcd: EtcdMember, etcd_prefix: str, clients: Clients
) -> None:
    reader = clients.etcd([etcd.client_url], etcd_prefix + "/")  # a trailing slash is fine
    got = Collector()
    watch = clients.watch(reader, got)
    await wait_for(lambda: watch.live)

    url = etcd.client_url
    await in_thread(etcdctl, url, "put", f"{etcd_prefix}/myorg/foo", "anything")
    await wait_for(lambda: len(got.updates) == 1)
    (foo,) = got.updates
    assert (foo.repository, foo.registry, foo.tag, foo.source) == ("myorg/foo", None, None, "etcd")

    # None of these deploy anything: a delete, reserved state, an invalid key, a sibling prefix.
    await in_thread(etcdctl, url, "del", f"{etcd_prefix}/myorg/foo")
    await in_thread(etcdctl, url, "put", f"{etcd_prefix}/_/lock/host1", "x")
    await in_thread(etcdctl, url, "put", f"{etcd_prefix}/Not A Repo", "x")
    await in_thread(etcdctl, url, "put", f"{etcd_prefix}2/myorg/sibling", "x")
    await in_thread(etcdctl, url, "put", f"{etcd_prefix}/myorg/marker:v1", "x")
    await wait_for(lambda: len(got.updates) == 2)
    assert [u.pattern for u in got.updates] == ["myorg/foo", "myorg/marker:v1"]


@pytest_twisted.ensureDeferred
async def test_a_write_applied_twice_deploys_once(
    etcd: EtcdMember, etcd_prefix: str, clients: Clients
) -> None:
    writer = clients.etcd([etcd.client_url], etcd_prefix)
    got = Collector()
    watch = clients.watch(clients.etcd([etcd.client_url], etcd_prefix), got)
    await wait_for(lambda: watch.live)
    sent = update("myorg/foo", "qa", event_id="ev-1")
    await writer.record(sent)
    # The same write again, as a member that answered too late applies it after the retry.
    await writer.record(sent)
    url, key = etcd.client_url, writer.key_for(sent)
    # An operator's value put twice triggers twice, as with the Go original.
    await in_thread(etcdctl, url, "put", f"{etcd_prefix}/myorg/bar", "anything")
    await in_thread(etcdctl, url, "put", f"{etcd_prefix}/myorg/bar", "anything")
    newer = sent.evolve(received=sent.received + 1, event_id="ev-2")
    await writer.record(newer)
    await wait_for(lambda: len(got.updates) == 4)
    assert got.updates == [sent, got.updates[1], got.updates[2], newer]
    assert [u.pattern for u in got.updates[1:3]] == ["myorg/bar", "myorg/bar"]
    (stored,) = json.loads(etcdctl(url, "get", key, "-w", "json"))["kvs"]
    assert stored["version"] == 3, "the key was written three times"


@pytest_twisted.ensureDeferred
async def test_catch_up_delivers_recorded_keys_once_at_start(
    etcd: EtcdMember, etcd_prefix: str, clients: Clients
) -> None:
    writer = clients.etcd([etcd.client_url], etcd_prefix)
    old_bar = update("myorg/bar", event_id="old")
    latest = [update("myorg/foo", "qa"), update("*"), update("myorg/bar", event_id="new")]
    for u in [old_bar, *latest]:
        await writer.record(u)
    await in_thread(etcdctl, etcd.client_url, "put", f"{etcd_prefix}/_/status/host1", "up")

    reader = clients.etcd([etcd.client_url], etcd_prefix, strong_consistency=True)
    got = Collector()
    watch = clients.watch(reader, got)
    await wait_for(lambda: watch.live)
    assert sorted(got.updates, key=lambda u: u.pattern) == sorted(latest, key=lambda u: u.pattern)

    marker = update("myorg/marker")
    await writer.record(marker)
    await wait_for(lambda: len(got.updates) == 4)
    assert got.updates[-1] == marker
    assert max(got.counts().values()) == 1


@pytest_twisted.ensureDeferred
async def test_group_commit_batches_concurrent_writes(
    etcd: EtcdMember, etcd_prefix: str, clients: Clients
) -> None:
    writer = clients.etcd([etcd.client_url], etcd_prefix)
    updates = [update(f"myorg/app{i}", "qa", event_id=str(i)) for i in range(200)]
    first_dup = update("myorg/dup", event_id="first")
    last_dup = update("myorg/dup", event_id="last")
    ds = [writer.record(u) for u in updates]
    # Both go into the same (second) batch: etcd refuses a key twice in one txn.
    dup_ds = [writer.record(first_dup), writer.record(last_dup)]
    revisions = await gatherResults(ds)
    dup_revisions = await gatherResults(dup_ds)

    # One txn for the first write, then the 201 others in batches of at most 128 ops.
    assert writer.transactions == 3
    assert len(set(revisions)) == 3
    assert max(revisions) - min(revisions) == 2
    assert dup_revisions[0] == dup_revisions[1]

    _, kvs = await writer.read_all(etcd.client_url)
    stored = {kv.key: kv for kv in kvs}
    assert len(stored) == 201
    for u, rev in zip(updates, revisions, strict=True):
        assert stored[writer.key_for(u).encode()].mod_revision == rev
    dup = stored[writer.key_for(last_dup).encode()]
    assert dup.mod_revision == dup_revisions[0]
    assert json.loads(dup.value)["event_id"] == "last"


@pytest_twisted.ensureDeferred
async def test_watch_through_a_byte_by_byte_proxy_loses_nothing(
    etcd: EtcdMember, etcd_prefix: str, clients: Clients, tcp_proxy: Callable[..., TCPProxy]
) -> None:
    proxy = tcp_proxy(etcd.client_url, byte_by_byte=True, pace=0.00005)
    writer = clients.etcd([etcd.client_url], etcd_prefix)
    reader = clients.etcd([proxy.url], etcd_prefix)
    got = Collector()
    watch = clients.watch(reader, got)
    await wait_for(lambda: watch.live)

    sent = [update(f"myorg/app{i}", "qa", event_id=f"ev-{i}") for i in range(20)]
    for u in sent:
        await writer.record(u)
    await wait_for(lambda: len(got.updates) >= 20, timeout=20)
    # A unary answer cut into single bytes too.
    through_proxy = update("myorg/via-proxy")
    await reader.record(through_proxy)
    await wait_for(lambda: len(got.updates) >= 21)
    assert got.updates == [*sent, through_proxy]
    assert watch.reconnects == 0
    assert proxy.bytes_down > 20 * 300


@pytest_twisted.ensureDeferred
async def test_compaction_during_an_outage_causes_a_full_resync(
    etcd_cluster: Callable[..., EtcdCluster],
    etcd_prefix: str,
    clients: Clients,
    tcp_proxy: Callable[..., TCPProxy],
) -> None:
    (member,) = (await in_thread(etcd_cluster, 1)).members
    proxy = tcp_proxy(member.client_url, byte_by_byte=False)
    writer = clients.etcd([member.client_url], etcd_prefix)
    # Backoff capped at 1 s: however long the outage below lasts (writes, an etcdctl process),
    # the watch tries again within a second of the unblock.
    reader = clients.etcd([proxy.url], etcd_prefix, retry_delay=0.05, max_backoff=1.0)
    got = Collector()
    watch = clients.watch(reader, got)
    await wait_for(lambda: watch.live)
    a, b, c = update("myorg/a"), update("myorg/b"), update("myorg/c")
    for u in (a, b, c):
        await writer.record(u)
    await wait_for(lambda: len(got.updates) == 3)
    seen = watch.revision

    proxy.block()
    await wait_for(lambda: not watch.live, what="the watch to notice the cut")
    a2, c2 = update("myorg/a", event_id="a2"), update("myorg/c", event_id="c2")
    d1, d2 = update("myorg/d", event_id="d1"), update("myorg/d", event_id="d2")
    for u in (a2, d1, d2):
        await writer.record(u)
    revision = await writer.record(c2)
    await in_thread(etcdctl, member.client_url, "compact", str(revision))
    assert revision > seen + 1

    del got.updates[:]
    proxy.unblock()
    await wait_for(lambda: watch.live and watch.resyncs == 1, what="a resync")
    assert sorted(got.updates, key=lambda u: u.pattern) == [a2, b, c2, d2]

    e = update("myorg/e")
    await writer.record(e)
    await wait_for(lambda: len(got.updates) == 5)
    assert got.updates[-1] == e
    assert watch.resyncs == 1


@pytest_twisted.ensureDeferred
async def test_cluster_member_in_use_dies(
    etcd_cluster: Callable[..., EtcdCluster], etcd_prefix: str, clients: Clients
) -> None:
    cluster = await in_thread(etcd_cluster, 3)
    leader, follower = await in_thread(cluster.leader_first_follower)
    other = 3 - leader - follower
    # The member in use is a follower, so the survivors keep their leader and the write right
    # after the kill needs no election.
    order = [cluster.urls[follower], cluster.urls[leader], cluster.urls[other]]
    writer = clients.etcd(order, etcd_prefix)
    # The watch waits 2-4 s before it moves, so that u2 below (a failover and one commit, which
    # a loaded machine can hold up for a second or more) is written while it is down.
    reader = clients.etcd(order, etcd_prefix, retry_delay=4.0)
    got = Collector()
    watch = clients.watch(reader, got)
    await wait_for(lambda: watch.live)

    states: list[bool] = []
    sampler = LoopingCall(lambda: states.append(watch.live))
    sampler.clock = reactor
    sampler.start(0.005)
    try:
        u1 = update("myorg/one")
        await writer.record(u1)
        await wait_for(lambda: len(got.updates) == 1)
        assert reader.members.current == writer.members.current == 0

        await in_thread(cluster.keep_leader_off, follower)  # or u2 would wait for an election
        await in_thread(cluster.members[follower].stop, signal.SIGKILL)
        u2 = update("myorg/two")
        revision = await writer.record(u2)  # written while the watch moves
        assert writer.members.current == 1
        assert not watch.live
        await wait_for(lambda: len(got.updates) == 2, what="the write made during the move")
        assert got.updates == [u1, u2]
        assert watch.live
        assert watch.revision >= revision
        assert reader.members.current == 1
        assert watch.reconnects >= 1
    finally:
        sampler.stop()
    assert False in states and states[-1] is True
    assert states.index(False) > 0  # it was live, went down, came back

    u3 = update("myorg/three")
    await writer.record(u3)
    await wait_for(lambda: len(got.updates) == 3)
    assert got.updates == [u1, u2, u3]


@pytest_twisted.ensureDeferred
async def test_single_member_restart_while_watch_backs_off(
    etcd_cluster: Callable[..., EtcdCluster],
    etcd_prefix: str,
    clients: Clients,
    tcp_proxy: Callable[..., TCPProxy],
) -> None:
    (member,) = (await in_thread(etcd_cluster, 1)).members
    # The watch reaches the member through a proxy, which turns its retries away until the
    # write below is acknowledged, however fast the member restarts.
    proxy = tcp_proxy(member.client_url, byte_by_byte=False)
    reader = clients.etcd([proxy.url], etcd_prefix, retry_delay=0.2, max_backoff=1.0)
    got = Collector()
    watch = clients.watch(reader, got)
    await wait_for(lambda: watch.live)
    await in_thread(etcdctl, member.client_url, "put", f"{etcd_prefix}/myorg/before", "x")
    await wait_for(lambda: len(got.updates) == 1)

    await in_thread(member.stop, signal.SIGTERM)
    await wait_for(lambda: not watch.live, what="the watch to see its member go")
    proxy.block()
    await wait_for(lambda: watch.reconnects >= 2, what="the watch to retry twice")
    await in_thread(member.start)
    await in_thread(member.wait_ready)
    await in_thread(etcdctl, member.client_url, "put", f"{etcd_prefix}/myorg/after", "x")
    assert not watch.live, "the watch got through the blocked proxy"
    proxy.unblock()

    await wait_for(lambda: len(got.updates) == 2, what="the write made during the backoff")
    assert watch.live
    await in_thread(etcdctl, member.client_url, "put", f"{etcd_prefix}/myorg/marker", "x")
    await wait_for(lambda: len(got.updates) == 3)
    assert [u.pattern for u in got.updates] == ["myorg/before", "myorg/after", "myorg/marker"]


@pytest_twisted.ensureDeferred
async def test_progress_notifications_advance_the_resume_revision(
    etcd_cluster: Callable[..., EtcdCluster], etcd_prefix: str, clients: Clients
) -> None:
    interval = ["--experimental-watch-progress-notify-interval", "200ms"]
    (member,) = (await in_thread(etcd_cluster, 1, True, interval)).members
    url = member.client_url
    reader = clients.etcd([url], etcd_prefix)
    got = Collector()
    watch = clients.watch(reader, got)
    await wait_for(lambda: watch.live)
    # Writes outside the prefix: no event reaches the watch, only progress notifications (one
    # may arrive at any moment, so the watch's revision is taken before the writes).
    before = watch.revision
    for i in range(3):
        await in_thread(etcdctl, url, "put", f"/elsewhere/{i}", "x")
    revision = await in_thread(current_revision, url)
    assert before < revision
    await wait_for(lambda: watch.revision >= revision, timeout=5, what="a progress notification")
    assert got.updates == []
    await in_thread(etcdctl, url, "put", f"{etcd_prefix}/myorg/foo", "x")
    await wait_for(lambda: len(got.updates) == 1)
    assert watch.revision == revision + 1


@pytest_twisted.ensureDeferred
async def test_record_fails_when_no_member_answers(etcd_prefix: str, clients: Clients) -> None:
    dead = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]
    writer = clients.etcd(dead, etcd_prefix, dial_timeout=1.0)
    results = await DeferredList([writer.record(update("myorg/foo"))], consumeErrors=True)
    ((ok, failure),) = results
    assert not ok
    assert failure.check(EtcdUnavailable)
    message = str(failure.value)
    assert dead[0] in message and dead[1] in message
    assert "refused" in message.lower()


@contextlib.contextmanager
def silent_listener(connect_hangs: bool) -> Iterator[str]:
    """The URL of a TCP port that never answers. The kernel completes the handshake of the
    first connections, but nothing ever accepts them; with ``connect_hangs`` the accept queue is
    filled first, so a new connection never completes."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        if connect_hangs:
            for _ in range(3):
                filler = socket.socket()
                filler.setblocking(False)
                filler.connect_ex(address)
                fillers.append(filler)
        yield f"http://127.0.0.1:{address[1]}"
    finally:
        for s in [*fillers, listener]:
            s.close()


@pytest.mark.parametrize("connect_hangs", [False, True], ids=["no-answer", "no-connect"])
@pytest_twisted.ensureDeferred
async def test_stop_while_the_member_never_answers(
    connect_hangs: bool, etcd_prefix: str, clients: Clients
) -> None:
    """What SIGTERM does: stopService must fire at once, not back off and retry."""
    with silent_listener(connect_hangs) as url:
        reader = clients.etcd([url], etcd_prefix, dial_timeout=30.0)
        watch = clients.watch(reader, Collector())
        await deferLater(reactor, 0.3)
        assert not watch.live
        assert watch.reconnects == 0, "the first request is still waiting"
        # A cancelled Deferred is "called" at once while it waits for another: watch the result.
        stopped: list[object] = []
        watch.stopService().addBoth(stopped.append)
        await wait_for(lambda: bool(stopped), timeout=1.0, what="stopService to fire")
        assert stopped == [None]
        assert watch.reason == "stopped"
        await deferLater(reactor, 0.3)
        assert watch.reconnects == 0


@pytest_twisted.ensureDeferred
async def test_a_member_that_lost_its_leader_is_not_watched_silently(
    etcd_cluster: Callable[..., EtcdCluster], etcd_prefix: str, clients: Clients
) -> None:
    """The two other members freeze: the member in use has no leader any more. Its gateway would
    keep a plain watch open and silent; the watch must end and say why."""
    cluster = await in_thread(etcd_cluster, 3)
    config = EtcdConfig(nodes=cluster.urls, prefix=etcd_prefix, dial_timeout=1.0,
                        retry_delay=0.1)
    reader = Etcd(reactor, config, max_backoff=1.0)
    clients.etcds.append(reader)
    got = Collector()
    watch = clients.watch(reader, got)
    await wait_for(lambda: watch.live)
    assert reader.members.current == 0

    frozen: list[int] = []
    try:
        for member in cluster.members[1:]:
            assert member.process is not None
            os.kill(member.process.pid, signal.SIGSTOP)
            frozen.append(member.process.pid)
        await wait_for(lambda: not watch.live, timeout=15, what="the leaderless watch to end")
        # The reason stays until the next attempt fails: a frozen member times out after 1 s.
        reason = watch.reason
    finally:
        for pid in frozen:
            os.kill(pid, signal.SIGCONT)
    assert reason.startswith(cluster.urls[0] + ": ")
    assert "no leader" in reason

    # Back to normal once the others wake up: nothing written meanwhile is lost.
    await wait_for(lambda: watch.live, timeout=15, what="the watch to come back")
    await in_thread(etcdctl, cluster.urls, "put", f"{etcd_prefix}/myorg/after", "x")
    await wait_for(lambda: len(got.updates) == 1)
    assert got.updates[0].pattern == "myorg/after"


_FOOTPRINT = """
import sys
from twisted.internet import task
from deployer.etcd import Etcd, EtcdConfig
from deployer.model import Update

async def main(reactor):
    etcd = Etcd(reactor, EtcdConfig(nodes=(sys.argv[1],), prefix=sys.argv[2]))
    got = []
    watch = etcd.watch(got.append)
    watch.startService()
    await etcd.record(Update("myorg/footprint", source="test", received=1.0, tag="qa"))
    while not got:
        await task.deferLater(reactor, 0.02)
    await watch.stopService()
    await etcd.close()
    heavy = sorted(m for m in ("txaioetcd", "numpy", "zlmdb") if m in sys.modules)
    print(",".join(heavy) or "none")

task.react(lambda reactor: __import__("twisted.internet.defer").internet.defer
           .Deferred.fromCoroutine(main(reactor)))
"""


def test_writing_and_watching_load_only_the_value_types(etcd: Any, etcd_prefix: str) -> None:
    """txaioetcd's package (and the numpy behind its LMDB layer) stays out of the daemon."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _FOOTPRINT, etcd.client_url, etcd_prefix],
                          capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert done.stdout.decode().strip() == "none"
