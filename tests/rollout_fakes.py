"""Hosts for fast rollout tests, on a Clock, each on the in-memory engine.

:class:`SimHost` is one host as the daemon wires it: a
:class:`~deployer.testing.memory_docker.MemoryDocker` on the clock (its health checks, its
supervisor, its ``/events``), the real :class:`~deployer.docker.DockerClient` over it, the
daemon's :class:`~deployer.events.EngineEvents` of it, a :class:`~deployer.rollout_round.Rollout`
over the rollout parts it is given, and the :class:`~deployer.reconcile.Reconciler` that uses it.
What an image does when run (:class:`Build`) is the engine's own
:class:`~deployer.testing.memory_health.Healthcheck` and
:class:`~deployer.testing.memory_health.Behaviour`; a supervisor runs a stopped container again
:data:`SUPERVISOR_DELAY` seconds later, from its tag.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import attrs
from twisted.internet.task import Clock

from deployer.docker import DockerClient
from deployer.events import EngineEvents
from deployer.host_apps import HostApps
from deployer.model import Update
from deployer.notify import PauseNotice
from deployer.readiness import ReadyRules
from deployer.reconcile import Reconciler
from deployer.reference import parse_reference
from deployer.replace import ReplaceMode, Replacer
from deployer.replacers import StopReplacer
from deployer.rollout.wiring import Rollouts
from deployer.rollout_round import Rollout
from deployer.rounds import Outcome, RoundReport
from deployer.testing.memory_common import digest_of, normalize
from deployer.testing.memory_docker import (
    Behaviour,
    ContainerState,
    Healthcheck,
    MemoryDocker,
    MemorySupervisor,
)
from deployer.testing.memory_health import STEADY
from tests.stack.health_images import HEALTHY_TEST

FAST_RULES = ReadyRules(min_ready=1.0, ready_timeout=30.0)
SUPERVISOR_DELAY = 0.5
"""Seconds a supervisor waits before it runs a stopped container again."""


def manifest_digest(image_id: str) -> str:
    """The manifest digest the pretend registry gives the build ``image_id`` (published
    without a digest of its own)."""
    return digest_of("manifest", image_id)


def health_check(every: float = 1.0) -> Healthcheck:
    """A ``HEALTHCHECK`` probed ``every`` seconds whose first failing probe says unhealthy:
    a verdict ``every`` seconds after the start."""
    return Healthcheck.shell(HEALTHY_TEST, interval=every, retries=1)


@attrs.frozen
class Build:
    """What the containers of an image do: its ``healthcheck`` (None: none) and how they
    ``behave`` (their probes pass or fail, they exit...)."""

    healthcheck: Healthcheck | None = None
    behaviour: Behaviour = STEADY

    @classmethod
    def dies(cls, after: float, code: int) -> Build:
        """No health check; exits with ``code`` ``after`` seconds."""
        return cls(None, Behaviour.dies(after, code))


GOOD = Build(health_check())
"""Healthy one second after the start."""
BAD = Build(health_check(), Behaviour.never_healthy("connection refused"))
"""Unhealthy one second after the start."""
PLAIN = Build()
"""No health check; runs until stopped."""


class SimHost:
    """One host (see the module docstring) on ``clock``: its engine :attr:`mem`, the client
    :attr:`client`, its :attr:`events`, :attr:`rollout` over ``rollouts`` and
    :attr:`reconciler`.

    ``notices`` are the pause notifications it sent, ``outcomes`` every replacement's,
    ``reports`` every round's."""

    def __init__(self, clock: Clock, name: str, rollouts: Rollouts, *,
                 rules: ReadyRules = FAST_RULES,
                 replacers: Mapping[ReplaceMode, Replacer] | None = None,
                 mode: ReplaceMode = ReplaceMode.STOP, label_enable: bool = False) -> None:
        self.clock = clock
        self.name = name
        self.rollouts = rollouts
        self.mem = MemoryDocker(clock=clock)
        self.client = DockerClient(clock, self.mem.agent())
        self.events = EngineEvents(clock, self.client, what=f"the engine of {name}")
        self.events.startService()
        assert self.events.live, self.events.reason
        self.notices: list[PauseNotice] = []
        self.outcomes: list[Outcome] = []
        self.reports: list[RoundReport] = []
        if replacers is None:
            replacers = {ReplaceMode.STOP: StopReplacer(clock, self.client, self.events, rules,
                                                        kill_timeout=10)}
        self.rollout = Rollout(clock, self.client, rollouts, replacers, hostname=name,
                               mode=mode, notify=self.notices.append,
                               observers=[self.outcomes.append],
                               apps=HostApps(rollouts.publish, self.events))
        self.reconciler = Reconciler(clock, self.client, rollout=self.rollout,
                                     observers=[self.reports.append], label_enable=label_enable)

    # -- what a test sets up --------------------------------------------------------------------

    def local(self, repotag: str, build: Build = PLAIN, image_id: str | None = None) -> str:
        """A local image tagged ``repotag``; its id."""
        return self.mem.add_image([repotag], image_id, healthcheck=build.healthcheck,
                                  behaviour=build.behaviour)

    def publish(self, repotag: str, build: Build = PLAIN, image_id: str | None = None) -> str:
        """The registry holds a new build of ``repotag``; its image id."""
        return self.mem.publish(repotag, image_id, healthcheck=build.healthcheck,
                                behaviour=build.behaviour)

    def run(self, name: str, ref: str, supervised: bool = True,
            labels: Mapping[str, str] | None = None) -> str:
        """Run a container of ``ref`` (a local tag); its id. Under a supervisor that runs it
        again from the tag after it stops, unless ``supervised`` is False (the containers the
        supervisor runs have the image's labels, not ``labels``)."""
        container_id = self.mem.run(name, ref, labels)
        if supervised:  # the engine's supervisor, taking over the container that runs
            supervisor = MemorySupervisor(self.mem, name, ref, SUPERVISOR_DELAY)
            supervisor.active = True
            self.mem.supervisors.append(supervisor)
        return container_id

    def deploy(self, pattern: str) -> None:
        self.reconciler.request(Update.from_reference(parse_reference(pattern), "test",
                                                      self.clock.seconds()))

    # -- looking --------------------------------------------------------------------------------

    def named(self, name: str) -> ContainerState | None:
        return self.mem.find_container(name)

    def image_of(self, ref: str) -> str | None:
        return self.mem.image_id(ref)

    def stopped(self, container_id: str) -> bool:
        """Whether the host asked the engine to stop ``container_id``."""
        return any(cid == container_id for cid, _ in self.mem.stops)

    def started(self, container_id: str) -> bool:
        """Whether the host asked the engine to start ``container_id``."""
        return self.mem.count("POST", f"/containers/{container_id}/start") > 0

    def pulls_of(self, ref: str) -> int:
        """How many pulls of ``ref`` (``repo:tag``, or ``repo@sha256:…`` by digest) the host
        asked for."""
        wanted = normalize(ref)
        return sum(1 for p in self.mem.pulls if p.repotag == wanted)

    def tags_from(self, image: str) -> int:
        """How many times the host asked the engine to tag ``image`` (a name as the host gave
        it); ``""``: any image."""
        return sum(1 for method, path in self.mem.calls
                   if method == "POST" and path.endswith(f"{image}/tag")
                   and "/images/" in path)

    @property
    def stops(self) -> int:
        return len(self.mem.stops)

    @property
    def starts(self) -> int:
        return self.mem.count("POST", "/containers/{id}/start")

    @property
    def pulls(self) -> int:
        return len(self.mem.pulls)

    @property
    def idle(self) -> bool:
        return not self.reconciler.busy


def health(container: ContainerState | None) -> str | None:
    """The health status of ``container`` (None without a health check)."""
    if container is None or container.health is None:
        return None
    return container.health.status


def run_until(clock: Clock, done: Callable[[], bool], limit: float = 600.0, step: float = 0.1,
              each: Callable[[], object] | None = None) -> float:
    """Advance ``clock`` by ``step`` until ``done()``; the time it took. ``each`` is called
    after every step (an invariant to check)."""
    start = clock.seconds()
    while not done():
        if clock.seconds() - start > limit:
            raise AssertionError(f"not done within {limit} s of clock time")
        clock.advance(step)
        if each is not None:
            each()
    return clock.seconds() - start
