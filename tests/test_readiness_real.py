"""The readiness wait and the client's rollout calls, one suite on two engines (see
tests/stack/two_engines.py): the in-memory engine, and a real private dockerd (marked ``real``).
Images with a passing or failing HEALTHCHECK, without one, dying early, and no replacement at
all."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred

from deployer.errors import ContainerNotFound, ImageNotFound
from deployer.events import ContainerEvent, EventSource
from deployer.readiness import NotReady, NotReadyReason, Ready, ReadyRules, wait_ready
from tests.stack.docker_stack import unique

if TYPE_CHECKING:
    from tests.stack.two_engines import Engine

pytest_plugins = ["tests.stack.two_engines"]  # the engine fixture


@pytest.fixture(autouse=True)
def listening(engine: Engine) -> None:
    """The engine's events followed from the start, as the daemon does."""
    engine.events.startService()


def waiting(engine: Engine, name: str, image_id: str, **rules: float) -> Deferred[Any]:
    return wait_ready(engine.reactor, engine.client, engine.events, name, image_id,
                      ReadyRules(**{"min_ready": 1.0, "ready_timeout": 60.0, **rules}))


async def call(engine: Engine, coroutine: Any) -> Any:
    return await engine.settle(Deferred.fromCoroutine(coroutine))


# -- the client's rollout calls -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_tag_start_and_healthcheck_of_the_client(engine: Engine) -> None:
    repo = unique("app")
    plain = await engine.build("plain", f"{repo}:plain", "v1")
    checked = await engine.build("healthy", f"{repo}:checked", "v1")
    client = engine.client
    assert await call(engine, client.image_has_healthcheck(checked))
    assert await call(engine, client.image_has_healthcheck(f"{repo}:checked"))
    assert not await call(engine, client.image_has_healthcheck(plain))
    with pytest.raises(ImageNotFound):
        await call(engine, client.image_has_healthcheck(f"{repo}:missing"))

    await call(engine, client.tag(checked, f"127.0.0.1:5000/{repo}", "qa"))
    assert engine.image_id(f"127.0.0.1:5000/{repo}:qa") == checked
    await call(engine, client.tag(plain, f"127.0.0.1:5000/{repo}", "qa"))  # moves it back
    assert engine.image_id(f"127.0.0.1:5000/{repo}:qa") == plain
    with pytest.raises(ImageNotFound):
        await call(engine, client.tag("sha256:" + "0" * 64, repo, "qa"))

    name = unique("c")
    container_id = await call(engine, client.create(name, {"Image": f"{repo}:plain"}))
    assert engine.inspect(name)["State"]["Status"] == "created"  # type: ignore[index]
    await call(engine, client.start(container_id))
    assert engine.inspect(name)["State"]["Running"]  # type: ignore[index]
    await call(engine, client.start(name))  # already running: 304, fine
    with pytest.raises(ContainerNotFound):
        await call(engine, client.start(unique("missing")))


# -- ready --------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_supervised_container_replaced_by_a_healthy_build(engine: Engine) -> None:
    """The ``--replace stop`` way: the host stops the container, its supervisor runs the new
    image, the wait ends when the engine reports it healthy."""
    ref, name = f"{unique('app')}:qa", unique("c")
    v1 = await engine.build("healthy", ref, "v1")
    supervisor = engine.supervise(name, ref)
    await supervisor.wait_running_image(v1)
    v2 = await engine.build("healthy", ref, "v2")
    engine.agent.reset()
    d = waiting(engine, name, v2)
    await call(engine, engine.client.stop(name, 5))
    result = await engine.settle(d)
    assert isinstance(result, Ready), result
    assert result.health_checked
    # one inspect of the name, one per container start; none per health probe
    assert engine.agent.count("GET", "containers/") <= 1 + supervisor.runs
    assert engine.agent.count() == engine.agent.count("GET", "containers/") + 1  # + the stop
    state = engine.inspect(name)
    assert state is not None
    assert (state["Id"], state["Image"]) == (result.container_id, v2)
    assert state["State"]["Health"]["Status"] == "healthy"


@pytest_twisted.ensureDeferred
async def test_an_image_without_healthcheck_is_ready_after_min_ready(engine: Engine) -> None:
    """The ``--replace recreate`` way: the wait begins, then the host runs the container."""
    ref, name = f"{unique('app')}:qa", unique("c")
    image_id = await engine.build("plain", ref, "v1")
    d = waiting(engine, name, image_id, min_ready=1.5)
    started = engine.now()
    await engine.run(ref, name)
    result = await engine.settle(d)
    assert isinstance(result, Ready), result
    assert not result.health_checked
    assert engine.now() - started >= 1.5
    assert engine.inspect(name)["State"]["Running"]  # type: ignore[index]


