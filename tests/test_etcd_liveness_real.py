"""etcd liveness against real etcd members stopped with SIGSTOP (they keep their ports and
answer nothing): the member in use is noticed within about 2 x dial_timeout, the watch and
writes fail over, every write is answered within members x dial_timeout of its arrival, and all
recovers on SIGCONT. Bounds get a margin for a loaded machine (MARGIN)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall, deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure

from deployer.errors import EtcdUnavailable
from deployer.etcd import Etcd, EtcdConfig, WatchService
from deployer.model import Update
from tests.stack.etcd_stack import EtcdCluster, wait_for

pytestmark = pytest.mark.real

T = 2.0  # dial_timeout
MARGIN = 1.5


class Answer:
    """When a Deferred fired, on the reactor's clock, and with what."""

    def __init__(self, d: Deferred[Any]) -> None:
        self.sent = reactor.seconds()
        self.at: float | None = None
        self.result: Any = None

        def done(result: Any) -> None:
            self.at, self.result = reactor.seconds(), result

        d.addBoth(done)

    @property
    def answered(self) -> bool:
        return self.at is not None

    @property
    def after(self) -> float:
        assert self.at is not None, "not answered"
        return self.at - self.sent

    @property
    def failed(self) -> bool:
        return isinstance(self.result, Failure)


class Txn:
    """One group-commit transaction: the member it went to, when, and when and how it ended."""

    def __init__(self, url: str, d: Deferred[Any]) -> None:
        self.url = url
        self.sent = reactor.seconds()
        self.at: float | None = None
        self.failure: Failure | None = None

        def done(result: Any) -> Any:
            self.at = reactor.seconds()
            self.failure = result if isinstance(result, Failure) else None
            return result

        d.addBoth(done)

    @property
    def ended(self) -> float:
        assert self.at is not None, f"no answer from {self.url}"
        return self.at

    @property
    def took(self) -> float:
        return self.ended - self.sent


def record_txns(etcd: Etcd) -> list[Txn]:
    """Every transaction ``etcd`` sends from now on, in order."""
    txns: list[Txn] = []
    call = etcd.gateway.call

    def recorded(url: str, path: str, body: dict[str, Any],
                 timeout: float | None = None) -> Deferred[dict[str, Any]]:
        d = call(url, path, body, timeout)
        if path == "/v3/kv/txn":
            txns.append(Txn(url, d))
        return d

    etcd.gateway.call = recorded  # type: ignore[method-assign]
    return txns


class Liveness:
    """When ``watch.live`` last changed, sampled every 20 ms."""

    def __init__(self, watch: WatchService) -> None:
        self.watch = watch
        self.changes: list[tuple[float, bool]] = [(reactor.seconds(), watch.live)]
        self._loop = LoopingCall(self._sample)
        self._loop.clock = reactor
        self._loop.start(0.02)

    def _sample(self) -> None:
        if self.watch.live != self.changes[-1][1]:
            self.changes.append((reactor.seconds(), self.watch.live))

    def down_since(self, since: float) -> float:
        """Seconds from ``since`` until the watch was first seen not live."""
        self._sample()
        downs = [t for t, live in self.changes if t >= since and not live]
        assert downs, f"not seen down since {since}: {self.changes}"
        return downs[0] - since

    def stop(self) -> None:
        self._loop.stop()


@pytest_twisted.async_yield_fixture
async def fleet_etcd(etcd_prefix: str) -> Any:
    """``make(urls, dial_timeout=T)``: an Etcd on ``urls``; its watch started by ``watch``."""
    made: list[tuple[Etcd, list[WatchService]]] = []

    def make(urls: tuple[str, ...], dial_timeout: float = T) -> tuple[Etcd, Callable[..., Any]]:
        config = EtcdConfig(nodes=urls, prefix=etcd_prefix, dial_timeout=dial_timeout,
                            retry_delay=0.2)
        etcd = Etcd(reactor, config, max_backoff=1.0)
        watches: list[WatchService] = []
        made.append((etcd, watches))

        def watch(on_update: Callable[[Update], object]) -> WatchService:
            service = etcd.watch(on_update)
            watches.append(service)
            service.startService()
            return service

        return etcd, watch

    yield make
    for etcd, watches in made:
        for service in watches:
            if service.running:
                await service.stopService()
        await etcd.close()


def update(name: str) -> Update:
    return Update(repository=name, source="test", received=1.0)


def names(got: list[Update]) -> list[str]:
    return [u.pattern for u in got]


