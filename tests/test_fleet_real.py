"""A fleet: several deployer daemons watching one etcd, each on its own real dockerd.

Two simulated hosts: the session's shared engine and a second engine kept for this module. Each
runs a supervised container (``Restart=always``) of a test image pulled from the session
registry, and its own daemon (``twist deployer --etcd_nodes ...``). Whatever reaches etcd (a
webhook to any one daemon, an operator's ``etcdctl put``) must be deployed on every host, once.
"""

from __future__ import annotations

import json
import re
import signal
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import attrs
import pytest

from tests.stack.daemon import Daemon
from tests.stack.docker_stack import (
    Dockerd,
    ImageBuilder,
    Published,
    StackError,
    Supervisor,
    unique,
    wait_until,
)
from tests.stack.etcd_stack import EtcdCluster, EtcdMember, etcdctl

pytestmark = pytest.mark.real

WEBHOOK = "/api/dockerhub/webhook"
SAMPLES = Path(__file__).parent / "samples"


def dockerhub_payload(repo_name: str, tag: str) -> dict[str, Any]:
    """The Docker Hub sample, for ``repo_name:tag``, without a callback URL."""
    sample: dict[str, Any] = json.loads((SAMPLES / "dockerhub-webhook.json").read_text())
    sample["repository"]["repo_name"] = repo_name
    sample["push_data"]["tag"] = tag
    sample.pop("callback_url", None)
    return sample


def parallel(*calls: Callable[[], Any]) -> list[Any]:
    """Run blocking calls side by side (one per host); their results, in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


# -- what the daemons' logs say -------------------------------------------------------------------


def rounds_for(log: str, pattern: str) -> int:
    """Update rounds that served ``pattern`` (alone or merged with others)."""
    quoted = repr(pattern)
    return sum(1 for line in log.splitlines() if "update round for" in line and quoted in line)


def stops_of(log: str, container: str) -> int:
    """Times the daemon stopped ``container`` so that it restarts on a new image."""
    return log.count(f"stopped {container} (")


def watched_urls(log: str) -> list[str]:
    """The etcd member of each watch the daemon established, in order."""
    return re.findall(r"watching \S+ on (\S+) from revision", log)


def retry_delays(log: str) -> list[float]:
    """The backoff delays the etcd watch announced, in seconds."""
    return [float(d) for d in re.findall(r"retrying on \S+ in ([0-9.]+)s", log)]


def health(daemon: Daemon) -> tuple[int, Any]:
    try:
        return daemon.get("/healthz", timeout=5.0)
    except OSError as e:
        return 0, str(e)


def wait_health(daemon: Daemon, status: int, timeout: float) -> Any:
    """Poll ``/healthz`` until it answers ``status``; the last body."""
    seen: list[tuple[int, Any]] = []

    def check() -> bool:
        seen.append(health(daemon))
        return seen[-1][0] == status

    try:
        wait_until(check, timeout, f"{daemon.url}/healthz {status}", 0.1)
    except StackError as e:
        raise StackError(f"{e}; last answer {seen[-1:]}\n{daemon.log()[-3000:]}") from None
    return seen[-1][1]


def wait_log(host: Host, check: Callable[[str], bool], what: str, timeout: float = 20) -> None:
    """Poll the host's daemon log until ``check`` accepts it."""
    wait_until(lambda: check(host.deployer.log()), timeout, f"{host.name}: {what}", 0.1)


def wait_stops(host: Host, count: int) -> None:
    """Poll the host's daemon log until it says it stopped the host's container ``count``
    times. The supervisor can start the new container (which the test waits for) before the
    daemon, busy on a loaded machine, logs that it stopped the old one."""
    name = host.supervisor.name
    wait_log(host, lambda log: stops_of(log, name) >= count, f"{count} stop(s) of {name}")


def wait_image(host: Host, ref: str, image: Published, timeout: float = 10) -> None:
    """Poll the host's engine until ``ref`` points at ``image``."""
    wait_until(lambda: host.engine.image_id(ref) == image.image_id, timeout,
               f"{host.name}: {ref} at {image.image_id}", 0.1)


# -- the fleet ------------------------------------------------------------------------------------


@attrs.define(eq=False)
class Host:
    """One simulated host: an engine, the supervisor of its container, its daemon."""

    name: str
    engine: Dockerd
    supervisor: Supervisor
    daemon: Daemon | None = None

    @property
    def deployer(self) -> Daemon:
        assert self.daemon is not None, f"{self.name} has no daemon"
        return self.daemon

    def wait_running(self, image: Published, timeout: float = 30.0) -> None:
        try:
            self.supervisor.wait_running_image_blocking(image.image_id, timeout)
        except StackError as e:
            log = self.daemon.log()[-4000:] if self.daemon is not None else "(no daemon)"
            raise StackError(f"{self.name}: {e}\ndeployer log:\n{log}") from None


