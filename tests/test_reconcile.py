"""The update round (:mod:`deployer.reconcile`) on the in-memory engine, with a Clock.

The engine is :class:`MemoryDocker` served to the real :class:`DockerClient` through its agent,
so every round goes through the client's HTTP encoding. The engine answers at once; the round
replaces stale containers through a standalone rollout (:class:`Rollout` with a
:class:`StopReplacer`), whose readiness wait follows the engine's own ``/events`` stream through
the daemon's :class:`EngineEvents`. Each container runs under the engine's supervisor, which
runs it again at once on what its tag points at now (unless :attr:`Host.supervised` is False
when it is run). ``min_ready`` is 0, so a replacement is ready on the clock's next turn:
:meth:`Host.settle` runs those turns without moving the time. A round thus runs to its end
inside :meth:`Reconciler.request` and :meth:`Host.settle`, unless a pull is held open with
``slow_pull``; the tests are plain synchronous functions.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from typing import Any, cast

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher

from deployer.docker import Container, DockerClient, Image, looks_like_id
from deployer.events import EngineEvents
from deployer.host_apps import HostApps
from deployer.model import Update
from deployer.readiness import ReadyRules
from deployer.reconcile import Reconciler, RoundReport, Stopped
from deployer.reference import parse_reference
from deployer.replace import ReplaceMode
from deployer.replacers import StopReplacer
from deployer.rollout import wiring
from deployer.rollout_round import Rollout
from deployer.rounds import Result
from deployer.testing.memory_docker import ContainerState, MemoryDocker
from tests.helpers import fired

REG = "registry.test:5000"
FOO = f"{REG}/myorg/foo"
BAR = f"{REG}/myorg/bar"
BAZ = f"{REG}/myorg/baz"
KILL_TIMEOUT = 7

PULL = "/images/create"
STOP = "/containers/{id}/stop"
INSPECT = "/containers/{id}/json"


class Host:
    """One host: the in-memory engine, the real client over it, the daemon's event stream of
    it, a Clock as the reactor, and the report of every round. The engine calls the tests look
    at (``mem.calls``) are those made after the event stream was opened."""

    def __init__(self, pull_stall_timeout: float = 120.0) -> None:
        self.clock = Clock()
        self.mem = MemoryDocker()
        self.client = DockerClient(self.clock, self.mem.agent(), base="http://docker",
                                   pull_stall_timeout=pull_stall_timeout)
        self.reports: list[RoundReport] = []
        self.names: dict[str, str] = {}
        self._events = itertools.count(1)
        self.events = EngineEvents(self.clock, self.client)
        self.events.startService()
        assert self.events.live, self.events.reason
        del self.mem.calls[:]
        #: Whether the containers run from now on run under a supervisor, which runs a stopped
        #: one again (on what its tag points at then).
        self.supervised = True
        self.mem.on_stop(self._stopped)

    def _stopped(self, container: ContainerState) -> None:
        self.names[container.id] = container.name

    def rollout(self, engine: Any = None, max_unavailable: int = 1) -> Rollout:
        engine = engine or self.client
        rules = ReadyRules(min_ready=0.0, ready_timeout=60.0)
        parts = wiring.standalone(self.clock, hostname="host-a", max_unavailable=max_unavailable)
        return Rollout(
            self.clock, engine, parts,
            {ReplaceMode.STOP: StopReplacer(self.clock, engine, self.events, rules,
                                            KILL_TIMEOUT)},
            hostname="host-a", apps=HostApps(parts.publish, self.events),
        )

    def reconciler(self, engine: Any = None, **kw: Any) -> Reconciler:
        kw.setdefault("kill_timeout", KILL_TIMEOUT)
        kw.setdefault("observers", [self.reports.append])
        kw.setdefault("rollout", self.rollout(engine))
        return Reconciler(self.clock, engine or self.client, **kw)

    def settle(self) -> None:
        """Run the timers due now (readiness after ``min_ready`` 0), without moving time."""
        for _ in range(10_000):
            now = self.clock.seconds()
            if not any(c.getTime() <= now for c in self.clock.getDelayedCalls()):
                return
            self.clock.advance(0)
        raise AssertionError("the clock does not settle")

    def update(self, pattern: str) -> Update:
        """A distinct update for ``pattern`` (``*``, ``repo`` or ``repo:tag``)."""
        event_id = f"event-{next(self._events)}"
        now = self.clock.seconds()
        if pattern == "*":
            return Update(repository="*", source="test", received=now, event_id=event_id)
        return Update.from_reference(parse_reference(pattern), "test", now, event_id)

    def local(self, repotag: str) -> str:
        """A new local image tagged ``repotag`` (the tag moves to it); returns its id."""
        return self.mem.add_image([repotag])

    def run(self, name: str, ref: str) -> str:
        """Run ``name`` from ``ref`` (under the engine's supervisor while :attr:`supervised`);
        the container's id."""
        if self.supervised:
            self.mem.supervise(name, ref)
            container = self.mem.find_container(name)
            assert container is not None and container.running, name
            container_id = container.id
        else:
            container_id = self.mem.run(name, ref)
        self.names[container_id] = name
        return container_id

    def stale(self, repotag: str, name: str) -> tuple[str, str, str]:
        """A container on ``repotag`` whose registry now holds a newer image:
        (container id, old image id, new image id)."""
        old = self.local(repotag)
        container_id = self.run(name, repotag)
        new = self.mem.publish(repotag)
        return container_id, old, new

    def pulled(self) -> list[str]:
        return [p.repotag for p in self.mem.pulls]

    def stops(self) -> list[tuple[str, int | None]]:
        """(container name, kill timeout) of every stop the engine received."""
        return [(self.names[cid], t) for cid, t in self.mem.stops]

    def running(self, container_id: str) -> bool:
        container = self.mem.containers.get(container_id)
        return container is not None and container.running

    def calls_since(self, start: int) -> list[tuple[str, str]]:
        """Engine calls from index ``start``, without the API version prefix."""
        return [(m, p.removeprefix("/v1.41")) for m, p in self.mem.calls[start:]]


class Held:
    """The engine of a :class:`Host` as a round sees it, with each stop (and, on demand, the
    next image list) held until the test lets it go."""

    def __init__(self, host: Host, hold_stops: bool = True) -> None:
        self.host = host
        self.client = host.client
        self.hold_stops = hold_stops
        self._stops: list[tuple[str, Deferred[None]]] = []
        self._listing: Deferred[None] | None = None

    @property
    def stopping(self) -> list[str]:
        """The names of the containers whose stop is held."""
        return [self.host.names[cid] for cid, _ in self._stops]

    def finish(self) -> None:
        """Let the first held stop happen."""
        _, d = self._stops.pop(0)
        d.callback(None)

    def hold_listing(self) -> Deferred[None]:
        self._listing = Deferred()
        return self._listing

    async def images(self) -> list[Image]:
        if self._listing is not None:
            held, self._listing = self._listing, None
            await held
        return await self.client.images()

    async def containers(self) -> list[Container]:
        return await self.client.containers()

    async def inspect_container(self, container_id: str) -> dict[str, Any]:
        return await self.client.inspect_container(container_id)

    async def inspect_image(self, name: str) -> Image:
        return await self.client.inspect_image(name)

    async def pull(self, repotag: str) -> None:
        await self.client.pull(repotag)

    async def stop(self, container_id: str, timeout: int) -> None:
        if self.hold_stops:
            held: Deferred[None] = Deferred()
            self._stops.append((container_id, held))
            await held
        await self.client.stop(container_id, timeout)

    async def start(self, container_id: str) -> None:
        await self.client.start(container_id)

    async def tag(self, image: str, repository: str, tag: str) -> None:
        await self.client.tag(image, repository, tag)


@pytest.fixture
def host() -> Host:
    return Host()


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    """Every log event emitted during the test."""
    events: list[LogEvent] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    yield events
    globalLogPublisher.removeObserver(observer)


@pytest.fixture(autouse=True)
def no_crash(logged: list[LogEvent]) -> Iterator[None]:
    """No test may end with the update loop crashed or a round lost to an unexpected error."""
    yield
    broken = [
        e for e in logged
        if e.get("log_format") in ("update loop failed unexpectedly",
                                   "update round for {patterns} failed")
    ]
    assert broken == [], [e.get("log_failure") for e in broken]


def all_updates(reports: list[RoundReport]) -> Counter[Update]:
    return Counter(u for report in reports for u in report.updates)


# -- 1. patterns ------------------------------------------------------------------------------


def test_star_pulls_every_tagged_image_and_never_untagged_ones(host: Host) -> None:
    host.local(f"{FOO}:qa")
    host.local(f"{BAR}:prod")
    host.local("busybox:1")
    host.mem.add_image([])  # <none>:<none>
    host.mem.add_image([], digests=[f"{FOO}@sha256:" + "ab" * 32])  # RepoTags null
    for tag in (f"{FOO}:qa", f"{BAR}:prod", "busybox:1"):
        host.mem.publish(tag)
    r = host.reconciler()

    r.request(host.update("*"))

    assert sorted(host.pulled()) == sorted([f"{FOO}:qa", f"{BAR}:prod", "busybox:1"])
    assert set(host.reports[-1].pulled) == {f"{FOO}:qa", f"{BAR}:prod", "busybox:1"}
    assert host.reports[-1].failed == {}


def test_repository_pattern_pulls_each_of_its_tags_and_nothing_else(host: Host) -> None:
    ours = [f"{FOO}:qa", f"{FOO}:prod", f"{FOO}:latest"]
    others = [f"{FOO}bar:qa", f"{FOO}/sub:qa", f"{BAR}:qa", "myorg/foo:qa"]
    for tag in ours + others:
        host.local(tag)
        host.mem.publish(tag)
    r = host.reconciler()

    r.request(host.update(FOO))

    assert sorted(host.pulled()) == sorted(ours)
    assert set(host.reports[-1].pulled) == set(ours)


def test_tag_pattern_pulls_exactly_that_tag(host: Host) -> None:
    for tag in (f"{FOO}:qa", f"{FOO}:qa2", f"{FOO}:prod", f"{BAR}:qa"):
        host.local(tag)
        host.mem.publish(tag)
    r = host.reconciler()

    r.request(host.update(f"{FOO}:qa"))

    assert host.pulled() == [f"{FOO}:qa"]


def test_pattern_without_local_tags_pulls_nothing_but_is_reported(host: Host) -> None:
    host.local(f"{BAR}:qa")
    r = host.reconciler()
    u = host.update(f"{FOO}:qa")

    r.request(u)

    assert host.pulled() == []
    assert host.mem.count("POST", PULL) == 0
    assert host.reports[-1].updates == (u,)
    assert host.reports[-1].pulled == {}
    fired(r.wait_idle())


def test_docker_hub_names_are_compared_in_their_familiar_form(host: Host) -> None:
    one, _, new_one = host.stale("busybox:1", "on-one")
    # started with the long name, and with no tag at all (latest)
    long_name = host.run("long-name", "docker.io/library/busybox:1")
    latest, _, new_latest = host.stale("busybox:latest", "on-latest")
    no_tag = host.run("no-tag", "busybox")
    r = host.reconciler()

    r.request(Update(repository="library/busybox", registry="docker.io", tag="1",
                     source="test", received=0.0))
    host.settle()

    assert host.pulled() == ["busybox:1"]
    assert host.reports[-1].pulled == {"busybox:1": new_one}
    assert sorted(name for name, _ in host.stops()) == ["long-name", "on-one"]
    assert {s.repotag for s in host.reports[-1].stopped} == {"busybox:1"}

    r.request(Update(repository="library/busybox", registry="index.docker.io",
                     source="test", received=0.0))
    host.settle()

    assert sorted(host.pulled()) == ["busybox:1", "busybox:1", "busybox:latest"]
    assert host.reports[-1].pulled == {"busybox:1": new_one, "busybox:latest": new_latest}
    assert sorted(s.name for s in host.reports[-1].stopped) == ["no-tag", "on-latest"]
    assert not any(host.running(c) for c in (one, long_name, latest, no_tag))


# -- 2. which containers are stale --------------------------------------------------------------


def test_container_on_an_outdated_image_is_stopped_with_the_kill_timeout(host: Host) -> None:
    cid, old, new = host.stale(f"{FOO}:qa", "app")
    r = host.reconciler()
    u = host.update(f"{FOO}:qa")

    r.request(u)
    assert host.stops() == [("app", KILL_TIMEOUT)]
    assert host.reports == []  # the round waits until the replacement is ready
    host.settle()

    report = host.reports[-1]
    assert report.stopped == (Stopped("app", cid, f"{FOO}:qa", old, new),)
    assert report.pulled == {f"{FOO}:qa": new}
    assert report.updates == (u,)
    assert report.ok
    restarted = host.mem.find_container("app")
    assert restarted is not None and restarted.running and restarted.image_id == new
    [outcome] = report.outcomes
    assert outcome.result is Result.REPLACED and outcome.name == "app"


def test_a_container_that_nothing_restarts_is_started_again_and_the_app_paused(
    host: Host,
) -> None:
    """The new required behaviour of --replace stop without a supervisor."""
    host.supervised = False
    cid, old, new = host.stale(f"{FOO}:qa", "app")
    r = host.reconciler()
    r.request(host.update(f"{FOO}:qa"))
    assert not host.running(cid)
    host.clock.advance(59)
    assert host.reports == [] and not host.running(cid)
    host.clock.advance(1)  # --ready_timeout
    host.settle()
    assert host.running(cid)  # the very container, started again
    assert host.mem.image_id(f"{FOO}:qa") == old
    [report] = host.reports
    [outcome] = report.outcomes
    assert outcome.result is Result.ROLLED_BACK and outcome.reason == "no_replacement"
    assert not report.ok and report.errors[0].startswith(f"{FOO}:qa: rollout paused")
    assert r.rollout is not None
    record = fired(r.rollout.rollouts.pauses.get(f"{FOO}:qa"))
    assert record is not None and record.image_id == new


def test_container_already_on_the_new_image_is_left_running(host: Host) -> None:
    image = host.local(f"{FOO}:qa")
    cid = host.run("app", f"{FOO}:qa")
    host.mem.publish(f"{FOO}:qa", image_id=image)  # the registry has nothing newer
    r = host.reconciler()

    r.request(host.update(f"{FOO}:qa"))

    assert host.pulled() == [f"{FOO}:qa"]
    assert host.reports[-1].pulled == {f"{FOO}:qa": image}
    assert host.reports[-1].stopped == ()
    assert host.mem.count("POST", STOP) == 0
    assert host.running(cid)


def test_container_whose_tag_moved_before_the_round_is_found_with_one_inspect(
    host: Host,
) -> None:
    old = host.local(f"{FOO}:qa")
    moved = host.run("moved", f"{FOO}:qa")
    new = host.local(f"{FOO}:qa")  # someone pulled the tag outside deployer
    current = host.run("current", f"{FOO}:qa")
    host.mem.publish(f"{FOO}:qa", image_id=new)
    host.local(f"{BAR}:qa")
    host.mem.publish(f"{BAR}:qa")
    listed = {c.id: c.image for c in fired(Deferred.fromCoroutine(host.client.containers()))}
    assert looks_like_id(listed[moved]) and listed[current] == f"{FOO}:qa"
    start = len(host.mem.calls)
    r = host.reconciler()

    # A round for another repository already learns which tag "moved" was started from ...
    r.request(host.update(f"{BAR}:qa"))
    assert host.mem.count("GET", INSPECT) == 1
    assert ("GET", f"/containers/{moved}/json") in host.calls_since(start)
    assert host.mem.count("POST", STOP) == 0

    # ... and the next round uses what it learnt, without inspecting again (the inspects of
    # the replacement's readiness wait are by name, then of the new container).
    start = len(host.mem.calls)
    r.request(host.update(f"{FOO}:qa"))
    host.settle()
    assert ("GET", f"/containers/{moved}/json") not in host.calls_since(start)
    assert host.reports[-1].stopped == (Stopped("moved", moved, f"{FOO}:qa", old, new),)
    assert host.stops() == [("moved", KILL_TIMEOUT)]
    assert host.running(current)


def test_containers_started_by_id_or_pinned_by_digest_are_never_stopped(host: Host) -> None:
    digest = "sha256:" + "cd" * 32
    old = host.mem.add_image([f"{FOO}:qa"], digests=[f"{FOO}@{digest}"])
    by_id = host.run("by-id", old)
    by_short_id = host.run("by-short-id", old.removeprefix("sha256:")[:12])
    pinned = host.run("pinned", f"{FOO}@{digest}")
    tagged = host.run("tagged", f"{FOO}:qa")
    new = host.mem.publish(f"{FOO}:qa")
    r = host.reconciler()

    r.request(host.update(f"{FOO}:qa"))
    r.request(host.update("*"))  # nothing to pull by digest either
    host.settle()

    assert host.reports[0].pulled == {f"{FOO}:qa": new}
    assert [s.name for s in host.reports[0].stopped] == ["tagged"]  # the round did its job
    assert host.reports[1].stopped == ()
    assert host.reports[1].failed == {}
    assert host.pulled() == [f"{FOO}:qa", f"{FOO}:qa"]
    assert host.stops() == [("tagged", KILL_TIMEOUT)]
    assert all(host.running(c) for c in (by_id, by_short_id, pinned))
    assert not host.running(tagged)


def test_containers_of_other_repositories_are_untouched(host: Host) -> None:
    foo, _, _ = host.stale(f"{FOO}:qa", "foo")
    bar, _, _ = host.stale(f"{BAR}:qa", "bar")
    foobar, _, _ = host.stale(f"{FOO}bar:qa", "foobar")
    r = host.reconciler()

    r.request(host.update(FOO))
    host.settle()

    assert host.pulled() == [f"{FOO}:qa"]
    assert host.stops() == [("foo", KILL_TIMEOUT)]
    assert host.running(bar) and host.running(foobar) and not host.running(foo)


# -- 3. safety ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "message"),
    [(None, "unknown blob"), (404, "manifest unknown"), (500, "registry exploded")],
    ids=["error-line-in-200-stream", "http-404", "http-500"],
)
def test_failed_pull_stops_none_of_that_tags_containers(
    host: Host, status: int | None, message: str,
) -> None:
    qa, qa_old, _ = host.stale(f"{FOO}:qa", "qa")
    prod, _, prod_new = host.stale(f"{FOO}:prod", "prod")
    host.mem.fail_pull(f"{FOO}:qa", message, status=status)
    r = host.reconciler()

    r.request(host.update(FOO))
    host.settle()

    report = host.reports[-1]
    assert set(report.failed) == {f"{FOO}:qa"}
    assert message in report.failed[f"{FOO}:qa"]
    assert report.pulled == {f"{FOO}:prod": prod_new}
    assert not report.ok
    assert host.stops() == [("prod", KILL_TIMEOUT)]
    assert host.running(qa) and not host.running(prod)
    assert host.mem.image_id(f"{FOO}:qa") == qa_old
    fired(r.wait_idle())


