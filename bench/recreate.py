"""Recreate latency: one ``docker run`` container re-created on a new build, to the new container
running.

The real stack: a private dockerd (the host), a local registry, and a second dockerd that builds
and pushes each new version (CI). On the host runs ``bench-web``, started with ``docker run -d
--restart unless-stopped -e ... -l ... -v VOLUME:/v1 -p 127.0.0.1:PORT:80 --hostname ...
--network NET --network-alias www``, no health check.

Two modes, alternating, on the same container:

* ``deployer``: in this process, on a Twisted reactor in a thread, what a round of
  ``--replace recreate`` does for it: :meth:`DockerClient.pull` of the tag, one image inspect,
  the container list, then :meth:`RecreateReplacer.replace` (read the old container back,
  create the new one, stop and rename the old one, rename and start the new one, wait until it
  is ready, remove the old one);
* ``docker CLI``: the same by hand, ``docker pull`` + ``docker stop`` + ``docker rename`` +
  ``docker run -d`` with the same options + ``docker rm`` of the old one.

Both clocks start at the pull and stop at the engine's ``start`` event of a container
``bench-web`` that runs the new image id (the event stream is read in a thread; one inspect of
the container checks its image), as in ``deploy_latency.py``. What comes after the start (the
deployer's readiness wait, the removal of the old container, ``docker rm``) is not counted, in
either mode.
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.threads import blockingCallFromThread

from bench.common import (
    Section,
    Summary,
    Table,
    main_for,
    ms,
    ratio,
    within_ratio,
    workdir,
)
from bench.engine_events import ContainerEvents
from tests.stack.docker_stack import Dockerd, ImageBuilder, Registry, free_port

KEY = "recreate"
TITLE = "5. Recreate latency (docker run container → re-created on the new image, running)"
MODES = ("deployer", "docker CLI")
NAME = "bench-web"
TARGET_RATIO = 1.05


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--iterations", type=int, default=10,
                        help="re-creations per mode (default 10)")
    parser.add_argument("--min-ready", type=float, default=0.5,
                        help="the replacer's --min_ready, s (default 0.5; not in the figures)")


def run(options: argparse.Namespace) -> Section:
    with workdir("rc-") as base:
        return _run(base, options.iterations, options.min_ready)


class Reactor:
    """A Twisted reactor in a thread, with the deployer's client, event stream and replacer."""

    def __init__(self, host: Dockerd, min_ready: float) -> None:
        from twisted.internet import reactor

        from deployer.docker import DockerClient
        from deployer.events import EngineEvents
        from deployer.readiness import ReadyRules
        from deployer.recreate import RecreateReplacer

        self.reactor: Any = reactor
        self.thread = threading.Thread(target=reactor.run, kwargs={"installSignalHandlers": False},
                                       name="reactor", daemon=True)
        self.thread.start()
        self.client = DockerClient.from_url(reactor, host.url)
        self.events = EngineEvents(reactor, self.client)
        self.replacer = RecreateReplacer(reactor, self.client, self.events,
                                         ReadyRules(min_ready=min_ready, ready_timeout=60.0),
                                         kill_timeout=10)
        self.call(self._start)

    def call(self, f: Callable[[], Any]) -> Any:
        return blockingCallFromThread(self.reactor, f)

    def _start(self) -> Deferred[str]:
        self.events.startService()
        return Deferred.fromCoroutine(self.client.version())  # negotiated before the clock

    def recreate(self, ref: str, marks: dict[str, float]) -> Any:
        return self.call(lambda: Deferred.fromCoroutine(self._recreate(ref, marks)))

    async def _recreate(self, ref: str, marks: dict[str, float]) -> Any:
        from deployer.replace import Replacement

        marks["started"] = time.monotonic()
        await self.client.pull(ref)
        marks["pulled"] = time.monotonic()
        new = await self.client.inspect_image(ref)
        container = next(c for c in await self.client.containers() if c.name == NAME)
        return await self.replacer.replace(
            Replacement(container, ref, container.image_id, new.id))

    def stop(self) -> None:
        try:
            self.call(lambda: Deferred.fromCoroutine(self._stop()))
        finally:
            self.reactor.callFromThread(self.reactor.stop)
            self.thread.join(10)

    async def _stop(self) -> None:
        await self.events.stopService()
        await self.client.close()


