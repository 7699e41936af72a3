"""The readiness wait and the client's rollout calls against a real private dockerd: images with
a passing or failing HEALTHCHECK, without one, dying early, and no replacement at all."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads

from deployer.backoff import backoff
from deployer.docker import DockerClient
from deployer.engine_address import engine_agent, engine_pool
from deployer.errors import ContainerNotFound, ImageNotFound
from deployer.events import EngineEvents
from deployer.readiness import NotReady, NotReadyReason, Ready, ReadyRules, wait_ready
from deployer.testing.agents import CountingAgent
from tests.stack.docker_stack import Dockerd, Supervisor, build_image, run_container, unique
from tests.stack.health_images import (
    FAILING_TEST,
    build_dying_image,
    build_health_image,
    image_healthcheck,
)

pytestmark = pytest.mark.real


class Engine:
    def __init__(self, dockerd: Dockerd) -> None:
        self.dockerd = dockerd
        pool = engine_pool(reactor)
        self.agent = CountingAgent(engine_agent(reactor, dockerd.url, pool))
        self.client = DockerClient(reactor, self.agent, pool=pool)
        self.events = EngineEvents(reactor, self.client, retry=backoff(0.2, 1.0))

    async def build(self, build: Callable[..., str], ref: str, version: str, **kw: Any) -> str:
        image_id: str = await threads.deferToThread(build, self.dockerd, ref, version, **kw)
        return image_id


@pytest_twisted.async_yield_fixture
async def engine(clean_dockerd: Dockerd) -> AsyncIterator[Engine]:
    e = Engine(clean_dockerd)
    e.events.startService()
    try:
        yield e
    finally:
        await e.events.stopService()
        await e.client.close()


def waiting(engine: Engine, name: str, image_id: str, **rules: float) -> Any:
    return wait_ready(reactor, engine.client, engine.events, name, image_id,
                      ReadyRules(**{"min_ready": 1.0, "ready_timeout": 60.0, **rules}))


# -- the client's rollout calls -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tag_start_and_healthcheck_of_the_client(engine: Engine) -> None:
    repo = unique("app")
    plain = await engine.build(build_image, f"{repo}:plain", "v1")
    checked = await engine.build(build_health_image, f"{repo}:checked", "v1")
    assert image_healthcheck(engine.dockerd, f"{repo}:checked") == ["CMD-SHELL",
                                                                    "test -f /tmp/healthy"]
    assert await engine.client.image_has_healthcheck(checked)
    assert await engine.client.image_has_healthcheck(f"{repo}:checked")
    assert not await engine.client.image_has_healthcheck(plain)
    with pytest.raises(ImageNotFound):
        await engine.client.image_has_healthcheck(f"{repo}:missing")

    await engine.client.tag(checked, f"127.0.0.1:5000/{repo}", "qa")
    assert engine.dockerd.image_id(f"127.0.0.1:5000/{repo}:qa") == checked
    await engine.client.tag(plain, f"127.0.0.1:5000/{repo}", "qa")  # moves it back
    assert engine.dockerd.image_id(f"127.0.0.1:5000/{repo}:qa") == plain
    with pytest.raises(ImageNotFound):
        await engine.client.tag("sha256:" + "0" * 64, repo, "qa")

    name = unique("c")
    container_id = engine.dockerd.cli("create", "--name", name, f"{repo}:plain").strip()
    await engine.client.start(container_id)
    assert engine.dockerd.inspect(name)["State"]["Running"]  # type: ignore[index]
    await engine.client.start(name)  # already running: 304, fine
    with pytest.raises(ContainerNotFound):
        await engine.client.start(unique("missing"))


# -- ready --------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_supervised_container_replaced_by_a_healthy_build(
    engine: Engine, supervisor_factory: Callable[..., Supervisor],
) -> None:
    """The ``--replace stop`` way: the host stops the container, its supervisor runs the new
    image, the wait ends when the engine reports it healthy."""
    ref, name = f"{unique('app')}:qa", unique("c")
    v1 = await engine.build(build_health_image, ref, "v1")
    supervisor = supervisor_factory(name, ref)
    await supervisor.wait_running_image(v1)
    v2 = await engine.build(build_health_image, ref, "v2")
    engine.agent.reset()
    d = waiting(engine, name, v2)
    await engine.client.stop(name, 5)
    result = await d
    assert isinstance(result, Ready), result
    assert result.health_checked
    # one inspect of the name, one per container start; none per health probe
    assert engine.agent.count("GET", "containers/") <= 1 + supervisor.runs
    assert engine.agent.count() == engine.agent.count("GET", "containers/") + 1  # + the stop
    state = engine.dockerd.inspect(name)
    assert state is not None
    assert (state["Id"], state["Image"]) == (result.container_id, v2)
    assert state["State"]["Health"]["Status"] == "healthy"


@pytest_twisted.ensureDeferred
async def test_an_image_without_healthcheck_is_ready_after_min_ready(engine: Engine) -> None:
    """The ``--replace recreate`` way: the wait begins, then the host runs the container."""
    ref, name = f"{unique('app')}:qa", unique("c")
    image_id = await engine.build(build_image, ref, "v1")
    d = waiting(engine, name, image_id, min_ready=1.5)
    started = reactor.seconds()
    await threads.deferToThread(run_container, engine.dockerd, ref, name)
    result = await d
    assert isinstance(result, Ready), result
    assert not result.health_checked
    assert reactor.seconds() - started >= 1.5
    assert engine.dockerd.inspect(name)["State"]["Running"]  # type: ignore[index]


@pytest_twisted.ensureDeferred
async def test_a_container_already_healthy_is_ready_at_once(engine: Engine) -> None:
    ref, name = f"{unique('app')}:qa", unique("c")
    image_id = await engine.build(build_health_image, ref, "v1")
    await threads.deferToThread(run_container, engine.dockerd, ref, name)
    first = await waiting(engine, name, image_id)
    assert isinstance(first, Ready)
    again = await waiting(engine, name, image_id)
    assert isinstance(again, Ready) and again.waited < 1.0


# -- not ready ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_build_whose_health_check_fails_is_unhealthy(
    engine: Engine, supervisor_factory: Callable[..., Supervisor],
) -> None:
    ref, name = f"{unique('app')}:qa", unique("c")
    v1 = await engine.build(build_health_image, ref, "v1")
    supervisor = supervisor_factory(name, ref)
    await supervisor.wait_running_image(v1)
    bad = await engine.build(build_health_image, ref, "v2-bad", test=FAILING_TEST)
    d = waiting(engine, name, bad)
    await engine.client.stop(name, 5)
    result = await d
    assert isinstance(result, NotReady), result
    assert result.reason is NotReadyReason.UNHEALTHY
    state = engine.dockerd.inspect(name)
    assert state is not None and state["Id"] == result.container_id
    assert state["Image"] == bad


@pytest_twisted.ensureDeferred
async def test_a_build_that_dies_before_min_ready_has_exited(
    engine: Engine, supervisor_factory: Callable[..., Supervisor],
) -> None:
    ref, name = f"{unique('app')}:qa", unique("c")
    v1 = await engine.build(build_image, ref, "v1")
    supervisor = supervisor_factory(name, ref)
    await supervisor.wait_running_image(v1)
    bad = await engine.build(build_dying_image, ref, "v2-dies", after=0.5, code=3)
    d = waiting(engine, name, bad, min_ready=5.0)
    await engine.client.stop(name, 5)
    result = await d
    assert isinstance(result, NotReady), result
    assert (result.reason, result.exit_code) == (NotReadyReason.EXITED, 3)
    assert result.waited < 5.0


@pytest_twisted.ensureDeferred
async def test_nothing_supervises_the_stopped_container(engine: Engine) -> None:
    ref, name = f"{unique('app')}:qa", unique("c")
    v1 = await engine.build(build_image, ref, "v1")
    old = await threads.deferToThread(run_container, engine.dockerd, ref, name)
    v2 = await engine.build(build_image, ref, "v2")
    assert v2 != v1
    d = waiting(engine, name, v2, ready_timeout=2.0)
    await engine.client.stop(name, 5)
    result = await d
    assert isinstance(result, NotReady), result
    assert result.reason is NotReadyReason.NO_REPLACEMENT
    assert 2.0 <= result.waited < 10.0
    assert old[:12] in result.detail
    assert engine.events.subscribers == 0


@pytest_twisted.ensureDeferred
async def test_no_container_of_the_name_at_all(engine: Engine) -> None:
    ref = f"{unique('app')}:qa"
    image_id = await engine.build(build_image, ref, "v1")
    result = await waiting(engine, unique("never"), image_id, ready_timeout=1.0)
    assert isinstance(result, NotReady)
    assert result.reason is NotReadyReason.NO_REPLACEMENT