def test_stop_error_is_reported_and_the_next_container_still_handled(host: Host) -> None:
    healthy, _, _ = host.stale(f"{FOO}:qa", "healthy")
    broken = host.run("broken", f"{FOO}:qa")
    listed = [c.id for c in fired(Deferred.fromCoroutine(host.client.containers()))]
    assert listed == [broken, healthy]  # the failing one is handled first

    def refuse(container: ContainerState) -> None:
        if container.name == "broken":
            raise RuntimeError("cgroup is stuck")

    host.mem.on_stop(refuse)
    r = host.reconciler()

    r.request(host.update(f"{FOO}:qa"))
    host.settle()

    report = host.reports[-1]
    assert len(report.errors) == 1
    assert report.errors[0].startswith("replace broken:")
    assert "cgroup is stuck" in report.errors[0]
    assert [o.result for o in report.outcomes] == [Result.ERROR, Result.REPLACED]
    assert [s.name for s in report.stopped] == ["healthy"]
    assert host.stops() == [("broken", KILL_TIMEOUT), ("healthy", KILL_TIMEOUT)]
    assert not report.ok


def test_container_gone_before_its_stop_is_not_an_error(host: Host) -> None:
    first, _, _ = host.stale(f"{FOO}:qa", "first")
    second = host.run("second", f"{FOO}:qa")  # listed, and so handled, first

    def remove_the_other(container: ContainerState) -> None:
        if container.id == second:
            host.mem.remove(first)

    host.mem.on_stop(remove_the_other)
    r = host.reconciler()

    r.request(host.update(f"{FOO}:qa"))
    host.settle()

    report = host.reports[-1]
    assert [s.name for s in report.stopped] == ["second"]
    assert report.errors == ()
    assert report.ok
    assert host.mem.count("POST", STOP) == 2


