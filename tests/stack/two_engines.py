"""One harness, two engines: the in-memory engine on a Clock, and a private dockerd.

A suite written against :class:`Engine` runs unchanged on both (the ``engine`` fixture is
parametrized ``memory`` / ``real``, the real half marked ``real``): whatever passes on both keeps
the in-memory engine honest. Each side gives the daemon's parts (:attr:`Engine.client`,
:attr:`Engine.events`, :attr:`Engine.reactor` for ``wait_ready``...) and the test's own hands on
the engine, which do not go through the client: build an image (``plain``, ``healthy``,
``failing`` health check, ``dying``), run, rename or remove a container, supervise one, look at
one, stop and start the engine.

Time: the real side waits on the reactor; the memory side advances its Clock in small steps
(yielding to the reactor between them, for what treq does there), so its half is not timed.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock, deferLater

from deployer.backoff import backoff
from deployer.docker import DockerClient
from deployer.engine_address import engine_agent, engine_pool
from deployer.events import EngineEvents
from deployer.testing.agents import CountingAgent
from deployer.testing.memory_docker import MemoryDocker
from deployer.testing.memory_lifecycle import MemorySupervisor
from tests.stack.docker_stack import (
    Dockerd,
    StackError,
    Supervisor,
    build_image,
)
from tests.stack.health_images import (
    FAILING_TEST,
    build_dying_image,
    build_health_image,
    memory_dying_image,
    memory_health_image,
    memory_image,
)

STEP = 0.05
"""Seconds between two looks (real) or two advances of the Clock (memory)."""


class Supervised(Protocol):
    runs: int

    async def wait_running_image(self, image_id: str, timeout: float = 30.0) -> str:
        """The id of the running container of the name once it runs ``image_id``."""


class Engine(Protocol):
    kind: str
    reactor: IReactorTime
    agent: CountingAgent
    client: DockerClient
    events: EngineEvents

    def now(self) -> float: ...

    async def build(self, recipe: str, ref: str, version: str, **kw: Any) -> str:
        """A local image ``ref``: ``plain``, ``healthy``, ``failing`` (its health check never
        passes) or ``dying`` (``after=``, ``code=``); its id."""

    async def run(self, ref: str, name: str, restart: str | None = None) -> str:
        """``docker run -d --name NAME [--restart RESTART] REF``; its id."""

    async def rename(self, name: str, new: str) -> None: ...

    async def remove(self, name: str) -> None:
        """``docker rm -f``."""

    def inspect(self, name: str) -> dict[str, Any] | None: ...

    def image_id(self, ref: str) -> str | None: ...

    def supervise(self, name: str, ref: str) -> Supervised: ...

    async def settle(self, d: Deferred[Any], timeout: float = 60.0) -> Any:
        """The result of ``d`` once it fires (time passes meanwhile)."""

    async def until(self, check: Callable[[], bool], timeout: float, what: str) -> None: ...

    async def sleep(self, seconds: float) -> None: ...

    async def stop_engine(self) -> None: ...

    async def start_engine(self) -> None: ...

    async def close(self) -> None: ...


# -- the in-memory engine ------------------------------------------------------------------------


class _MemorySupervised:
    def __init__(self, side: MemorySide, supervisor: MemorySupervisor) -> None:
        self._side = side
        self._supervisor = supervisor

    @property
    def runs(self) -> int:
        return self._supervisor.runs

    async def wait_running_image(self, image_id: str, timeout: float = 30.0) -> str:
        mem, name = self._side.mem, self._supervisor.name

        def running() -> bool:
            found = mem.find_container(name)
            return found is not None and found.status == "running" and found.image_id == image_id

        await self._side.until(running, timeout, f"{name} running {image_id}")
        found = mem.find_container(name)
        assert found is not None
        return found.id


class MemorySide:
    kind = "memory"

    def __init__(self) -> None:
        self.clock = Clock()
        self.clock.advance(reactor.seconds())  # times like a real engine's
        self.reactor: IReactorTime = self.clock
        self.mem = MemoryDocker(clock=self.clock)
        self.agent = CountingAgent(self.mem.agent())
        self.client = DockerClient(self.clock, self.agent)
        self.events = EngineEvents(self.clock, self.client, retry=backoff(0.2, 1.0))

    def now(self) -> float:
        return self.clock.seconds()

    async def build(self, recipe: str, ref: str, version: str, **kw: Any) -> str:
        if recipe == "plain":
            return memory_image(self.mem, ref, version)
        if recipe == "healthy":
            return memory_health_image(self.mem, ref, version)
        if recipe == "failing":
            return memory_health_image(self.mem, ref, version, test=FAILING_TEST)
        if recipe == "dying":
            return memory_dying_image(self.mem, ref, version, **kw)
        raise ValueError(recipe)

    async def run(self, ref: str, name: str, restart: str | None = None) -> str:
        if restart is None:
            return self.mem.run(name, ref)
        return self.mem.run(name, ref, HostConfig={"RestartPolicy": {"Name": restart}})

    async def rename(self, name: str, new: str) -> None:
        self.mem.rename_container(name, new)

    async def remove(self, name: str) -> None:
        self.mem.remove(name)

    def inspect(self, name: str) -> dict[str, Any] | None:
        found = self.mem.find_container(name)
        return None if found is None else found.inspect()

    def image_id(self, ref: str) -> str | None:
        return self.mem.image_id(ref)

    def supervise(self, name: str, ref: str) -> Supervised:
        return _MemorySupervised(self, self.mem.supervise(name, ref, delay=0.2))

    async def _step(self) -> None:
        await deferLater(reactor, 0)  # treq sends request bodies on the reactor
        self.clock.advance(STEP)

    async def settle(self, d: Deferred[Any], timeout: float = 60.0) -> Any:
        await self.until(lambda: d.called, timeout, "the Deferred to fire")
        return await d

    async def until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = self.clock.seconds() + timeout
        while not check():
            if self.clock.seconds() > deadline:
                raise StackError(f"{what} did not happen within {timeout} s (engine's clock)")
            await self._step()

    async def sleep(self, seconds: float) -> None:
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end:
            await self._step()

    async def stop_engine(self) -> None:
        self.mem.stop_engine()

    async def start_engine(self) -> None:
        self.mem.start_engine()

    async def close(self) -> None:
        await self.events.stopService()
        self.mem.flush()
        await self.client.close()


# -- a real dockerd ------------------------------------------------------------------------------


class _RealSupervised:
    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    @property
    def runs(self) -> int:
        return self._supervisor.runs

    async def wait_running_image(self, image_id: str, timeout: float = 30.0) -> str:
        container_id: str = await self._supervisor.wait_running_image(image_id, timeout)
        return container_id


class RealSide:
    kind = "real"

    def __init__(self, dockerd: Dockerd) -> None:
        self.dockerd = dockerd
        self.reactor: IReactorTime = reactor
        pool = engine_pool(reactor)
        self.agent = CountingAgent(engine_agent(reactor, dockerd.url, pool))
        self.client = DockerClient(reactor, self.agent, pool=pool)
        self.events = EngineEvents(reactor, self.client, retry=backoff(0.2, 1.0))
        self._supervisors: list[Supervisor] = []

    def now(self) -> float:
        return reactor.seconds()

    async def build(self, recipe: str, ref: str, version: str, **kw: Any) -> str:
        build: Callable[..., str]
        if recipe == "plain":
            build = build_image
        elif recipe in ("healthy", "failing"):
            build = build_health_image
            if recipe == "failing":
                kw["test"] = FAILING_TEST
        elif recipe == "dying":
            build = build_dying_image
        else:
            raise ValueError(recipe)
        image_id: str = await threads.deferToThread(build, self.dockerd, ref, version, **kw)
        return image_id

    async def run(self, ref: str, name: str, restart: str | None = None) -> str:
        options = ["--restart", restart] if restart is not None else []
        container_id: str = await threads.deferToThread(
            self.dockerd.cli, "run", "-d", "--name", name, *options, ref)
        return container_id.strip()

    async def rename(self, name: str, new: str) -> None:
        await self.dockerd.acli("rename", name, new)

    async def remove(self, name: str) -> None:
        await self.dockerd.acli("rm", "-f", name)

    def inspect(self, name: str) -> dict[str, Any] | None:
        return self.dockerd.inspect(name)

    def image_id(self, ref: str) -> str | None:
        return self.dockerd.image_id(ref)

    def supervise(self, name: str, ref: str) -> Supervised:
        supervisor = Supervisor(self.dockerd, name, ref).start()
        self._supervisors.append(supervisor)
        return _RealSupervised(supervisor)

    async def settle(self, d: Deferred[Any], timeout: float = 60.0) -> Any:
        await self.until(lambda: d.called, timeout, "the Deferred to fire")
        return await d

    async def until(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = reactor.seconds() + timeout
        while not check():
            if reactor.seconds() > deadline:
                raise StackError(f"{what} did not happen within {timeout} s")
            await deferLater(reactor, STEP)

    async def sleep(self, seconds: float) -> None:
        await deferLater(reactor, seconds)

    async def stop_engine(self) -> None:
        await threads.deferToThread(self.dockerd.stop)

    async def start_engine(self) -> None:
        await threads.deferToThread(self.dockerd.start)

    async def close(self) -> None:
        await self.events.stopService()
        for supervisor in self._supervisors:
            await threads.deferToThread(supervisor.stop)
        await self.client.close()


# -- fixtures ------------------------------------------------------------------------------------

BOTH = ["memory", pytest.param("real", marks=pytest.mark.real)]


async def _engine(request: pytest.FixtureRequest, fixture: str) -> AsyncIterator[Engine]:
    side: MemorySide | RealSide
    if request.param == "memory":
        side = MemorySide()
    elif fixture == "dockerd_factory":
        side = RealSide(request.getfixturevalue(fixture)())
    else:
        side = RealSide(request.getfixturevalue(fixture))
    try:
        yield side
    finally:
        await side.close()


@pytest_twisted.async_yield_fixture(params=BOTH)
async def engine(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    """An engine of each kind; the real one is the session's shared dockerd, its containers
    removed after the test."""
    async for side in _engine(request, "clean_dockerd"):
        yield side


@pytest_twisted.async_yield_fixture(params=BOTH)
async def own_engine(request: pytest.FixtureRequest) -> AsyncIterator[Engine]:
    """An engine of each kind that the test may stop and start; the real one is its own
    dockerd."""
    async for side in _engine(request, "dockerd_factory"):
        yield side


__all__ = ["BOTH", "Engine", "MemorySide", "RealSide", "Supervised", "engine", "own_engine"]
