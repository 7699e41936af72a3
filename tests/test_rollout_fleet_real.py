"""Zero-downtime rollouts on the real stack: three hosts (three dockerds, each with the app under
a restart loop and its own deployer daemon, all in fleet mode on one etcd), and a standalone
host whose container nothing supervises.

A sampler thread asks the three engines about four times a second which of them has a healthy
``app`` container (``GET /containers/json`` filtered on the name and ``health=healthy``, as
``docker ps -q --filter name=^app$ --filter health=healthy`` does); with ``--max_unavailable 1``
no two samples in a row may both see the same two down (see :func:`persistent`).
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs
import pytest

from tests.stack.daemon import Daemon
from tests.stack.docker_stack import (
    Dockerd,
    ImageBuilder,
    Published,
    StackError,
    Supervisor,
    log_tail,
    run_container,
    unique,
    wait_until,
)
from tests.stack.etcd_stack import EtcdMember, etcdctl
from tests.stack.health_images import FAILING_TEST, HEALTHY_TEST, healthcheck

pytestmark = pytest.mark.real

GOOD = [healthcheck(HEALTHY_TEST)]
BAD = [healthcheck(FAILING_TEST)]


def parallel(*calls: Callable[[], Any]) -> list[Any]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


def healthy(engine: Dockerd, name: str) -> bool:
    """Whether ``engine`` runs a healthy container named exactly ``name``."""
    filters = quote(json.dumps({"name": [f"^{name}$"], "health": ["healthy"]}))
    status, body = engine.api("GET", f"/containers/json?filters={filters}", timeout=5.0)
    return status == 200 and len(json.loads(body)) == 1


def persistent(samples: Sequence[tuple[bool, ...]]) -> list[tuple[bool, ...]]:
    """Each two samples in a row (per engine: healthy) as one, an instance down only when both
    saw it down.

    One sample asks the engines side by side, and a busy engine answers late: a sample can see
    host A not healthy yet (its engine answered at once) and host B already stopped (its engine
    answered later) although B stopped after A was ready; the next sample, which starts after
    every answer of the one before, sees A healthy. Two instances seen down by two samples in a
    row were down together (each was down from its first read to its second, and both spans hold
    the moment between the samples); a real overlap lasts at least the 1 s health interval of a
    replacement, which two samples 0.25 s apart see.
    """
    assert len(samples) >= 2, f"too few samples to judge: {samples}"
    return [tuple(a or b for a, b in zip(first, second, strict=True))
            for first, second in itertools.pairwise(samples)]


class Sampler(threading.Thread):
    """Polls the engines side by side every ``interval`` seconds; ``samples`` holds, for each
    poll, which engines had a healthy ``name``."""

    def __init__(self, engines: Sequence[Dockerd], name: str, interval: float = 0.25) -> None:
        super().__init__(name="sampler", daemon=True)
        self.engines = list(engines)
        self.container = name
        self.interval = interval
        self.samples: list[tuple[float, tuple[bool, ...]]] = []
        self.errors: list[str] = []
        self._halt = threading.Event()
        self._pool = ThreadPoolExecutor(len(self.engines))

    def run(self) -> None:
        while not self._halt.is_set():
            began = time.monotonic()
            futures = [self._pool.submit(healthy, e, self.container) for e in self.engines]
            try:
                self.samples.append((began, tuple(f.result() for f in futures)))
            except Exception as e:  # an engine that does not answer is a finding too
                self.errors.append(repr(e))
            self._halt.wait(max(0.0, self.interval - (time.monotonic() - began)))

    def __enter__(self) -> Sampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self.join(10)
        self._pool.shutdown()

    def persistent(self) -> list[tuple[bool, ...]]:
        """Which engines had a healthy ``name``, by :func:`persistent`."""
        return persistent([seen for _, seen in self.samples])

    @property
    def fewest(self) -> int:
        """The fewest healthy instances, as two samples in a row agree (:func:`persistent`)."""
        return min(sum(seen) for seen in self.persistent())


# -- reading the daemons' logs --------------------------------------------------------------------


def log_events(daemon: Daemon) -> list[tuple[float, str]]:
    """(time, message) of each JSON line of the daemon's log."""
    out = []
    for line in daemon.raw_log().splitlines():
        try:
            event = json.loads(line)
            out.append((datetime.fromisoformat(event["time"]).timestamp(), event["message"]))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def first_time(daemon: Daemon, check: Callable[[str], bool]) -> float:
    found = [t for t, message in log_events(daemon) if check(message)]
    assert found, f"{daemon.url}: no such line in\n{daemon.log()[-4000:]}"
    return found[0]


