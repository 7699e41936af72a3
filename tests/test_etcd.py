"""Fast tests of deployer.etcd: group commit, failover and backoff, the watch's resume and
resync, against the in-memory etcd gateway (deployer.testing.fake_etcd) driven through the real
HTTP client code (treq over RequestTraversalAgent) with a Clock."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectingCancelledError
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web._newclient import RequestGenerationFailed
from twisted.web.client import ResponseNeverReceived

from deployer.backoff import backoff
from deployer.errors import EtcdHTTPError, EtcdUnavailable
from deployer.etcd.watch import MIN_RETRY_DELAY, WATCH_IDLE_TIMEOUT
from deployer.model import Update
from tests.helpers import fired
from tests.stack.etcd_stack import FAKE_HOSTS as HOSTS
from tests.stack.etcd_stack import Rig
from tests.stack.etcd_stack import make_rig as _make_rig

_RIGS: list[Rig] = []


def make_rig(*args: Any, **kw: Any) -> Rig:
    rig = _make_rig(*args, **kw)
    _RIGS.append(rig)
    return rig


@pytest.fixture(autouse=True)
def _stop_watches() -> Iterator[None]:
    """Every watch a test started is stopped after it, rather than left suspended until the
    interpreter exits."""
    yield
    while _RIGS:
        _RIGS.pop().stop()


def u(name: str, **kw: Any) -> Update:
    kw.setdefault("source", "test")
    kw.setdefault("received", 1.0)
    return Update(repository=name, **kw)


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


# -- group commit ---------------------------------------------------------------------------


def test_writes_during_a_transaction_go_out_as_one() -> None:
    rig = make_rig()
    rig.fake.hold = True
    first = rig.etcd.record(u("myorg/first"))
    rig.flush()
    assert len(rig.fake.held) == 1
    rest = [rig.etcd.record(u(f"myorg/app{i}")) for i in range(50)]
    rig.flush()
    assert len(rig.fake.held) == 1, "nothing is sent while a transaction is in flight"
    assert not first.called

    rig.fake.release()
    rig.flush()
    assert fired(first) == 2
    assert not any(d.called for d in rest), "each caller waits for its own write"
    assert len(rig.fake.held) == 1
    rig.fake.hold = False
    rig.fake.release()
    rig.flush()
    assert [fired(d) for d in rest] == [3] * 50
    assert [len(puts) for _, puts in rig.fake.txns] == [1, 50]
    assert rig.etcd.transactions == 2
    assert set(rig.fake.txns[1][1]) == {f"/deployer/myorg/app{i}".encode() for i in range(50)}


def test_the_same_key_twice_in_a_batch_keeps_the_last() -> None:
    rig = make_rig()
    rig.fake.hold = True
    rig.etcd.record(u("myorg/first"))
    rig.flush()
    one = rig.etcd.record(u("myorg/foo", event_id="one"))
    other = rig.etcd.record(u("myorg/bar"))
    two = rig.etcd.record(u("myorg/foo", event_id="two"))
    rig.fake.hold = False
    rig.fake.release()
    rig.flush()
    assert fired(one) == fired(two) == fired(other) == 3
    _, puts = rig.fake.txns[1]
    assert set(puts) == {b"/deployer/myorg/foo", b"/deployer/myorg/bar"}
    assert json.loads(puts[b"/deployer/myorg/foo"])["event_id"] == "two"


def test_batches_are_capped() -> None:
    rig = make_rig(max_txn_ops=10)
    rig.fake.hold = True
    ds = [rig.etcd.record(u(f"myorg/app{i}")) for i in range(26)]
    rig.fake.hold = False
    for _ in range(5):
        rig.flush()
        rig.fake.release()
    rig.flush()
    assert [len(puts) for _, puts in rig.fake.txns] == [1, 10, 10, 5]
    assert [fired(d) for d in ds] == [2] + [3] * 10 + [4] * 10 + [5] * 5


def test_record_tries_members_in_turn() -> None:
    rig = make_rig(HOSTS)
    rig.net.down = {"10.0.0.1", "10.0.0.2"}
    assert fired(rig.etcd.record(u("myorg/foo"))) == 2
    assert rig.net.hosts("/v3/kv/txn") == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    assert rig.etcd.members.current == 2
    fired(rig.etcd.record(u("myorg/bar")))
    assert rig.net.hosts("/v3/kv/txn")[3:] == ["10.0.0.3"], "the next write starts where it works"


def test_record_fails_when_every_member_fails() -> None:
    rig = make_rig(HOSTS)
    rig.net.down = set(HOSTS)
    d = rig.etcd.record(u("myorg/foo"))
    with pytest.raises(EtcdUnavailable) as info:
        fired(d)
    for host in HOSTS:
        assert f"http://{host}:2379: ConnectionRefusedError" in str(info.value)
    rig.net.down = set()
    assert fired(rig.etcd.record(u("myorg/foo"))) == 2, "a later write is not stuck"


def test_a_member_that_does_not_answer_times_out() -> None:
    rig = make_rig(HOSTS[:2])
    rig.fake.silent = {"10.0.0.1"}
    d = rig.etcd.record(u("myorg/foo"))
    rig.flush()
    rig.clock.advance(4.9)
    rig.flush()
    assert not d.called
    rig.clock.advance(0.2)
    rig.flush()
    assert fired(d) == 2
    assert rig.net.hosts("/v3/kv/txn") == ["10.0.0.1", "10.0.0.2"]
    assert rig.etcd.members.current == 1

    rig.fake.silent = {"10.0.0.1", "10.0.0.2"}
    d = rig.etcd.record(u("myorg/bar"))
    rig.flush()
    rig.clock.advance(5.0)
    rig.flush()
    rig.clock.advance(5.0)
    rig.flush()
    with pytest.raises(EtcdUnavailable) as info:
        fired(d)
    assert str(info.value) == (
        "no etcd member acknowledged the write within 10s:"
        " http://10.0.0.2:2379: timed out after 5s; http://10.0.0.1:2379: no answer within 5s"
    )


def test_a_refused_request_does_not_move_off_a_member() -> None:
    rig = make_rig(HOSTS[:2])
    rig.fake.reject = "etcdserver: request is too large"
    d = rig.etcd.record(u("myorg/foo"))
    rig.flush()
    with pytest.raises(EtcdUnavailable, match="request is too large"):
        fired(d)
    assert rig.etcd.members.current == 0


# -- backoff ----------------------------------------------------------------------------------


def test_the_watch_backoff_is_exponential_jittered_and_capped() -> None:
    delay = backoff(1.0, 30.0, floor=MIN_RETRY_DELAY, rng=random.Random(3))
    delays = [delay(n) for n in range(12)]
    for n, d in enumerate(delays):
        ceiling = min(30.0, 2.0**n)
        assert ceiling / 2 <= d <= ceiling
    assert max(delays) <= 30.0
    assert len({round(delay(5), 6) for _ in range(20)}) > 1, "jittered"
    assert delay(10_000) <= 30.0


def test_the_watch_backoff_has_a_floor() -> None:
    # A zero retry_delay would retry at once, forever: a busy loop while etcd is down.
    delay = backoff(0.0, 30.0, floor=MIN_RETRY_DELAY, rng=random.Random(3))
    delays = [delay(n) for n in range(12)]
    assert min(delays) >= MIN_RETRY_DELAY
    assert delays[-1] >= 15.0, "it still backs off exponentially from the floor"
    assert backoff(1e-9, 30.0, floor=MIN_RETRY_DELAY, rng=random.Random(3))(0) >= MIN_RETRY_DELAY
    assert backoff(0.0, 0.0, floor=MIN_RETRY_DELAY, rng=random.Random(3))(5) == MIN_RETRY_DELAY


def test_a_zero_retry_delay_is_not_a_busy_loop() -> None:
    rig = make_rig()
    rig.etcd.config.retry_delay = 0.0
    rig.net.down = {"10.0.0.1"}
    got: list[Update] = []
    service = rig.etcd.watch(got.append)
    attempts = 0

    def reconnected() -> None:
        nonlocal attempts
        attempts += 1
        if attempts > 200:
            raise RuntimeError("busy loop")  # ends the loop rather than hang the test

    service.on_reconnect = reconnected
    service.startService()
    rig.started.append(service)
    for _ in range(100):
        rig.clock.advance(0.1)
        rig.flush()
    # 10 s of etcd down: delays from 0.1 s doubling (with jitter) make at most ~10 attempts.
    assert 3 <= attempts <= 12
    assert not service.live


# -- the watch --------------------------------------------------------------------------------


def test_catch_up_then_live() -> None:
    rig = make_rig()
    fake = rig.fake
    fake.put(b"/deployer/myorg/foo", b"anything")
    fake.put(b"/deployer/myorg/bar:qa", rig.etcd.layout.value(u("myorg/bar", tag="qa")))
    fake.put(b"/deployer/_/lock/host1", b"x")
    fake.put(b"/deployer/Bad Key", b"x")
    fake.put(b"/deployer2/myorg/other", b"x")
    service, got = rig.watch()
    assert sorted(x.pattern for x in got) == ["myorg/bar:qa", "myorg/foo"]
    assert service.live and service.reason == ""
    ((_, body),) = fake.ranges
    assert body.get("serializable") is True
    (w,) = fake.watches
    assert w.start_revision == fake.revision + 1
    assert w.key == b"/deployer/"

    fake.put(b"/deployer/myorg/new", b"x")
    fake.delete(b"/deployer/myorg/foo")
    fake.put(b"/deployer/_/status", b"x")
    rig.flush()
    assert [x.pattern for x in got[2:]] == ["myorg/new"]
    assert service.revision == fake.revision


def test_strong_consistency_reads_are_linearizable() -> None:
    rig = make_rig()
    rig.etcd.config.strong_consistency = True
    rig.watch()
    (_, body), = rig.fake.ranges
    assert "serializable" not in body


def test_resume_after_a_break_loses_nothing_and_repeats_nothing() -> None:
    rig = make_rig()
    service, got = rig.watch()
    rig.fake.put(b"/deployer/myorg/a", b"x")
    rig.flush()
    seen = rig.fake.revision
    rig.fake.open_watches[0].drop()
    rig.flush()
    assert not service.live
    assert service.reason.startswith("http://10.0.0.1:2379: ")
    rig.fake.put(b"/deployer/myorg/b", b"x")  # while the watch is down
    rig.clock.advance(1.0)  # the first backoff is at most retry_delay
    rig.flush()
    assert service.live
    assert service.reconnects == 1
    assert rig.fake.watches[-1].start_revision == seen + 1
    assert [x.pattern for x in got] == ["myorg/a", "myorg/b"]
    assert len(rig.fake.ranges) == 1, "a resume does not read everything again"


def test_the_gateways_last_error_is_the_reason() -> None:
    rig = make_rig()
    service, _ = rig.watch()
    w = rig.fake.open_watches[0]
    w.request.write(b'{"error":{"grpc_code":14,"message":"transport is closing"}}')
    w.end()
    rig.flush()
    assert not service.live
    assert "transport is closing" in service.reason


def test_a_clean_end_of_the_stream_also_resumes() -> None:
    rig = make_rig()
    service, _ = rig.watch()
    rig.fake.open_watches[0].end()
    rig.flush()
    assert not service.live
    assert "the watch stream ended" in service.reason
    rig.clock.advance(1.0)
    rig.flush()
    assert service.live


def test_events_seen_before_are_not_delivered_twice() -> None:
    rig = make_rig()
    _, got = rig.watch()
    rig.fake.commit({b"/deployer/myorg/a": b"x", b"/deployer/myorg/b": b"x"})
    rig.flush()
    w = rig.fake.open_watches[0]
    # The same revision again (a server replaying after a resume), then something new.
    rig.fake.send_events(w, rig.fake.history[-1][1])
    rig.fake.put(b"/deployer/myorg/c", b"x")
    rig.flush()
    assert [x.pattern for x in got] == ["myorg/a", "myorg/b", "myorg/c"]


def test_a_write_applied_twice_is_delivered_once(logged: list[dict[str, Any]]) -> None:
    rig = make_rig()
    _, got = rig.watch()
    assert rig.fake.open_watches[0].prev_kv, "the watch asks for previous values"
    written = rig.etcd.layout.value(u("myorg/a", event_id="ev-1"))
    rig.fake.put(b"/deployer/myorg/a", written)
    rig.fake.put(b"/deployer/myorg/a", written)  # the retry, applied as well
    rig.fake.put(b"/deployer/myorg/b", b"anything")
    rig.fake.put(b"/deployer/myorg/b", b"anything")  # an operator triggers twice
    rig.fake.put(b"/deployer/myorg/a", rig.etcd.layout.value(u("myorg/a", received=2.0)))
    rig.flush()
    assert [(x.pattern, x.received) for x in got[:1]] == [("myorg/a", 1.0)]
    assert [x.pattern for x in got] == ["myorg/a", "myorg/b", "myorg/b", "myorg/a"]
    assert got[-1].received == 2.0
    (repeat,) = [e for e in logged if "a write applied twice" in e.get("log_format", "")]
    assert repeat["key"] == "/deployer/myorg/a"


def test_progress_notifications_advance_the_revision() -> None:
    rig = make_rig()
    service, _ = rig.watch()
    rig.fake.open_watches[0].send({"result": {"header": {"revision": "50"}}})
    rig.flush()
    assert service.revision == 50
    rig.fake.open_watches[0].drop()
    rig.flush()
    rig.clock.advance(1.0)
    rig.flush()
    assert rig.fake.watches[-1].start_revision == 51


def test_compaction_causes_a_full_resync() -> None:
    rig = make_rig()
    fake = rig.fake
    fake.put(b"/deployer/myorg/a", b"x")
    service, got = rig.watch()
    fake.put(b"/deployer/myorg/b", b"x")
    rig.flush()
    fake.open_watches[0].drop()
    rig.flush()
    fake.put(b"/deployer/myorg/c", b"x")
    fake.delete(b"/deployer/myorg/a")
    fake.compact(fake.revision)
    del got[:]
    rig.clock.advance(1.0)
    rig.flush()
    assert service.resyncs == 1
    assert len(fake.ranges) == 2
    assert sorted(x.pattern for x in got) == ["myorg/b", "myorg/c"]
    assert service.live
    assert fake.watches[-1].start_revision == fake.revision + 1
    fake.put(b"/deployer/myorg/d", b"x")
    rig.flush()
    assert got[-1].pattern == "myorg/d"
    assert len(got) == 3


def test_a_watch_error_or_cancel_reconnects() -> None:
    rig = make_rig()
    service, _ = rig.watch()
    rig.fake.open_watches[0].send({"result": {"header": {}, "canceled": True,
                                              "cancel_reason": "mvcc: required revision"}})
    rig.flush()
    assert not service.live
    assert "mvcc: required revision" in service.reason
    assert not rig.fake.open_watches, "the stream is closed"
    rig.clock.advance(1.0)
    rig.flush()
    assert service.live
    rig.fake.open_watches[0].send({"error": {"grpc_code": 14, "message": "unavailable"}})
    rig.flush()
    assert not service.live
    assert "unavailable" in service.reason


def test_failover_order_and_backoff() -> None:
    rig = make_rig(HOSTS, max_backoff=8.0)
    rig.net.down = set(HOSTS)
    service, _ = rig.watch()
    for _ in range(8):
        rig.clock.advance(8.0)
        rig.flush()
    attempts = [(t, host) for t, host, path in rig.net.log if path == "/v3/kv/range"]
    assert [host for _, host in attempts] == [HOSTS[i % 3] for i in range(len(attempts))]
    gaps = [b - a for (a, _), (b, _) in itertools.pairwise(attempts)]
    for n, gap in enumerate(gaps):
        ceiling = min(8.0, 2.0**n)
        assert ceiling / 2 <= gap <= ceiling + 8.0  # the clock moves in steps of 8 s
    assert not service.live
    assert service.reconnects == len(attempts) - 1

    rig.net.down = set()
    rig.clock.advance(8.0)
    rig.flush()
    assert service.live
    assert rig.etcd.members.current == len(attempts) % 3


def test_a_failed_watch_moves_record_too() -> None:
    rig = make_rig(HOSTS[:2])
    rig.watch()
    rig.net.down = {"10.0.0.1"}
    rig.fake.open_watches[0].drop()
    rig.flush()
    assert rig.etcd.members.current == 1
    fired(rig.etcd.record(u("myorg/foo")))
    assert rig.net.hosts("/v3/kv/txn") == ["10.0.0.2"]


def test_a_member_that_accepts_but_never_answers_times_out() -> None:
    rig = make_rig(HOSTS[:2])
    rig.fake.silent = {"10.0.0.1"}
    service, _ = rig.watch()
    assert not service.live
    rig.clock.advance(5.0)
    rig.flush()
    assert "timed out" in service.reason
    rig.clock.advance(1.0)
    rig.flush()
    assert service.live
    assert rig.etcd.members.current == 1


def test_a_silent_stream_is_presumed_dead() -> None:
    rig = make_rig()
    service, _ = rig.watch()
    assert service.live
    rig.clock.advance(WATCH_IDLE_TIMEOUT - 1)
    rig.fake.open_watches[0].send({"result": {"header": {"revision": "1"}}})
    rig.flush()
    rig.clock.advance(WATCH_IDLE_TIMEOUT - 1)
    rig.flush()
    assert service.live, "each message restarts the idle timer"
    rig.clock.advance(1)
    rig.flush()
    assert not service.live
    assert "no message from etcd for 660s" in service.reason
    assert not rig.fake.open_watches
    rig.clock.advance(1)
    rig.flush()
    assert service.live


def test_stop_during_backoff_and_while_live() -> None:
    rig = make_rig()
    rig.net.down = {"10.0.0.1"}
    service, _ = rig.watch()
    assert rig.clock.getDelayedCalls()
    assert fired(service.stopService()) is None
    assert not rig.clock.getDelayedCalls()
    assert service.reason == "stopped"

    rig.net.down = set()
    service, _ = rig.watch()
    assert service.live
    assert fired(service.stopService()) is None
    rig.flush()
    assert not rig.fake.open_watches, "the stream was closed"
    assert not service.live
    assert not rig.clock.getDelayedCalls()


def test_requests_ask_for_a_member_with_a_leader() -> None:
    # etcd's gateway fails these with "etcdserver: no leader" on a member cut off from its
    # leader, and ends a watch stream on one, instead of serving it silently.
    rig = make_rig()
    service, _ = rig.watch()
    assert service.live
    fired(rig.etcd.record(u("myorg/foo")))
    paths = {path: hasleader for _, path, hasleader in rig.fake.requests}
    assert paths == {"/v3/kv/range": [b"true"], "/v3/watch": [b"true"], "/v3/kv/txn": [b"true"]}


def test_no_leader_on_the_watch_stream_moves_to_the_next_member() -> None:
    rig = make_rig(HOSTS[:2])
    service, _ = rig.watch()
    w = rig.fake.open_watches[0]
    assert w.member == "10.0.0.1"
    w.request.write(b'{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader",'
                    b'"http_status":"Service Unavailable"}}')
    w.end()
    rig.flush()
    assert not service.live
    assert "no leader" in service.reason
    assert rig.etcd.members.current == 1
    rig.clock.advance(1.0)
    rig.flush()
    assert service.live
    assert rig.fake.open_watches[0].member == "10.0.0.2"


def response_never_received(host: str) -> Exception:
    return ResponseNeverReceived([Failure(CancelledError())])


def connecting_cancelled(host: str) -> Exception:
    return ConnectingCancelledError(IPv4Address("TCP", host, 2379))


def generation_cancelled(host: str) -> Exception:
    """Cancelled while the agent still writes the body."""
    return RequestGenerationFailed([Failure(CancelledError())])


@pytest.mark.parametrize("error", [response_never_received, connecting_cancelled])
@pytest.mark.parametrize("path", ["/v3/kv/range", "/v3/watch"])
def test_stop_while_a_request_never_answers(
    path: str, error: Callable[[str], Exception], logged: list[dict[str, Any]]
) -> None:
    # The agent reports the cancelled request as an ordinary failure; the watch must still end
    # rather than back off and retry, or the daemon never exits on SIGTERM.
    rig = make_rig(HOSTS[:2], max_backoff=1.0)
    rig.net.hang[path] = error
    service, _ = rig.watch()
    assert rig.net.hosts(path) == ["10.0.0.1"]
    assert not service.live
    stopped = service.stopService()
    rig.flush()
    assert fired(stopped) is None
    assert service.reason == "stopped"
    assert not rig.clock.getDelayedCalls()
    rig.clock.advance(60.0)
    rig.flush()
    assert service.reconnects == 0
    assert rig.net.hosts(path) == ["10.0.0.1"]
    assert rig.etcd.members.current == 0, "stopping is no failure of the member"
    assert not [e for e in logged if e.get("log_level") is not None
                and e["log_level"].name in ("warn", "error", "critical")]


def test_stop_from_the_update_callback_during_catch_up() -> None:
    rig = make_rig()
    rig.fake.put(b"/deployer/myorg/foo", b"x")
    stopped: list[Deferred[None]] = []
    service = rig.etcd.watch(lambda update: stopped.append(service.stopService()))
    service.startService()
    rig.started.append(service)
    rig.flush()
    assert fired(stopped[0]) is None
    assert not rig.fake.watches, "no watch is opened after the stop"
    assert not service.live
    assert not rig.clock.getDelayedCalls()


def test_a_failing_callback_is_logged_and_the_watch_goes_on(logged: list[dict[str, Any]]) -> None:
    rig = make_rig()
    got: list[Update] = []

    def on_update(update: Update) -> object:
        got.append(update)
        if update.pattern == "myorg/raises":
            raise RuntimeError("broken handler")
        if update.pattern == "myorg/fails-later":
            return fail(RuntimeError("broken later"))
        return None

    service, _ = rig.watch(on_update)
    for name in (b"raises", b"fails-later", b"fine"):
        rig.fake.put(b"/deployer/myorg/" + name, b"x")
    rig.flush()
    assert [x.pattern for x in got] == ["myorg/raises", "myorg/fails-later", "myorg/fine"]
    assert service.live
    failures = [e["log_failure"].getErrorMessage() for e in logged if "log_failure" in e]
    assert "broken handler" in failures
    assert "broken later" in failures


def test_close_waits_for_writes_in_flight() -> None:
    rig = make_rig()
    rig.fake.hold = True
    d = rig.etcd.record(u("myorg/foo"))
    rig.flush()
    closed = Deferred.fromCoroutine(rig.etcd.close())
    assert not closed.called
    rig.fake.release()
    rig.flush()
    assert fired(d) == 2
    assert closed.called


# -- plain requests ---------------------------------------------------------------------------


def test_request_fails_over_and_stays_on_the_member_that_answered() -> None:
    rig = make_rig(HOSTS)
    rig.net.down = {"10.0.0.1"}
    body = {"key": "L2RlcGxveWVyL3g="}
    d = rig.etcd.request("/v3/kv/range", body)
    rig.flush()
    assert "header" in fired(d)
    assert rig.net.hosts("/v3/kv/range") == ["10.0.0.1", "10.0.0.2"]
    assert rig.etcd.members.current == 1
    fired(rig.etcd.request("/v3/kv/range", body))
    assert rig.net.hosts("/v3/kv/range")[2:] == ["10.0.0.2"]


def test_request_fails_when_no_member_answers_in_time() -> None:
    rig = make_rig(HOSTS[:2])
    rig.fake.freeze("10.0.0.1")
    rig.fake.freeze("10.0.0.2")
    d = rig.etcd.request("/v3/lease/grant", {"TTL": 5})
    rig.advance(9.9)
    assert not d.called
    rig.advance(0.2)
    with pytest.raises(EtcdUnavailable) as info:
        fired(d)
    assert str(info.value) == (
        "no etcd member answered /v3/lease/grant within 5s each:"
        " http://10.0.0.1:2379: timed out after 5s; http://10.0.0.2:2379: timed out after 5s"
    )


def test_a_request_etcd_refuses_is_raised_at_once() -> None:
    rig = make_rig(HOSTS[:2])
    d = rig.etcd.request("/v3/lease/revoke", {"ID": 42})
    rig.flush()
    with pytest.raises(EtcdHTTPError) as info:
        fired(d)
    assert (info.value.status, info.value.code) == (404, 5)
    assert rig.net.hosts("/v3/lease/revoke") == ["10.0.0.1"], "no other member is asked"
    assert rig.etcd.members.current == 0


@pytest.mark.parametrize("error", [response_never_received, connecting_cancelled,
                                   generation_cancelled])
def test_a_cancelled_request_is_no_failure_of_the_member(
    error: Callable[[str], Exception], logged: list[dict[str, Any]]
) -> None:
    rig = make_rig(HOSTS[:2])
    rig.net.hang["/v3/kv/txn"] = error
    d = rig.etcd.request("/v3/kv/txn", {})
    d.cancel()
    rig.flush()
    with pytest.raises(CancelledError):
        fired(d)
    assert rig.net.hosts("/v3/kv/txn") == ["10.0.0.1"]
    assert rig.etcd.members.current == 0
    assert [e for e in logged if e.get("log_failure") is not None] == []
