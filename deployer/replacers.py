"""The ``stop`` way of replacing a container (:class:`StopReplacer`), and a stand-in for a way
that this daemon cannot use (:class:`RefusingReplacer`).

:class:`StopReplacer` stops the stale container, so that its supervisor (systemd
``Restart=always`` running ``docker run --rm --name NAME REPO:TAG``, fleet) starts a container of
the same name again, from the tag, which now points at the new image; then it waits until that
container is ready (:func:`deployer.readiness.wait_ready`). Its rollback puts the tag back on the
previous image, then:

- when nothing ran the new image at all (``no_replacement``: nothing supervises the container),
  it starts the stopped container again (``docker start`` of its id);
- otherwise it stops the container of the new build that runs (if any), so that the supervisor
  starts the previous build from the tag;

and in both cases waits until a container of the name is ready on the previous image again.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from deployer.errors import ContainerNotFound, DeployerError, DockerError
from deployer.events import EventSource
from deployer.readiness import NotReady, NotReadyReason, Readiness, ReadyRules, wait_ready
from deployer.reference import split
from deployer.replace import Replacement, ReplaceMode

log = Logger()


class ReplaceRefused(DeployerError):
    """A replacer that does not take the container down at all (the mode is not available, or
    the container cannot be replaced that way); the container is left as it was."""


class Tagger(Protocol):
    async def tag(self, image: str, repository: str, tag: str) -> None: ...


class StopEngine(Protocol):
    """What :class:`StopReplacer` needs of the engine (:class:`deployer.docker.DockerClient`)."""

    async def stop(self, container_id: str, timeout: int) -> None: ...

    async def start(self, container_id: str) -> None: ...

    async def tag(self, image: str, repository: str, tag: str) -> None: ...

    async def inspect_container(self, container_id: str) -> dict[str, Any]: ...


def _short(image_id: str) -> str:
    return image_id.removeprefix("sha256:")[:12]


def _ignore_cancel(failure: Failure) -> None:
    failure.trap(CancelledError)


async def tag_back(engine: Tagger, replacement: Replacement) -> bool:
    """Point ``replacement.app`` at ``replacement.old_image`` again; False (logged) when the
    engine refused."""
    repository, tag, _ = split(replacement.app)
    try:
        await engine.tag(replacement.old_image, repository, tag or "latest")
    except DockerError as e:
        log.error("cannot point {app} at the previous image {old} again: {error}",
                  app=replacement.app, old=_short(replacement.old_image), error=str(e))
        return False
    log.info("{app} points at the previous image {old} again", app=replacement.app,
             old=_short(replacement.old_image))
    return True


class StopReplacer:
    """``--replace stop`` (see the module docstring). ``kill_timeout`` is what ``docker stop``
    waits before it kills; ``rules`` say when a container is ready."""

    def __init__(self, clock: IReactorTime, engine: StopEngine, events: EventSource,
                 rules: ReadyRules, kill_timeout: int = 10) -> None:
        self.clock = clock
        self.engine = engine
        self.events = events
        self.rules = rules
        self.kill_timeout = kill_timeout

    def _wait(self, name: str, image_id: str) -> Deferred[Readiness]:
        return wait_ready(self.clock, self.engine, self.events, name, image_id, self.rules)

    async def replace(self, replacement: Replacement) -> Readiness:
        """Stop the container and wait for its replacement. :class:`ContainerNotFound` when it
        was gone before it could be stopped, another :class:`DockerError` when it could not be
        stopped: nothing was taken down then."""
        container = replacement.container
        waiting = self._wait(replacement.name, replacement.new_image)  # subscribed from now on
        try:
            await self.engine.stop(container.id, self.kill_timeout)
        except BaseException:
            waiting.addErrback(_ignore_cancel)
            waiting.cancel()
            raise
        log.info(
            "stopped {name} ({old:.19}) so that it restarts on {tag} ({new:.19})",
            name=container.name, old=replacement.old_image, tag=replacement.app,
            new=replacement.new_image,
        )
        return await waiting

    async def roll_back(self, replacement: Replacement, outcome: NotReady) -> None:
        await tag_back(self.engine, replacement)
        waiting: Deferred[Readiness] | None = None
        try:
            if outcome.reason is NotReadyReason.NO_REPLACEMENT:
                # The stopped container still holds the name: wait once it runs again.
                await self._start_again(replacement)
                waiting = self._wait(replacement.name, replacement.old_image)
            else:
                # The name is held by a container of the new build (or by none): what the
                # supervisor starts next, from the tag, is the previous build.
                waiting = self._wait(replacement.name, replacement.old_image)
                await self._stop_new_build(replacement, outcome)
        except DockerError as e:
            if waiting is not None:
                waiting.addErrback(_ignore_cancel)
                waiting.cancel()
            log.error("rolling back {name} failed: {error}; it may not run at all now",
                      name=replacement.name, error=str(e))
            return
        back = await waiting
        if back.ready:
            log.info("{name} is back on the previous build: {how}", name=replacement.name,
                     how=back.describe())
        else:
            log.error("{name} did not come back on the previous build {old}: {why}",
                      name=replacement.name, old=_short(replacement.old_image),
                      why=back.describe())

    async def _start_again(self, replacement: Replacement) -> None:
        container = replacement.container
        await self.engine.start(container.id)
        log.warn(
            "started {name} ({id}) again on {old}: no container named {name} ran {new} within"
            " {timeout:g}s after it was stopped, so nothing seems to supervise it (run it under"
            " a supervisor, or use --replace recreate)",
            name=container.name, id=container.id[:12], old=_short(replacement.old_image),
            new=_short(replacement.new_image), timeout=self.rules.ready_timeout,
        )

    async def _stop_new_build(self, replacement: Replacement, outcome: NotReady) -> None:
        """Stop what runs the new build under the name, so that the supervisor starts the
        previous one from the tag."""
        stopped = set()
        if outcome.container_id:
            await self._stop_quietly(outcome.container_id)
            stopped.add(outcome.container_id)
        # The supervisor may have started the new build again (after it exited) before the
        # tag was put back: stop that one too.
        try:
            current = await self.engine.inspect_container(replacement.name)
        except ContainerNotFound:
            return
        state = current.get("State") or {}
        cid = str(current.get("Id", ""))
        if (state.get("Running") and cid not in stopped
                and current.get("Image") != replacement.old_image):
            await self._stop_quietly(cid)

    async def _stop_quietly(self, container_id: str) -> None:
        try:
            await self.engine.stop(container_id, self.kill_timeout)
        except ContainerNotFound:
            return
        log.info("stopped {id} of the new build, so that the previous one starts again",
                 id=container_id[:12])


class RefusingReplacer:
    """A replace mode this daemon cannot use: it never takes a container down, and says so."""

    def __init__(self, mode: ReplaceMode, why: str) -> None:
        self.mode = mode
        self.why = why

    async def replace(self, replacement: Replacement) -> Readiness:
        log.error(
            "not replacing {name}: --replace {mode} (or its deployer.replace label) {why}; it"
            " keeps running {old}",
            name=replacement.name, mode=self.mode.value, why=self.why,
            old=_short(replacement.old_image),
        )
        raise ReplaceRefused(f"--replace {self.mode.value} {self.why}")

    async def roll_back(self, replacement: Replacement, outcome: NotReady) -> None:
        """Nothing to undo: :meth:`replace` never takes anything down."""
