"""More zero-downtime rollouts on the real stack (the fleet of
:mod:`tests.test_rollout_fleet_real`: three dockerds, the app under a restart loop on each, a
deployer daemon per host in fleet mode on one etcd):

- ``--max_unavailable 2`` takes two instances down at once and never three, where
  ``--max_unavailable 1`` takes one (both measured in the same test, same build and health
  timings);
- a deployer SIGKILLed while it holds a slot: the slot is taken by another host once its lease
  expires (TTL 10 s), not before, and the rollout completes on the live hosts;
- two pushes a second apart: every host ends on the second build, and no host ever runs
  anything but the three builds;
- ``POST /api/resume`` with bad input, and while etcd is down, on a real daemon: clear errors
  and not one write to etcd.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from base64 import b64decode
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests import test_rollout_fleet_real as base
from tests.stack.daemon import Daemon
from tests.stack.docker_stack import Dockerd, free_port, unique, wait_until
from tests.stack.etcd_stack import EtcdCluster, EtcdMember, current_revision, etcdctl
from tests.stack.health_images import healthcheck
from tests.test_rollout_fleet_real import (
    GOOD,
    Fleet,
    Host,
    Sampler,
    first_time,
    log_events,
    parallel,
    persistent,
)

pytestmark = pytest.mark.real

# The fixtures of the fleet, shared with that module.
fleet = base.fleet
more_engines = base.more_engines

SLOW_CHECK = "sleep 3; test -f /tmp/healthy"
"""A health check that takes 3 s: a replacement is ready about 4 s after its start."""
SLOW = [healthcheck(SLOW_CHECK, interval="1s", timeout="10s")]


# -- what the engines run -------------------------------------------------------------------------


def app_state(engine: Dockerd, name: str) -> tuple[str | None, bool]:
    """(image id, healthy) of the running container named exactly ``name``; (None, False)
    when none runs."""
    filters = quote(json.dumps({"name": [f"^{name}$"]}))
    status, body = engine.api("GET", f"/containers/json?filters={filters}", timeout=5.0)
    assert status == 200, body
    found = json.loads(body)
    if not found:
        return None, False
    return str(found[0]["ImageID"]), "(healthy)" in str(found[0].get("Status", ""))


class StateSampler(threading.Thread):
    """Polls the engines side by side every ``interval`` seconds; ``samples`` holds, for each
    poll, the (image id, healthy) of ``name`` on each engine."""

    def __init__(self, engines: Sequence[Dockerd], name: str, interval: float = 0.25) -> None:
        super().__init__(name="state-sampler", daemon=True)
        self.engines = list(engines)
        self.container = name
        self.interval = interval
        self.samples: list[tuple[float, tuple[tuple[str | None, bool], ...]]] = []
        self.errors: list[str] = []
        self._halt = threading.Event()
        self._pool = ThreadPoolExecutor(len(self.engines))

    def run(self) -> None:
        while not self._halt.is_set():
            began = time.monotonic()
            futures = [self._pool.submit(app_state, e, self.container) for e in self.engines]
            try:
                self.samples.append((began, tuple(f.result() for f in futures)))
            except Exception as e:
                self.errors.append(repr(e))
            self._halt.wait(max(0.0, self.interval - (time.monotonic() - began)))

    def __enter__(self) -> StateSampler:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._halt.set()
        self.join(10)
        self._pool.shutdown()

    def images(self) -> set[str]:
        return {image for _, seen in self.samples for image, _ in seen if image is not None}

    @property
    def fewest_healthy(self) -> int:
        """The fewest healthy instances, as two samples in a row agree (:func:`persistent`)."""
        healthy = [tuple(ok for _, ok in seen) for _, seen in self.samples]
        return min(sum(seen) for seen in persistent(healthy))


def most_down(sampler: Sampler, among: Sequence[int] | None = None) -> int:
    """The most instances (of the hosts ``among``, by index) that two samples in a row saw not
    healthy (:func:`~tests.test_rollout_fleet_real.persistent`)."""
    hosts = list(among) if among is not None else None
    return max(
        sum(not ok for n, ok in enumerate(seen) if hosts is None or n in hosts)
        for seen in sampler.persistent()
    )


# -- what the daemons logged ----------------------------------------------------------------------


def windows(fleet: Fleet, name: str, hosts: Sequence[Host] | None = None
            ) -> list[tuple[float, float, str]]:
    """Per host, (when it stopped ``name``, when the replacement was healthy, host), sorted."""
    out = []
    for host in hosts if hosts is not None else fleet.hosts:
        stopped = first_time(host.deployer, lambda m: m.startswith(f"stopped {name} ("))
        ready = first_time(host.deployer,
                           lambda m: m.startswith(f"{name} (") and " is healthy after " in m)
        out.append((stopped, ready, host.name))
    return sorted(out)


def most_at_once(spans: Sequence[tuple[float, float, str]]) -> int:
    """The most of ``spans`` (start, end, _) that were open at one moment."""
    edges = sorted([(start, 1) for start, _, _ in spans] + [(end, -1) for _, end, _ in spans])
    most = current = 0
    for _, step in edges:  # at a tie the end (-1) comes first: touching is not overlapping
        current += step
        most = max(most, current)
    return most


def slot_holders(fleet: Fleet, app: str) -> list[tuple[int, str]]:
    """(create revision, host) of each slot key of ``app``, oldest first."""
    out = json.loads(etcdctl(fleet.etcd.client_url, "get", f"{fleet.prefix}/_/rollout/{app}/",
                             "--prefix", "-w", "json"))
    found = [(int(kv["create_revision"]), json.loads(b64decode(kv["value"]))["host"])
             for kv in out.get("kvs", [])]
    return sorted(found)


# -- --max_unavailable ----------------------------------------------------------------------------


def test_max_unavailable_two_replaces_two_at_once_and_never_three(fleet: Fleet) -> None:
    ref = fleet.images.ref(unique("two"), "qa")
    fleet.app_running(ref, "v1")
    name = fleet.hosts[0].sup.name
    seen: dict[int, tuple[Sampler, float, list[tuple[float, float, str]], int]] = {}
    for limit, version in ((1, "v2"), (2, "v3")):
        fleet.start_daemons("--max_unavailable", str(limit))
        new = fleet.images.publish(ref, version, GOOD)
        with Sampler([h.engine for h in fleet.hosts], name) as sampler:
            began = time.monotonic()
            fleet.deploy(ref)
            parallel(*(lambda h=h, new=new: h.wait_healthy(new, timeout=90) for h in fleet.hosts))
            took = time.monotonic() - began
            fleet.wait_free()
        assert not sampler.errors, sampler.errors
        waited = sum("waiting for a rollout slot of " in h.deployer.log() for h in fleet.hosts)
        seen[limit] = (sampler, took, windows(fleet, name), waited)
        fleet.stop()  # the next limit is a new set of daemons
        for host in fleet.hosts:
            assert host.engine.image_id(ref) == new.image_id

    for limit, (sampler, took, spans, waited) in seen.items():
        print(f"--max_unavailable {limit}: rollout of 3 hosts took {took:.1f}s; at most"
              f" {most_down(sampler)} down in two samples in a row, {most_at_once(spans)} at"
              f" once in the logs; {waited} hosts waited for a slot")
    one, two = seen[1], seen[2]
    # One at a time: never two down, never two replacements at once.
    assert most_down(one[0]) == 1 and most_at_once(one[2]) == 1
    # Two at a time: two down at some moment (seen by the sampler and in the logs), never three.
    assert most_down(two[0]) == 2, two[0].samples
    assert most_at_once(two[2]) == 2, two[2]
    # Faster, by the rollout's structure: with 2 slots at most one host waits for a slot (the
    # third), with 1 up to two do.
    assert two[3] <= 1 and one[3] <= 2


# -- a deployer killed while it holds a slot ------------------------------------------------------


def test_a_deployer_killed_holding_a_slot_frees_it_after_the_lease_ttl(fleet: Fleet) -> None:
    ref = fleet.images.ref(unique("kill"), "qa")
    fleet.app_running(ref, "v1")
    fleet.start_daemons()
    name = fleet.hosts[0].sup.name
    slow = fleet.images.publish(ref, "v2-slow", SLOW)

    def holder() -> Host | None:
        for host in fleet.hosts:
            if f"stopped {name} (" in host.deployer.log():
                return host
        return None

    with Sampler([h.engine for h in fleet.hosts], name) as sampler:
        fleet.deploy(ref)
        wait_until(lambda: holder() is not None, 60, "a host replacing its instance", 0.05)
        dead = holder()
        assert dead is not None
        # it holds the slot now, waiting for its replacement's (slow) health check
        assert [h for _, h in slot_holders(fleet, ref)][:1] == [dead.name]
        assert dead.deployer.process is not None
        dead.deployer.process.send_signal(signal.SIGKILL)
        dead.deployer.process.wait(10)
        killed = time.time()
        dead.deployer.stop(check=False)  # its log may end with half a line
        dead.daemon = None
        live = [h for h in fleet.hosts if h is not dead]
        # Its key stays (its lease is not kept alive any more, but has not expired yet).
        time.sleep(2.0)
        assert [h for _, h in slot_holders(fleet, ref)][:1] == [dead.name]
        assert not any(f"stopped {name} (" in h.deployer.log() for h in live)

        parallel(*(lambda h=h: h.wait_healthy(slow, timeout=120) for h in live))
        fleet.wait_free(timeout=60)
    # The supervisor of the dead deployer's host started the new build anyway.
    dead.wait_healthy(slow, timeout=30)

    def took_slot(host: Host) -> float:
        return first_time(host.deployer, lambda m: m.startswith(f"rollout slot of {ref} taken"))

    after = min(took_slot(h) for h in live) - killed
    print(f"killed {dead.name} holding the slot; the next host took it {after:.1f}s later")
    # etcd expires the lease between TTL - TTL/3 (a keepalive just before the kill) and TTL
    # (10 s) after the kill; the next host looks every 0.1 s.
    assert after >= 5.0, f"the slot was taken {after:.1f}s after the kill: before the lease's TTL"
    assert after <= 25.0
    # The next host had waited behind the dead one.
    _, following = min((took_slot(h), h.name) for h in live)
    [next_host] = [h for h in live if h.name == following]
    waiting = [m for _, m in log_events(next_host.deployer)
               if m.startswith(f"waiting for a rollout slot of {ref}")]
    assert waiting and f"replacing now: {dead.name} ({name})" in waiting[0], waiting
    # The live hosts went one at a time, each after the previous one was healthy.
    spans = windows(fleet, name, live)
    assert most_at_once(spans) == 1, spans
    assert most_down(sampler, [fleet.hosts.index(h) for h in live]) <= 1
    assert not sampler.errors, sampler.errors
    assert fleet.pause(ref) is None
    for host in fleet.hosts:
        assert host.engine.image_id(ref) == slow.image_id


# -- two pushes in quick succession ---------------------------------------------------------------


def test_two_pushes_a_second_apart_end_on_the_second_everywhere(fleet: Fleet) -> None:
    ref = fleet.images.ref(unique("twice"), "qa")
    v1 = fleet.app_running(ref, "v1")
    fleet.start_daemons()
    name = fleet.hosts[0].sup.name
    v2 = fleet.images.publish(ref, "v2", GOOD)
    builder = fleet.images.builder()
    v3_id = fleet.images.build(builder, ref, "v3", GOOD)  # pushed a second after v2's webhook

    with StateSampler([h.engine for h in fleet.hosts], name) as sampler:
        began = time.monotonic()
        fleet.deploy(ref, via=0)
        time.sleep(1.0)
        fleet.images.push(builder, ref)
        fleet.deploy(ref, via=1)
        parallel(*(lambda h=h: h.sup.wait_running_image_blocking(v3_id, 120)
                   for h in fleet.hosts))
        wait_until(lambda: all(app_state(h.engine, name) == (v3_id, True) for h in fleet.hosts),
                   60, "every host healthy on v3", 0.1)
        took = time.monotonic() - began
        fleet.wait_free()
        time.sleep(2.0)  # nothing moves afterwards

    assert not sampler.errors, sampler.errors
    for host in fleet.hosts:
        assert app_state(host.engine, name) == (v3_id, True), host.name
        assert host.engine.image_id(ref) == v3_id, host.name
    assert sampler.images() <= {v1.image_id, v2.image_id, v3_id}, sampler.images()
    # one instance at a time across both pushes
    assert sampler.fewest_healthy >= 2, [s for s in sampler.samples
                                         if sum(ok for _, ok in s[1]) < 2]
    assert fleet.pause(ref) is None

    # and /status says so: one image on every host, converged
    def status_on_v3() -> bool:
        code, document = fleet.hosts[2].deployer.get("/status")
        app = document.get("apps", {}).get(ref, {}) if code == 200 else {}
        hosts = app.get("hosts", {})
        return (app.get("converged") is True and sorted(hosts) == ["h1", "h2", "h3"]
                and all(h.get("image_id") == v3_id for h in hosts.values()))

    wait_until(status_on_v3, 30, "/status: every host on v3, converged", 0.2)
    on_v2 = sum(any(seen[n][0] == v2.image_id for _, seen in sampler.samples) for n in range(3))
    stops = sum(h.deployer.log().count(f"stopped {name} (") for h in fleet.hosts)
    print(f"two pushes: {on_v2} of 3 hosts ran v2 for a while before v3; {stops} stops;"
          f" every host healthy on v3 {took:.1f}s after the first webhook")


# -- resume: bad input and etcd down, on a real daemon --------------------------------------------


APP = "myorg/app:qa"
PAUSE = {"app": APP, "image_id": "sha256:" + "fe" * 32, "digest": None, "host": "host-b",
         "reason": "unhealthy: health check failed 2 times", "time": 1.0}


def resume(daemon: Daemon, body: bytes, content_type: str = "application/json"
           ) -> tuple[int, Any]:
    return daemon.request("POST", "/api/resume", body, {"Content-Type": content_type})


def revision_of(etcd_url: str, key: str) -> tuple[int, int] | None:
    """(create revision, mod revision) of ``key``, or None."""
    answer = json.loads(etcdctl(etcd_url, "get", key, "-w", "json"))
    kvs = answer.get("kvs") or []
    return (int(kvs[0]["create_revision"]), int(kvs[0]["mod_revision"])) if kvs else None


def cli(daemon_url: str, *args: str, token: str = "test-token") -> tuple[int, str, str]:
    root = Path(__file__).resolve().parent.parent
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(root), "DEPLOYER_WEBHOOK_TOKEN": token}
    done = subprocess.run([sys.executable, "-m", "deployer", *args, "--url", daemon_url],
                          capture_output=True, text=True, timeout=60, env=env, check=False)
    return done.returncode, done.stdout, done.stderr


def test_resume_bad_input_writes_nothing(tmp_path: Path, dockerd: Dockerd, etcd: EtcdMember,
                                        etcd_prefix: str) -> None:
    """What the command refuses before sending, the daemon refuses too; and an app that is not
    paused (while another is) is a 404: etcd's revision does not move."""
    paused_key = f"{etcd_prefix}/_/paused/myorg/other:qa"
    etcdctl(etcd.client_url, "put", paused_key, json.dumps({**PAUSE, "app": "myorg/other:qa"}))
    daemon = Daemon(tmp_path, ["--docker", dockerd.url, "--repull_period", "0",
                               "--etcd_nodes", etcd.client_url, "--etcd_prefix", etcd_prefix,
                               "--hostname", "host-a"]).start()
    try:
        time.sleep(1.0)  # settled (it writes its status after a round; none runs)
        before = current_revision(etcd.client_url)
        refused = [
            (b"not json", 400),
            (b"[]", 400),
            (b"{}", 400),
            (b'{"app": 7}', 400),
            (b'{"app": null}', 400),
            (json.dumps({"app": "myorg/app"}).encode(), 400),          # no tag
            (json.dumps({"app": "myorg/App:qa"}).encode(), 400),       # not a repository
            (json.dumps({"app": "myorg/app:qa@sha256:" + "ab" * 32}).encode(), 400),
            (json.dumps({"app": "*"}).encode(), 400),
            (json.dumps({"app": ""}).encode(), 400),
            (json.dumps({"app": "my app:qa"}).encode(), 400),
            (json.dumps({"app": APP}).encode(), 404),                  # not paused
            (json.dumps({"app": "myorg/other:prod"}).encode(), 404),   # another tag of it
            (json.dumps({"app": "myorg/other"}).encode(), 400),        # the paused one, no tag
            (json.dumps({"app": "unknown/app:v9"}).encode(), 404),
        ]
        for body, code in refused:
            status, answer = resume(daemon, body)
            assert status == code, (body, status, answer)
            assert isinstance(answer, dict) and isinstance(answer.get("error"), str), answer
            assert answer["error"], body
        status, answer = resume(daemon, json.dumps({"app": APP}).encode(), "text/plain")
        assert status == 415, answer
        assert cli(daemon.url, "resume", "myorg/other:prod") == (
            1, "", "deployer resume: myorg/other:prod is not paused: nothing changed\n")
        assert current_revision(etcd.client_url) == before, "a refused resume wrote to etcd"
        # a daemon that does not answer at all
        port = free_port()
        code, out, err = cli(f"http://127.0.0.1:{port}", "resume", APP)
        assert (code, out) == (1, "")
        assert err.startswith(f"deployer resume: no answer from http://127.0.0.1:{port}/api/resume")
        assert err.count("\n") == 1 and "Traceback" not in err
        # and the pause that is there ends as asked, once
        status, answer = resume(daemon, json.dumps({"app": "myorg/other:qa"}).encode())
        assert (status, answer) == (200, {"status": "resumed", "app": "myorg/other:qa"})
        assert revision_of(etcd.client_url, paused_key) is None
        assert current_revision(etcd.client_url) == before + 1
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.log()


