"""Engine calls per round at 3, 30 and 300 running containers, on a real dockerd.

The round is :class:`deployer.reconcile.Reconciler` in this process, over the real client
(:class:`deployer.docker.DockerClient`) wrapped in :class:`deployer.testing.agents.CountingAgent`.
Of the N running containers, k run the image being deployed (``bench/app:qa``), the others
another one (``bench/other:qa``): a host that runs many services and gets a push for one.

Three rounds per N:

* ``push``: a new build of ``bench/app:qa`` was pushed; the round pulls it and stops the k
  containers it made stale;
* ``same again``: the same webhook once more (a registry's retry): one pull, nothing to stop;
* ``repull *``: the periodic safety re-pull of every local tag (two tags), nothing to stop.

Next to each, the Go original's rule: list images + list containers + one inspect per running
container, plus the same pulls and stops. That read phase is also replayed with the same client
(``GET /images/json``, ``GET /containers/json``, then one ``GET /containers/ID/json`` per
running container, one after the other as the Go original does) to time it on the same engine.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from twisted.internet import task, threads
from twisted.internet.defer import Deferred

from bench.common import Section, Table, Target, main_for, ms, workdir
from deployer.docker import DockerClient
from deployer.engine_address import engine_agent, engine_pool
from deployer.model import Update
from deployer.reconcile import Reconciler, RoundReport
from deployer.testing.agents import CountingAgent
from tests.stack.docker_stack import Dockerd, ImageBuilder, Registry, _UnixHTTPConnection

KEY = "engine_calls"
TITLE = "2. Engine calls per round (real dockerd)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="3,30,300",
                        help="numbers of running containers, comma-separated (default 3,30,300)")
    parser.add_argument("--parallel", type=int, default=8,
                        help="containers created at once while setting up (default 8)")


def stale_count(n: int) -> int:
    """How many of ``n`` running containers run the image being deployed."""
    return min(10, max(1, n // 10))


class Host:
    """The engine under test, driven through its API from threads (setup only)."""

    def __init__(self, dockerd: Dockerd, parallel: int) -> None:
        self.dockerd = dockerd
        self.parallel = parallel

    def _api(self, method: str, path: str, body: Any = None) -> Any:
        conn = _UnixHTTPConnection(self.dockerd.socket, 60)
        try:
            data = json.dumps(body).encode() if body is not None else None
            headers = {"Content-Type": "application/json"} if data is not None else {}
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            raw = response.read()
            if response.status >= 300:
                raise RuntimeError(f"{method} {path}: {response.status} {raw[:300]!r}")
            return json.loads(raw) if raw else None
        finally:
            conn.close()

    def _run_one(self, ref: str, role: str) -> str:
        created = self._api("POST", "/containers/create",
                            {"Image": ref, "Labels": {"bench.role": role}})
        self._api("POST", f"/containers/{created['Id']}/start")
        return str(created["Id"])

    def running(self, role: str) -> list[str]:
        filters = json.dumps({"label": [f"bench.role={role}"], "status": ["running"]})
        from urllib.parse import quote

        return [c["Id"] for c in self._api("GET", f"/containers/json?filters={quote(filters)}")]

    def prepare(self, app_ref: str, other_ref: str, app: int, other: int) -> None:
        """Remove the stopped containers, then run containers until ``app`` run ``app_ref`` and
        ``other`` run ``other_ref``."""
        self._api("POST", "/containers/prune")
        jobs = [(app_ref, "app")] * (app - len(self.running("app")))
        jobs += [(other_ref, "other")] * (other - len(self.running("other")))
        with ThreadPoolExecutor(self.parallel) as pool:
            list(pool.map(lambda job: self._run_one(*job), jobs))

    def remove(self, role: str) -> None:
        with ThreadPoolExecutor(self.parallel) as pool:
            list(pool.map(lambda cid: self._api("DELETE", f"/containers/{cid}?force=1"),
                          self.running(role)))

    def remove_all(self) -> None:
        ids = [c["Id"] for c in self._api("GET", "/containers/json?all=1")]
        with ThreadPoolExecutor(self.parallel) as pool:
            list(pool.map(lambda cid: self._api("DELETE", f"/containers/{cid}?force=1"), ids))


def run(options: argparse.Namespace) -> Section:
    sizes = [int(s) for s in options.sizes.split(",") if s.strip()]
    with workdir("be-") as base:
        registry = Registry(base=base / "registry")
        engines: list[Dockerd] = []
        try:
            registry.start()
            host = Dockerd.create([registry.host]).start()
            engines.append(host)
            builder = Dockerd.create([registry.host]).start()
            engines.append(builder)
            images = ImageBuilder(registry=registry, builder=lambda: builder)
            app_ref, other_ref = images.ref("bench/app", "qa"), images.ref("bench/other", "qa")
            images.publish(app_ref, "v0")
            images.publish(other_ref, "v0")
            host.cli("pull", app_ref)
            host.cli("pull", other_ref)
            results: list[dict[str, Any]] = []
            task.react(lambda reactor: Deferred.fromCoroutine(
                _measure(reactor, Host(host, options.parallel), images, app_ref, other_ref,
                         sizes, results)))
        except SystemExit as e:
            if e.code not in (0, None):
                raise
        finally:
            for engine in reversed(engines):
                try:
                    engine.cleanup()
                except Exception as e:
                    print(f"cleanup: {e!r}")
            registry.cleanup()
    return _section(results)


async def _measure(reactor: Any, host: Host, images: ImageBuilder, app_ref: str,
                   other_ref: str, sizes: list[int], results: list[dict[str, Any]]) -> None:
    pool = engine_pool(reactor)
    counting = CountingAgent(engine_agent(reactor, host.dockerd.url, pool))
    client = DockerClient(reactor, counting, "http://docker", None, pool)
    reports: list[RoundReport] = []
    reconciler = Reconciler(reactor, client, kill_timeout=10, max_pulls=4,
                            observers=[reports.append])
    await client.version()
    app = app_ref.rpartition(":")[0]
    registry, _, repository = app.partition("/")
    other_repository = other_ref.rpartition(":")[0].partition("/")[2]
    version = 0
    try:
        for n in sizes:
            k = stale_count(n)
            started = time.monotonic()
            await threads.deferToThread(host.prepare, app_ref, other_ref, k, n - k)
            print(f"N={n}: {n} containers running ({time.monotonic() - started:.1f} s to set up)",
                  flush=True)
            version += 1
            await threads.deferToThread(images.publish, app_ref, f"v{version}")
            app_update = Update(repository, "bench", reactor.seconds(), registry, "qa")
            other_update = Update(other_repository, "bench", reactor.seconds(), registry, "qa")
            for scenario, update, fresh in (
                ("push", app_update, False),
                ("same again", app_update, False),
                ("repull *", Update("*", "bench", reactor.seconds()), False),
                ("tag moved: first round", other_update, True),
                ("tag moved: next round", other_update, False),
            ):
                if scenario == "tag moved: first round":
                    # k containers on the tag's previous image (the engine lists them by id),
                    # and a daemon that has not seen them yet.
                    await threads.deferToThread(host.prepare, app_ref, other_ref, k, n - k)
                    version += 1
                    await threads.deferToThread(images.publish, app_ref, f"v{version}")
                    await threads.deferToThread(host.dockerd.cli, "pull", app_ref)
                if fresh:
                    reconciler = Reconciler(reactor, client, kill_timeout=10, max_pulls=4,
                                            observers=[reports.append])
                running = len(await client.containers())
                counting.reset()
                reports.clear()
                began = time.monotonic()
                reconciler.request(update)
                await reconciler.wait_idle()
                seconds = time.monotonic() - began
                report = reports[-1]
                calls = Counter(_kind(m, p) for m, p in counting.calls)
                results.append({
                    "n": n, "scenario": scenario, "running": running, "seconds": seconds,
                    "calls": dict(calls), "total": len(counting.calls),
                    "pulls": len(report.pulled) + len(report.failed),
                    "stopped": len(report.stopped), "errors": list(report.errors),
                })
                print(f"  {scenario:<22} {len(counting.calls):>4} calls {dict(calls)}"
                      f" in {ms(seconds)} ms", flush=True)
            # The Go original's read phase, replayed with the same client.
            running_now = await client.containers()
            counting.reset()
            began = time.monotonic()
            await client.images()
            listed = await client.containers()
            for container in listed:
                await client.inspect_container(container.id)
            results.append({"n": n, "scenario": "go-read", "running": len(running_now),
                            "seconds": time.monotonic() - began, "total": len(counting.calls),
                            "calls": dict(Counter(_kind(m, p) for m, p in counting.calls))})
            print(f"  Go read phase: {len(counting.calls)} calls in"
                  f" {ms(time.monotonic() - began)} ms", flush=True)
            await threads.deferToThread(host.remove, "app")
    finally:
        await client.close()
        await threads.deferToThread(host.remove_all)


def _kind(method: str, path: str) -> str:
    parts = path.split("/")
    if len(parts) == 3 and parts[0] == "containers" and parts[1] not in ("json", "create"):
        parts[1] = "{id}"
    if len(parts) > 2 and parts[0] == "images" and parts[-1] == "json":
        parts = ["images", "{name}", "json"]
    return f"{method} /{'/'.join(parts)}"


def _section(results: list[dict[str, Any]]) -> Section:
    rows = []
    worst: list[tuple[float, dict[str, Any]]] = []
    go_read = {r["n"]: r for r in results if r["scenario"] == "go-read"}
    for r in results:
        if r["scenario"] == "go-read":
            continue
        go_calls = 2 + r["running"] + r["pulls"] + r["stopped"]
        calls = r["calls"]
        rows.append((
            str(r["n"]), r["scenario"], str(r["running"]),
            str(calls.get("GET /images/json", 0)), str(calls.get("GET /containers/json", 0)),
            str(calls.get("GET /containers/{id}/json", 0)),
            str(calls.get("POST /images/create", 0)),
            str(calls.get("GET /images/{name}/json", 0)),
            str(calls.get("POST /containers/{id}/stop", 0)),
            str(r["total"]), str(go_calls), f"{r['total'] / go_calls:.2f}", ms(r["seconds"]),
        ))
        worst.append((r["total"] / go_calls, r))
    table = Table(
        ("N", "round", "running", "list images", "list containers", "inspect", "pull",
         "inspect image", "stop",
         "deployer calls", "Go rule calls", "ratio", "round ms"),
        tuple(rows),
    )
    read_rows = tuple(
        (str(n), str(r["running"]), str(r["total"]), ms(r["seconds"]),
         ms(min(x["seconds"] for x in results
                if x["n"] == n and x["scenario"] == "same again")))
        for n, r in sorted(go_read.items())
    )
    read_table = Table(
        ("N", "running", "Go read-phase calls", "Go read phase ms",
         "deployer's whole 'same again' round ms"),
        read_rows,
        caption="The Go original's read phase replayed on the same engine and client:",
    )
    targets = []
    if worst:
        top, r = max(worst, key=lambda x: x[0])
        targets.append(Target(
            "every round: deployer's calls ≤ the Go rule's",
            f"highest ratio {top:.2f} (N={r['n']}, {r['scenario']})", "≤ 1.00", top <= 1.0))
        by_scenario: dict[str, set[int]] = {}
        for r in results:
            if r["scenario"] not in ("go-read", "tag moved: first round"):
                reads = r["total"] - r["pulls"] - r["stopped"]
                by_scenario.setdefault(r["scenario"], set()).add(reads)
        flat = all(len(v) == 1 for v in by_scenario.values())
        moved = [r for r in results if r["scenario"] == "tag moved: next round"]
        inspects = [r["calls"].get("GET /containers/{id}/json", 0) for r in moved]
        targets.append(Target(
            "a container whose tag moved on is inspected once, not every round",
            "inspects in the next round: " + ", ".join(
                f"{i} at N={r['n']}" for i, r in zip(inspects, moved, strict=True)),
            "0", all(i == 0 for i in inspects)))
        targets.append(Target(
            "calls other than pulls and stops do not grow with N (all rounds but a daemon's"
            " first after a tag moved)",
            ", ".join(f"{k}: {sorted(v)}" for k, v in by_scenario.items()),
            "one value per round kind", flat))
    errors = [e for r in results for e in r.get("errors", [])]
    notes = [
        "Calls are counted at the HTTP agent, so every request the round makes is seen; the"
        " API version was negotiated before counting. Go rule = 2 + running + pulls + stops"
        " (its count of image lists after a pull is not included, so it is a lower bound).",
        "deployer's count does not grow with N: a container's repo:tag comes from the"
        " container list, and the one inspect a container needs when its tag has moved on is"
        " remembered for the container's lifetime. Each pulled tag is inspected once (the id"
        " it now points at), so that its containers are replaced without waiting for the"
        " round's other pulls. The stops are sequential, as in the Go original.",
        "'tag moved' rounds: k containers run the previous image of `bench/app:qa` (the tag was"
        " pulled by hand, so the engine lists them by image id) and a webhook for"
        " `bench/other:qa` arrives; 'first round' is a daemon that has not seen these"
        " containers (k inspects), 'next round' the same daemon again (none).",
    ]
    if errors:
        notes.append("Errors reported by rounds: " + "; ".join(errors))
    return Section(
        key=KEY, title=TITLE,
        setup=(
            "A private dockerd and local registry; N busybox containers running (k = "
            + ", ".join(f"{stale_count(n)} at N={n}" for n in sorted(go_read))
            + " run `bench/app:qa`, the rest `bench/other:qa`); an in-process `Reconciler`"
            " over the real client, counted by `CountingAgent`."
        ),
        tables=[table, read_table], targets=targets, notes=notes,
    )


def main() -> None:
    main_for(KEY, TITLE, run, add_arguments)


if __name__ == "__main__":
    main()