# -- 4. bounded concurrency -------------------------------------------------------------------


def test_at_most_max_pulls_run_at_once_and_all_complete(host: Host) -> None:
    tags = [f"{FOO}:t{i}" for i in range(5)]
    releases: dict[str, Deferred[None]] = {}
    for tag in tags:
        host.stale(tag, tag.rpartition(":")[2])
        releases[tag] = Deferred()
        host.mem.slow_pull(tag, releases[tag])
    r = host.reconciler(max_pulls=2)

    r.request(host.update(FOO))
    idle = r.wait_idle()

    assert host.pulled() == tags[:2]
    assert host.mem.pulls_in_progress == 2
    host.clock.advance(3)
    for n, tag in enumerate(tags):
        assert not idle.called
        releases[tag].callback(None)
        assert len(host.pulled()) == min(5, n + 3)
        assert host.mem.pulls_in_progress == min(2, 4 - n)
    host.settle()
    fired(idle)

    assert host.mem.max_pulls_in_progress == 2
    assert sorted(host.pulled()) == tags
    report = host.reports[-1]
    assert sorted(report.pulled) == tags
    assert len(report.stopped) == 5
    assert report.finished - report.started == 3
    # measured on the reconciler's clock: the first two pulls were held for 3 s
    assert sorted(report.pull_seconds.values()) == [0, 0, 0, 3, 3]


