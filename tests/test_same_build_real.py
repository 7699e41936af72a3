"""Same build everywhere on the real stack: two hosts (two dockerds, each with its own deployer
daemon in fleet mode on one etcd, ``--replace recreate``, slow readiness ``--min_ready 3s``).

A push lands while the first host is mid-rollout of an update; the second host comes to that
update only then (it starts late, and catches up from etcd). It deploys the build the first host
recorded for the update (``repo@digest``, tagged ``repo:tag``), not the tag's newest build; the
next update then rolls the newer build out to both. ``GET /status`` shows each host's digest.
"""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.stack.daemon import Daemon
from tests.stack.docker_stack import Dockerd, ImageBuilder, StackError, unique, wait_until
from tests.stack.etcd_stack import EtcdMember, etcdctl

pytestmark = pytest.mark.real


@pytest.fixture
def second_engine(dockerd_factory: Callable[..., Dockerd]) -> Iterator[Dockerd]:
    engine = dockerd_factory()
    try:
        yield engine
    finally:
        engine.cleanup()


@pytest.fixture
def daemons(tmp_path: Path, etcd: EtcdMember,
            etcd_prefix: str) -> Iterator[Callable[[str, Dockerd], Daemon]]:
    started: list[Daemon] = []

    def start(hostname: str, engine: Dockerd) -> Daemon:
        daemon = Daemon(tmp_path, [
            "--docker", engine.url, "--etcd_nodes", etcd.client_url,
            "--etcd_prefix", etcd_prefix, "--etcd_retry_delay", "0.2s", "--repull_period", "0",
            "--hostname", hostname, "--replace", "recreate", "--min_ready", "3s",
            "--ready_timeout", "60s",
        ])
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        code = daemon.stop()
        log = daemon.log()
        assert "Traceback" not in log, log[-5000:]
        assert code in (0, -signal.SIGTERM), f"deployer exited with {code}:\n{log[-3000:]}"


def image_of(engine: Dockerd, name: str) -> str | None:
    state = engine.inspect(name)
    return state["Image"] if state is not None and state["State"]["Running"] else None


def slots(etcd: EtcdMember, prefix: str, app: str) -> int:
    """How many rollout slots of ``app`` are held or waited for."""
    out = etcdctl(etcd.client_url, "get", f"{prefix}/_/rollout/{app}/", "--prefix",
                  "--keys-only")
    return len(out.split())


def digests(daemon: Daemon, app: str) -> dict[str, str | None]:
    """Each host's digest of ``app`` in the daemon's ``GET /status``."""
    status, doc = daemon.get("/status")
    assert status == 200, doc
    hosts = (doc.get("apps", {}).get(app) or {}).get("hosts", {})
    return {host: state.get("digest") for host, state in hosts.items()}


def test_a_push_mid_rollout_leaves_both_hosts_on_the_build_of_the_update(
    clean_dockerd: Dockerd, second_engine: Dockerd, image_builder: ImageBuilder,
    etcd: EtcdMember, etcd_prefix: str, daemons: Callable[[str, Dockerd], Daemon],
) -> None:
    engines = {"h1": clean_dockerd, "h2": second_engine}
    ref = image_builder.ref(unique("same"), "qa")
    repository, _, tag = ref.rpartition(":")
    v1 = image_builder.publish(ref, "v1")
    name = unique("app")
    for engine in engines.values():
        engine.cli("pull", ref)
        engine.cli("run", "-d", "--name", name, "--restart", "unless-stopped", ref)
    builder = image_builder.builder()
    v2_id = image_builder.build(builder, ref, "v2")
    v2_digest = image_builder.push(builder, ref)
    v3_id = image_builder.build(builder, ref, "v3")  # ready to push, not pushed yet

    first = daemons("h1", engines["h1"])
    status, body = first.post_json("/api/deploy", {"repository": repository, "tag": tag})
    assert status == 202, body
    wait_until(lambda: "recorded" in first.log() and image_of(engines["h1"], name) == v2_id,
               60, "h1 records the build and runs it", 0.05)
    # h1 is mid-rollout (ready only after 3 s running, its slot held): a push lands. (Only
    # h2, which has not come to the update yet, pulls after it: when the push ends, before or
    # after h1 is ready, makes no difference to h1.)
    assert slots(etcd, etcd_prefix, ref) == 1, first.log()[-3000:]
    v3_digest = image_builder.push(builder, ref)
    record = json.loads(etcdctl(etcd.client_url, "get", f"{etcd_prefix}/_/builds/{ref}",
                                "--print-value-only"))
    assert (record["digest"], record["image_id"], record["host"]) == (v2_digest, v2_id, "h1")

    second = daemons("h2", engines["h2"])  # comes to the update now, from etcd
    try:
        wait_until(lambda: image_of(engines["h2"], name) == v2_id, 90, "h2 on v2", 0.2)
        wait_until(lambda: digests(first, ref) == {"h1": v2_digest, "h2": v2_digest}, 30,
                   "/status: both hosts on the update's digest", 0.2)
    except StackError as e:
        raise StackError(f"{e}\nh1:\n{first.log()[-3000:]}\nh2:\n{second.log()[-4000:]}") \
            from None
    assert image_of(engines["h1"], name) == v2_id
    log = second.log()
    assert f"pulling {repository}@{v2_digest} for {ref}: the build that h1 recorded" in log
    assert f"pulled {ref} " not in log  # never pulled by tag: the tag is v3 by now
    assert engines["h2"].image_id(ref) == v2_id  # the digest pulled and tagged repo:tag
    assert v1.image_id not in (image_of(engines["h1"], name), image_of(engines["h2"], name))

    # The next update rolls the newer build out after it.
    status, body = second.post_json("/api/deploy", {"repository": repository, "tag": tag})
    assert status == 202, body
    with ThreadPoolExecutor(2) as pool:
        waits = [pool.submit(wait_until, lambda e=e: image_of(e, name) == v3_id, 90,
                             f"{h} on v3", 0.2) for h, e in engines.items()]
        for w in waits:
            w.result()
    wait_until(lambda: digests(second, ref) == {"h1": v3_digest, "h2": v3_digest}, 30,
               "/status: both hosts on the next update's digest", 0.2)
    record = json.loads(etcdctl(etcd.client_url, "get", f"{etcd_prefix}/_/builds/{ref}",
                                "--print-value-only"))
    assert record["digest"] == v3_digest