@pytest_twisted.ensureDeferred
async def test_a_container_already_healthy_is_ready_at_once(engine: Engine) -> None:
    ref, name = f"{unique('app')}:qa", unique("c")
    image_id = await engine.build("healthy", ref, "v1")
    await engine.run(ref, name)
    first = await engine.settle(waiting(engine, name, image_id))
    assert isinstance(first, Ready)
    again = await engine.settle(waiting(engine, name, image_id))
    assert isinstance(again, Ready) and again.waited < 1.0


# -- not ready ----------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_build_whose_health_check_fails_is_unhealthy(engine: Engine) -> None:
    ref, name = f"{unique('app')}:qa", unique("c")
    v1 = await engine.build("healthy", ref, "v1")
    supervisor = engine.supervise(name, ref)
    await supervisor.wait_running_image(v1)
    bad = await engine.build("failing", ref, "v2-bad")
    d = waiting(engine, name, bad)
    await call(engine, engine.client.stop(name, 5))
    result = await engine.settle(d)
    assert isinstance(result, NotReady), result
    assert result.reason is NotReadyReason.UNHEALTHY
    state = engine.inspect(name)
    assert state is not None and state["Id"] == result.container_id
    assert state["Image"] == bad
    assert state["State"]["Health"]["FailingStreak"] >= 2


class WithoutDies:
    """The engine's events without its ``die`` events, as if they were lost with the stream
    (a dockerd that restarts loses the events it had not sent)."""

    def __init__(self, events: EventSource) -> None:
        self.events = events

    def subscribe(self, heard: Callable[[ContainerEvent], object],
                  resync: Callable[[], object]) -> Any:
        def without_dies(event: ContainerEvent) -> None:
            if event.verb != "die":
                heard(event)

        return self.events.subscribe(without_dies, resync)


@pytest_twisted.ensureDeferred
async def test_a_build_restarted_by_its_policy_with_its_dies_unheard_is_not_ready(
    engine: Engine,
) -> None:
    """It dies 1 s after each start and its restart policy starts it again; its ``die`` events
    are lost: it never runs ``min_ready`` in one go, so it is never ready (the engine, asked when
    ``min_ready`` is up, says it stopped or started again)."""
    ref, name = f"{unique('app')}:qa", unique("c")
    bad = await engine.build("dying", ref, "v1", after=1.0, code=3)
    d = wait_ready(engine.reactor, engine.client, WithoutDies(engine.events), name, bad,
                   ReadyRules(min_ready=2.5, ready_timeout=20.0))
    await engine.run(ref, name, restart="always")
    try:
        result = await engine.settle(d)
        assert isinstance(result, NotReady), result
        assert result.reason in (NotReadyReason.EXITED, NotReadyReason.TIMEOUT), result
    finally:
        await engine.remove(name)


@pytest_twisted.ensureDeferred
async def test_a_build_that_dies_before_min_ready_has_exited(engine: Engine) -> None:
    ref, name = f"{unique('app')}:qa", unique("c")
    v1 = await engine.build("plain", ref, "v1")
    supervisor = engine.supervise(name, ref)
    await supervisor.wait_running_image(v1)
    bad = await engine.build("dying", ref, "v2-dies", after=0.5, code=3)
    d = waiting(engine, name, bad, min_ready=5.0)
    await call(engine, engine.client.stop(name, 5))
    result = await engine.settle(d)
    assert isinstance(result, NotReady), result
    assert (result.reason, result.exit_code) == (NotReadyReason.EXITED, 3)
    assert result.waited < 5.0


@pytest_twisted.ensureDeferred
async def test_nothing_supervises_the_stopped_container(engine: Engine) -> None:
    ref, name = f"{unique('app')}:qa", unique("c")
    v1 = await engine.build("plain", ref, "v1")
    old = await engine.run(ref, name)
    v2 = await engine.build("plain", ref, "v2")
    assert v2 != v1
    d = waiting(engine, name, v2, ready_timeout=2.0)
    await call(engine, engine.client.stop(name, 5))
    result = await engine.settle(d)
    assert isinstance(result, NotReady), result
    assert result.reason is NotReadyReason.NO_REPLACEMENT
    assert 2.0 <= result.waited < 10.0
    assert old[:12] in result.detail
    assert engine.events.subscribers == 0


@pytest_twisted.ensureDeferred
async def test_no_container_of_the_name_at_all(engine: Engine) -> None:
    ref = f"{unique('app')}:qa"
    image_id = await engine.build("plain", ref, "v1")
    result = await engine.settle(waiting(engine, unique("never"), image_id, ready_timeout=1.0))
    assert isinstance(result, NotReady)
    assert result.reason is NotReadyReason.NO_REPLACEMENT