# -- 5. coalescing ----------------------------------------------------------------------------


def test_request_whose_tags_all_wait_for_their_pull_joins_the_running_round(
    host: Host,
) -> None:
    for tag in ("a", "b", "c"):
        host.stale(f"{FOO}:{tag}", f"app-{tag}")
    release: Deferred[None] = Deferred()
    host.mem.slow_pull(f"{FOO}:a", release)
    r = host.reconciler(max_pulls=1)
    first = host.update(FOO)
    r.request(first)
    assert host.pulled() == [f"{FOO}:a"]  # b and c queue behind the semaphore

    joined = [host.update(f"{FOO}:b"), host.update(f"{FOO}:c"), host.update(f"{FOO}:c")]
    for u in joined:
        r.request(u)
    release.callback(None)
    host.settle()

    assert host.pulled() == [f"{FOO}:a", f"{FOO}:b", f"{FOO}:c"]
    assert len(host.reports) == 1
    assert host.reports[0].updates == (first, *joined)
    assert host.reports[0].patterns == (FOO, f"{FOO}:b", f"{FOO}:c")
    assert len(host.reports[0].stopped) == 3
    fired(r.wait_idle())


def test_request_with_a_tag_outside_the_running_round_does_not_join_it(host: Host) -> None:
    """``foo`` names foo:a and foo:b; a round that pulls foo:b but not foo:a cannot serve it."""
    for tag in (f"{REG}/myorg/baz:z", f"{BAR}:x", f"{FOO}:a", f"{FOO}:b"):
        host.stale(tag, tag.rpartition("/")[2].replace(":", "-"))
    hold_baz: Deferred[None] = Deferred()
    hold_bar: Deferred[None] = Deferred()
    host.mem.slow_pull(f"{REG}/myorg/baz:z", hold_baz)
    host.mem.slow_pull(f"{BAR}:x", hold_bar)
    r = host.reconciler(max_pulls=1)
    r.request(host.update(f"{REG}/myorg/baz:z"))
    r.request(host.update(f"{BAR}:x"))
    r.request(host.update(f"{FOO}:b"))
    hold_baz.callback(None)
    # the second round pulls bar:x (held), then foo:b
    assert host.pulled() == [f"{REG}/myorg/baz:z", f"{BAR}:x"]

    every_tag = host.update(FOO)
    r.request(every_tag)
    hold_bar.callback(None)
    host.settle()

    fired(r.wait_idle())
    [serving] = [rep for rep in host.reports if every_tag in rep.updates]
    assert set(serving.pulled) == {f"{FOO}:a", f"{FOO}:b"}
    assert Counter(host.pulled())[f"{FOO}:a"] == 1
    assert [s.name for s in serving.stopped] == ["foo-a"]  # foo-b went in the round before