def test_resume_while_etcd_is_down_is_503_and_never_written_later(
    tmp_path: Path, dockerd: Dockerd, etcd_cluster: Callable[..., EtcdCluster],
) -> None:
    cluster = etcd_cluster(1)
    member = cluster.members[0]
    prefix = "/deployer"
    key = f"{prefix}/_/paused/{APP}"
    etcdctl(member.client_url, "put", key, json.dumps(PAUSE))
    kept = revision_of(member.client_url, key)
    daemon = Daemon(tmp_path, ["--docker", dockerd.url, "--repull_period", "0",
                               "--etcd_nodes", member.client_url, "--etcd_prefix", prefix,
                               "--hostname", "host-a", "--etcd_dial_timeout", "1s",
                               "--etcd_retry_delay", "0.2s"]).start()
    try:
        member.stop()
        for _ in range(3):
            began = time.monotonic()
            status, answer = resume(daemon, json.dumps({"app": APP}).encode())
            assert status == 503, answer
            assert isinstance(answer, dict) and answer.get("error"), answer
            assert time.monotonic() - began < 8.0
        code, out, err = cli(daemon.url, "resume", APP)
        assert (code, out) == (1, "")
        assert err.startswith(f"deployer resume: {daemon.url}/api/resume answered HTTP 503: ")
        # an unknown app is refused the same way (etcd cannot say it is not paused)
        status, _ = resume(daemon, json.dumps({"app": "unknown/app:v9"}).encode())
        assert status == 503
        # a malformed one is refused at once, etcd or not
        status, _ = resume(daemon, json.dumps({"app": "myorg/app"}).encode())
        assert status == 400

        member.start()
        member.wait_ready()
        wait_until(lambda: daemon.get("/healthz")[0] == 200, 60, "the daemon back on etcd", 0.2)
        time.sleep(3.0)  # longer than any retry of the daemon's
        assert revision_of(member.client_url, key) == kept, \
            "a resume refused while etcd was down was carried out later"
        assert cli(daemon.url, "resume", APP) == (0, f"resumed {APP}\n", "")
        assert revision_of(member.client_url, key) is None
    finally:
        daemon.stop()
    assert "Traceback" not in daemon.log()
