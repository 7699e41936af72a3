"""The rollout in the round (:mod:`deployer.rollout_round`) on one host, standalone, with a Clock
and the in-memory engine (:class:`tests.rollout_fakes.SimHost`): slots, readiness, pause and
rollback, labels, replace modes, ``--max_unavailable``, and what the host publishes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, capturedLogs, formatEvent

from deployer.readiness import ReadyRules
from deployer.replace import ReplaceMode
from deployer.replacers import RefusingReplacer, StopReplacer
from deployer.rollout import wiring
from deployer.rollout.pause import PauseRecord
from deployer.rollout.slots import LocalSlots, Slot
from deployer.rollout_round import PAUSE_CHECK
from deployer.rounds import Result
from tests.helpers import fired
from tests.rollout_fakes import BAD, GOOD, Build, SimHost, health, run_until

APP = "registry.test:5000/myorg/app:qa"
OTHER = "registry.test:5000/myorg/other:qa"


@pytest.fixture
def logs() -> Iterator[list[LogEvent]]:
    with capturedLogs() as events:
        yield events


def text(events: list[LogEvent]) -> str:
    return "\n".join(formatEvent(e) for e in events)


def standalone(clock: Clock, max_unavailable: int = 1, **kw: Any) -> SimHost:
    return SimHost(clock, "h1", wiring.standalone(clock, hostname="h1",
                                                  max_unavailable=max_unavailable), **kw)


def running_on(host: SimHost, name: str) -> tuple[str, str | None] | None:
    """(image id, health) of the running container ``name``."""
    container = host.named(name)
    if container is None or not container.running:
        return None
    return container.image_id, health(container)


def holding(host: SimHost) -> Any:
    slots = host.rollouts.slots
    assert isinstance(slots, LocalSlots)
    return slots.holding()


# -- a good build ---------------------------------------------------------------------------------


def test_the_slot_is_held_until_the_replacement_is_healthy() -> None:
    clock = Clock()
    host = standalone(clock)
    old = host.local(APP, GOOD)
    host.run("web", APP)
    new = host.publish(APP, GOOD)

    host.deploy(APP)

    assert host.stops == 1  # pulled, then taken down at once: its turn came
    assert [t.container for t in holding(host)[APP].replacing] == ["web"]
    clock.advance(0.5)  # the supervisor runs it again, from the tag: the new build
    assert running_on(host, "web") == (new, "starting")
    assert holding(host)[APP].replacing and host.reports == []
    clock.advance(1.0)  # its health check passes
    assert running_on(host, "web") == (new, "healthy")
    assert holding(host) == {}
    [outcome] = host.outcomes
    assert outcome.result is Result.REPLACED and outcome.slot
    assert outcome.old_image == old and outcome.new_image == new
    assert outcome.seconds == 1.5 and outcome.waited == 0
    [report] = host.reports
    assert report.ok and [s.name for s in report.stopped] == ["web"]
    assert host.notices == []


def test_without_a_health_check_ready_means_running_for_min_ready() -> None:
    clock = Clock()
    host = standalone(clock, rules=ReadyRules(min_ready=5.0, ready_timeout=30.0))
    host.local(APP)
    host.run("web", APP)
    new = host.publish(APP)
    host.deploy(APP)
    clock.advance(0.5)
    assert running_on(host, "web") == (new, None)
    clock.advance(4.9)
    assert host.outcomes == []
    clock.advance(0.1)
    assert [o.result for o in host.outcomes] == [Result.REPLACED]
    assert host.idle


# -- a bad build ----------------------------------------------------------------------------------


def test_an_unhealthy_build_pauses_the_app_and_the_host_goes_back(
    logs: list[LogEvent],
) -> None:
    clock = Clock()
    host = standalone(clock)
    old = host.local(APP, GOOD)
    host.run("web", APP)
    bad = host.publish(APP, BAD)

    host.deploy(APP)
    clock.advance(0.5)  # restarted on the bad build
    assert host.image_of(APP) == bad and fired(host.rollouts.pauses.get(APP)) is None
    clock.advance(1.0)  # and its check failed

    record = fired(host.rollouts.pauses.get(APP))
    assert record is not None
    assert (record.app, record.image_id, record.host) == (APP, bad, "h1")
    assert record.digest is not None and record.reason.startswith("unhealthy:")
    assert host.image_of(APP) == old  # the tag is back on the previous build
    run_until(clock, lambda: host.idle)
    assert running_on(host, "web") == (old, "healthy")  # the supervisor ran the previous one
    [outcome] = host.outcomes
    assert outcome.result is Result.ROLLED_BACK and outcome.reason == "unhealthy"
    assert outcome.paused
    [notice] = host.notices
    assert notice.text().startswith(f"Rollout of {APP} paused on h1: unhealthy: ")
    assert (notice.image_id, notice.previous_image) == (bad, old)
    [report] = host.reports
    assert not report.ok and any("rollout paused" in e for e in report.errors)
    assert f"Rollout of {APP} paused on h1: unhealthy" in text(logs)
    doc = fired(host.rollouts.status.document())
    assert doc["apps"][APP]["paused"]["image_id"] == bad
    assert doc["hosts"]["h1"]["apps"][APP]["image_id"] == old


def test_a_build_that_exits_is_rolled_back() -> None:
    clock = Clock()
    host = standalone(clock)
    old = host.local(APP)
    host.run("web", APP)
    host.publish(APP, Build.dies(0.3, 7))
    host.deploy(APP)
    run_until(clock, lambda: host.idle)
    [outcome] = host.outcomes
    assert outcome.result is Result.ROLLED_BACK and outcome.reason == "exited"
    assert "code 7" in outcome.detail
    assert running_on(host, "web") == (old, None)
    assert host.image_of(APP) == old


def test_without_a_supervisor_the_stopped_container_is_started_again_and_the_app_paused(
    logs: list[LogEvent],
) -> None:
    clock = Clock()
    host = standalone(clock)
    old = host.local(APP)
    web = host.run("web", APP, supervised=False)
    new = host.publish(APP)

    host.deploy(APP)
    assert running_on(host, "web") is None
    clock.advance(29.9)
    assert host.starts == 0
    clock.advance(0.1)  # --ready_timeout: nothing ran the new build under that name

    assert host.started(web)  # the very container that was stopped
    assert running_on(host, "web") == (old, None)
    assert host.image_of(APP) == old
    record = fired(host.rollouts.pauses.get(APP))
    assert record is not None and record.image_id == new
    assert record.reason.startswith("no_replacement:")
    run_until(clock, lambda: host.idle)
    [outcome] = host.outcomes
    assert outcome.result is Result.ROLLED_BACK and outcome.reason == "no_replacement"
    assert "nothing seems to supervise it" in text(logs)
    assert "is back on the previous build" in text(logs)


def test_the_other_containers_of_a_bad_build_are_never_taken_down() -> None:
    clock = Clock()
    host = standalone(clock)
    old = host.local(APP, GOOD)
    first = host.run("web-1", APP)
    second = host.run("web-2", APP)
    host.publish(APP, BAD)
    host.deploy(APP)
    run_until(clock, lambda: host.idle)
    # web-2 learns of the pause while it waits for the slot, before web-1 is back
    assert [(o.name, o.result) for o in host.outcomes] == [
        ("web-2", Result.PAUSED), ("web-1", Result.ROLLED_BACK)
    ]
    assert not host.outcomes[0].slot
    assert not host.stopped(second) and host.stopped(first)
    assert running_on(host, "web-2") == (old, "healthy")
    assert running_on(host, "web-1") == (old, "healthy")
    assert len(host.notices) == 1


# -- paused rollouts ------------------------------------------------------------------------------


class CountingSlots:
    """Slots that say how often they were asked."""

    def __init__(self, clock: Clock) -> None:
        self.inner = LocalSlots(clock, 1)
        self.asked: list[str] = []

    def acquire(self, app: str, container: str) -> Deferred[Slot]:
        self.asked.append(container)
        return self.inner.acquire(app, container)


def test_a_build_paused_already_is_not_replaced_and_the_tag_goes_back() -> None:
    clock = Clock()
    parts = wiring.standalone(clock, hostname="h2")
    slots = CountingSlots(clock)
    host = SimHost(clock, "h2", wiring.Rollouts(slots, parts.pauses, parts.publish,
                                                parts.status))
    old = host.local(APP, GOOD)
    host.run("web", APP)
    bad = host.publish(APP, BAD)
    fired(parts.pauses.pause(PauseRecord(APP, bad, None, "h1", "unhealthy: boom", 1.0)))

    host.deploy(APP)

    assert host.idle
    assert host.pulls == 1  # pulled early, as every host does
    assert host.stops == 0 and slots.asked == []
    assert host.image_of(APP) == old
    [outcome] = host.outcomes
    assert outcome.result is Result.PAUSED and "h1" in outcome.detail
    assert host.reports[-1].stopped == ()


def test_a_new_build_ends_the_pause_and_rolls_out() -> None:
    clock = Clock()
    host = standalone(clock)
    host.local(APP, GOOD)
    host.run("web", APP)
    bad = host.publish(APP, BAD)
    fired(host.rollouts.pauses.pause(PauseRecord(APP, bad, None, "h9", "unhealthy", 1.0)))
    host.deploy(APP)
    assert [o.result for o in host.outcomes] == [Result.PAUSED]

    good = host.publish(APP, GOOD)
    host.deploy(APP)
    run_until(clock, lambda: host.idle)

    assert fired(host.rollouts.pauses.get(APP)) is None
    assert [o.result for o in host.outcomes] == [Result.PAUSED, Result.REPLACED]
    assert running_on(host, "web") == (good, "healthy")


def test_a_host_that_waited_for_its_slot_and_finds_the_app_paused_does_not_replace() -> None:
    """Two hosts share the slots and pauses (as a fleet does through etcd)."""
    clock = Clock()
    parts = wiring.standalone(clock, hostname="h1")
    first, second = SimHost(clock, "h1", parts), SimHost(clock, "h2", parts)
    olds = []
    for host in (first, second):
        olds.append(host.local(APP, GOOD))
        host.run("web", APP)
        host.publish(APP, BAD, image_id="sha256:" + "b" * 64)
    asked = clock.seconds()
    first.deploy(APP)
    second.deploy(APP)
    assert second.image_of(APP) == "sha256:" + "b" * 64  # pulled, waits for a slot
    run_until(clock, lambda: first.idle and second.idle)
    assert second.stops == 0
    assert second.image_of(APP) == olds[1]
    assert [o.result for o in second.outcomes] == [Result.PAUSED]
    record = fired(parts.pauses.get(APP))
    assert record is not None and record.host == "h1"
    # It read the pause while it waited (and left the line), within one check of the pause.
    outcome = second.outcomes[0]
    assert not outcome.slot
    assert record.time - asked < outcome.waited <= record.time - asked + PAUSE_CHECK
    assert holding(second) == {}
    assert len(first.notices) == 1 and second.notices == []


def test_a_waiting_host_reads_the_pause_every_check_and_stops_reading_at_its_turn() -> None:
    clock = Clock()
    parts = wiring.standalone(clock, hostname="h1")
    first, second = SimHost(clock, "h1", parts), SimHost(clock, "h2", parts)
    for host in (first, second):
        host.local(APP, GOOD)
        host.run("web", APP)
        host.publish(APP, GOOD, image_id="sha256:" + "c" * 64)
    checks: list[float] = []
    real_get = parts.pauses.get

    def counted(app: str) -> Deferred[PauseRecord | None]:
        checks.append(clock.seconds())
        return real_get(app)

    parts.pauses.get = counted  # type: ignore[method-assign]
    first.deploy(APP)
    second.deploy(APP)
    waited = run_until(clock, lambda: first.idle and second.idle, step=0.05)
    assert [o.result for o in second.outcomes] == [Result.REPLACED]
    assert second.outcomes[0].slot
    # A read before each host asks for its slot and one at each turn (h1's at once); while
    # h2 waits, one every PAUSE_CHECK from when it asked.
    asked, during = checks[2], checks[3:-1]
    assert checks[:3] == [asked] * 3 and during, checks
    gaps = [b - a for a, b in zip([asked, *during[:-1]], during, strict=True)]
    assert all(abs(gap - PAUSE_CHECK) < 1e-6 for gap in gaps), gaps
    assert checks[-1] <= waited, "no read after the turn came"
    read = len(checks)
    clock.advance(10 * PAUSE_CHECK)
    assert len(checks) == read, "the checks stopped"


# -- labels and replace modes ---------------------------------------------------------------------


def test_containers_that_opt_out_are_never_touched() -> None:
    clock = Clock()
    host = standalone(clock)
    host.local(APP)
    pinned = host.run("pinned", APP, labels={"deployer.enable": "false"})
    host.run("web", APP)
    host.publish(APP)
    host.deploy(APP)
    run_until(clock, lambda: host.idle)
    assert not host.stopped(pinned)
    assert [o.name for o in host.outcomes] == ["web"]


def test_label_enable_touches_only_containers_that_opt_in() -> None:
    clock = Clock()
    host = standalone(clock, label_enable=True)
    host.local(APP)
    plain = host.run("plain", APP)
    host.run("opted", APP, labels={"deployer.enable": "true"})
    host.publish(APP)
    host.deploy(APP)
    run_until(clock, lambda: host.idle)
    assert not host.stopped(plain)
    assert [o.name for o in host.outcomes] == ["opted"]


@pytest.mark.parametrize("how", ["label", "flag"])
def test_a_mode_without_its_replacer_is_refused_and_nothing_is_taken_down(
    how: str, logs: list[LogEvent],
) -> None:
    clock = Clock()
    parts = wiring.standalone(clock, hostname="h1")
    rules = ReadyRules(min_ready=1.0, ready_timeout=30.0)
    labels = {"deployer.replace": "recreate"} if how == "label" else {}
    mode = ReplaceMode.RECREATE if how == "flag" else ReplaceMode.STOP
    host = SimHost(clock, "h1", parts, mode=mode, replacers={
        ReplaceMode.STOP: StopReplacer(clock, None, None, rules),
        ReplaceMode.RECREATE: RefusingReplacer(ReplaceMode.RECREATE, "is not available here"),
    })
    old = host.local(APP)
    host.run("web", APP, labels=labels)
    host.publish(APP)

    host.deploy(APP)

    assert host.idle and host.stops == 0
    assert running_on(host, "web") == (old, None)
    [outcome] = host.outcomes
    assert outcome.result is Result.ERROR and "is not available here" in outcome.detail
    assert fired(parts.pauses.get(APP)) is None
    assert host.reports[-1].errors == (f"replace web: {outcome.detail}",)
    assert "not replacing web: --replace recreate" in text(logs)


# -- how many at once -----------------------------------------------------------------------------


def test_the_containers_of_one_app_go_one_at_a_time() -> None:
    clock = Clock()
    host = standalone(clock)
    host.local(APP, GOOD)
    for n in (1, 2, 3):
        host.run(f"web-{n}", APP)
    new = host.publish(APP, GOOD)
    clock.advance(1.0)  # all three healthy
    down: list[int] = []

    def count() -> None:
        down.append(sum(1 for n in (1, 2, 3)
                        if (running_on(host, f"web-{n}") or ("", None))[1] != "healthy"))

    count()
    host.deploy(APP)
    count()
    run_until(clock, lambda: host.idle, each=count)
    assert down[0] == 0 and max(down) == 1
    assert [o.name for o in host.outcomes] == ["web-1", "web-2", "web-3"]  # as listed
    assert all(running_on(host, f"web-{n}") == (new, "healthy") for n in (1, 2, 3))


def test_max_unavailable_zero_replaces_them_all_at_once() -> None:
    clock = Clock()
    host = standalone(clock, max_unavailable=0)
    host.local(APP, GOOD)
    for n in (1, 2, 3):
        host.run(f"web-{n}", APP)
    host.local(OTHER)
    host.run("other", OTHER)
    host.publish(APP, GOOD)
    host.publish(OTHER)
    host.deploy(APP)
    host.deploy(OTHER)
    assert host.stops == 4  # no waiting at all
    took = run_until(clock, lambda: host.idle)
    assert took == pytest.approx(1.5)


def test_different_apps_do_not_wait_for_each_other() -> None:
    clock = Clock()
    host = standalone(clock)
    host.local(APP, GOOD)
    host.run("web", APP)
    host.local(OTHER, GOOD)
    host.run("other", OTHER)
    host.publish(APP, GOOD)
    host.publish(OTHER, GOOD)
    host.deploy(APP)
    host.deploy(OTHER)
    assert host.stops == 2
    assert set(holding(host)) == {APP, OTHER}


# -- what the host publishes ----------------------------------------------------------------------


def test_the_host_publishes_what_it_runs_after_each_round() -> None:
    clock = Clock()
    host = standalone(clock)
    host.local(APP, GOOD)
    host.run("web", APP)
    new = host.publish(APP, GOOD)
    host.deploy(APP)
    doc = fired(host.rollouts.status.document())
    [state] = doc["hosts"]["h1"]["apps"].values()  # published after the round's lists
    run_until(clock, lambda: host.idle)
    clock.advance(5)
    doc = fired(host.rollouts.status.document())
    state = doc["hosts"]["h1"]["apps"][APP]
    assert state["image_id"] == new and state["health"] == "healthy"
    assert state["containers"] == ["web"]
    assert state["digest"] is not None and state["digest"].startswith("sha256:")
    assert state["last_round"]["result"] == "replaced"
    assert doc["apps"][APP]["converged"] and doc["apps"][APP]["paused"] is None


# -- etcd away -----------------------------------------------------------------------------------


class FlakyPauses:
    """Pauses whose first ``failures`` reads fail as etcd out of reach does."""

    def __init__(self, inner: Any, failures: int) -> None:
        self.inner = inner
        self.failures = failures

    def get(self, app: str) -> Deferred[Any]:
        if self.failures:
            self.failures -= 1
            from twisted.internet.defer import fail

            from deployer.errors import EtcdUnavailable
            return fail(EtcdUnavailable("no etcd member answered"))
        return self.inner.get(app)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_reading_the_pause_is_retried_while_etcd_does_not_answer(
    logs: list[LogEvent],
) -> None:
    clock = Clock()
    parts = wiring.standalone(clock, hostname="h1")
    host = SimHost(clock, "h1", wiring.Rollouts(parts.slots, FlakyPauses(parts.pauses, 3),
                                                parts.publish, parts.status))
    host.local(APP)
    host.run("web", APP)
    new = host.publish(APP)
    host.deploy(APP)
    assert host.stops == 0  # nothing is taken down before the pause is known
    run_until(clock, lambda: host.idle)
    assert [o.result for o in host.outcomes] == [Result.REPLACED]
    assert running_on(host, "web") == (new, None)
    assert text(logs).count("reading the pause of") == 3


def test_a_tag_that_cannot_name_an_app_is_left_alone() -> None:
    clock = Clock()
    host = standalone(clock)
    host.local(APP)
    host.run("web", APP)
    container = fired(Deferred.fromCoroutine(host.client.containers()))[0]
    outcome = fired(Deferred.fromCoroutine(
        host.rollout.replace(container, "Not A/Name:qa", "sha256:" + "9" * 64)))
    assert outcome.result is Result.ERROR
    assert host.stops == 0


class PausesAwayWhile(FlakyPauses):
    """Pauses whose reads fail while ``away()`` says so."""

    def __init__(self, inner: Any, away: Any) -> None:
        super().__init__(inner, 0)
        self.away = away

    def get(self, app: str) -> Deferred[Any]:
        if self.away():
            self.failures = 1
        return super().get(app)


def test_a_waiting_host_logs_failed_pause_reads_once_and_keeps_waiting(
    logs: list[LogEvent],
) -> None:
    clock = Clock()
    parts = wiring.standalone(clock, hostname="h1")
    first = SimHost(clock, "h1", parts)
    second = SimHost(clock, "h2", wiring.Rollouts(
        parts.slots, PausesAwayWhile(parts.pauses, lambda: 0.5 < clock.seconds() < 3.5),
        parts.publish, parts.status))
    for host in (first, second):
        host.local(APP, GOOD)
        host.run("web", APP)
        host.publish(APP, BAD, image_id="sha256:" + "b" * 64)
    first.deploy(APP)
    second.deploy(APP)
    run_until(clock, lambda: first.idle and second.idle)
    assert [o.result for o in second.outcomes] == [Result.PAUSED]
    assert second.stops == 0
    assert text(logs).count("while it waits for a slot failed") == 1
