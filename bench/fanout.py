"""Fan-out: from the webhook's 202 to every watching deployer's callback, at N = 1, 3, 10.

One etcd member; one daemon (``twistd deployer`` in etcd mode, its rounds run against the
in-memory engine) receives the webhooks; N watcher processes run only ``Etcd.watch`` with a
callback that prints the time it got each update (``bench/fanout_watcher.py``). The webhooks
go one after the other, each for a new repository; the next one leaves once every watcher has
reported the previous one. All times are ``CLOCK_MONOTONIC``, shared by every process.

The baseline, measured in the same run before each N: sequential ``POST /v3/kv/put`` to the same
member over one keep-alive connection (keys outside the watched prefix).
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

from bench.common import (
    ROOT,
    TOKEN,
    KeepAlive,
    MemoryEngine,
    Section,
    Summary,
    Table,
    Target,
    auth_headers,
    main_for,
    ms,
    ratio,
    stop_process,
    webhook_route,
    workdir,
)
from tests.stack.daemon import Daemon
from tests.stack.etcd_stack import EtcdCluster

KEY = "fanout"
TITLE = "3. Fan-out through etcd (webhook 202 → every watcher's callback)"
REPO = re.compile(r"(fan/n\d+-r\d+)")


class Watcher:
    """One watcher process and the times it reported, by repository."""

    def __init__(self, url: str, prefix: str, log: Path) -> None:
        self.seen: dict[str, float] = {}
        self.live = threading.Event()
        self.cond = threading.Condition()
        self._log = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.fanout_watcher", url, prefix], cwd=ROOT,
            stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL,
        )
        self._thread = threading.Thread(target=self._read, args=(self.process.stdout,),
                                        daemon=True)
        self._thread.start()

    def _read(self, stream: IO[bytes]) -> None:
        for raw in stream:
            line = raw.decode().strip()
            if line == "live":
                self.live.set()
                continue
            at, _, pattern = line.partition(" ")
            found = REPO.search(pattern)
            if found is None:
                continue
            with self.cond:
                self.seen.setdefault(found.group(1), float(at))
                self.cond.notify_all()

    def wait(self, repo: str, timeout: float = 30.0) -> float:
        with self.cond:
            if not self.cond.wait_for(lambda: repo in self.seen, timeout):
                raise TimeoutError(f"watcher {self.process.pid} never got {repo}")
            return self.seen[repo]

    def stop(self) -> None:
        stop_process(self.process)
        self._thread.join(5)
        self._log.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--watchers", default="1,3,10", help="values of N (default 1,3,10)")
    parser.add_argument("--updates", type=int, default=100, help="webhooks per N (default 100)")
    parser.add_argument("--puts", type=int, default=200,
                        help="baseline puts per N (default 200)")


def put_latencies(port: int, count: int, tag: str) -> list[float]:
    client = KeepAlive(port)
    out = []
    try:
        for i in range(count):
            body = json.dumps({
                "key": base64.b64encode(f"/bench-put/{tag}/{i}".encode()).decode(),
                "value": base64.b64encode(b"x" * 200).decode(),
            }).encode()
            began = time.monotonic()
            status, answer = client.request("POST", "/v3/kv/put", body,
                                            {"Content-Type": "application/json"})
            out.append(time.monotonic() - began)
            if status != 200:
                raise RuntimeError(f"etcd put answered {status}: {answer[:200]!r}")
    finally:
        client.close()
    return out


def run(options: argparse.Namespace) -> Section:
    counts = [int(n) for n in options.watchers.split(",") if n.strip()]
    with workdir("bf-") as base:
        cluster = EtcdCluster(base / "etcd", 1)
        engine = MemoryEngine(base / "engine.sock", base / "engine.log")
        daemon: Daemon | None = None
        watchers: list[Watcher] = []
        results = []
        try:
            cluster.start()
            member = cluster.members[0]
            engine.start()
            prefix = "/bench-fanout"
            daemon = Daemon(base, ["--docker", engine.url, "--etcd_nodes", member.client_url,
                                   "--etcd_prefix", prefix, "--repull_period", "0"],
                            token=TOKEN).start()
            client = KeepAlive(daemon.port)
            path, make_body = webhook_route(client)
            headers = auth_headers()
            for n in counts:
                puts = put_latencies(member.client_port, options.puts, f"n{n}")
                watchers = [Watcher(member.client_url, prefix, base / f"watcher-{n}-{i}.log")
                            for i in range(n)]
                for w in watchers:
                    if not w.live.wait(30):
                        raise TimeoutError(f"watcher {w.process.pid} never went live")
                last: list[float] = []
                every: list[float] = []
                whole: list[float] = []
                answer_times: list[float] = []
                for i in range(-5, options.updates):  # five warm-up webhooks
                    repo = f"fan/n{n}-r{i + 5}"
                    body = make_body(repo, "t")
                    sent = time.monotonic()
                    status, answer = client.request("POST", path, body, headers)
                    accepted = time.monotonic()
                    if status != 202:
                        raise RuntimeError(f"webhook answered {status}: {answer[:200]!r}")
                    got = [w.wait(repo) for w in watchers]
                    if i >= 0:
                        last.append(max(got) - accepted)
                        every.extend(t - accepted for t in got)
                        whole.append(max(got) - sent)
                        answer_times.append(accepted - sent)
                results.append((n, Summary.of(puts), Summary.of(last), Summary.of(every),
                                Summary.of(whole), Summary.of(answer_times)))
                print(f"N={n}: put median {ms(results[-1][1].median)} ms, fan-out to all"
                      f" median {ms(results[-1][2].median)} ms p99 {ms(results[-1][2].p99)} ms",
                      flush=True)
                for w in watchers:
                    w.stop()
                watchers = []
            client.close()
        finally:
            for w in watchers:
                w.stop()
            if daemon is not None:
                daemon.stop()
            engine.stop()
            cluster.stop()
    return _section(results, options.updates, path)


def _section(results: list[tuple[int, Summary, Summary, Summary, Summary, Summary]],
             updates: int, path: str) -> Section:
    rows = []
    for n, put, last, every, whole, answer in results:
        rows.append((str(n), ms(put.median), ms(put.p99), ms(last.median), ms(last.p99),
                     ms(every.median), ms(every.p99), ms(whole.median), ms(whole.p99),
                     ms(answer.median), ms(answer.p99), ratio(last.p99, put.p99)))
    table = Table(
        ("N", "etcd put median ms", "etcd put p99 ms", "202 → all N median ms",
         "202 → all N p99 ms", "202 → each watcher median ms", "202 → each watcher p99 ms",
         "POST sent → all N median ms", "POST sent → all N p99 ms",
         "POST → 202 median ms", "POST → 202 p99 ms", "202 → all N p99 / put p99"),
        tuple(rows),
    )
    targets = []
    for n, put, last, _, whole, _ in results:
        if n == 10:
            targets.append(Target(
                "N=10: p99 to every watcher ≤ 2 x etcd put p99",
                f"{ms(last.p99)} ms vs put p99 {ms(put.p99)} ms ({ratio(last.p99, put.p99)})",
                f"≤ {ms(2 * put.p99)} ms", last.p99 <= 2 * put.p99))
            targets.append(Target(
                "N=10 (stricter, whole path): p99 from POST sent to every watcher ≤ 2 x put p99",
                f"{ms(whole.p99)} ms vs put p99 {ms(put.p99)} ms ({ratio(whole.p99, put.p99)})",
                f"≤ {ms(2 * put.p99)} ms", whole.p99 <= 2 * put.p99))
    return Section(
        key=KEY, title=TITLE,
        setup=(
            f"One etcd member, one daemon in etcd mode taking the webhooks on `{path}`, N"
            f" watcher processes (each only `Etcd.watch` and a callback that prints the time)."
            f" {updates} webhooks per N, one at a time, each for a new repository (after five"
            " warm-up ones); 'to all N' is the time from the 202 to the last watcher's callback"
            " for that webhook."
        ),
        tables=[table], targets=targets,
        notes=[
            "Negative times are real: etcd sends the watch event to the watchers as it answers"
            " the daemon's transaction, so a watcher often has the update before the daemon's"
            " 202 has reached the client. 'POST sent → all N' is the whole path: webhook,"
            " group-committed etcd write, watch stream, callback. 'POST → 202' is the webhook's"
            " own round trip, which includes one etcd write.",
        ],
    )


def main() -> None:
    main_for(KEY, TITLE, run, add_arguments)


if __name__ == "__main__":
    main()
