"""The update round against a real dockerd and a real registry, with the rollout the daemon
uses (standalone slots and pauses, ``--replace stop``, readiness from the engine's events)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater

from deployer.docker import DockerClient
from deployer.engine_address import engine_agent, engine_pool
from deployer.events import EngineEvents
from deployer.model import Update
from deployer.readiness import ReadyRules
from deployer.reconcile import Reconciler, RoundReport
from deployer.reference import parse_reference
from deployer.replace import ReplaceMode
from deployer.replacers import StopReplacer
from deployer.rollout import wiring
from deployer.rollout_round import Rollout
from deployer.rounds import Result
from deployer.testing.agents import CountingAgent
from tests.stack.docker_stack import (
    Dockerd,
    HangingRegistry,
    ImageBuilder,
    run_container,
    unique,
)

pytestmark = pytest.mark.real


class Engine:
    """A real DockerClient whose requests are counted, and the engine's event stream."""

    def __init__(self, dockerd: Dockerd, pull_stall_timeout: float = 120.0) -> None:
        self.pool = engine_pool(reactor)
        self.agent = CountingAgent(engine_agent(reactor, dockerd.url, self.pool))
        self.client = DockerClient(reactor, self.agent, pool=self.pool,
                                   pull_stall_timeout=pull_stall_timeout)
        self.events = EngineEvents(reactor, self.client)

    async def start(self) -> Engine:
        self.events.startService()
        await _until(lambda: self.events.live, 10, "the engine's event stream")
        return self

    async def close(self) -> None:
        await self.events.stopService()
        await self.client.close()


@pytest_twisted.async_yield_fixture
async def engine(clean_dockerd: Dockerd) -> AsyncIterator[Engine]:
    e = await Engine(clean_dockerd).start()
    yield e
    await e.close()


def reconciler(engine: Engine, reports: list[RoundReport], rollout: bool = True,
               ready_timeout: float = 30.0, **kw: Any) -> Reconciler:
    """The round as the daemon has it; ``rollout=False``: the round alone (stops, no wait)."""
    if rollout:
        rules = ReadyRules(min_ready=1.0, ready_timeout=ready_timeout)
        replacer = StopReplacer(reactor, engine.client, engine.events, rules, kill_timeout=5)
        kw["rollout"] = Rollout(reactor, engine.client, wiring.standalone(reactor, hostname="t"),
                                {ReplaceMode.STOP: replacer}, hostname="t")
    return Reconciler(reactor, engine.client, kill_timeout=5, observers=[reports.append], **kw)


def update(pattern: str) -> Update:
    return Update.from_reference(parse_reference(pattern), "test", reactor.seconds())


@pytest_twisted.ensureDeferred
async def test_supervised_container_ends_up_on_the_new_image(
    engine: Engine, clean_dockerd: Dockerd, image_builder: ImageBuilder,
    supervisor_factory: Callable[..., Any],
) -> None:
    repo = unique("app")
    ref = image_builder.ref(repo, "qa")
    v1 = image_builder.publish(ref, "v1")
    await clean_dockerd.acli("pull", ref)
    supervisor = supervisor_factory(unique("c"), ref)
    first = await supervisor.wait_running_image(v1.image_id)

    v2 = image_builder.publish(ref, "v2")
    reports: list[RoundReport] = []
    r = reconciler(engine, reports)
    r.request(update(ref))
    await r.wait_idle()

    assert [s.name for s in reports[-1].stopped] == [supervisor.name]
    assert reports[-1].pulled == {ref: v2.image_id}
    [outcome] = reports[-1].outcomes
    assert outcome.result is Result.REPLACED, outcome
    second = await supervisor.wait_running_image(v2.image_id, timeout=1)  # ready already
    assert second != first


@pytest_twisted.ensureDeferred
async def test_every_tag_of_a_repository_is_pulled(
    engine: Engine, clean_dockerd: Dockerd, image_builder: ImageBuilder,
) -> None:
    repo = unique("app")
    qa, prod, other = (image_builder.ref(repo, "qa"), image_builder.ref(repo, "prod"),
                       image_builder.ref(unique("other"), "qa"))
    for ref in (qa, prod, other):
        image_builder.publish(ref, "v1")
        await clean_dockerd.acli("pull", ref)
    new_qa = image_builder.publish(qa, "v2")
    new_prod = image_builder.publish(prod, "v2")
    image_builder.publish(other, "v2")

    reports: list[RoundReport] = []
    r = reconciler(engine, reports)
    r.request(update(f"{image_builder.registry.host}/{repo}"))
    await r.wait_idle()

    assert reports[-1].pulled == {qa: new_qa.image_id, prod: new_prod.image_id}
    pulls = [p for m, p in engine.agent.calls if p == "images/create"]
    assert len(pulls) == 2  # not the other repository