# -- the fleet ------------------------------------------------------------------------------------


@attrs.define(eq=False)
class Host:
    name: str
    engine: Dockerd
    supervisor: Supervisor | None = None
    daemon: Daemon | None = None

    @property
    def deployer(self) -> Daemon:
        assert self.daemon is not None
        return self.daemon

    @property
    def sup(self) -> Supervisor:
        assert self.supervisor is not None
        return self.supervisor

    def wait_healthy(self, image: Published, timeout: float = 60.0) -> str:
        """Wait until the app runs ``image`` and is healthy; its container id."""
        try:
            cid = self.sup.wait_running_image_blocking(image.image_id, timeout)
            wait_until(lambda: healthy(self.engine, self.sup.name), timeout,
                       f"{self.name}: {self.sup.name} healthy", 0.1)
        except StackError as e:
            log = self.daemon.log()[-5000:] if self.daemon is not None else ""
            raise StackError(f"{e}\n{self.name} deployer log:\n{log}") from None
        return cid


@attrs.define(eq=False)
class Fleet:
    workdir: Path
    hosts: list[Host]
    images: ImageBuilder
    supervise: Callable[..., Supervisor]
    etcd: EtcdMember
    prefix: str

    def app_running(self, ref: str, version: str) -> Published:
        """Publish ``ref`` (a good build) and run it under a supervisor on every host."""
        published = self.images.publish(ref, version, GOOD)
        parallel(*(lambda h=h: h.engine.cli("pull", ref) for h in self.hosts))
        name = unique("app")
        for host in self.hosts:
            host.supervisor = self.supervise(name, ref, engine=host.engine)
        parallel(*(lambda h=h: h.wait_healthy(published) for h in self.hosts))
        return published

    def start_daemons(self, *extra: str) -> None:
        """A daemon on each host. Each set of daemons logs in a directory of its own: a log is
        named by the daemon's port, and a port freed by an earlier set can be handed out again
        (its log would then begin with the earlier daemon's lines)."""
        workdir = self.workdir / f"daemons-{sum(1 for _ in self.workdir.glob('daemons-*'))}"
        workdir.mkdir()
        for host in self.hosts:
            host.daemon = Daemon(workdir, [
                "--docker", host.engine.url,
                "--etcd_nodes", self.etcd.client_url,
                "--etcd_prefix", self.prefix,
                "--etcd_retry_delay", "0.2s",
                "--repull_period", "0",
                "--hostname", host.name,
                "--min_ready", "1s",
                "--ready_timeout", "60s",
                *extra,
            ])
        parallel(*(h.deployer.start for h in self.hosts))

    def deploy(self, ref: str, via: int = 0) -> None:
        repository, _, tag = ref.rpartition(":")
        status, body = self.hosts[via].deployer.post_json(
            "/api/deploy", {"repository": repository, "tag": tag})
        assert status == 202, body

    def keys(self, under: str) -> list[str]:
        out = etcdctl(self.etcd.client_url, "get", f"{self.prefix}/_/{under}", "--prefix",
                      "--keys-only")
        return [k for k in out.split() if k]

    def pause(self, app: str) -> dict[str, Any] | None:
        out = etcdctl(self.etcd.client_url, "get", f"{self.prefix}/_/paused/{app}",
                      "--print-value-only").strip()
        return json.loads(out) if out else None

    def wait_free(self, timeout: float = 60.0) -> None:
        """Until no host holds or waits for a rollout slot."""
        wait_until(lambda: self.keys("rollout/") == [], timeout, "every rollout slot free", 0.2)

    def stop(self) -> None:
        errors = []
        for host in self.hosts:
            if host.daemon is None:
                continue
            host.daemon.stop()
            if "Traceback" in host.daemon.log():
                errors.append(f"{host.name} logged a traceback:\n{host.daemon.log()[-4000:]}")
        assert not errors, "\n\n".join(errors)