@attrs.define(eq=False)
class Fleet:
    """Two hosts and their daemons; everything started here is stopped by the fixture."""

    workdir: Path
    engines: tuple[Dockerd, Dockerd]
    images: ImageBuilder
    supervise: Callable[..., Supervisor]
    daemons: list[Daemon] = attrs.field(factory=list)

    @property
    def registry_host(self) -> str:
        return self.images.registry.host

    def hosts_running(self, ref: str, version: str) -> tuple[Published, list[Host]]:
        """Publish ``ref`` at ``version``, pull it on every engine and run a supervised
        container of it on each; returns once every container runs that image."""
        published = self.images.publish(ref, version)
        parallel(*(lambda e=e: e.cli("pull", ref) for e in self.engines))
        hosts = [
            Host(f"host-{i}", engine, self.supervise(unique("c"), ref, engine=engine))
            for i, engine in enumerate(self.engines)
        ]
        parallel(*(lambda h=h: h.wait_running(published) for h in hosts))
        return published, hosts

    def start_daemons(self, hosts: Sequence[Host], nodes: Sequence[str], prefix: str) -> None:
        """One daemon per host, all on the etcd ``nodes`` (same order) and ``prefix``."""
        for host in hosts:
            host.daemon = Daemon(self.workdir, [
                "--docker", host.engine.url,
                "--etcd_nodes", ",".join(nodes),
                "--etcd_prefix", prefix,
                "--etcd_retry_delay", "0.2s",
                "--etcd_dial_timeout", "2s",
                "--repull_period", "0",
                "--hostname", host.name,
            ])
            self.daemons.append(host.daemon)
        parallel(*(h.deployer.start for h in hosts))

    def stop(self) -> None:
        errors = []
        for daemon in self.daemons:
            code = daemon.stop()
            log = daemon.log()
            if "Traceback" in log:
                errors.append(f"{daemon.url} logged a traceback:\n{log[-4000:]}")
            # twist re-raises SIGTERM on itself after a clean shutdown
            elif code not in (None, 0, -signal.SIGTERM):
                errors.append(f"{daemon.url} exited with {code}:\n{log[-3000:]}")
        assert not errors, "\n\n".join(errors)


@pytest.fixture(scope="module")
def second_engine(dockerd_factory: Callable[..., Dockerd]) -> Iterator[Dockerd]:
    """The second host's engine, shared by this module's tests."""
    engine = dockerd_factory()
    try:
        yield engine
    finally:
        engine.cleanup()


@pytest.fixture
def fleet(
    tmp_path: Path, clean_dockerd: Dockerd, second_engine: Dockerd,
    image_builder: ImageBuilder, supervisor_factory: Callable[..., Supervisor],
) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path, (clean_dockerd, second_engine), image_builder, supervisor_factory)
    try:
        yield fleet
    finally:
        try:
            fleet.stop()
        finally:
            if second_engine.running:
                second_engine.remove_all_containers()


# -- tests ---------------------------------------------------------------------------------------


def test_a_webhook_to_one_host_deploys_on_every_host(
    fleet: Fleet, etcd: EtcdMember, etcd_prefix: str
) -> None:
    repo = unique("fleet")
    ref = fleet.images.ref(repo, "qa")
    v1, hosts = fleet.hosts_running(ref, "v1")
    fleet.start_daemons(hosts, [etcd.client_url], etcd_prefix)
    a, b = hosts

    v2 = fleet.images.publish(ref, "v2")
    assert v2.image_id != v1.image_id
    status, body = a.deployer.post_json(
        WEBHOOK, dockerhub_payload(f"{fleet.registry_host}/{repo}", "qa")
    )
    assert status == 202, body
    # Answered only once etcd has it.
    key = f"{etcd_prefix}/{fleet.registry_host}/{repo}:qa"
    recorded = json.loads(etcdctl(etcd.client_url, "get", key, "--print-value-only"))
    assert (recorded["repository"], recorded["tag"]) == (repo, "qa")

    parallel(*(lambda h=h: h.wait_running(v2) for h in hosts))
    pattern = f"{fleet.registry_host}/{repo}:qa"
    for host in hosts:
        assert host.engine.image_id(ref) == v2.image_id
        wait_stops(host, 1)
        log = host.deployer.log()
        assert rounds_for(log, pattern) == 1, log
        assert stops_of(log, host.supervisor.name) == 1, log
    assert "accepted update source=dockerhub" in a.deployer.log()
    assert "accepted update" not in b.deployer.log()  # B learned it from its watch only


