"""The readiness wait (:mod:`deployer.readiness`) on a Clock, with a scripted engine and event
source: every path to each result, and the orders of events that a real engine produces."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs

from deployer.docker import DockerClient
from deployer.errors import ContainerNotFound, DockerUnavailable
from deployer.events import ContainerEvent, EngineEvents
from deployer.readiness import (
    DEFAULT_MIN_READY,
    DEFAULT_READY_TIMEOUT,
    SETTLED_AGAIN,
    NotReady,
    NotReadyReason,
    Readiness,
    Ready,
    ReadyRules,
    wait_ready,
)
from deployer.testing.agents import CountingAgent
from deployer.testing.memory_docker import Behaviour, Healthcheck, MemoryDocker
from tests.fake_events import FakeEventSource

NEW = "sha256:" + "n" * 64
OLD = "sha256:" + "o" * 64
OLD_ID = "a" * 64
NEW_ID = "b" * 64
OTHER_ID = "c" * 64
DEFAULTS = ReadyRules()
HEALTHCHECK = {"Test": ["CMD-SHELL", "test -f /tmp/healthy"], "Interval": 1_000_000_000}


def container(
    id_: str, image: str, name: str = "web", *, status: str = "running", exit_code: int = 0,
    health: str | None = None, healthcheck: dict[str, Any] | None = None,
    probes: tuple[str, ...] = (), restarting: bool = False,
    started_at: str = "2026-11-30T10:00:00.000000001Z",
) -> dict[str, Any]:
    """A ``GET /containers/{id}/json`` answer, as much of it as matters."""
    state: dict[str, Any] = {
        "Status": status, "Running": status == "running", "Restarting": restarting,
        "ExitCode": exit_code, "StartedAt": started_at,
    }
    if health is not None:
        state["Health"] = {"Status": health, "FailingStreak": 0,
                           "Log": [{"ExitCode": 1, "Output": p} for p in probes]}
    return {"Id": id_, "Name": "/" + name, "Image": image, "State": state,
            "Config": {"Image": "myorg/app:qa", "Healthcheck": healthcheck}}


class Engine:
    """Containers by id; inspect by id or name; every inspect recorded. ``hold`` makes the
    next inspects wait until :meth:`release`."""

    def __init__(self, events: Events) -> None:
        self.events = events
        self.containers: dict[str, dict[str, Any]] = {}
        self.inspects: list[str] = []
        self.subscribed_at_first_inspect: bool | None = None
        self.hold = False
        self.held: list[tuple[str, Deferred[dict[str, Any]]]] = []
        self.errors: list[Exception] = []

    def put(self, obj: dict[str, Any]) -> None:
        self.containers = {k: v for k, v in self.containers.items() if v["Name"] != obj["Name"]}
        self.containers[obj["Id"]] = obj

    def remove(self, id_: str) -> None:
        del self.containers[id_]

    def _find(self, ref: str) -> dict[str, Any]:
        for obj in self.containers.values():
            if ref in (obj["Id"], obj["Name"].lstrip("/")):
                return obj
        raise ContainerNotFound(f"No such container: {ref}", 404)

    def inspect_container(self, ref: str) -> Deferred[dict[str, Any]]:
        if self.subscribed_at_first_inspect is None:
            self.subscribed_at_first_inspect = bool(self.events.subscribers)
        self.inspects.append(ref)
        if self.errors:
            return fail(self.errors.pop(0))
        if self.hold:
            d: Deferred[dict[str, Any]] = Deferred()
            self.held.append((ref, d))
            return d
        try:
            return succeed(self._find(ref))
        except ContainerNotFound as e:
            return fail(e)

    def release(self) -> None:
        self.hold = False
        held, self.held = self.held, []
        for ref, d in held:
            try:
                d.callback(self._find(ref))
            except ContainerNotFound as e:
                d.errback(e)


class Events(FakeEventSource):
    def __init__(self) -> None:
        super().__init__(time=1_000)

    def emit(self, action: str, id_: str, name: str = "web", **attributes: str) -> None:
        exit_code = attributes.get("exitCode")
        self.publish(ContainerEvent(
            action=action, id=id_, name=name, image="myorg/app:qa", time_nano=self.tick(),
            exit_code=int(exit_code) if exit_code is not None else None,
            attributes={"name": name, **attributes},
        ))


@attrs.define
class Setup:
    clock: Clock = attrs.field(factory=Clock)
    events: Events = attrs.field(factory=Events)
    engine: Engine = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.engine = Engine(self.events)

    def wait(self, rules: ReadyRules = DEFAULTS, **kw: Any) -> Deferred[Readiness]:
        return wait_ready(self.clock, self.engine, self.events, "web", NEW, rules, **kw)

    def replace(self, new: dict[str, Any], old_id: str = OLD_ID) -> None:
        """What a supervisor does after the old container was stopped: remove it, run NEW."""
        self.events.emit("destroy", old_id)
        self.engine.put(new)
        self.events.emit("create", new["Id"])
        self.events.emit("start", new["Id"])


@pytest.fixture
def s() -> Setup:
    return Setup()


def result(d: Deferred[Readiness]) -> Readiness | None:
    """The result if the wait is over, else None."""
    out: list[Any] = []

    def keep(value: Any) -> Any:
        out.append(value)
        return value

    d.addBoth(keep)
    if not out:
        return None
    assert not hasattr(out[0], "raiseException"), out[0]
    r: Readiness = out[0]
    return r


def not_ready(d: Deferred[Readiness]) -> NotReady:
    r = result(d)
    assert isinstance(r, NotReady), r
    return r


def ready(d: Deferred[Readiness]) -> Ready:
    r = result(d)
    assert isinstance(r, Ready), r
    return r


def finished_cleanly(s: Setup) -> None:
    assert s.events.subscribers == []
    assert s.clock.getDelayedCalls() == []


# -- rules --------------------------------------------------------------------------------------


def test_default_rules_are_the_issues() -> None:
    assert ReadyRules() == ReadyRules(min_ready=5.0, ready_timeout=300.0)
    assert (DEFAULT_MIN_READY, DEFAULT_READY_TIMEOUT) == (5.0, 300.0)


@pytest.mark.parametrize("kw", [{"min_ready": -1}, {"ready_timeout": 0}, {"ready_timeout": -5}])
def test_rules_refuse_nonsense(kw: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        ReadyRules(**kw)


# -- ready --------------------------------------------------------------------------------------


def test_it_subscribes_before_it_inspects(s: Setup) -> None:
    s.wait()
    assert s.engine.inspects == ["web"]
    assert s.engine.subscribed_at_first_inspect is True


def test_a_healthy_replacement_that_is_already_there(s: Setup) -> None:
    s.engine.put(container(NEW_ID, NEW, health="healthy", healthcheck=HEALTHCHECK))
    with capturedLogs() as logged:
        r = ready(s.wait())
    assert r == Ready("web", NEW, NEW_ID, health_checked=True, waited=0.0)
    assert s.engine.inspects == ["web"]
    assert r.describe() == f"web ({NEW_ID[:12]}) on sha256:nnnnnnnnnnnn is healthy after 0.0s"
    assert [e["result"] for e in logged if "result" in e] == [r.describe()]
    finished_cleanly(s)


def test_supervisor_replaces_the_stopped_container_and_it_turns_healthy(s: Setup) -> None:
    s.engine.put(container(OLD_ID, OLD, status="exited", exit_code=143))
    d = s.wait()
    s.events.emit("die", OLD_ID, exitCode="143")  # late events of the old one change nothing
    s.events.emit("stop", OLD_ID)
    s.replace(container(NEW_ID, NEW, health="starting", healthcheck=HEALTHCHECK))
    s.clock.advance(100)
    assert result(d) is None
    s.events.emit("health_status: healthy", NEW_ID)
    r = ready(d)
    assert (r.container_id, r.health_checked, r.waited) == (NEW_ID, True, 100.0)
    assert s.engine.inspects == ["web", NEW_ID]  # one inspect per start, none per probe
    finished_cleanly(s)


def test_without_a_health_check_it_is_ready_after_min_ready(s: Setup) -> None:
    d = s.wait(ReadyRules(min_ready=5))
    s.clock.advance(2)
    s.replace(container(NEW_ID, NEW))
    s.clock.advance(4.9)
    assert result(d) is None
    s.clock.advance(0.1)
    assert ready(d) == Ready("web", NEW, NEW_ID, health_checked=False, waited=7.0)
    finished_cleanly(s)


def test_a_running_replacement_without_health_check_found_first_still_waits(s: Setup) -> None:
    s.engine.put(container(NEW_ID, NEW))
    d = s.wait(ReadyRules(min_ready=3))
    assert result(d) is None
    s.clock.advance(3)
    assert ready(d).waited == 3.0


def test_a_container_run_without_its_images_health_check_needs_min_ready(s: Setup) -> None:
    s.engine.put(container(NEW_ID, NEW, healthcheck={"Test": ["NONE"]}))
    d = s.wait(ReadyRules(min_ready=1))
    s.clock.advance(1)
    assert ready(d).health_checked is False


def test_health_can_be_ignored_by_the_caller(s: Setup) -> None:
    s.engine.put(container(NEW_ID, NEW, health="starting", healthcheck=HEALTHCHECK))
    d = s.wait(ReadyRules(min_ready=1), healthcheck=False)
    s.clock.advance(1)
    assert ready(d).health_checked is False


def test_a_recreated_container_renamed_into_place_then_started(s: Setup) -> None:
    """The order of ``--replace recreate``: the wait may begin before the new one starts."""
    s.engine.put(container(OLD_ID, OLD))
    d = s.wait(ReadyRules(min_ready=2))
    s.engine.put(container(NEW_ID, NEW, name="web-new", status="created"))
    s.events.emit("create", NEW_ID, name="web-new")
    s.engine.put(container(OLD_ID, OLD, name="web-old", status="exited"))
    s.events.emit("die", OLD_ID)
    s.events.emit("rename", OLD_ID, name="web-old", oldName="/web")
    s.engine.put(container(NEW_ID, NEW, status="created"))
    s.events.emit("rename", NEW_ID, name="web", oldName="/web-new")
    s.clock.advance(10)
    assert result(d) is None
    s.engine.put(container(NEW_ID, NEW))
    s.events.emit("start", NEW_ID)
    s.clock.advance(2)
    assert ready(d).container_id == NEW_ID


def test_events_during_an_inspect_are_handled_after_it(s: Setup) -> None:
    d = s.wait()
    s.engine.hold = True
    s.replace(container(NEW_ID, NEW, health="starting", healthcheck=HEALTHCHECK))
    s.events.emit("health_status: healthy", NEW_ID)
    assert result(d) is None
    s.engine.release()
    assert ready(d).health_checked


def test_a_lost_event_is_made_up_for_by_the_resync(s: Setup) -> None:
    d = s.wait()
    s.engine.put(container(NEW_ID, NEW, health="healthy", healthcheck=HEALTHCHECK))  # unheard
    assert result(d) is None
    s.events.resync()
    assert ready(d).container_id == NEW_ID
    assert s.engine.inspects == ["web", "web"]


def test_an_inspect_that_fails_is_logged_and_the_wait_goes_on(s: Setup) -> None:
    s.engine.errors = [DockerUnavailable("cannot reach the Docker engine")]
    with capturedLogs() as logged:
        d = s.wait(ReadyRules(min_ready=1))
    assert any(e["log_level"] == LogLevel.warn and "cannot reach" in str(e.get("why"))
               for e in logged)
    s.replace(container(NEW_ID, NEW))
    s.clock.advance(1)
    assert ready(d).container_id == NEW_ID


def test_other_containers_are_not_looked_at(s: Setup) -> None:
    d = s.wait()
    s.events.emit("start", OTHER_ID, name="db")
    s.events.emit("die", OTHER_ID, name="db", exitCode="1")
    s.events.emit("health_status: unhealthy", OTHER_ID, name="db")
    assert result(d) is None
    assert s.engine.inspects == ["web"]


# -- not ready ----------------------------------------------------------------------------------


def test_a_replacement_that_turns_unhealthy(s: Setup) -> None:
    d = s.wait()
    s.replace(container(NEW_ID, NEW, health="starting", healthcheck=HEALTHCHECK))
    s.engine.put(container(NEW_ID, NEW, health="unhealthy", healthcheck=HEALTHCHECK,
                           probes=("", "connection refused\n")))
    s.clock.advance(3)
    s.events.emit("health_status: unhealthy", NEW_ID)
    r = not_ready(d)
    assert (r.reason, r.container_id, r.waited) == (NotReadyReason.UNHEALTHY, NEW_ID, 3.0)
    assert r.detail == f"{NEW_ID[:12]} turned unhealthy; last check said: connection refused"
    assert r.describe().startswith("web not ready on sha256:nnnnnnnnnnnn (unhealthy): ")
    finished_cleanly(s)


def test_an_unhealthy_replacement_found_first(s: Setup) -> None:
    s.engine.put(container(NEW_ID, NEW, health="unhealthy", healthcheck=HEALTHCHECK,
                           probes=("boom",)))
    r = not_ready(s.wait())
    assert r.reason is NotReadyReason.UNHEALTHY
    assert r.detail.endswith("last check said: boom")
    assert s.engine.inspects == ["web"]


def test_an_unhealthy_replacement_without_a_health_log(s: Setup) -> None:
    d = s.wait()
    s.replace(container(NEW_ID, NEW, health="starting", healthcheck=HEALTHCHECK))
    s.engine.errors = [DockerUnavailable("gone")]
    s.events.emit("health_status: unhealthy", NEW_ID)
    assert not_ready(d).detail == f"{NEW_ID[:12]} turned unhealthy"


def test_a_replacement_that_dies_before_min_ready(s: Setup) -> None:
    d = s.wait(ReadyRules(min_ready=5))
    s.replace(container(NEW_ID, NEW))
    s.clock.advance(1.5)
    s.events.emit("die", NEW_ID, exitCode="3")
    r = not_ready(d)
    assert (r.reason, r.exit_code, r.container_id) == (NotReadyReason.EXITED, 3, NEW_ID)
    assert r.detail == f"{NEW_ID[:12]} stopped with code 3 after 1.5s, before it was ready"
    finished_cleanly(s)


def test_a_healthy_check_pending_replacement_that_dies(s: Setup) -> None:
    d = s.wait()
    s.replace(container(NEW_ID, NEW, health="starting", healthcheck=HEALTHCHECK))
    s.events.emit("die", NEW_ID, exitCode="137")
    assert not_ready(d).exit_code == 137


def test_a_replacement_found_dead_or_restarting(s: Setup) -> None:
    s.engine.put(container(NEW_ID, NEW, status="exited", exit_code=1))
    assert not_ready(s.wait()).reason is NotReadyReason.EXITED
    other = Setup()
    other.engine.put(container(NEW_ID, NEW, restarting=True, exit_code=2))
    assert not_ready(other.wait()).exit_code == 2


def test_a_replacement_that_was_removed_unheard_is_gone_at_the_resync(s: Setup) -> None:
    d = s.wait()
    s.replace(container(NEW_ID, NEW, health="starting", healthcheck=HEALTHCHECK))
    s.engine.remove(NEW_ID)
    s.events.resync()
    r = not_ready(d)
    assert (r.reason, r.exit_code) == (NotReadyReason.EXITED, None)


def test_a_replacement_that_started_and_died_before_its_inspect_answered(s: Setup) -> None:
    d = s.wait()
    s.engine.hold = True
    s.replace(container(NEW_ID, NEW))
    s.engine.put(container(NEW_ID, NEW, status="exited", exit_code=4))
    s.events.emit("die", NEW_ID, exitCode="4")
    s.engine.release()
    assert not_ready(d).exit_code == 4


def test_nothing_replaces_it(s: Setup) -> None:
    s.engine.put(container(OLD_ID, OLD, status="exited"))
    d = s.wait(ReadyRules(ready_timeout=30))
    s.clock.advance(29.9)
    assert result(d) is None
    s.clock.advance(0.1)
    r = not_ready(d)
    assert (r.reason, r.waited, r.container_id) == (NotReadyReason.NO_REPLACEMENT, 30.0, None)
    assert r.detail == f"no container named web ran it within 30s (last seen: {OLD_ID[:12]}" \
        " on sha256:oooooooooooo)"
    finished_cleanly(s)


def test_a_supervisor_that_starts_the_old_image_again_is_no_replacement(s: Setup) -> None:
    d = s.wait(ReadyRules(ready_timeout=30))
    s.replace(container(OTHER_ID, OLD))
    s.clock.advance(30)
    r = not_ready(d)
    assert r.reason is NotReadyReason.NO_REPLACEMENT
    assert OTHER_ID[:12] in r.detail


def test_a_replacement_not_healthy_in_time(s: Setup) -> None:
    d = s.wait(ReadyRules(ready_timeout=60))
    s.replace(container(NEW_ID, NEW, health="starting", healthcheck=HEALTHCHECK))
    s.events.emit("health_status: starting", NEW_ID)
    s.clock.advance(60)
    r = not_ready(d)
    assert (r.reason, r.container_id) == (NotReadyReason.TIMEOUT, NEW_ID)
    assert r.detail == f"{NEW_ID[:12]} runs it but was not healthy (health: starting)" \
        " within 60s"


def test_min_ready_longer_than_the_timeout(s: Setup) -> None:
    d = s.wait(ReadyRules(min_ready=20, ready_timeout=10))
    s.replace(container(NEW_ID, NEW))
    s.clock.advance(10)
    assert not_ready(d).detail.endswith("was not running for 20s within 10s")
    finished_cleanly(s)


def test_a_replacement_renamed_away_is_no_longer_waited_for(s: Setup) -> None:
    d = s.wait(ReadyRules(min_ready=5, ready_timeout=20))
    s.replace(container(NEW_ID, NEW))
    s.events.emit("rename", NEW_ID, name="web-x", oldName="/web")
    s.clock.advance(20)
    r = not_ready(d)
    assert r.reason is NotReadyReason.TIMEOUT
    assert r.container_id is None


def test_replacements_gone_before_their_inspect_mean_a_supervisor(s: Setup) -> None:
    """A restart loop of a container that dies at once (``docker run --rm``): each start is
    gone before it is inspected. Something supervises it, so it is a timeout, not
    no_replacement."""
    d = s.wait(ReadyRules(ready_timeout=10))
    for _ in range(3):
        s.events.emit("create", NEW_ID)
        s.events.emit("start", NEW_ID)
        s.events.emit("die", NEW_ID, exitCode="1")
        s.events.emit("destroy", NEW_ID)
    s.clock.advance(10)
    r = not_ready(d)
    assert r.reason is NotReadyReason.TIMEOUT
    assert "3 container(s) named web started and were gone" in r.detail


def test_a_replacement_restarted_unheard_must_run_min_ready_from_its_new_start(
    s: Setup,
) -> None:
    d = s.wait(ReadyRules(min_ready=5))
    s.replace(container(NEW_ID, NEW))
    s.clock.advance(3)
    # Its die was lost with the stream (a dockerd restart): the resync finds it started again.
    s.engine.put(container(NEW_ID, NEW, started_at="2026-11-30T10:00:03Z"))
    s.events.resync()
    s.clock.advance(4.9)
    assert result(d) is None, "ready from its first start, although it restarted since"
    s.clock.advance(0.1)
    assert ready(d).waited == 8.0
    finished_cleanly(s)


def test_a_start_heard_again_counts_only_when_it_is_a_new_start(s: Setup) -> None:
    d = s.wait(ReadyRules(min_ready=5))
    s.replace(container(NEW_ID, NEW))
    s.clock.advance(2)
    s.events.emit("start", NEW_ID)  # the same start, replayed after a reconnect: no change
    s.clock.advance(1)
    s.engine.put(container(NEW_ID, NEW, started_at="2026-11-30T10:00:03Z"))
    s.events.emit("start", NEW_ID)  # started again, its die unheard
    s.clock.advance(4.9)
    assert result(d) is None
    s.clock.advance(0.1)
    assert ready(d).waited == 8.0
    # the replace's start, both starts heard, and the look once min_ready was up
    assert s.engine.inspects.count(NEW_ID) == 4


def test_a_replacement_dead_unheard_when_min_ready_is_up_has_exited(s: Setup) -> None:
    d = s.wait(ReadyRules(min_ready=5))
    s.replace(container(NEW_ID, NEW))
    s.clock.advance(2)
    # It died, and its die was lost with the stream (no resync came yet):
    s.engine.put(container(NEW_ID, NEW, status="exited", exit_code=137))
    s.clock.advance(3)
    r = not_ready(d)
    assert (r.reason, r.exit_code, r.waited) == (NotReadyReason.EXITED, 137, 5.0)


def test_a_replacement_restarted_unheard_when_min_ready_is_up_runs_it_again(s: Setup) -> None:
    d = s.wait(ReadyRules(min_ready=5))
    s.replace(container(NEW_ID, NEW))
    s.clock.advance(2)
    s.engine.put(container(NEW_ID, NEW, started_at="2026-11-30T10:00:02Z"))  # nothing heard
    s.clock.advance(3)
    assert result(d) is None, "ready, although it has run 3 s since it started again"
    s.clock.advance(5)
    assert ready(d).waited == 10.0


def test_an_engine_error_when_min_ready_is_up_is_asked_again(s: Setup) -> None:
    d = s.wait(ReadyRules(min_ready=5))
    s.replace(container(NEW_ID, NEW))
    s.engine.errors = [DockerUnavailable("cannot reach the Docker engine")]
    s.clock.advance(5)
    assert result(d) is None
    s.clock.advance(SETTLED_AGAIN)
    assert ready(d).waited == 5.0 + SETTLED_AGAIN


def test_a_start_heard_of_a_replacement_that_died_again_is_exited(s: Setup) -> None:
    d = s.wait(ReadyRules(min_ready=5))
    s.replace(container(NEW_ID, NEW))
    s.engine.put(container(NEW_ID, NEW, status="exited", exit_code=3,
                           started_at="2026-11-30T10:00:03Z"))
    s.events.emit("start", NEW_ID)
    r = not_ready(d)
    assert (r.reason, r.exit_code) == (NotReadyReason.EXITED, 3)


def test_a_restarted_replacement_is_not_ready(s: Setup) -> None:
    d = s.wait(ReadyRules(min_ready=5))
    s.replace(container(NEW_ID, NEW))
    s.events.emit("die", NEW_ID, exitCode="0")
    s.events.emit("start", NEW_ID)
    s.events.emit("restart", NEW_ID)
    assert not_ready(d).reason is NotReadyReason.EXITED


def test_cancelling_the_wait_leaves_nothing_behind(s: Setup) -> None:
    d = s.wait()
    s.replace(container(NEW_ID, NEW))
    d.cancel()
    d.addErrback(lambda f: f.trap(Exception))
    finished_cleanly(s)


# -- over the in-memory engine ------------------------------------------------------------------


class OverMemory:
    """The wait over the real client, the event service and the in-memory engine, on one
    Clock: the engine's own order of events and answers."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_800_000_000)
        self.mem = MemoryDocker(clock=self.clock)
        self.agent = CountingAgent(self.mem.agent())
        self.client = DockerClient(self.clock, self.agent)
        self.events = EngineEvents(self.clock, self.client)
        self.events.startService()
        self.check = Healthcheck.shell("test -f /tmp/healthy")

    def wait(self, image_id: str, **rules: float) -> Deferred[Readiness]:
        return wait_ready(self.clock, self.client, self.events, "web", image_id,
                          ReadyRules(**{"min_ready": 2.0, "ready_timeout": 60.0, **rules}))

    def advance(self, seconds: float) -> None:
        for _ in range(int(seconds * 10)):
            self.clock.advance(0.1)