@pytest_twisted.ensureDeferred
async def test_failed_pull_stops_nothing(
    engine: Engine, clean_dockerd: Dockerd, image_builder: ImageBuilder,
) -> None:
    repo = unique("app")
    ref = image_builder.ref(repo, "qa")
    v1 = image_builder.publish(ref, "v1")
    await clean_dockerd.acli("pull", ref)
    container = run_container(clean_dockerd, ref, unique("c"))
    image_builder.publish(ref, "v2")
    image_builder.registry.break_layers(repo, "qa")

    reports: list[RoundReport] = []
    r = reconciler(engine, reports)
    r.request(update(ref))
    await r.wait_idle()

    report = reports[-1]
    assert ref in report.failed
    assert report.stopped == ()
    state = clean_dockerd.inspect(container)
    assert state is not None and state["State"]["Running"]
    assert state["Image"] == v1.image_id
    assert clean_dockerd.image_id(ref) == v1.image_id
    assert engine.agent.count("POST", "containers/") == 0


@pytest_twisted.ensureDeferred
async def test_container_whose_tag_moved_before_the_round_is_stale(
    engine: Engine, clean_dockerd: Dockerd, image_builder: ImageBuilder,
) -> None:
    """The container list then shows an image id; the container's own config names the tag.
    Nothing supervises it: once stopped it stays down, so after ``--ready_timeout`` the host
    starts it again, puts the tag back and pauses the app."""
    repo = unique("app")
    ref = image_builder.ref(repo, "qa")
    image_builder.publish(ref, "v1")
    await clean_dockerd.acli("pull", ref)
    container = run_container(clean_dockerd, ref, unique("c"))
    v2 = image_builder.publish(ref, "v2")
    await clean_dockerd.acli("pull", ref)  # the tag moves outside deployer
    listed = json.loads(clean_dockerd.api("GET", "/containers/json")[1])
    assert any(c["Id"] == container and c["Image"] != ref for c in listed)

    v1 = clean_dockerd.inspect(container)["Image"]  # type: ignore[index]
    reports: list[RoundReport] = []
    r = reconciler(engine, reports, ready_timeout=3.0)
    r.request(update(ref))

    def stopped() -> bool:
        state = clean_dockerd.inspect(container)
        return state is not None and not state["State"]["Running"]

    await _until(stopped, 30, "the stop")
    await r.wait_idle()

    assert [s.id for s in reports[-1].stopped] == [container]
    assert reports[-1].stopped[0].new_image == v2.image_id
    [outcome] = reports[-1].outcomes
    assert (outcome.result, outcome.reason) == (Result.ROLLED_BACK, "no_replacement")
    state = clean_dockerd.inspect(container)
    assert state is not None and state["State"]["Running"] and state["Image"] == v1
    assert clean_dockerd.image_id(ref) == v1
    assert r.rollout is not None
    record = await r.rollout.rollouts.pauses.get(ref)
    assert record is not None and record.image_id == v2.image_id


async def _round_calls(engine: Engine, dockerd: Dockerd, builder: ImageBuilder,
                       count: int) -> tuple[dict[tuple[str, str], int], int]:
    repo = unique("app")
    ref = builder.ref(repo, "qa")
    builder.publish(ref, "v1")
    await dockerd.acli("pull", ref)
    for _ in range(count):
        run_container(dockerd, ref)
    builder.publish(ref, "v2")
    reports: list[RoundReport] = []
    r = reconciler(engine, reports, rollout=False)  # the round's own calls; nothing restarts
    await engine.client.version()
    engine.agent.reset()
    r.request(update(ref))
    await r.wait_idle()
    stops = engine.agent.count("POST", "containers/")
    others = {(m, "images/{ref}/json" if p == f"images/{ref}/json" else p): n
              for (m, p), n in engine.agent.summary().items()
              if m != "POST" or not p.startswith("containers/")}
    assert len(reports[-1].stopped) == count
    dockerd.remove_all_containers()
    return others, stops


