"""Fleet rollout: from the webhook's 202 until every host of a 3-host fleet runs the new build,
healthy.

The real stack: three private dockerds (the hosts), a local registry, a fourth dockerd that
builds and pushes each new version (CI), one etcd member, and on each host the app under
:class:`~tests.stack.docker_stack.Supervisor` (``Restart=always``: ``docker rm -f`` + ``docker
run`` of the tag after each exit) and a deployer daemon (``twistd deployer``) in fleet mode,
``--max_unavailable 1``. The image has a ``HEALTHCHECK`` every second (healthy at the first
passing check, about 1 s after the start).

Two modes, alternating, on the same fleet:

* ``deployer``: ``POST /api/deploy`` to the first host's daemon; the clock starts at its 202.
  The daemons pull at once, then take the app's rollout slot one host at a time: stop, wait
  until the supervisor's new container is healthy (from the engine's events), free the slot.
* ``docker CLI``: the least the same rollout needs, by hand: ``docker pull`` on every host in
  parallel (three CLI processes), then per host in turn: ``docker stop``, the supervisor's
  restart, and the time until the new container is healthy, before the next host. The clock
  starts at the first command.

Both end at the same moment: the engine's ``health_status: healthy`` event of a container NAME
running the new image id, on the last host (each engine's ``/events`` stream is read in a
thread; one inspect of the container checks its image).
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import (
    TOKEN,
    KeepAlive,
    Section,
    Summary,
    Table,
    auth_headers,
    main_for,
    ms,
    ratio,
    wait_for,
    within_ratio,
    workdir,
)
from bench.engine_events import ContainerEvents
from tests.stack.daemon import Daemon
from tests.stack.docker_stack import (
    Dockerd,
    ImageBuilder,
    Registry,
    Supervisor,
)
from tests.stack.etcd_stack import EtcdCluster, etcdctl
from tests.stack.health_images import HEALTHY_TEST, healthcheck

KEY = "rollout"
TITLE = "6. Fleet rollout (webhook → every host of 3 healthy on the new build)"
MODES = ("deployer", "docker CLI")
HOSTS = 3
NAME = "bench-app"
PREFIX = "/bench"
TARGET_RATIO = 1.10
HEALTHY = "health_status: healthy"
#: How long a rollout may take to reach a container event, in seconds.
WAIT = 90.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--iterations", type=int, default=8,
                        help="rollouts per mode (default 8)")
    parser.add_argument("--restart-delay", type=float, default=0.1,
                        help="the supervisor's delay before a restart, s (default 0.1,"
                             " systemd's RestartSec)")


def run(options: argparse.Namespace) -> Section:
    with workdir("ro-") as base:
        return _run(base, options.iterations, options.restart_delay)


def parallel(*calls: Callable[[], Any]) -> list[Any]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return [f.result() for f in [pool.submit(call) for call in calls]]


def _run(base: Path, iterations: int, restart_delay: float) -> Section:
    registry = Registry(base=base / "registry")
    etcd = EtcdCluster(base / "etcd", 1)
    engines: list[Dockerd] = []
    supervisors: list[Supervisor] = []
    daemons: list[Daemon] = []
    events: list[ContainerEvents] = []
    try:
        registry.start()
        etcd.start()
        for _ in range(HOSTS + 1):  # from this thread: an engine dies with the thread that
            engines.append(Dockerd.create([registry.host]))  # started it (PR_SET_PDEATHSIG)
            engines[-1].start()
        builder, hosts = engines[0], engines[1:]
        images = ImageBuilder(registry=registry, builder=lambda: builder)
        repo = "bench/app"
        ref = images.ref(repo, "qa")
        check = [healthcheck(HEALTHY_TEST)]
        first = images.publish(ref, "v0", check)
        parallel(*(lambda h=h: h.cli("pull", ref) for h in hosts))
        events += [ContainerEvents(host, NAME, ("start", "die", "health_status")).start()
                   for host in hosts]
        for host in hosts:
            supervisors.append(Supervisor(host, NAME, ref, delay=restart_delay).start())
        for stream in events:
            stream.wait(0.0, HEALTHY, first.image_id, WAIT)
        url = etcd.members[0].client_url
        for n, host in enumerate(hosts, 1):
            daemons.append(Daemon(base, [
                "--docker", host.url, "--etcd_nodes", url, "--etcd_prefix", PREFIX,
                "--hostname", f"host-{n}", "--repull_period", "0", "--kill_timeout", "10",
                "--max_unavailable", "1", "--ready_timeout", "60s",
            ], token=TOKEN))
        parallel(*(d.start for d in daemons))
        client = KeepAlive(daemons[0].port)
        body = json.dumps({"repository": f"{registry.host}/{repo}", "tag": "qa"}).encode()

        def slots_free() -> bool:
            out = etcdctl(url, "get", f"{PREFIX}/_/rollout/", "--prefix", "--keys-only")
            return not out.strip()

        def by_deployer(new: str) -> tuple[float, list[float]]:
            status, answer = client.request("POST", "/api/deploy", body, auth_headers())
            if status != 202:
                raise RuntimeError(f"/api/deploy answered {status}: {answer[:200]!r}")
            started = time.monotonic()
            healthy = parallel(*(lambda e=e: e.wait(started, HEALTHY, new, WAIT) for e in events))
            wait_for(slots_free, 60, "every rollout slot free", 0.05)
            return started, healthy

        def by_cli(new: str) -> tuple[float, list[float]]:
            started = time.monotonic()
            parallel(*(lambda h=h: h.cli("pull", ref) for h in hosts))
            healthy = []
            for host, stream in zip(hosts, events, strict=True):
                stopping = time.monotonic()
                host.cli("stop", "-t", "10", NAME)
                healthy.append(stream.wait(stopping, HEALTHY, new, WAIT))
            return started, healthy

        actions = {"deployer": by_deployer, "docker CLI": by_cli}
        total: dict[str, list[float]] = {m: [] for m in MODES}
        first_stop: dict[str, list[float]] = {m: [] for m in MODES}
        replace: dict[str, list[float]] = {m: [] for m in MODES}
        handoff: dict[str, list[float]] = {m: [] for m in MODES}
        version = 0
        for i in range(iterations):
            for mode in MODES if i % 2 == 0 else MODES[::-1]:
                version += 1
                new = images.publish(ref, f"v{version}", check).image_id
                time.sleep(0.5)  # let the previous rollout's processes settle
                started, healthy = actions[mode](new)
                done = max(healthy)
                # each host's turn: from the old container's exit to the new one healthy, and
                # from the previous host's healthy to this one's exit (the hand-over)
                turns = sorted((e.last("die", started, h), h) for e, h in
                               zip(events, healthy, strict=True))
                total[mode].append(done - started)
                first_stop[mode].append(turns[0][0] - started)
                replace[mode] += [h - d for d, h in turns]
                handoff[mode] += [d - h for (_, h), (d, _) in itertools.pairwise(turns)]
                print(f"  {mode:<10} v{version:<3} {ms(done - started):>6} ms (first stop after"
                      f" {ms(turns[0][0] - started)} ms; turns "
                      + ", ".join(ms(h - d) for d, h in turns) + " ms)", flush=True)
        stopped = sum(d.log().count(f"stopped {NAME} (") for d in daemons)
    finally:
        closers: list[Callable[[], object]] = [
            *(e.close for e in events), *(s.stop for s in supervisors),
            *(d.stop for d in daemons), *(e.cleanup for e in engines), etcd.stop,
            registry.cleanup,
        ]
        for closer in closers:
            try:
                closer()
            except Exception as e:  # every process gets its turn
                print(f"cleanup: {e!r}")
    return _section(
        {m: Summary.of(total[m]) for m in MODES},
        {m: (Summary.of(first_stop[m]), Summary.of(replace[m]), Summary.of(handoff[m]))
         for m in MODES},
        iterations, restart_delay, stopped,
    )


def _section(stats: dict[str, Summary], parts: dict[str, tuple[Summary, Summary, Summary]],
             iterations: int, restart_delay: float, stopped: int) -> Section:
    floor = stats["docker CLI"]
    rows = []
    for mode in MODES:
        s = stats[mode]
        first, turn, hand = parts[mode]
        rows.append((mode, str(s.n), ms(s.median), ms(s.p90), ms(s.low), ms(s.high),
                     ratio(s.median, floor.median), ms(first.median), ms(turn.median),
                     ms(hand.median)))
    table = Table(
        ("mode", "n", "median ms", "p90 ms", "min ms", "max ms", "median / CLI",
         "median ms to the first stop", "median ms per host, exit → healthy",
         "median ms hand-over, healthy → next exit"),
        tuple(rows),
    )
    d = stats["deployer"]
    targets = within_ratio("deployer", "docker CLI", d, floor, TARGET_RATIO)
    notes = [
        "The deployer's own share, beyond the CLI's: the webhook written to etcd and seen by"
        " every daemon's watch, each round's image and container lists, the image inspect"
        " after the pull, per host the slot's queueing (one transaction, then reads of the"
        " queue every 0.1 s while next in line) and its release, and the readiness wait on the"
        " engine's events. The CLI instead starts a process per pull and per stop.",
        f"Every host's turn includes the supervisor's restart (`docker rm -f` and `docker run`"
        f" as CLI processes after a {restart_delay:g} s delay) and the first health check, one"
        " second after the start: identical in both modes.",
    ]
    (d_first, _, d_hand), (c_first, _, c_hand) = parts["deployer"], parts["docker CLI"]
    notes.append(
        f"Where the difference goes: the deployer reaches the first stop in {ms(d_first.median)}"
        f" ms against the CLI's {ms(c_first.median)} ms (the daemons pull over the engine's API;"
        " the CLI starts three `docker pull` processes side by side), and hands over from one"
        f" host to the next in {ms(d_hand.median)} ms against {ms(c_hand.median)} ms (the ready"
        " host deletes its slot key; the next host sees it at its next look at the queue, every"
        " 0.1 s, and stops its container).")
    if stopped < iterations * HOSTS:
        notes.append(f"Warning: the daemons' logs show {stopped} stops for"
                     f" {iterations * HOSTS} replacements.")
    return Section(
        key=KEY,
        title=TITLE,
        setup=(
            f"{iterations} rollouts per mode, modes alternating (order reversed every other"
            f" iteration), of a fleet of {HOSTS} hosts (a private dockerd each, the app under a"
            " restart loop, a `twistd deployer` in fleet mode on one etcd member,"
            " `--max_unavailable 1`). Each rollout publishes a new build of `bench/app:qa`"
            " (docker import + push from a fourth engine, a 1 MB busybox rootfs with a"
            " `HEALTHCHECK --interval=1s`) before the clock starts. Completion: the engine's"
            " `health_status: healthy` event of the last host's new container, checked to run"
            " the new image id."
        ),
        tables=[table],
        targets=targets,
        notes=notes,
    )


def main() -> None:
    main_for(KEY, TITLE, run, add_arguments)


if __name__ == "__main__":
    main()