@pytest.fixture(scope="module")
def more_engines(dockerd_factory: Callable[..., Dockerd]) -> Iterator[list[Dockerd]]:
    """The second and third hosts' engines, shared by this module's tests."""
    engines = [dockerd_factory(), dockerd_factory()]
    try:
        yield engines
    finally:
        for engine in engines:
            engine.cleanup()


@pytest.fixture
def fleet(
    tmp_path: Path, clean_dockerd: Dockerd, more_engines: list[Dockerd],
    image_builder: ImageBuilder, supervisor_factory: Callable[..., Supervisor],
    etcd: EtcdMember, etcd_prefix: str,
) -> Iterator[Fleet]:
    hosts = [Host(f"h{n}", engine) for n, engine in enumerate([clean_dockerd, *more_engines], 1)]
    fleet = Fleet(tmp_path, hosts, image_builder, supervisor_factory, etcd, etcd_prefix)
    try:
        yield fleet
    finally:
        try:
            fleet.stop()
        finally:
            for engine in more_engines:
                if engine.running:
                    engine.remove_all_containers()


# -- tests ---------------------------------------------------------------------------------------


def test_a_push_rolls_through_three_hosts_with_two_of_three_always_healthy(fleet: Fleet) -> None:
    ref = fleet.images.ref(unique("roll"), "qa")
    v1 = fleet.app_running(ref, "v1")
    fleet.start_daemons()
    name = fleet.hosts[0].sup.name
    v2 = fleet.images.publish(ref, "v2", GOOD)
    assert v2.image_id != v1.image_id

    with Sampler([h.engine for h in fleet.hosts], name) as sampler:
        fleet.deploy(ref)
        parallel(*(lambda h=h: h.wait_healthy(v2, timeout=90) for h in fleet.hosts))
        fleet.wait_free()

    assert not sampler.errors, sampler.errors
    assert sampler.fewest == 2, [s for s in sampler.samples if sum(s[1]) < 2]
    # and it saw each host's instance go down and come back
    assert all(any(not seen[n] for _, seen in sampler.samples) for n in range(3))
    for host in fleet.hosts:
        assert host.engine.image_id(ref) == v2.image_id
    # The order: each host took its instance down only once the one before was healthy again.
    turns = []
    for host in fleet.hosts:
        stopped = first_time(host.deployer, lambda m: m.startswith(f"stopped {name} ("))
        ready = first_time(host.deployer,
                           lambda m: m.startswith(f"{name} (") and " is healthy after " in m)
        turns.append((stopped, ready, host.name))
    turns.sort()
    for (_, ready, before), (stopped, _, after) in itertools.pairwise(turns):
        assert stopped >= ready, f"{after} stopped {ready - stopped:.2f}s before {before} was ready"
    assert fleet.pause(f"{ref}") is None