def test_the_fleet_survives_the_loss_of_the_first_etcd_member(
    fleet: Fleet, etcd_cluster: Callable[..., EtcdCluster], etcd_prefix: str
) -> None:
    # etcd's own election timing: a member that a loaded machine stalls for half a second
    # (the fast setting's election timeout) would start elections, and the daemons would leave
    # the first member before it dies.
    cluster = etcd_cluster(3, False)
    nodes = cluster.urls
    first = cluster.members[0]
    repo = unique("fleet")
    ref = fleet.images.ref(repo, "qa")
    payload = dockerhub_payload(f"{fleet.registry_host}/{repo}", "qa")
    _, hosts = fleet.hosts_running(ref, "v1")
    fleet.start_daemons(hosts, nodes, etcd_prefix)
    a, b = hosts

    # Both use the first member, and the fleet deploys through it.
    v2 = fleet.images.publish(ref, "v2")
    status, body = b.deployer.post_json(WEBHOOK, payload)
    assert status == 202, body
    parallel(*(lambda h=h: h.wait_running(v2) for h in hosts))
    for host in hosts:
        assert watched_urls(host.deployer.log()) == [nodes[0]]

    # The member in use dies, as the cluster's leader: a new election must happen too.
    leader = _make_leader(cluster, first)
    assert leader == first.client_url
    first.kill()
    v3 = fleet.images.publish(ref, "v3")
    # While the others elect a leader, no member acknowledges a write and a webhook is answered
    # 503 (by design): the webhook goes in once they have one; the daemons' watches and their
    # member in use still move off the dead member through the election.
    cluster.leader()  # once the running members agree on one
    status, body = a.deployer.post_json(WEBHOOK, payload)
    assert status == 202, body
    parallel(*(lambda h=h: h.wait_running(v3) for h in hosts))
    for host in hosts:
        wait_health(host.deployer, 200, 20)
        wait_stops(host, 2)
        log = host.deployer.log()
        urls = watched_urls(log)
        assert urls[0] == nodes[0] and urls[-1] in nodes[1:], log
        assert host.engine.image_id(ref) == v3.image_id
        assert stops_of(log, host.supervisor.name) == 2, log
    assert json.loads(
        etcdctl(cluster.running_urls(), "get", f"{etcd_prefix}/{fleet.registry_host}/{repo}:qa",
                "--print-value-only")
    )["tag"] == "qa"


def _make_leader(cluster: EtcdCluster, member: EtcdMember) -> str:
    """Move the cluster's leadership to ``member``; the leader's client URL afterwards."""
    index = cluster.members.index(member)
    leader, ids = cluster.leader()
    if leader != index:
        etcdctl(cluster.urls[leader], "move-leader", f"{ids[index]:x}")
    return cluster.urls[cluster.leader()[0]]


def test_etcd_restart_refuses_then_deploys_once(
    fleet: Fleet, etcd_cluster: Callable[..., EtcdCluster], etcd_prefix: str
) -> None:
    (member,) = etcd_cluster(1).members
    repo = unique("fleet")
    ref = fleet.images.ref(repo, "qa")
    v1, hosts = fleet.hosts_running(ref, "v1")
    fleet.start_daemons(hosts, [member.client_url], etcd_prefix)
    a, _ = hosts
    v2 = fleet.images.publish(ref, "v2")

    member.stop()
    for host in hosts:
        reason = wait_health(host.deployer, 503, 10)
        assert "etcd" in reason["error"], reason
    status, body = a.deployer.post_json(
        WEBHOOK, dockerhub_payload(f"{fleet.registry_host}/{repo}", "qa")
    )
    assert status == 503, body
    assert "etcd" in body["error"], body
    # Let the watches back off for a while, so that they are likely still waiting when etcd
    # is back and the key is written.
    for host in hosts:
        wait_log(host, lambda log: max(retry_delays(log), default=0) >= 1.0,
                 "a watch retry delay of 1 s or more")

    member.start()
    member.wait_ready()
    assert etcdctl(member.client_url, "get", etcd_prefix + "/", "--prefix", "--keys-only") \
        .strip() == "", "the refused webhook left a key behind"
    pattern = f"{fleet.registry_host}/{repo}:qa"
    etcdctl(member.client_url, "put", f"{etcd_prefix}/{pattern}", "x")

    parallel(*(lambda h=h: h.wait_running(v2, timeout=45) for h in hosts))
    for host in hosts:
        wait_health(host.deployer, 200, 20)
    sentinel = _sentinel_round(member.client_url, etcd_prefix, fleet, hosts)
    for host in hosts:
        log = host.deployer.log()
        assert rounds_for(log, pattern) == 1, log
        assert stops_of(log, host.supervisor.name) == 1, log
        assert host.supervisor.runs == 2, f"{host.name}: {host.supervisor.runs} runs"
        assert host.engine.image_id(ref) == v2.image_id != v1.image_id
        assert rounds_for(log, sentinel) == 1


