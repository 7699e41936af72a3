"""Fast tests of etcd liveness on a Clock: a member in use that stops answering (a FakeEtcd
member frozen, as SIGSTOP does) is noticed within 2 x dial_timeout, the watch and writes fail
over, and every write is answered within members x dial_timeout of its arrival, whatever it
waited for."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from deployer.errors import EtcdUnavailable
from deployer.etcd.liveness import PROBE_INTERVAL
from deployer.model import Update
from tests.helpers import fired
from tests.stack.etcd_stack import FAKE_HOSTS as HOSTS
from tests.stack.etcd_stack import Rig
from tests.stack.etcd_stack import make_rig as _make_rig

T = 5.0  # dial_timeout
_RIGS: list[Rig] = []


def make_rig(*args: Any, **kw: Any) -> Rig:
    rig = _make_rig(*args, **kw)
    _RIGS.append(rig)
    return rig


@pytest.fixture(autouse=True)
def _stop_watches() -> Iterator[None]:
    yield
    while _RIGS:
        _RIGS.pop().stop()


def u(name: str) -> Update:
    return Update(repository=name, source="test", received=1.0)


class Answer:
    """When a Deferred fired (on the rig's clock), and with what."""

    def __init__(self, rig: Rig, d: Deferred[Any]) -> None:
        self.sent = rig.clock.seconds()
        self.at: float | None = None
        self.result: Any = None

        def done(result: Any) -> None:
            self.at, self.result = rig.clock.seconds(), result

        d.addBoth(done)

    @property
    def after(self) -> float:
        assert self.at is not None, "not answered"
        return self.at - self.sent

    @property
    def failed(self) -> bool:
        return isinstance(self.result, Failure)


def until(rig: Rig, predicate: Any, limit: float) -> float:
    """Advance the clock in steps of 0.1 s until ``predicate()``; the time it took."""
    start = rig.clock.seconds()
    while not predicate():
        assert rig.clock.seconds() - start < limit, f"not within {limit}s"
        rig.advance(0.1)
    return rig.clock.seconds() - start


def test_the_member_in_use_is_checked_every_interval_while_the_watch_is_live() -> None:
    rig = make_rig(HOSTS)
    rig.net.down = set(HOSTS)
    service, _ = rig.watch()
    assert service.probe is not None
    rig.advance(10)
    assert not service.live
    assert service.probe.checks == 0, "no check while the watch tries members itself"
    rig.net.down = {"10.0.0.1"}
    until(rig, lambda: service.live, 40)
    before = len(rig.fake.ranges)
    rig.advance(10 * PROBE_INTERVAL)
    checks = rig.fake.ranges[before:]
    assert service.probe.checks == len(checks) == 10
    assert {member for member, _ in checks} == {rig.fake.open_watches[-1].member}, "in use"
    assert all(body["serializable"] and body["count_only"] for _, body in checks)
    assert fired(service.stopService()) is None
    assert not rig.clock.getDelayedCalls()


def test_a_hung_member_in_use_is_noticed_and_the_watch_and_writes_fail_over() -> None:
    rig = make_rig(HOSTS)
    service, got = rig.watch()
    assert service.live and rig.fake.open_watches[0].member == "10.0.0.1"
    rig.advance(0.5)
    rig.fake.freeze("10.0.0.1")
    noticed = until(rig, lambda: not service.live, 2 * T)
    assert noticed <= PROBE_INTERVAL + T
    assert service.reason == (
        "http://10.0.0.1:2379: EtcdUnavailable: no answer to the liveness check:"
        " timed out after 5s"
    )
    assert rig.etcd.members.current == 1, "writes move too"
    write = Answer(rig, rig.etcd.record(u("myorg/during")))
    rig.flush()
    assert write.at is not None and not write.failed, "no wait for the hung member"
    assert rig.net.hosts("/v3/kv/txn") == ["10.0.0.2"]
    until(rig, lambda: service.live, 1.0)  # the first backoff is at most retry_delay
    assert rig.fake.open_watches[-1].member == "10.0.0.2"
    until(rig, lambda: [x.pattern for x in got] == ["myorg/during"], 1.0)


def test_a_write_behind_a_hung_transaction_moves_on_with_its_group() -> None:
    rig = make_rig(HOSTS)
    fired(rig.etcd.record(u("myorg/before")))
    rig.fake.freeze("10.0.0.1")
    first = Answer(rig, rig.etcd.record(u("myorg/first")))
    rig.advance(1.0)
    rest = [Answer(rig, rig.etcd.record(u(f"myorg/app{i}"))) for i in range(10)]
    until(rig, lambda: all(a.at is not None for a in [first, *rest]), 3 * T)
    assert not any(a.failed for a in [first, *rest])
    assert first.after == pytest.approx(T)
    assert max(a.after for a in rest) == pytest.approx(T - 1.0), "the rest of one timeout"
    assert [(m, len(puts)) for m, puts in rig.fake.txns] == [
        ("10.0.0.1", 1), ("10.0.0.2", 11)], "the retry and the newcomers share a transaction"


def test_every_member_hung_the_watch_is_down_and_writes_fail_in_time() -> None:
    rig = make_rig(HOSTS)
    service, got = rig.watch()
    for host in HOSTS:
        rig.fake.freeze(host)
    first = Answer(rig, rig.etcd.record(u("myorg/first")))
    rig.advance(1.0)
    second = Answer(rig, rig.etcd.record(u("myorg/second")))
    noticed = until(rig, lambda: not service.live, 2 * T)
    assert noticed <= PROBE_INTERVAL + T - 1.0 + 0.11  # frozen 1 s before, seen in 0.1 s steps
    until(rig, lambda: second.at is not None, 4 * T)
    budget = len(HOSTS) * T
    for write in (first, second):
        assert write.failed and write.result.check(EtcdUnavailable)
        assert write.after <= budget + 1e-6
    assert first.after == pytest.approx(budget), "it had its turn at every member"
    assert "within 15s" in str(second.result.value)
    rig.advance(10)
    assert not service.live
    assert service.reason.startswith("http://10.0.0.")
    assert "timed out" in service.reason

    for host in HOSTS:  # every member answers again
        rig.fake.thaw(host)
    until(rig, lambda: service.live, 60)
    write = Answer(rig, rig.etcd.record(u("myorg/after")))
    until(rig, lambda: write.at is not None, T)
    assert not write.failed
    until(rig, lambda: "myorg/after" in [x.pattern for x in got], 1.0)


def test_one_member_with_a_3s_timeout_answers_every_write_within_3s() -> None:
    rig = make_rig(HOSTS[:1], dial_timeout=3.0)
    rig.fake.freeze("10.0.0.1")
    first = Answer(rig, rig.etcd.record(u("myorg/first")))
    rig.advance(1.0)
    second = Answer(rig, rig.etcd.record(u("myorg/second")))
    rig.advance(2.5)
    third = Answer(rig, rig.etcd.record(u("myorg/third")))
    until(rig, lambda: third.at is not None, 10)
    assert [a.after for a in (first, second, third)] == pytest.approx([3.0, 3.0, 3.0])
    assert all(a.failed and a.result.check(EtcdUnavailable) for a in (first, second, third))
    # The second write expired at 4 s, while its transaction was in flight: that transaction is
    # given up on, and the third (which arrived at 3.5 s) is sent at once, not at 7 s.
    sent = [t - 1000 for t, _, path in rig.net.log if path == "/v3/kv/txn"]
    assert sent == pytest.approx([0.0, 3.0, 4.0])


def test_the_member_the_watch_is_on_is_checked_after_a_write_moved_on_from_it() -> None:
    """A write that member 1 never answered (sent before it hung, so the checks that came after
    it still passed) times out and moves the member in use on before the next check: that check
    must still go to the member the watch is on, or the watch stays on the hung member."""
    rig = make_rig(HOSTS)
    service, got = rig.watch()
    assert service.live and rig.fake.open_watches[0].member == "10.0.0.1"
    rig.net.hang["/v3/kv/txn"] = lambda host: TimeoutError(f"{host}: no answer")
    write = Answer(rig, rig.etcd.record(u("myorg/stuck")))
    rig.advance(T - 0.5)  # a check at 2 s and at 4 s, both answered
    assert service.live and rig.etcd.members.current == 0
    del rig.net.hang["/v3/kv/txn"]
    rig.fake.freeze("10.0.0.1")  # 0.5 s after the last check; the write times out in 0.5 s
    until(rig, lambda: write.at is not None, 1.0)
    assert not write.failed, "retried on the next member"
    assert rig.etcd.members.current == 1
    noticed = until(rig, lambda: not service.live, 2 * T)
    assert noticed <= PROBE_INTERVAL + T
    assert service.reason.startswith("http://10.0.0.1:2379: EtcdUnavailable: no answer to the")
    until(rig, lambda: service.live, 1.0)
    assert rig.fake.open_watches[-1].member == "10.0.0.2"
    until(rig, lambda: "myorg/stuck" in [x.pattern for x in got], 1.0)