@pytest_twisted.ensureDeferred
async def test_the_member_in_use_hangs(
    etcd_cluster: Callable[..., EtcdCluster], fleet_etcd: Any
) -> None:
    cluster: EtcdCluster = await deferToThread(etcd_cluster, 3)
    leader, follower = await deferToThread(cluster.leader_first_follower)
    other = 3 - leader - follower
    # The member in use is a follower: the others keep their leader and need no election.
    order = (cluster.urls[follower], cluster.urls[leader], cluster.urls[other])
    etcd, watch_with = fleet_etcd(order)
    got: list[Update] = []
    watch = watch_with(got.append)
    await wait_for(lambda: watch.live, what="the watch")
    await etcd.record(update("myorg/before"))
    await wait_for(lambda: names(got) == ["myorg/before"])
    await deferToThread(cluster.keep_leader_off, follower)
    seen = Liveness(watch)
    txns = record_txns(etcd)
    try:
        with cluster.frozen(cluster.members[follower]):
            frozen_at = reactor.seconds()
            at_once = Answer(etcd.record(update("myorg/at-once")))
            await wait_for(lambda: not watch.live and etcd.members.current == 1,
                           timeout=2 * T + MARGIN, what="the hung member to be noticed")
            assert seen.down_since(frozen_at) <= 2 * T + MARGIN
            assert watch.reason.startswith(order[0] + ": ")
            assert "liveness check" in watch.reason or "timed out" in watch.reason
            later = Answer(etcd.record(update("myorg/later")))
            await wait_for(lambda: at_once.answered and later.answered, timeout=3 * T + MARGIN)
            assert not at_once.failed and not later.failed, (at_once.result, later.result)
            # The writes are bounded by what they went through, not by how long the leader
            # (on a loaded machine) takes to commit: one timeout on the hung member, then the
            # next member at once, and nothing on the hung member after that.
            hung, *rest = txns
            assert hung.url == order[0] and hung.failure is not None, [t.url for t in txns]
            assert hung.took <= T + MARGIN
            assert rest and {t.url for t in rest} == {order[1]}, [t.url for t in txns]
            assert all(t.at is not None and t.failure is None for t in rest)
            assert rest[0].sent - hung.ended <= 0.1, "retried on the next member at once"
            assert at_once.after <= T + MARGIN + rest[0].took
            # On the hung member it would have waited a whole timeout: it went to the next one,
            # at most behind the rest of the transaction in flight there when it came.
            assert later.sent >= hung.sent
            waited = max(0.0, hung.ended - later.sent)
            assert later.after <= waited + sum(t.took for t in rest) + 0.1
            await wait_for(lambda: watch.live, timeout=T + MARGIN, what="the watch to come back")
            await wait_for(lambda: {"myorg/at-once", "myorg/later"} <= set(names(got)),
                           what="the writes made during the hang")
        # Back from SIGSTOP: nothing lost, nothing stuck.
        await etcd.record(update("myorg/after"))
        await wait_for(lambda: names(got)[-1:] == ["myorg/after"])
        assert watch.live
        assert sorted(names(got)) == sorted(
            ["myorg/before", "myorg/at-once", "myorg/later", "myorg/after"])
    finally:
        seen.stop()


@pytest_twisted.ensureDeferred
async def test_every_member_hangs(
    etcd_cluster: Callable[..., EtcdCluster], fleet_etcd: Any
) -> None:
    cluster: EtcdCluster = await deferToThread(etcd_cluster, 3)
    etcd, watch_with = fleet_etcd(cluster.urls)
    got: list[Update] = []
    watch = watch_with(got.append)
    await wait_for(lambda: watch.live, what="the watch")
    seen = Liveness(watch)
    budget = len(cluster.members) * T
    try:
        with cluster.frozen(*cluster.members):
            frozen_at = reactor.seconds()
            first = Answer(etcd.record(update("myorg/first")))
            await deferLater(reactor, 0.5)
            second = Answer(etcd.record(update("myorg/second")))
            await wait_for(lambda: not watch.live, timeout=2 * T + MARGIN,
                           what="the watch to say it is down")
            assert seen.down_since(frozen_at) <= 2 * T + MARGIN
            await wait_for(lambda: first.answered and second.answered,
                           timeout=budget + MARGIN, what="both writes to be answered")
            for write in (first, second):
                assert write.failed and write.result.check(EtcdUnavailable), write.result
                assert write.after <= budget + MARGIN
            reason = watch.reason
            assert not watch.live and reason.startswith("http://127.0.0.1:")
        assert "timed out" in reason or "liveness check" in reason
        await wait_for(lambda: watch.live, timeout=15, what="the watch to recover")
        await etcd.record(update("myorg/recovered"))
        await wait_for(lambda: "myorg/recovered" in names(got), what="the watch to deliver")
    finally:
        seen.stop()


@pytest_twisted.ensureDeferred
async def test_one_member_with_a_3s_timeout_answers_in_3s(
    etcd_cluster: Callable[..., EtcdCluster], fleet_etcd: Any
) -> None:
    cluster: EtcdCluster = await deferToThread(etcd_cluster, 1)
    etcd, _ = fleet_etcd(cluster.urls, dial_timeout=3.0)
    await etcd.record(update("myorg/warm"))  # a pooled connection, as a daemon has
    with cluster.frozen(*cluster.members):
        first = Answer(etcd.record(update("myorg/first")))
        second = Answer(etcd.record(update("myorg/second")))
        await wait_for(lambda: first.answered and second.answered, timeout=3.0 + MARGIN)
    for write in (first, second):
        assert write.failed and write.result.check(EtcdUnavailable)
        assert write.after <= 3.0 + MARGIN
    assert isinstance(await etcd.record(update("myorg/after")), int)