def test_request_during_its_tags_pull_gets_exactly_one_more_pull(host: Host) -> None:
    host.stale(f"{FOO}:qa", "app")
    release: Deferred[None] = Deferred()
    host.mem.slow_pull(f"{FOO}:qa", release)
    r = host.reconciler()
    first, second = host.update(f"{FOO}:qa"), host.update(FOO)
    r.request(first)
    r.request(second)  # foo:qa is being pulled: this push may be newer than what it gets
    assert host.pulled() == [f"{FOO}:qa"]
    newest = host.mem.publish(f"{FOO}:qa")

    release.callback(None)
    host.settle()

    assert host.pulled() == [f"{FOO}:qa", f"{FOO}:qa"]
    assert [rep.updates for rep in host.reports] == [(first,), (second,)]
    assert host.reports[-1].pulled == {f"{FOO}:qa": newest}
    assert host.mem.image_id(f"{FOO}:qa") == newest
    fired(r.wait_idle())


def test_a_hundred_requests_during_a_pull_cost_one_more_pull(host: Host) -> None:
    host.stale(f"{FOO}:qa", "qa")
    host.stale(f"{FOO}:prod", "prod")
    release: Deferred[None] = Deferred()
    host.mem.slow_pull(f"{FOO}:prod", release)
    r = host.reconciler()
    updates = [host.update(FOO) for _ in range(100)]
    for u in updates:
        r.request(u)

    release.callback(None)
    host.settle()

    assert Counter(host.pulled()) == {f"{FOO}:qa": 2, f"{FOO}:prod": 2}
    assert len(host.reports) == 2
    assert all_updates(host.reports) == Counter(updates)
    fired(r.wait_idle())


def test_no_request_is_lost(host: Host) -> None:
    for tag in ("a", "b", "c"):
        host.stale(f"{FOO}:{tag}", f"app-{tag}")
    host.stale(f"{BAR}:x", "app-x")
    release: Deferred[None] = Deferred()
    host.mem.slow_pull(f"{FOO}:a", release)
    r = host.reconciler(max_pulls=1)
    sent = [host.update(FOO)]
    r.request(sent[0])
    # while foo:a is held: some join, some wait for the next round
    for pattern in (f"{FOO}:b", f"{FOO}:a", f"{BAR}:x", "*", f"{FOO}:c", f"{FOO}:b", FOO,
                    f"{REG}/myorg/none:qa"):
        sent.append(host.update(pattern))
        r.request(sent[-1])

    release.callback(None)
    host.settle()
    fired(r.wait_idle())
    sent.append(host.update(f"{BAR}:x"))
    r.request(sent[-1])
    host.settle()

    assert all_updates(host.reports) == Counter(sent)  # each one exactly once
    # the requests that came while foo:a was held cost one more pull of each foo tag
    assert {t: n for t, n in Counter(host.pulled()).items() if t.startswith(f"{FOO}:")} == {
        f"{FOO}:a": 2, f"{FOO}:b": 2, f"{FOO}:c": 2
    }


def test_requests_that_joined_a_round_are_kept_when_the_engine_goes_away(host: Host) -> None:
    host.stale(f"{FOO}:a", "app-a")
    host.stale(f"{FOO}:b", "app-b")
    release: Deferred[None] = Deferred()
    host.mem.slow_pull(f"{FOO}:a", release)
    r = host.reconciler(max_pulls=1, retry_delay=1.0)
    first, joined = host.update(FOO), host.update(f"{FOO}:b")
    r.request(first)
    r.request(joined)  # foo:b waits behind foo:a: this joins the round

    host.mem.down = True  # the pull of foo:b cannot start
    release.callback(None)
    assert host.reports == []
    host.mem.down = False
    host.clock.advance(1.0)

    fired(r.wait_idle())
    assert [rep.updates for rep in host.reports] == [(first, joined)]
    assert set(host.reports[0].pulled) == {f"{FOO}:a", f"{FOO}:b"}


# -- 6. a slow or hung pull holds up only its own tag ---------------------------------------------


