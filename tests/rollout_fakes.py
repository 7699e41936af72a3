"""A small engine for fast rollout tests, on a Clock: images with a HEALTHCHECK that passes or
fails (or that die), containers under a supervisor or not, and the engine's container events.

:class:`FakeEngine` has every call a round and a :class:`~deployer.replacers.StopReplacer` make
(images, containers, inspect, pull, stop, start, tag) and answers at once; what happens later
(a supervisor's restart, a health check's verdict, a container that dies) happens on the clock
and is told through :class:`FakeEvents` as a real engine's ``/events`` would. :class:`SimHost`
is one host: its engine, a :class:`~deployer.rollout_round.Rollout` over the rollout parts it is
given, and the :class:`~deployer.reconcile.Reconciler` that uses it.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.internet.task import Clock

from deployer.docker import Container, Image
from deployer.errors import ContainerNotFound, ImageNotFound, PullFailed
from deployer.events import ContainerEvent
from deployer.host_apps import HostApps
from deployer.model import Update
from deployer.notify import PauseNotice
from deployer.readiness import ReadyRules
from deployer.reconcile import Reconciler
from deployer.reference import familiar, parse_reference, split
from deployer.replace import ReplaceMode, Replacer
from deployer.replacers import StopReplacer
from deployer.rollout.wiring import Rollouts
from deployer.rollout_round import Rollout
from deployer.rounds import Outcome, RoundReport

FAST_RULES = ReadyRules(min_ready=1.0, ready_timeout=30.0)
HEALTH = {"Test": ["CMD-SHELL", "test -f /tmp/healthy"], "Interval": 1_000_000_000}


def manifest_digest(image_id: str) -> str:
    """The manifest digest the fake registry gives the build ``image_id``."""
    return "sha256:" + hashlib.sha256(image_id.encode()).hexdigest()


@attrs.define(eq=False)
class _Subscription:
    events: FakeEvents
    on_event: Callable[[ContainerEvent], object]
    on_resync: Callable[[], object] | None

    def cancel(self) -> None:
        if self in self.events.subscribers:
            self.events.subscribers.remove(self)


class FakeEvents:
    """An :class:`~deployer.events.EventSource` that tells what :meth:`emit` is given."""

    def __init__(self) -> None:
        self.subscribers: list[_Subscription] = []
        self.seen: list[ContainerEvent] = []

    def subscribe(self, on_event: Callable[[ContainerEvent], object],
                  on_resync: Callable[[], object] | None = None) -> _Subscription:
        subscription = _Subscription(self, on_event, on_resync)
        self.subscribers.append(subscription)
        return subscription

    def emit(self, event: ContainerEvent) -> None:
        self.seen.append(event)
        for subscription in list(self.subscribers):
            if subscription in self.subscribers:
                subscription.on_event(event)

    def resync(self) -> None:
        for subscription in list(self.subscribers):
            if subscription.on_resync is not None:
                subscription.on_resync()


@attrs.define
class Build:
    """What an image does when run: its health check ``passes`` (True), ``fails`` (False) or
    there is none (None); ``dies_after`` seconds it exits with ``exit_code`` (None: never)."""

    health: bool | None = None
    dies_after: float | None = None
    exit_code: int = 3


@attrs.define
class FakeImage:
    id: str
    build: Build
    tags: list[str] = attrs.field(factory=list)
    digests: list[str] = attrs.field(factory=list)

    def image(self) -> Image:
        return Image(self.id, tuple(self.tags), tuple(self.digests))


@attrs.define
class FakeContainer:
    id: str
    name: str
    image_ref: str
    image_id: str
    labels: dict[str, str]
    supervised: bool
    running: bool = True
    health: str | None = None
    exit_code: int = 0
    generation: int = 0


class FakeEngine:
    """One host's engine on ``clock`` (see the module docstring). ``restart_delay``: how long a
    supervisor waits before it runs a stopped container again; ``check_delay``: how long a
    health check takes to say healthy or unhealthy."""

    def __init__(self, clock: Clock, restart_delay: float = 0.5,
                 check_delay: float = 1.0) -> None:
        self.clock = clock
        self.events = FakeEvents()
        self.restart_delay = restart_delay
        self.check_delay = check_delay
        self.image_store: dict[str, FakeImage] = {}
        self.container_store: dict[str, FakeContainer] = {}
        #: What the registry holds: familiar repo:tag -> (image id, build).
        self.registry: dict[str, tuple[str, Build]] = {}
        #: Every build the registry was given: manifest digest -> (image id, build).
        self.manifests: dict[str, tuple[str, Build]] = {}
        self.calls: list[tuple[str, str]] = []
        self._ids = itertools.count(1)

    # -- what a test sets up --------------------------------------------------------------------

    def _new_id(self) -> str:
        return "sha256:" + hashlib.sha256(str(next(self._ids)).encode()).hexdigest()

    def publish(self, repotag: str, build: Build | None = None, image_id: str | None = None) -> str:
        """The registry holds a new build of ``repotag``; its image id."""
        image_id = image_id or self._new_id()
        self.registry[familiar(repotag)] = (image_id, build or Build())
        self.manifests[manifest_digest(image_id)] = (image_id, build or Build())
        return image_id

    def local(self, repotag: str, build: Build | None = None, image_id: str | None = None) -> str:
        """A local image tagged ``repotag``; its id."""
        image_id = image_id or self._new_id()
        image = self.image_store.setdefault(image_id, FakeImage(image_id, build or Build()))
        self._tag(image, familiar(repotag))
        return image_id

    def run(self, name: str, ref: str, supervised: bool = True,
            labels: Mapping[str, str] | None = None) -> str:
        """Run a container of ``ref`` (a local tag); under a supervisor that runs it again from
        the tag after it stops, unless ``supervised`` is False."""
        image = self.find_image(ref)
        assert image is not None, ref
        container = FakeContainer(self._new_id()[7:], name, familiar(ref), image.id,
                                  dict(labels or {}), supervised)
        self.container_store[container.id] = container
        self._started(container)
        return container.id

    # -- looking ------------------------------------------------------------------------------

    def find_image(self, ref: str) -> FakeImage | None:
        if ref in self.image_store:
            return self.image_store[ref]
        wanted = familiar(ref)
        for image in self.image_store.values():
            if wanted in image.tags or wanted in image.digests:
                return image
        return None

    def image_of(self, ref: str) -> str | None:
        image = self.find_image(ref)
        return image.id if image is not None else None

    def named(self, name: str) -> FakeContainer | None:
        for container in self.container_store.values():
            if container.name == name:
                return container
        return None

    def count(self, method: str, what: str = "") -> int:
        return sum(1 for m, w in self.calls if m == method and w.startswith(what))

    # -- the engine's API ---------------------------------------------------------------------

    async def images(self) -> list[Image]:
        self.calls.append(("images", ""))
        return [i.image() for i in self.image_store.values()]

    async def containers(self) -> list[Container]:
        self.calls.append(("containers", ""))
        out = []
        for c in self.container_store.values():
            if not c.running:
                continue
            image = self.find_image(c.image_ref)
            listed = c.image_ref if image is not None and image.id == c.image_id else c.image_id
            out.append(Container(c.id, c.name, listed, c.image_id, dict(c.labels)))
        return out

    async def inspect_container(self, ref: str) -> dict[str, Any]:
        self.calls.append(("inspect_container", ref))
        container = self.container_store.get(ref) or self.named(ref)
        if container is None:
            raise ContainerNotFound(f"No such container: {ref}", 404)
        build = self.image_store[container.image_id].build
        state: dict[str, Any] = {
            "Status": "running" if container.running else "exited",
            "Running": container.running, "Restarting": False,
            "ExitCode": container.exit_code,
        }
        if container.health is not None:
            state["Health"] = {"Status": container.health, "FailingStreak": 0, "Log": []}
        return {"Id": container.id, "Name": "/" + container.name, "Image": container.image_id,
                "State": state,
                "Config": {"Image": container.image_ref,
                           "Healthcheck": HEALTH if build.health is not None else None,
                           "Labels": dict(container.labels)}}

    async def inspect_image(self, name: str) -> Image:
        self.calls.append(("inspect_image", name))
        image = self.find_image(name)
        if image is None:
            raise ImageNotFound(f"No such image: {name}", 404)
        return image.image()

    async def pull(self, repotag: str) -> None:
        self.calls.append(("pull", repotag))
        key = familiar(repotag)
        name, _, by_digest = split(key)
        found = self.manifests.get(by_digest) if by_digest else self.registry.get(key)
        if found is None:
            raise PullFailed(f"pull {repotag}: manifest unknown", 404)
        image_id, build = found
        image = self.image_store.setdefault(image_id, FakeImage(image_id, build))
        digest = f"{name}@{manifest_digest(image_id)}"
        if digest not in image.digests:
            image.digests.append(digest)
        if not by_digest:  # a pull by digest tags nothing
            self._tag(image, key)

    async def stop(self, container_id: str, timeout: int) -> None:
        self.calls.append(("stop", container_id))
        container = self.container_store.get(container_id)
        if container is None:
            raise ContainerNotFound(f"No such container: {container_id}", 404)
        if container.running:
            self._died(container, 143, "stop")

    async def start(self, container_id: str) -> None:
        self.calls.append(("start", container_id))
        container = self.container_store.get(container_id)
        if container is None:
            raise ContainerNotFound(f"No such container: {container_id}", 404)
        if not container.running:
            container.running = True
            self._started(container)

    async def tag(self, image: str, repository: str, tag: str) -> None:
        self.calls.append(("tag", f"{repository}:{tag}"))
        found = self.find_image(image)
        if found is None:
            raise ImageNotFound(f"No such image: {image}", 404)
        self._tag(found, familiar(f"{repository}:{tag}"))

    # -- what happens on the clock -------------------------------------------------------------

    def _tag(self, image: FakeImage, repotag: str) -> None:
        for other in self.image_store.values():
            if other is not image and repotag in other.tags:
                other.tags.remove(repotag)
        if repotag not in image.tags:
            image.tags.append(repotag)

    def _emit(self, action: str, container: FakeContainer, **attributes: str) -> None:
        exit_code = attributes.get("exitCode")
        self.events.emit(ContainerEvent(
            action=action, id=container.id, name=container.name, image=container.image_ref,
            time_nano=int(self.clock.seconds() * 1e9),
            exit_code=int(exit_code) if exit_code is not None else None,
            attributes={"name": container.name, **attributes},
        ))

    def _started(self, container: FakeContainer) -> None:
        container.generation += 1
        generation = container.generation
        build = self.image_store[container.image_id].build
        container.health = "starting" if build.health is not None else None
        self._emit("start", container)
        if build.health is not None:
            verdict = "healthy" if build.health else "unhealthy"
            self.clock.callLater(self.check_delay, self._checked, container, generation, verdict)
        if build.dies_after is not None:
            self.clock.callLater(build.dies_after, self._exits, container, generation,
                                 build.exit_code)

    def _checked(self, container: FakeContainer, generation: int, verdict: str) -> None:
        if container.running and container.generation == generation:
            container.health = verdict
            self._emit(f"health_status: {verdict}", container)

    def _exits(self, container: FakeContainer, generation: int, code: int) -> None:
        if container.running and container.generation == generation:
            self._died(container, code, None)

    def _died(self, container: FakeContainer, code: int, verb: str | None) -> None:
        container.running = False
        container.exit_code = code
        if verb is not None:
            self._emit("kill", container)
        self._emit("die", container, exitCode=str(code))
        if verb is not None:
            self._emit(verb, container)
        if container.supervised:
            self.clock.callLater(self.restart_delay, self._restart, container)

    def _restart(self, old: FakeContainer) -> None:
        """``docker rm -f NAME; docker run --rm --name NAME REPO:TAG``."""
        if self.container_store.get(old.id) is not old:
            return
        del self.container_store[old.id]
        self._emit("destroy", old)
        self.run(old.name, old.image_ref, supervised=True, labels=old.labels)


class SimHost:
    """One host: a :class:`FakeEngine`, a :class:`Rollout` over ``rollouts``, its reconciler.

    ``notices`` are the pause notifications it sent, ``outcomes`` every replacement's,
    ``reports`` every round's."""

    def __init__(self, clock: Clock, name: str, rollouts: Rollouts, *,
                 rules: ReadyRules = FAST_RULES,
                 replacers: Mapping[ReplaceMode, Replacer] | None = None,
                 mode: ReplaceMode = ReplaceMode.STOP, label_enable: bool = False,
                 engine: FakeEngine | None = None) -> None:
        self.clock = clock
        self.name = name
        self.rollouts = rollouts
        self.engine = engine or FakeEngine(clock)
        self.notices: list[PauseNotice] = []
        self.outcomes: list[Outcome] = []
        self.reports: list[RoundReport] = []
        if replacers is None:
            replacers = {ReplaceMode.STOP: StopReplacer(clock, self.engine, self.engine.events,
                                                        rules, kill_timeout=10)}
        self.rollout = Rollout(clock, self.engine, rollouts, replacers, hostname=name, mode=mode,
                               notify=self.notices.append, observers=[self.outcomes.append],
                               apps=HostApps(rollouts.publish, self.engine.events))
        self.reconciler = Reconciler(clock, self.engine, rollout=self.rollout,
                                     observers=[self.reports.append], label_enable=label_enable)

    def deploy(self, pattern: str) -> None:
        self.reconciler.request(Update.from_reference(parse_reference(pattern), "test",
                                                      self.clock.seconds()))

    @property
    def idle(self) -> bool:
        return not self.reconciler.busy


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