def _sentinel_round(endpoint: str, prefix: str, fleet: Fleet, hosts: Sequence[Host]) -> str:
    """Put a key of a repository no host has and wait until every daemon ran its round.

    The watch delivers in revision order and rounds run one at a time, so once it ran, every
    earlier key was handled and every round it caused has ended."""
    pattern = f"{fleet.registry_host}/{unique('sentinel')}:qa"
    etcdctl(endpoint, "put", f"{prefix}/{pattern}", "x")
    for host in hosts:
        wait_log(host, lambda log: rounds_for(log, pattern) >= 1, f"a round for {pattern}")
    return pattern


def test_etcdctl_put_of_a_repository_deploys_every_tag_and_del_deploys_nothing(
    fleet: Fleet, etcd: EtcdMember, etcd_prefix: str
) -> None:
    repo = unique("fleet")
    qa, prod = fleet.images.ref(repo, "qa"), fleet.images.ref(repo, "prod")
    fleet.images.publish(prod, "prod-v1")
    parallel(*(lambda e=e: e.cli("pull", prod) for e in fleet.engines))
    _, hosts = fleet.hosts_running(qa, "qa-v1")
    fleet.start_daemons(hosts, [etcd.client_url], etcd_prefix)

    qa2, prod2 = fleet.images.publish(qa, "qa-v2"), fleet.images.publish(prod, "prod-v2")
    key = f"{etcd_prefix}/{fleet.registry_host}/{repo}"
    etcdctl(etcd.client_url, "put", key, "anything")
    parallel(*(lambda h=h: h.wait_running(qa2) for h in hosts))
    for host in hosts:
        wait_image(host, prod, prod2)
        assert host.engine.image_id(qa) == qa2.image_id

    qa3, prod3 = fleet.images.publish(qa, "qa-v3"), fleet.images.publish(prod, "prod-v3")
    assert etcdctl(etcd.client_url, "del", key).strip() == "1"
    _sentinel_round(etcd.client_url, etcd_prefix, fleet, hosts)
    for host in hosts:
        log = host.deployer.log()
        assert rounds_for(log, f"{fleet.registry_host}/{repo}") == 1, log
        assert stops_of(log, host.supervisor.name) == 1, log
        assert host.engine.image_id(qa) == qa2.image_id != qa3.image_id
        assert host.engine.image_id(prod) == prod2.image_id != prod3.image_id
        assert host.supervisor.runs == 2


def test_a_restarted_daemon_catches_up_and_a_second_restart_changes_nothing(
    fleet: Fleet, etcd: EtcdMember, etcd_prefix: str
) -> None:
    repo = unique("fleet")
    ref = fleet.images.ref(repo, "qa")
    pattern = f"{fleet.registry_host}/{repo}:qa"
    v1, hosts = fleet.hosts_running(ref, "v1")
    fleet.start_daemons(hosts, [etcd.client_url], etcd_prefix)
    a, b = hosts

    b.deployer.stop()
    v2 = fleet.images.publish(ref, "v2")
    status, body = a.deployer.post_json(
        WEBHOOK, dockerhub_payload(f"{fleet.registry_host}/{repo}", "qa")
    )
    assert status == 202, body
    a.wait_running(v2)
    assert b.engine.image_id(ref) == v1.image_id  # nobody deploys on B while its daemon is down

    b.deployer.start()
    b.wait_running(v2)
    wait_stops(b, 1)
    log = b.deployer.log()
    assert rounds_for(log, pattern) == 1, log
    assert stops_of(log, b.supervisor.name) == 1, log
    assert b.supervisor.runs == 2

    before = len(b.deployer.log())
    b.deployer.stop()
    b.deployer.start()
    _sentinel_round(etcd.client_url, etcd_prefix, fleet, [b])
    since = b.deployer.log()[before:]
    assert rounds_for(since, pattern) == 1, since  # the catch-up delivered the key again ...
    assert stops_of(since, b.supervisor.name) == 0, since  # ... and nothing changed
    assert b.supervisor.runs == 2
    assert b.engine.image_id(ref) == v2.image_id
    assert a.supervisor.runs == 2
    assert rounds_for(a.deployer.log(), pattern) == 1