def test_a_held_pull_holds_up_only_the_requests_for_its_tag(host: Host) -> None:
    foo_id, _, _ = host.stale(f"{FOO}:qa", "foo")
    bar_id, _, _ = host.stale(f"{BAR}:qa", "bar")
    release: Deferred[None] = Deferred()
    host.mem.slow_pull(f"{FOO}:qa", release)
    r = host.reconciler()
    r.request(host.update(f"{FOO}:qa"))
    start = len(host.mem.calls)

    r.request(host.update(f"{BAR}:qa"))  # another repository: served at once
    host.settle()
    bar = host.mem.find_container("bar")
    assert bar is not None and bar.running and bar.id != bar_id
    assert host.calls_since(start) == [
        ("GET", "/images/json"),
        ("GET", "/containers/json"),
        ("POST", PULL),
        ("GET", f"/images/{BAR}:qa/json"),
        ("GET", "/containers/bar/json"),  # the readiness wait looks at the name first
        ("POST", f"/containers/{bar_id}/stop"),
        ("GET", f"/containers/{bar.id}/json"),  # then at the container that started
        ("GET", f"/containers/{bar.id}/json"),  # and again once it has run --min_ready
    ]
    assert [rep.patterns for rep in host.reports] == [(f"{BAR}:qa",)]

    start = len(host.mem.calls)
    again = host.update(FOO)
    r.request(again)  # wants foo:qa, which is being pulled: waits for that pull
    assert host.calls_since(start) == []

    release.callback(None)
    host.settle()

    foo = host.mem.find_container("foo")
    assert foo is not None and foo.running and foo.id != foo_id
    assert host.calls_since(start) == [
        # the end of the first round for foo:qa
        ("GET", f"/images/{FOO}:qa/json"),
        ("GET", "/containers/foo/json"),
        ("POST", f"/containers/{foo_id}/stop"),
        ("GET", f"/containers/{foo.id}/json"),
        ("GET", f"/containers/{foo.id}/json"),  # once it has run --min_ready
        # the round for the request that waited: one more pull (the push may be newer)
        ("GET", "/images/json"),
        ("GET", "/containers/json"),
        ("POST", PULL),
        ("GET", f"/images/{FOO}:qa/json"),
    ]
    assert [rep.patterns for rep in host.reports] == [
        (f"{BAR}:qa",), (f"{FOO}:qa",), (FOO,)
    ]
    fired(r.wait_idle())


def test_a_tag_whose_pull_finished_is_replaced_while_its_round_still_pulls(host: Host) -> None:
    slow, _, _ = host.stale(f"{FOO}:slow", "slow")
    quick, _, quick_new = host.stale(f"{FOO}:quick", "quick")
    release: Deferred[None] = Deferred()
    host.mem.slow_pull(f"{FOO}:slow", release)
    r = host.reconciler()

    r.request(host.update(FOO))

    assert not host.running(quick) and host.running(slow)
    host.settle()
    assert host.reports == []  # the round reports once every tag is done
    release.callback(None)
    host.settle()
    [report] = host.reports
    assert [s.name for s in report.stopped] == ["quick", "slow"]
    assert report.pulled[f"{FOO}:quick"] == quick_new
    assert not host.running(slow)


def test_a_hung_pull_fails_after_the_stall_timeout_while_other_repositories_deploy() -> None:
    """The registry of foo hangs on the manifest: the engine does not even answer. bar's
    requests, before and after, are served at once; foo's pull fails after the stall timeout,
    and nothing of foo is stopped."""
    host = Host(pull_stall_timeout=120)
    hung, hung_image, _ = host.stale(f"{FOO}:qa", "foo")
    bar, _, _ = host.stale(f"{BAR}:qa", "bar")
    host.mem.slow_pull(f"{FOO}:qa", answer=False)  # never released
    r = host.reconciler(max_pulls=2)

    r.request(host.update(f"{FOO}:qa"))
    host.clock.advance(1)
    r.request(host.update(f"{BAR}:qa"))
    host.settle()
    assert [rep.patterns for rep in host.reports] == [(f"{BAR}:qa",)]
    assert not host.running(bar)
    # a minute later, another push of bar: served at once too
    host.clock.advance(60)
    replacement = host.run("bar-2", f"{BAR}:qa")
    new_bar = host.mem.publish(f"{BAR}:qa")
    r.request(host.update(f"{BAR}:qa"))
    host.settle()
    assert len(host.reports) == 2
    assert host.reports[-1].pulled == {f"{BAR}:qa": new_bar}
    assert not host.running(replacement)

    host.clock.advance(58.9)
    assert len(host.reports) == 2 and host.running(hung)
    host.clock.advance(0.1)  # 120 s after the pull started

    report = host.reports[-1]
    assert report.patterns == (f"{FOO}:qa",)
    assert set(report.failed) == {f"{FOO}:qa"}
    assert "no progress from registry registry.test:5000 for 120 s" in report.failed[f"{FOO}:qa"]
    assert report.stalled == (f"{FOO}:qa",)
    assert report.stopped == () and report.pulled == {}
    assert host.running(hung) and host.mem.image_id(f"{FOO}:qa") == hung_image
    host.mem.flush()
    assert host.mem.pulls_abandoned == [f"{FOO}:qa"]
    fired(r.wait_idle())


def test_replacements_of_different_apps_do_not_wait_for_each_other() -> None:
    """Two rounds side by side: each app has its own rollout slots."""
    host = Host()
    host.stale(f"{FOO}:qa", "foo")
    host.stale(f"{BAR}:qa", "bar")
    engine = Held(host)
    r = host.reconciler(engine)

    r.request(host.update(f"{FOO}:qa"))
    r.request(host.update(f"{BAR}:qa"))

    assert engine.stopping == ["foo", "bar"]
    engine.finish()
    engine.finish()
    host.settle()
    assert [[s.name for s in rep.stopped] for rep in host.reports] == [["foo"], ["bar"]]
    fired(r.wait_idle())


