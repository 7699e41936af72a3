"""A fleet of 50 hosts in this process, on one real etcd (tests/stack/etcd_stack.py).

Each host is a daemon as :meth:`DeployerService.from_config` wires it in fleet mode (its etcd
client, watch, lease, rollout slots, pauses and status, its reconciler and its engine's event
stream), over its own in-memory engine (:class:`MemoryDocker` on the reactor, through the real
:class:`DockerClient`) that runs the app ``web`` under its supervisor, from an image with a
HEALTHCHECK probed every :data:`PROBE_INTERVAL` seconds. A push is recorded in etcd through one
host's sink, as its webhook does; every host's watch then runs the round.

The invariants are checked at every step: whenever any engine stops a container, and by a
sampler every :data:`SAMPLE_EVERY` seconds in between, no more than ``--max_unavailable``
instances of the app may be anything but running and healthy; every container that ran is
recorded, so that a bad build is seen on every host that ever started it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, cast

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.task import LoopingCall, deferLater
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher

from deployer.config import Config
from deployer.docker import DockerClient
from deployer.model import Update
from deployer.reconcile import RoundReport
from deployer.reference import parse_reference
from deployer.rollout.gateway import get_prefix
from deployer.rollout.keys import RolloutKeys
from deployer.rounds import Result
from deployer.service import DeployerService
from deployer.testing.memory_docker import Behaviour, ContainerState, Healthcheck, MemoryDocker
from tests.stack.etcd_stack import EtcdMember
from tests.stack.health_images import FAILING_TEST, HEALTHY_TEST

pytestmark = [pytest.mark.real, pytest.mark.slow]

HOSTS = 50
GIVEN_BACK = "the rollout slot of {app} for {name} came after the pause"
"""How a host that found the pause while waiting logs its slot, which it gives back."""
APP = "127.0.0.1:5000/myorg/app:qa"
V1, V2, V3 = ("sha256:" + c * 64 for c in "123")
PROBE_INTERVAL = 0.1
SUPERVISOR_DELAY = 0.05
SAMPLE_EVERY = 0.02
GOOD = (Healthcheck.shell(HEALTHY_TEST, interval=PROBE_INTERVAL, retries=2), Behaviour())
BAD = (Healthcheck.shell(FAILING_TEST, interval=PROBE_INTERVAL, retries=2),
       Behaviour.never_healthy("connection refused"))


def now() -> float:
    return float(reactor.seconds())  # type: ignore[attr-defined]


async def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = now() + timeout
    while not predicate():
        if now() > deadline:
            raise AssertionError(f"not within {timeout:g} s: {what}")
        await deferLater(reactor, 0.05)


def up(container: ContainerState | None) -> bool:
    """Whether ``container`` serves: running and healthy."""
    return (container is not None and container.status == "running"
            and container.health is not None and container.health.status == "healthy")


@attrs.define(eq=False)
class Host:
    """One host: its engine, the daemon on it, and what its rounds did."""

    name: str
    mem: MemoryDocker
    service: DeployerService
    reports: list[RoundReport] = attrs.field(factory=list)
    #: The image id of every container of ``web`` that ran here.
    ran: set[str] = attrs.field(factory=set)

    @property
    def web(self) -> ContainerState | None:
        return self.mem.find_container("web")

    def done(self, rounds: int) -> bool:
        return len(self.reports) >= rounds and not self.service.reconciler.busy

    def look(self) -> None:
        web = self.web
        if web is not None and web.running:
            self.ran.add(web.image_id)


class Fleet:
    """``HOSTS`` hosts under one etcd prefix, and the invariant (see the module docstring)."""

    def __init__(self, etcd: EtcdMember, prefix: str, max_unavailable: int) -> None:
        self.prefix = prefix
        self.max_unavailable = max_unavailable
        self.hosts: list[Host] = []
        self.most_down = 0
        self.violations: list[str] = []
        self.sampler = LoopingCall(self.check, "sample")
        self.sampler.clock = reactor
        #: Every failure logged meanwhile (none is expected).
        self.failures: list[LogEvent] = []
        self.given_back = 0  # slots that came after their host had found the pause
        self._observer = cast(ILogObserver, self._logged)
        globalLogPublisher.addObserver(self._observer)
        for n in range(1, HOSTS + 1):
            name = f"h{n:02d}"
            mem = MemoryDocker(clock=reactor)
            mem.add_image([APP], V1, healthcheck=GOOD[0], behaviour=GOOD[1])
            mem.supervise("web", APP, delay=SUPERVISOR_DELAY)
            config = Config(
                etcd_nodes=(etcd.client_url,), etcd_prefix=prefix, hostname=name,
                listen="tcp:0:interface=127.0.0.1", webhook_tokens=("t",), repull_period=0.0,
                max_unavailable=max_unavailable, min_ready=0.2, ready_timeout=30.0,
            )
            docker = DockerClient(reactor, mem.agent())
            service = DeployerService.from_config(config, reactor, docker=docker)
            host = Host(name, mem, service)
            service.reconciler.observers.append(host.reports.append)
            mem.on_exit(lambda c, host=host: host.ran.add(c.image_id))
            mem.on_stop(lambda c, where=name: self.check(f"{where} stopped {c.id[:12]}"))
            self.hosts.append(host)

    def _logged(self, event: LogEvent) -> None:
        if "log_failure" in event:
            self.failures.append(event)
        if str(event.get("log_format", "")).startswith(GIVEN_BACK):
            self.given_back += 1

    def failed(self) -> list[str]:
        return [f"{formatEvent(e)}: {e['log_failure'].getErrorMessage()}" for e in self.failures]

    def down(self) -> list[str]:
        return [h.name for h in self.hosts if not up(h.web)]

    def check(self, when: str) -> None:
        for host in self.hosts:
            host.look()
        down = self.down()
        self.most_down = max(self.most_down, len(down))
        if len(down) > self.max_unavailable:
            self.violations.append(f"{when}: {len(down)} down: {', '.join(down)}")

    async def start(self) -> None:
        for host in self.hosts:
            host.service.startService()
        for host in self.hosts:
            keeper = host.service.rollouts.keeper
            assert keeper is not None
            await keeper.wait()
        await wait_for(lambda: all(h.service.watch is not None and h.service.watch.live
                                   and h.service.events.live for h in self.hosts),
                       20.0, "every watch and event stream live")
        await wait_for(lambda: not self.down(), 10.0, "every instance healthy")
        self.sampler.start(SAMPLE_EVERY)

    async def push(self, image_id: str, build: tuple[Healthcheck, Behaviour]) -> None:
        """The registry holds ``image_id`` under the tag; a webhook reaches the first host."""
        for host in self.hosts:
            host.mem.publish(APP, image_id, healthcheck=build[0], behaviour=build[1])
        update = Update.from_reference(parse_reference(APP), "registry", now())
        await self.hosts[0].service.sink.accept([update])

    async def settle(self, rounds: int, timeout: float) -> float:
        started = now()
        await wait_for(lambda: all(h.done(rounds) for h in self.hosts), timeout,
                       f"round {rounds} done on every host")
        return now() - started

    async def drained(self, timeout: float) -> None:
        """Wait until no rollout slot key is left."""
        deadline = now() + timeout
        while keys := await self.slot_keys():
            if now() > deadline:
                raise AssertionError(f"not within {timeout:g} s: slot keys left: {keys}")
            await deferLater(reactor, 0.1)

    async def slot_keys(self) -> list[str]:
        gateway = self.hosts[0].service.etcd
        assert gateway is not None
        _, found = await get_prefix(gateway, RolloutKeys(self.prefix).rollouts)
        return [kv.key for kv in found]

    async def stop(self) -> None:
        globalLogPublisher.removeObserver(self._observer)
        if self.sampler.running:
            self.sampler.stop()
        for host in self.hosts:
            for supervisor in host.mem.supervisors:
                supervisor.stop()
        await DeferredList([Deferred.fromCoroutine(_stop(h.service)) for h in self.hosts])
        for host in self.hosts:
            host.mem.stop_engine()


async def _stop(service: DeployerService) -> None:
    if service.running:
        await service.stopService()


@pytest_twisted.async_yield_fixture
async def fleet(request: pytest.FixtureRequest, etcd: EtcdMember, etcd_prefix: str) -> Any:
    made = Fleet(etcd, etcd_prefix, request.param)
    try:
        yield made
    finally:
        await made.stop()


def results(host: Host, rounds: int) -> list[Result]:
    """The results of the replacements of round ``rounds`` (1-based) on ``host``."""
    return [o.result for o in host.reports[rounds - 1].outcomes]


@pytest.mark.parametrize("fleet", [1, 3], indirect=True, ids=["max1", "max3"])
@pytest_twisted.ensureDeferred
async def test_fifty_hosts_roll_a_good_build_then_stop_a_bad_one(fleet: Fleet) -> None:
    limit = fleet.max_unavailable
    began = time.monotonic()
    await fleet.start()
    started = time.monotonic() - began

    # A good build: every host replaces its instance, at most ``limit`` at a time.
    await fleet.push(V2, GOOD)
    good = await fleet.settle(1, timeout=120.0)
    assert fleet.violations == []
    assert 1 <= fleet.most_down <= limit
    for host in fleet.hosts:
        web = host.web
        assert up(web) and web is not None and web.image_id == V2, host.name
        assert host.mem.image_id(APP) == V2, host.name
        assert results(host, 1) == [Result.REPLACED], host.name
    assert await fleet.slot_keys() == []
    first = fleet.hosts[0].service.rollouts.status
    doc = await first.document()
    assert doc["apps"][APP]["paused"] is None and doc["apps"][APP]["converged"]

    # A bad build: it reaches at most ``limit`` hosts; the app is paused; every host is back.
    fleet.most_down = 0
    pushed = now()
    await fleet.push(V3, BAD)
    bad = await fleet.settle(2, timeout=120.0)
    fleet.check("the end")
    assert fleet.violations == []
    assert 1 <= fleet.most_down <= limit
    tried = sorted(h.name for h in fleet.hosts if V3 in h.ran)
    assert 1 <= len(tried) <= limit, tried
    record = await fleet.hosts[-1].service.rollouts.pauses.get(APP)
    assert record is not None and record.image_id == V3 and record.host in tried
    assert record.reason.startswith("unhealthy")
    # The hosts still in line read the pause while they wait, not at their turn: here all of
    # them are back within about a check of it (at their turns, one after the other, 4-5 s).
    after_pause = pushed + bad - record.time
    for host in fleet.hosts:
        web = host.web
        assert up(web) and web is not None and web.image_id == V2, host.name
        assert host.mem.image_id(APP) == V2, host.name  # the tag is back on the good build
        expected = Result.ROLLED_BACK if host.name in tried else Result.PAUSED
        assert results(host, 2) == [expected], host.name
    # Their places in line give the slot back as it comes. Most of them had found the pause
    # while waiting (reading it at their turns, none would have): the hosts that get their
    # turns within the first check of the pause learn of it there.
    await fleet.drained(timeout=60.0)
    paused = [h.name for h in fleet.hosts if h.name not in tried]
    assert fleet.given_back >= len(paused) // 2, (fleet.given_back, len(paused))
    doc = await first.document()
    assert doc["apps"][APP]["paused"]["image_id"] == V3
    assert fleet.failed() == []
    print(f"\n{HOSTS} hosts, --max_unavailable {limit}: started in {started:.1f} s, good build"
          f" rolled out in {good:.1f} s, bad build stopped after {len(tried)} host(s) and"
          f" settled in {bad:.1f} s ({after_pause:.1f} s after the pause); at most"
          f" {fleet.most_down} down; {fleet.given_back} of {HOSTS - len(tried)} found the"
          f" pause while waiting")
