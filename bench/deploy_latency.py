"""Deploy latency: from the webhook's 202 to the container running on the new image.

The real stack: a private dockerd (the host), a local registry, a second dockerd that builds and
pushes each new version (CI), and :class:`~tests.stack.docker_stack.Supervisor` restarting the
container the way ``Restart=always`` does. The daemon runs standalone as its own process and
gets the Docker Hub payload.

Next to it, in the same run and alternating with it, the floor: the same work done by hand,

* ``docker CLI``: ``docker pull REF`` then ``docker stop NAME`` (two CLI processes), and
* ``engine API``: ``POST /images/create`` then ``POST /containers/NAME/stop`` over the socket
  (no process start-up: the least any client can do),

each followed by the supervisor's restart. Every mode waits the same way: the engine's event
stream (``GET /events``, read in a thread) says when a container NAME started, and one inspect
of that container checks that it runs the new image. A mode's clock starts at the 202 (daemon)
or at the first command (floors).
"""

from __future__ import annotations

import argparse
import json
import time
import urllib.parse
from pathlib import Path

from bench.common import (
    TOKEN,
    KeepAlive,
    Section,
    Summary,
    Table,
    dockerhub_payload,
    main_for,
    ms,
    ratio,
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
    _UnixHTTPConnection,
)

KEY = "deploy_latency"
TITLE = "1. Deploy latency (webhook → container running the new image)"
MODES = ("daemon", "docker CLI", "engine API")
TARGET_RATIO = 1.05


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--iterations", type=int, default=10,
                        help="deploys per mode (default 10)")
    parser.add_argument("--restart-delay", type=float, default=0.1,
                        help="the supervisor's delay before a restart, s (default 0.1,"
                             " systemd's RestartSec)")


def run(options: argparse.Namespace) -> Section:
    with workdir("bl-") as base:
        return _run(base, options.iterations, options.restart_delay)


def _run(base: Path, iterations: int, restart_delay: float) -> Section:
    registry = Registry(base=base / "registry")
    host = builder = None
    supervisor = daemon = events = None
    try:
        registry.start()
        host = Dockerd.create([registry.host]).start()
        builder = Dockerd.create([registry.host]).start()
        images = ImageBuilder(registry=registry, builder=lambda: builder)
        repo, name = "bench/app", "bench-app"
        ref = images.ref(repo, "qa")
        first = images.publish(ref, "v0")
        host.cli("pull", ref)
        supervisor = Supervisor(host, name, ref, delay=restart_delay).start()
        supervisor.wait_running_image_blocking(first.image_id)
        events = ContainerEvents(host, name).start()
        # The image has no HEALTHCHECK: with --min_ready 0 the daemon's replacement is ready
        # once the new container runs, so its readiness wait is over before the next mode
        # replaces the container by hand (a wait still under way would count that as the new
        # build exiting, and roll it back).
        daemon = Daemon(base, ["--docker", host.url, "--repull_period", "0",
                               "--kill_timeout", "10", "--min_ready", "0s"], token=TOKEN).start()
        client = KeepAlive(daemon.port)
        engine = _UnixHTTPConnection(host.socket, timeout=60)
        body = json.dumps(dockerhub_payload(f"{registry.host}/{repo}", "qa")).encode()
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

        def by_daemon() -> float:
            status, answer = client.request("POST", "/api/dockerhub/webhook", body, headers)
            if status != 202:
                raise RuntimeError(f"webhook answered {status}: {answer[:200]!r}")
            return time.monotonic()

        def by_cli() -> float:
            started = time.monotonic()
            host.cli("pull", ref)
            host.cli("stop", "-t", "10", name)
            return started

        def by_api() -> float:
            started = time.monotonic()
            query = urllib.parse.urlencode({"fromImage": f"{registry.host}/{repo}", "tag": "qa"})
            for method, path in (("POST", f"/images/create?{query}"),
                                 ("POST", f"/containers/{name}/stop?t=10")):
                engine.request(method, path)
                response = engine.getresponse()
                data = response.read()
                if response.status >= 300 or b'"error"' in data:
                    raise RuntimeError(f"{method} {path}: {response.status} {data[-300:]!r}")
            return started

        actions = {"daemon": by_daemon, "docker CLI": by_cli, "engine API": by_api}
        samples: dict[str, list[float]] = {m: [] for m in MODES}
        to_stop: dict[str, list[float]] = {m: [] for m in MODES}
        restart: dict[str, list[float]] = {m: [] for m in MODES}
        version = 0
        for i in range(iterations):
            order = MODES if i % 2 == 0 else MODES[::-1]
            for mode in order:
                version += 1
                new = images.publish(ref, f"v{version}")
                time.sleep(0.2)  # let the previous restart's processes settle
                started = actions[mode]()
                done, died = events.wait_started(started, new.image_id)
                samples[mode].append(done - started)
                to_stop[mode].append(died - started)
                restart[mode].append(done - died)
                print(f"  {mode:<11} v{version:<3} {ms(done - started):>6} ms"
                      f" (old container died after {ms(died - started)} ms)", flush=True)
        stats = {m: Summary.of(samples[m]) for m in MODES}
        parts = {m: (Summary.of(to_stop[m]), Summary.of(restart[m])) for m in MODES}
        rounds = daemon.log().count("stopped ")
    finally:
        for closer in (events.close if events else None, supervisor.stop if supervisor else None,
                       daemon.stop if daemon else None, host.cleanup if host else None,
                       builder.cleanup if builder else None, registry.cleanup):
            if closer is not None:
                try:
                    closer()
                except Exception as e:  # every process gets its turn
                    print(f"cleanup: {e!r}")
    return _section(stats, parts, iterations, restart_delay, rounds)