def _run(base: Path, iterations: int, min_ready: float) -> Section:
    registry = Registry(base=base / "registry")
    host = builder = None
    events = twisted = None
    try:
        registry.start()
        host = Dockerd.create([registry.host]).start()
        builder = Dockerd.create([registry.host]).start()
        images = ImageBuilder(registry=registry, builder=lambda: builder)
        ref = images.ref("bench/web", "qa")
        images.publish(ref, "v0")
        host.cli("pull", ref)
        network, volume = "bench-net", "bench-vol"
        host.cli("network", "create", network)
        host.cli("volume", "create", volume)
        options = [
            "--restart", "unless-stopped", "-e", "GREETING=hello", "-l", "team=bench",
            "-v", f"{volume}:/v1", "-p", f"127.0.0.1:{free_port()}:80", "--hostname", "web",
            "--network", network, "--network-alias", "www",
        ]
        host.cli("run", "-d", "--name", NAME, *options, ref)
        events = ContainerEvents(host, NAME).start()
        twisted = Reactor(host, min_ready)
        reactor = twisted

        def by_deployer(marks: dict[str, float]) -> None:
            result = reactor.recreate(ref, marks)
            if not result.ready:
                raise RuntimeError(f"the deployer did not re-create {NAME}: {result.describe()}")

        def by_cli(marks: dict[str, float]) -> None:
            marks["started"] = time.monotonic()
            host.cli("pull", ref)
            marks["pulled"] = time.monotonic()
            host.cli("stop", "-t", "10", NAME)
            host.cli("rename", NAME, f"{NAME}-old")
            host.cli("run", "-d", "--name", NAME, *options, ref)
            host.cli("rm", f"{NAME}-old")

        actions = {"deployer": by_deployer, "docker CLI": by_cli}
        total: dict[str, list[float]] = {m: [] for m in MODES}
        pull: dict[str, list[float]] = {m: [] for m in MODES}
        version = 0
        for i in range(iterations):
            for mode in MODES if i % 2 == 0 else MODES[::-1]:
                version += 1
                new = images.publish(ref, f"v{version}")
                time.sleep(0.2)  # let the previous round's processes settle
                marks: dict[str, float] = {}
                actions[mode](marks)
                done, _ = events.wait_started(marks["started"], new.image_id)
                names = host.cli("ps", "-a", "--format", "{{.Names}}").split()
                if names != [NAME]:
                    raise RuntimeError(f"after {mode}: containers {names}, not just {NAME}")
                total[mode].append(done - marks["started"])
                pull[mode].append(marks["pulled"] - marks["started"])
                print(f"  {mode:<10} v{version:<3} {ms(done - marks['started']):>6} ms"
                      f" (pull {ms(marks['pulled'] - marks['started'])} ms)", flush=True)
        state = host.inspect(NAME)
        kept = _kept(state, volume, network)
    finally:
        for closer in (twisted.stop if twisted else None, events.close if events else None,
                       host.cleanup if host else None, builder.cleanup if builder else None,
                       registry.cleanup):
            if closer is not None:
                try:
                    closer()
                except Exception as e:  # every process gets its turn
                    print(f"cleanup: {e!r}")
    return _section({m: Summary.of(total[m]) for m in MODES},
                    {m: Summary.of(pull[m]) for m in MODES}, iterations, min_ready, kept)


def _kept(state: dict[str, Any] | None, volume: str, network: str) -> str:
    """Checks that the last re-created container still has its options."""
    if state is None:
        return "no container left"
    config, hc = state["Config"], state["HostConfig"]
    missing = [what for what, ok in (
        ("env", "GREETING=hello" in (config.get("Env") or ())),
        ("label", (config.get("Labels") or {}).get("team") == "bench"),
        ("volume", f"{volume}:/v1" in (hc.get("Binds") or ())),
        ("port", bool(hc.get("PortBindings"))),
        ("hostname", config.get("Hostname") == "web"),
        ("restart policy", (hc.get("RestartPolicy") or {}).get("Name") == "unless-stopped"),
        ("alias", "www" in (state["NetworkSettings"]["Networks"].get(network) or {}).get(
            "Aliases", ())),
    ) if not ok]
    return "all kept" if not missing else "missing: " + ", ".join(missing)


def _section(stats: dict[str, Summary], pulls: dict[str, Summary], iterations: int,
             min_ready: float, kept: str) -> Section:
    floor = stats["docker CLI"]
    rows = []
    for mode in MODES:
        s, p = stats[mode], pulls[mode]
        rows.append((mode, str(s.n), ms(s.median), ms(s.p90), ms(s.low), ms(s.high),
                     ratio(s.median, floor.median), ms(p.median), ms(s.median - p.median)))
    table = Table(
        ("mode", "n", "median ms", "p90 ms", "min ms", "max ms", "median / CLI",
         "median ms of the pull", "median ms from the pull to the start"),
        tuple(rows),
    )
    d = stats["deployer"]
    targets = within_ratio("deployer", "docker CLI", d, floor, TARGET_RATIO)
    notes = [
        "The deployer's own work before the start, beyond the CLI's: one image inspect, the"
        " container list, the old container's and image's inspects, the list of every"
        " container (for containers sharing its network namespace), a network look-up and an"
        " inspect of the created container; the CLI instead starts four processes.",
        f"After the start (not counted): the deployer waits until the new container has run"
        f" {min_ready:g} s (`--min_ready`), then removes the old one; the CLI runs `docker rm`.",
        f"The last container re-created still has the options it was run with: {kept}.",
    ]
    return Section(
        key=KEY,
        title=TITLE,
        setup=(
            f"{iterations} re-creations per mode, modes alternating (order reversed every other"
            " iteration), on one container run with a restart policy, an env var, a label, a"
            " named volume, a published port, a hostname and a user-defined network with an"
            " alias. Each iteration publishes a new build of `bench/web:qa` (docker import +"
            " push from a second engine, a 1 MB busybox rootfs) before the clock starts; the"
            " clock runs from the pull to the engine's `start` event of the new container."
        ),
        tables=[table],
        targets=targets,
        notes=notes,
    )


def main() -> None:
    main_for(KEY, TITLE, run, add_arguments)


if __name__ == "__main__":
    main()