def test_the_containers_of_one_app_are_replaced_one_at_a_time() -> None:
    host = Host()
    host.stale(f"{FOO}:qa", "first")
    host.run("second", f"{FOO}:qa")
    engine = Held(host)
    r = host.reconciler(engine)

    r.request(host.update(f"{FOO}:qa"))

    assert engine.stopping == ["second"]  # listed first
    engine.finish()
    assert engine.stopping == []  # its replacement is not ready yet: the slot is held
    host.settle()
    assert engine.stopping == ["first"]
    engine.finish()
    host.settle()
    assert [s.name for s in host.reports[-1].stopped] == ["second", "first"]
    fired(r.wait_idle())


def test_without_a_rollout_stops_are_one_at_a_time_on_the_host() -> None:
    """Two rounds side by side: the second round's stop waits for the first's."""
    host = Host()
    host.stale(f"{FOO}:qa", "foo")
    host.stale(f"{BAR}:qa", "bar")
    engine = Held(host)
    r = Reconciler(host.clock, engine, kill_timeout=KILL_TIMEOUT, observers=[host.reports.append])

    r.request(host.update(f"{FOO}:qa"))
    r.request(host.update(f"{BAR}:qa"))

    assert engine.stopping == ["foo"]  # bar's round has pulled, and waits for the host's turn
    assert host.pulled() == [f"{FOO}:qa", f"{BAR}:qa"]
    engine.finish()
    assert engine.stopping == ["bar"]
    engine.finish()
    assert engine.stopping == []
    assert [[s.name for s in rep.stopped] for rep in host.reports] == [["foo"], ["bar"]]
    fired(r.wait_idle())


def test_requests_that_arrive_while_a_round_reads_the_engine_join_it() -> None:
    host = Host()
    for repo in (FOO, BAR, BAZ):
        host.stale(f"{repo}:qa", repo.rpartition("/")[2])
    release: Deferred[None] = Deferred()
    host.mem.slow_pull(f"{FOO}:qa", release)
    engine = Held(host, hold_stops=False)
    r = host.reconciler(engine)
    r.request(host.update(f"{FOO}:qa"))
    start = len(host.mem.calls)

    listing = engine.hold_listing()
    r.request(host.update(f"{BAR}:qa"))  # starts a round, which waits for the image list
    r.request(host.update(f"{BAZ}:qa"))  # joins it
    r.request(host.update(FOO))  # wants foo:qa, which is being pulled: waits for that
    listing.callback(None)
    host.settle()

    assert [rep.patterns for rep in host.reports] == [(f"{BAR}:qa", f"{BAZ}:qa")]
    assert Counter(host.calls_since(start))[("GET", "/images/json")] == 1
    assert sorted(s.name for s in host.reports[0].stopped) == ["bar", "baz"]
    release.callback(None)
    host.settle()
    fired(r.wait_idle())
    assert [rep.patterns for rep in host.reports] == [
        (f"{BAR}:qa", f"{BAZ}:qa"), (f"{FOO}:qa",), (FOO,)
    ]
    assert Counter(host.pulled())[f"{FOO}:qa"] == 2


# -- 7. engine down ----------------------------------------------------------------------------


def test_engine_down_retries_with_a_capped_backoff_until_it_is_back(host: Host) -> None:
    cid, _, new = host.stale(f"{FOO}:qa", "app")
    host.mem.down = True
    r = host.reconciler(retry_delay=1.0, retry_max=5.0)
    first, later = host.update(f"{FOO}:qa"), host.update(f"{BAR}:qa")

    r.request(first)
    idle = r.wait_idle()
    delays = []
    for _ in range(5):
        [retry] = host.clock.getDelayedCalls()
        delays.append(retry.getTime() - host.clock.seconds())
        if len(delays) == 2:
            r.request(later)  # waits for the retry, does not try the engine meanwhile
            assert host.clock.getDelayedCalls() == [retry]
        host.clock.advance(delays[-1])
        assert not idle.called
    assert delays == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert host.reports == [] and host.mem.calls == []

    host.mem.down = False
    [retry] = host.clock.getDelayedCalls()
    host.clock.advance(retry.getTime() - host.clock.seconds())

    fired(idle)
    assert host.clock.getDelayedCalls() == []
    assert [rep.updates for rep in host.reports] == [(first, later)]
    assert host.reports[0].pulled == {f"{FOO}:qa": new}
    assert not host.running(cid)

    # success resets the backoff
    host.mem.down = True
    r.request(host.update(f"{FOO}:qa"))
    [retry] = host.clock.getDelayedCalls()
    assert retry.getTime() - host.clock.seconds() == 1.0
    r.stop()


def test_an_engine_that_goes_away_mid_round_keeps_the_requests_and_reports_the_stops(
    host: Host,
) -> None:
    quick, _, _ = host.stale(f"{FOO}:quick", "quick")
    slow, _, _ = host.stale(f"{FOO}:slow", "slow")
    release: Deferred[None] = Deferred()
    host.mem.slow_pull(f"{FOO}:slow", release)
    r = host.reconciler(retry_delay=1.0)
    u = host.update(FOO)
    r.request(u)
    assert not host.running(quick)  # replaced while foo:slow still pulls
    host.settle()

    host.mem.down = True
    release.callback(None)  # foo:slow's pull ends; the engine is gone when it is inspected

    [partial] = host.reports
    assert [s.name for s in partial.stopped] == ["quick"]  # told, though the round is redone
    assert not partial.ok and partial.errors[-1].endswith("the round is retried")
    assert host.running(slow)
    host.mem.down = False
    host.clock.advance(1.0)
    host.settle()
    fired(r.wait_idle())
    assert [rep.updates for rep in host.reports] == [(u,), (u,)]
    assert [s.name for s in host.reports[-1].stopped] == ["slow"]
    assert host.reports[-1].ok