def _section(stats: dict[str, Summary], parts: dict[str, tuple[Summary, Summary]], iterations: int,
             restart_delay: float, stopped_lines: int) -> Section:
    floor = stats["docker CLI"]
    api = stats["engine API"]
    rows = []
    for mode in MODES:
        s = stats[mode]
        k, r = parts[mode]
        rows.append((mode, str(s.n), ms(s.median), ms(s.p90), ms(s.low), ms(s.high),
                     ratio(s.median, floor.median), ratio(s.median, api.median),
                     ms(k.median), ms(r.median)))
    table = Table(
        ("mode", "n", "median ms", "p90 ms", "min ms", "max ms", "median / CLI floor",
         "median / API floor", "median ms to the old container's exit",
         "median ms from exit to new start"),
        tuple(rows),
    )
    d = stats["daemon"]
    targets = within_ratio("daemon", "docker CLI floor", d, floor, TARGET_RATIO)
    notes = [
        f"Stricter floor, for information: the daemon's median is {ratio(d.median, api.median)}"
        f" the engine-API floor's ({ms(d.median)} ms vs {ms(api.median)} ms); the difference"
        " is the daemon's own work per round (two image lists, one container list, the"
        " webhook's parsing and logging) plus its reaction time.",
        "Every deploy includes the supervisor's restart: `docker rm -f` and `docker run` as CLI"
        f" processes after a {restart_delay:g} s delay, identical in every mode.",
    ]
    if stopped_lines < iterations:
        notes.append(f"Warning: the daemon's log shows {stopped_lines} stops for {iterations}"
                     " webhooks.")
    return Section(
        key=KEY,
        title=TITLE,
        setup=(
            f"{iterations} deploys per mode, modes alternating (order reversed every other"
            " iteration). Each deploy publishes a new build of `bench/app:qa` (docker import +"
            " push from a second engine) before the clock starts; the image is a 1 MB busybox"
            " rootfs in a local registry. The daemon: `twistd deployer`, standalone, token auth,"
            " Docker Hub payload. Completion: the engine's `start` event for the container,"
            " checked to run the new image id."
        ),
        tables=[table],
        targets=targets,
        notes=notes,
    )


def main() -> None:
    main_for(KEY, TITLE, run, add_arguments)


if __name__ == "__main__":
    main()