def test_a_bad_build_stops_at_the_first_host_and_the_next_good_push_completes(
    fleet: Fleet,
) -> None:
    ref = fleet.images.ref(unique("bad"), "qa")
    v1 = fleet.app_running(ref, "v1")
    fleet.start_daemons()
    name = fleet.hosts[0].sup.name
    before = {h.name: (h.sup.runs, h.sup.running_image()) for h in fleet.hosts}
    bad = fleet.images.publish(ref, "v2-bad", BAD)

    with Sampler([h.engine for h in fleet.hosts], name) as sampler:
        fleet.deploy(ref, via=1)
        wait_until(lambda: fleet.pause(ref) is not None, 90, "the rollout paused", 0.2)
        # every host ends with the tag on the previous build, the failing one running it
        for host in fleet.hosts:
            wait_until(lambda h=host: h.engine.image_id(ref) == v1.image_id, 90,
                       f"{host.name}: {ref} back on v1", 0.2)
        parallel(*(lambda h=h: h.wait_healthy(v1, timeout=90) for h in fleet.hosts))
        fleet.wait_free()

    record = fleet.pause(ref)
    assert record is not None and record["image_id"] == bad.image_id
    assert record["reason"].startswith("unhealthy")
    started_bad = [h for h in fleet.hosts if h.sup.runs != before[h.name][0]]
    assert [h.name for h in started_bad] == [record["host"]]  # exactly one host started it
    [failed] = started_bad
    assert failed.sup.runs == before[failed.name][0] + 2  # the bad build, then the previous one
    for host in fleet.hosts:
        if host is not failed:  # never stopped: the very same container still runs
            assert host.sup.running_image() == before[host.name][1]
            assert f"stopped {name} (" not in host.deployer.log()
            assert "is paused for this build" in host.deployer.log()
    paused_lines = [h.name for h in fleet.hosts
                    if f"Rollout of {ref} paused on {failed.name}: unhealthy" in h.deployer.log()]
    assert paused_lines == [failed.name]
    assert not sampler.errors and sampler.fewest >= 2

    good = fleet.images.publish(ref, "v3", GOOD)
    with Sampler([h.engine for h in fleet.hosts], name) as sampler:
        fleet.deploy(ref, via=2)
        parallel(*(lambda h=h: h.wait_healthy(good, timeout=90) for h in fleet.hosts))
        fleet.wait_free()
    assert fleet.pause(ref) is None
    assert not sampler.errors and sampler.fewest == 2


def test_a_container_that_nothing_supervises_is_started_again_and_its_app_paused(
    tmp_path: Path, clean_dockerd: Dockerd, image_builder: ImageBuilder,
) -> None:
    ref = image_builder.ref(unique("alone"), "qa")
    v1 = image_builder.publish(ref, "v1")
    clean_dockerd.cli("pull", ref)
    name = unique("c")
    container = run_container(clean_dockerd, ref, name)
    v2 = image_builder.publish(ref, "v2")
    daemon = Daemon(tmp_path, ["--docker", clean_dockerd.url, "--repull_period", "0",
                               "--replace", "stop", "--min_ready", "1s",
                               "--ready_timeout", "5s", "--hostname", "alone"]).start()
    try:
        repository, _, tag = ref.rpartition(":")
        status, body = daemon.post_json("/api/deploy", {"repository": repository, "tag": tag})
        assert status == 202, body
        wait_until(lambda: f"Rollout of {ref} paused on alone" in daemon.log(), 60,
                   "the rollout paused", 0.2)
        wait_until(lambda: f"{name} is back on the previous build" in daemon.log(), 30,
                   "the container back", 0.2)
        state = clean_dockerd.inspect(name)
        assert state is not None and state["Id"] == container  # the very same container
        assert state["State"]["Running"] and state["Image"] == v1.image_id
        assert clean_dockerd.image_id(ref) == v1.image_id  # the tag is back on it
        log = daemon.log()
        assert f"stopped {name} (" in log and "nothing seems to supervise it" in log
        status, metrics = daemon.get("/metrics")
        text = metrics.decode() if isinstance(metrics, bytes) else str(metrics)
        assert 'deployer_rollbacks_total{reason="no_replacement"} 1.0' in text
        assert "deployer_rollout_pauses_total 1.0" in text
        assert v2.image_id not in (state["Image"],)
    except Exception:
        print(log_tail(daemon.log_path, 60))
        raise
    finally:
        daemon.stop()