def test_stop_cancels_a_pending_retry(host: Host) -> None:
    host.stale(f"{FOO}:qa", "app")
    host.mem.down = True
    r = host.reconciler(retry_delay=1.0)
    r.request(host.update(f"{FOO}:qa"))
    assert len(host.clock.getDelayedCalls()) == 1

    r.stop()

    assert host.clock.getDelayedCalls() == []
    host.mem.down = False
    host.clock.advance(100)
    assert host.mem.calls == []
    assert host.reports == []


# -- 8. engine calls per round -----------------------------------------------------------------


def _round_calls(containers: int) -> tuple[Counter[tuple[str, str]], int, int]:
    host = Host()
    host.local(f"{FOO}:qa")
    for n in range(containers):
        host.run(f"app-{n}", f"{FOO}:qa")
    host.mem.publish(f"{FOO}:qa")
    fired(Deferred.fromCoroutine(host.client.version()))
    start = len(host.mem.calls)
    r = host.reconciler()

    r.request(host.update(f"{FOO}:qa"))
    host.settle()

    assert len(host.reports[-1].stopped) == containers
    calls = Counter(host.calls_since(start))
    stops = sum(n for (m, p), n in calls.items() if m == "POST" and p.endswith("/stop"))
    inspects = sum(n for (m, p), n in calls.items()
                   if m == "GET" and p.startswith("/containers/") and p != "/containers/json")
    others = Counter({k: n for k, n in calls.items()
                      if not k[1].endswith("/stop")
                      and not (k[1].startswith("/containers/") and k[1] != "/containers/json")})
    return others, stops, inspects


def test_engine_calls_per_round_do_not_grow_with_containers() -> None:
    """Per stale container: its stop and the three inspects of its readiness wait (the name,
    the container that started, and that container once it has run --min_ready); nothing else
    grows."""
    few, few_stops, few_inspects = _round_calls(3)
    many, many_stops, many_inspects = _round_calls(30)

    assert (few_stops, many_stops) == (3, 30)
    assert (few_inspects, many_inspects) == (9, 90)
    assert few == many == {("GET", "/images/json"): 1, ("GET", "/containers/json"): 1,
                           ("POST", PULL): 1, ("GET", f"/images/{FOO}:qa/json"): 1}


# -- 9. observers ------------------------------------------------------------------------------


def test_failing_observer_breaks_neither_the_round_nor_later_rounds(
    host: Host, logged: list[LogEvent],
) -> None:
    seen: list[RoundReport] = []

    def broken(report: RoundReport) -> None:
        seen.append(report)
        raise ValueError("observer bug")

    host.stale(f"{FOO}:qa", "foo")
    host.stale(f"{BAR}:qa", "bar")
    r = host.reconciler(observers=[broken, host.reports.append])

    r.request(host.update(f"{FOO}:qa"))
    r.request(host.update(f"{BAR}:qa"))
    host.settle()

    assert [[s.name for s in rep.stopped] for rep in host.reports] == [["foo"], ["bar"]]
    assert seen == host.reports
    failures = [e for e in logged
                if e.get("log_format") == "round observer {observer!r} failed"]
    assert len(failures) == 2
    assert all(e["log_failure"].check(ValueError) for e in failures)
    fired(r.wait_idle())


def test_wait_idle_fires_at_once_when_nothing_is_pending(host: Host) -> None:
    r = host.reconciler()
    fired(r.wait_idle())


def test_an_engine_error_while_listing_keeps_the_requests_for_a_retry() -> None:
    clock = Clock()
    mem = MemoryDocker()
    mem.publish("myorg/foo:qa")
    mem.add_image(["myorg/foo:qa"])
    old = mem.run("app", "myorg/foo:qa")
    new = mem.publish("myorg/foo:qa")
    mem.failing_calls.append(("GET", "/images/json", 500))
    reports: list[RoundReport] = []
    r = Reconciler(clock, DockerClient(clock, mem.agent(), base="http://docker"),
                   observers=[reports.append], retry_delay=1.0)
    r.request(Update("myorg/foo", source="test", received=0.0, tag="qa"))
    mem.flush()
    assert reports == [] and r.busy  # the round failed before pulling; the request waits
    assert mem.count("POST", "/images/create") == 0
    clock.advance(1.0)
    mem.flush()
    assert not r.busy
    assert [s.id for s in reports[-1].stopped] == [old]
    assert mem.image_id("myorg/foo:qa") == new


def test_a_flood_for_one_pattern_is_bounded_while_the_engine_is_away() -> None:
    from deployer.reconcile import MAX_QUEUED_PER_PATTERN

    clock = Clock()
    mem = MemoryDocker()
    mem.down = True
    reports: list[RoundReport] = []
    r = Reconciler(clock, DockerClient(clock, mem.agent(), base="http://docker"),
                   observers=[reports.append], retry_delay=1.0)
    for i in range(MAX_QUEUED_PER_PATTERN + 500):
        r.request(Update("myorg/foo", source="test", received=float(i), tag="qa"))
    mem.flush()
    assert r.merged == 500
    mem.down = False
    clock.advance(1.0)
    mem.flush()
    [report] = reports
    assert len(report.updates) == MAX_QUEUED_PER_PATTERN
    assert report.updates[0].received == 0.0
    assert report.updates[-1].received == float(MAX_QUEUED_PER_PATTERN + 499)  # the newest


def test_stopping_ends_retries_and_starts_no_round() -> None:
    clock = Clock()
    mem = MemoryDocker()
    mem.down = True
    r = Reconciler(clock, DockerClient(clock, mem.agent(), base="http://docker"),
                   retry_delay=1.0)
    r.request(Update("myorg/foo", source="test", received=0.0, tag="qa"))
    mem.flush()
    assert clock.getDelayedCalls()  # a retry is scheduled
    r.stop()
    assert not [c for c in clock.getDelayedCalls() if c.active()]
    mem.down = False
    calls = len(mem.calls)
    r.request(Update("myorg/bar", source="test", received=1.0, tag="qa"))
    clock.advance(100)
    mem.flush()
    assert len(mem.calls) == calls  # nothing more reaches the engine