def test_over_the_engine_a_supervised_replacement_turns_healthy() -> None:
    o = OverMemory()
    o.mem.add_image(["myorg/app:qa"], healthcheck=o.check)
    o.mem.supervise("web", "myorg/app:qa", delay=0.2)
    new = o.mem.add_image(["myorg/app:qa"], healthcheck=o.check)
    o.agent.reset()
    d = o.wait(new)
    o.mem.stop_container("web", 10)
    o.advance(1.0)  # run again after 0.2 s, its first probe 1 s later
    assert result(d) is None
    o.advance(0.5)
    r = ready(d)
    assert r.health_checked and 1.1 <= r.waited <= 1.4
    assert r.container_id == o.mem.find_container("web").id  # type: ignore[union-attr]
    assert o.agent.count("GET", "containers/") == 2  # the name, then the one that started
    assert o.agent.count() == 2
    assert o.mem.events.streams == 1 and o.events.subscribers == 0


def test_over_the_engine_a_recreated_container_renamed_into_place() -> None:
    o = OverMemory()
    o.mem.add_image(["myorg/app:qa"])
    old = o.mem.run("web", "myorg/app:qa")
    new_image = o.mem.add_image(["myorg/app:qa"])
    d = o.wait(new_image)
    new = o.mem.create_container("web-new", {"Image": "myorg/app:qa"})
    o.mem.stop_container(old, 10)
    o.mem.rename_container(old, "web-old")
    o.mem.rename_container(new.id, "web")
    o.advance(5)
    assert result(d) is None, "created, not started"
    o.mem.start_container(new.id)
    o.advance(1.9)
    assert result(d) is None
    o.advance(0.2)
    r = ready(d)
    assert (r.container_id, r.health_checked) == (new.id, False)


def test_over_the_engine_a_build_that_fails_its_check_says_what_the_check_said() -> None:
    o = OverMemory()
    o.mem.add_image(["myorg/app:qa"], healthcheck=o.check)
    o.mem.supervise("web", "myorg/app:qa")
    bad = o.mem.add_image(["myorg/app:qa"], healthcheck=o.check,
                          behaviour=Behaviour.never_healthy("connection refused"))
    d = o.wait(bad)
    o.mem.stop_container("web", 10)
    o.advance(2.1)  # two failing probes
    r = not_ready(d)
    assert r.reason is NotReadyReason.UNHEALTHY
    assert r.detail.endswith("last check said: connection refused")


def test_over_the_engine_a_build_restarted_by_its_policy_has_exited() -> None:
    o = OverMemory()
    o.mem.add_image(["myorg/app:qa"], behaviour=Behaviour.dies(after=0.5, code=2))
    image_id = o.mem.image_id("myorg/app:qa")
    assert image_id is not None
    d = o.wait(image_id)
    o.mem.run("web", "myorg/app:qa", HostConfig={"RestartPolicy": {"Name": "always"}})
    o.advance(0.6)
    r = not_ready(d)
    assert (r.reason, r.exit_code) == (NotReadyReason.EXITED, 2)