@pytest.mark.slow
@pytest_twisted.ensureDeferred
async def test_engine_calls_per_round_do_not_grow_with_containers(
    engine: Engine, clean_dockerd: Dockerd, image_builder: ImageBuilder,
) -> None:
    few, few_stops = await _round_calls(engine, clean_dockerd, image_builder, 3)
    many, many_stops = await _round_calls(engine, clean_dockerd, image_builder, 30)
    assert (few_stops, many_stops) == (3, 30)  # one stop per stale container, nothing else
    assert few == many
    assert few == {("GET", "images/json"): 1, ("GET", "containers/json"): 1,
                   ("POST", "images/create"): 1, ("GET", "images/{ref}/json"): 1}


@pytest_twisted.ensureDeferred
async def test_a_burst_of_requests_during_a_round_costs_one_more_pull(
    engine: Engine, clean_dockerd: Dockerd, image_builder: ImageBuilder,
) -> None:
    repo = unique("app")
    ref = image_builder.ref(repo, "qa")
    image_builder.publish(ref, "v1")
    await clean_dockerd.acli("pull", ref)
    v2 = image_builder.publish(ref, "v2")
    reports: list[RoundReport] = []
    r = reconciler(engine, reports)
    for _ in range(100):
        r.request(update(ref))
    await r.wait_idle()
    assert engine.agent.count("POST", "images/create") <= 2
    assert sum(len(rep.updates) for rep in reports) == 100
    assert clean_dockerd.image_id(ref) == v2.image_id


async def _until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait until ``check()``; the seconds it took."""
    started = reactor.seconds()
    while not check():
        if reactor.seconds() - started > timeout:
            raise AssertionError(f"{what}: not within {timeout} s")
        await deferLater(reactor, 0.05, lambda: None)
    return reactor.seconds() - started


@pytest_twisted.ensureDeferred
async def test_a_hung_registry_stalls_only_its_own_pull(
    clean_dockerd: Dockerd, image_builder: ImageBuilder,
    hanging_registry: HangingRegistry, supervisor_factory: Callable[..., Any],
) -> None:
    """The hung pull fails after the stall timeout with nothing stopped; a request for another
    repository sent while it hangs deploys at once (its supervised container replaced and
    ready)."""
    fake = hanging_registry
    fake_host = fake.host
    # The other round (pull, stop, re-created by the supervisor, 1 s ready) fits well within
    # it: ~2 s on a loaded 2-core machine (load 6.7), and every docker CLI call of the
    # supervisor and each engine call is slower when CPU-starved.
    stall = 15.0
    engine = await Engine(clean_dockerd, pull_stall_timeout=stall).start()
    try:
        ok = image_builder.ref(unique("app"), "qa")
        v1 = image_builder.publish(ok, "v1")
        await clean_dockerd.acli("pull", ok)
        hung = f"{fake_host}/{unique('hung')}:qa"
        await clean_dockerd.acli("tag", ok, hung)
        hung_container = run_container(clean_dockerd, hung, unique("c"))
        ok_supervisor = supervisor_factory(unique("c"), ok)
        ok_container = await ok_supervisor.wait_running_image(v1.image_id)
        v2 = image_builder.publish(ok, "v2")

        reports: list[RoundReport] = []
        r = reconciler(engine, reports)
        began = reactor.seconds()
        r.request(update(hung))
        # dockerd waits for the manifest now, and sends no response headers meanwhile
        await _until(fake.asked.is_set, stall, "dockerd asking the hanging registry")
        sent = reactor.seconds()
        r.request(update(ok))
        took = await _until(lambda: bool(reports), stall, "the other repository's round")

        # deployed while the hung pull still hangs: not held up until its stall timeout
        assert [rep.patterns for rep in reports] == [(ok,)], \
            f"deployed {took:.1f} s after the request (sent {sent - began:.1f} s in)"
        assert reactor.seconds() - began < stall
        [served] = reports
        assert served.pulled == {ok: v2.image_id}
        assert [s.id for s in served.stopped] == [ok_container]
        assert [o.result for o in served.outcomes] == [Result.REPLACED]

        await r.wait_idle()
        failed_after = reactor.seconds() - began
        [_, stalled] = reports
        assert stalled.patterns == (hung,)
        assert set(stalled.failed) == {hung} and stalled.stalled == (hung,)
        assert f"no progress from registry {fake_host}" in stalled.failed[hung]
        assert stalled.stopped == ()
        assert stall <= failed_after < stall + 10
        state = clean_dockerd.inspect(hung_container)
        assert state is not None and state["State"]["Running"]
        assert state["Image"] == v1.image_id
        assert any("/manifests/qa" in seen for seen in fake.seen)
    finally:
        await engine.close()
