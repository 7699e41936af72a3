"""The daemon (``twist deployer``) in fleet mode while its etcd members hang (SIGSTOP): /healthz
answers 503 while no member answers, the member in use is left within about 2 x
--etcd_dial_timeout, and every webhook is answered (202 or 503) within members x
--etcd_dial_timeout of its arrival, also one that arrives while another write waits."""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.stack.daemon import Daemon
from tests.stack.docker_stack import Dockerd, wait_until
from tests.stack.etcd_stack import EtcdCluster

pytestmark = pytest.mark.real

MARGIN = 1.5  # for a loaded machine


@pytest.fixture
def fleet_daemon(tmp_path: Path, dockerd: Dockerd,
                 etcd_prefix: str) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(nodes: tuple[str, ...], dial_timeout: float, retry_delay: float) -> Daemon:
        daemon = Daemon(tmp_path, [
            "--docker", dockerd.url, "--etcd_nodes", ",".join(nodes),
            "--etcd_prefix", etcd_prefix, "--etcd_dial_timeout", f"{dial_timeout:g}s",
            "--etcd_retry_delay", f"{retry_delay:g}s", "--repull_period", "0",
        ])
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        code = daemon.stop()
        log = daemon.log()
        assert "Traceback" not in log, log[-4000:]
        assert code in (0, -signal.SIGTERM), f"deployer exited with {code}:\n{log[-3000:]}"


def deploy(daemon: Daemon, name: str) -> tuple[int, float]:
    """POST /api/deploy; the status and how long the answer took."""
    start = time.monotonic()
    status, _ = daemon.post_json("/api/deploy", {"repository": f"myorg/{name}", "tag": "qa"},
                                 timeout=60)
    return status, time.monotonic() - start


def healthz(daemon: Daemon) -> int:
    status, _ = daemon.get("/healthz", timeout=5)
    return status


def wait_health(daemon: Daemon, status: int, timeout: float) -> float:
    """Seconds until /healthz answers ``status`` (polled every 0.1 s)."""
    start = time.monotonic()
    wait_until(lambda: healthz(daemon) == status, timeout, f"/healthz {status}", 0.1)
    return time.monotonic() - start


def failed_writes(daemon: Daemon, url: str) -> list[str]:
    """The daemon's log lines of group-commit transactions to ``url`` that failed."""
    return re.findall(rf"etcd write of \d+ key\(s\) to {re.escape(url)} failed", daemon.log())


def test_the_member_in_use_hangs(etcd_cluster: Callable[..., EtcdCluster],
                                 fleet_daemon: Callable[..., Daemon]) -> None:
    cluster = etcd_cluster(3)
    leader, follower = cluster.leader_first_follower()
    other = 3 - leader - follower
    order = (cluster.urls[follower], cluster.urls[leader], cluster.urls[other])
    # A retry delay of 2 s keeps /healthz at 503 for 1-2 s after the watch lost its member.
    daemon = fleet_daemon(order, dial_timeout=2.0, retry_delay=2.0)
    assert deploy(daemon, "before")[0] == 202
    cluster.keep_leader_off(follower)
    with cluster.frozen(cluster.members[follower]):
        with ThreadPoolExecutor(1) as pool:
            during = pool.submit(deploy, daemon, "during")
            assert wait_health(daemon, 503, 2 * 2.0 + MARGIN) <= 2 * 2.0 + MARGIN
            status, took = during.result()
        assert status == 202
        assert took <= 3 * 2.0 + MARGIN
        wait_health(daemon, 200, 2.0 + 2 * 2.0 + MARGIN)
        hung_writes = len(failed_writes(daemon, order[0]))
        status, took = deploy(daemon, "after-failover")
        assert status == 202
        # It did not wait for the hung member: no write timed out there meanwhile (it would
        # have been logged before the answer), and it took less than one timeout more than
        # the commit that a loaded machine can hold up.
        assert len(failed_writes(daemon, order[0])) == hung_writes, daemon.log()[-3000:]
        assert took < 2.0 + MARGIN, took
    log = daemon.log()
    assert f"etcd member {order[0]} failed its liveness check" in log
    assert f"on {order[1]} from revision" in log, "the watch moved to the next member"
    assert healthz(daemon) == 200


def test_every_member_hangs(etcd_cluster: Callable[..., EtcdCluster],
                            fleet_daemon: Callable[..., Daemon]) -> None:
    cluster = etcd_cluster(3)
    dial = 2.0
    daemon = fleet_daemon(cluster.urls, dial_timeout=dial, retry_delay=0.2)
    with cluster.frozen(*cluster.members):
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(deploy, daemon, "first")
            time.sleep(0.5)
            second = pool.submit(deploy, daemon, "second")  # waits behind the first write
            assert wait_health(daemon, 503, 2 * dial + MARGIN) <= 2 * dial + MARGIN
            answers = [first.result(), second.result()]
        for status, took in answers:
            assert status == 503
            assert took <= 3 * dial + MARGIN, answers
        status, body = daemon.get("/healthz")
        assert status == 503 and "etcd" in json.dumps(body)
    # What the other test counts: a transaction that timed out on a member is logged.
    assert any(failed_writes(daemon, url) for url in cluster.urls), daemon.log()[-3000:]
    wait_health(daemon, 200, 15)
    assert deploy(daemon, "recovered")[0] == 202


def test_one_member_with_a_3s_dial_timeout(etcd_cluster: Callable[..., EtcdCluster],
                                           fleet_daemon: Callable[..., Daemon]) -> None:
    cluster = etcd_cluster(1)
    daemon = fleet_daemon(cluster.urls, dial_timeout=3.0, retry_delay=0.2)
    with cluster.frozen(*cluster.members):
        status, took = deploy(daemon, "frozen")
        assert status == 503
        assert took <= 3.0 + MARGIN
    wait_health(daemon, 200, 15)
    assert deploy(daemon, "thawed")[0] == 202
