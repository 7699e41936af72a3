"""Webhook load: webhooks per second and latency against a daemon in etcd mode, next to the raw
etcd put rate, and the daemon's resident memory.

``wrk`` (Debian's) on loopback, one thread, C connections, a Lua script giving every request a
distinct repository. The daemon (``twistd deployer --etcd_nodes ...``) answers 202 only once its
own etcd write is acknowledged; concurrent webhooks share group-committed transactions. Its rounds
run against the in-memory engine on a unix socket (no images: every round is two list calls).

The baseline, measured in the same run with the same wrk settings, alternating with the daemon:
wrk straight at the same etcd member's ``POST /v3/kv/put``, a distinct key per request, a value
of the size the daemon writes.

Memory: ``VmRSS`` of the daemon process idle after start, right after the load, and settled
after at least ``--webhooks`` webhooks (10,000 by default; more when the timed runs made more).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import profile as bench_profile
from bench.common import (
    TOKEN,
    KeepAlive,
    MemoryEngine,
    Section,
    Table,
    Target,
    main_for,
    vm_rss_kib,
    webhook_route,
    workdir,
)
from tests.stack.daemon import Daemon
from tests.stack.etcd_stack import EtcdCluster

KEY = "webhook_load"
TITLE = "4. Webhook load (daemon in etcd mode) and resident memory"
IDLE_LIMIT_MB = 60.0
GROWTH_LIMIT_MB = 5.0

_DONE = r"""
function done(summary, latency, requests)
  io.write(string.format(
    '{"requests":%d,"duration_us":%d,"status_errors":%d,"connect_errors":%d,'
    .. '"read_errors":%d,"write_errors":%d,"timeouts":%d,'
    .. '"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d,"mean_us":%f}\n',
    summary.requests, summary.duration, summary.errors.status, summary.errors.connect,
    summary.errors.read, summary.errors.write, summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
"""

_COMMON = r"""
local counter = 0
local threads = {}
function setup(thread)
  thread:set("id", #threads + 1)
  table.insert(threads, thread)
end
"""

WEBHOOK_LUA = r"""
local style = "%(style)s"
local run = "%(run)s"
function init(args)
  wrk.method = "POST"
  wrk.path = "%(path)s"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer %(token)s"
end
function request()
  counter = counter + 1
  local repo = string.format("load/%%s-t%%d-r%%d", run, id, counter)
  local body
  if style == "deploy" then
    body = string.format('{"repository":"%%s","tag":"t"}', repo)
  else
    body = string.format('{"repository":{"repo_name":"%%s"},"push_data":{"tag":"t"}}', repo)
  end
  return wrk.format(nil, nil, nil, body)
end
"""

ETCD_LUA = r"""
local run = "%(run)s"
local chars = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local function b64(data)
  local out = {}
  for i = 1, #data, 3 do
    local a, b, c = data:byte(i, i + 2)
    local n = a * 65536 + (b or 0) * 256 + (c or 0)
    local c1 = math.floor(n / 262144) %% 64
    local c2 = math.floor(n / 4096) %% 64
    local c3 = math.floor(n / 64) %% 64
    local c4 = n %% 64
    out[#out + 1] = chars:sub(c1 + 1, c1 + 1) .. chars:sub(c2 + 1, c2 + 1)
      .. (b and chars:sub(c3 + 1, c3 + 1) or "=") .. (c and chars:sub(c4 + 1, c4 + 1) or "=")
  end
  return table.concat(out)
end
local value = b64(string.rep("v", 150))
function init(args)
  wrk.method = "POST"
  wrk.path = "/v3/kv/put"
  wrk.headers["Content-Type"] = "application/json"
end
function request()
  counter = counter + 1
  local key = b64(string.format("/bench-raw/%%s-t%%d-r%%d", run, id, counter))
  return wrk.format(nil, nil, nil, '{"key":"' .. key .. '","value":"' .. value .. '"}')
end
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connections", type=int, default=32,
                        help="concurrent connections, for both (default 32)")
    parser.add_argument("--duration", type=int, default=10,
                        help="seconds per timed run (default 10)")
    parser.add_argument("--runs", type=int, default=2,
                        help="timed runs of each, alternating (default 2)")
    parser.add_argument("--webhooks", type=int, default=10_000,
                        help="webhooks before the memory is read again (default 10000)")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the py-spy profile of the daemon (done when py-spy is"
                             " installed)")


class Wrk:
    def __init__(self, base: Path, connections: int) -> None:
        binary = shutil.which("wrk")
        if binary is None:
            raise RuntimeError("wrk is not installed: apt-get install -y wrk")
        self.binary = binary
        self.base = base
        self.connections = connections
        self.runs = 0

    def run(self, url: str, script: str, params: dict[str, Any], duration: int) -> dict[str, Any]:
        self.runs += 1
        path = self.base / f"wrk-{self.runs}.lua"
        values = {**params, "run": f"r{self.runs}"}
        path.write_text(_COMMON + script % values + _DONE)
        args = [self.binary, "-t1", f"-c{self.connections}", f"-d{duration}s", "--timeout",
                "10s", "-s", str(path), url]
        done = subprocess.run(args, capture_output=True, text=True, timeout=duration + 60,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr}{done.stdout}")
        last = [line for line in done.stdout.splitlines() if line.startswith("{")]
        if not last:
            raise RuntimeError(f"no summary from wrk: {done.stdout}{done.stderr}")
        result: dict[str, Any] = json.loads(last[-1])
        result["rate"] = result["requests"] / (result["duration_us"] / 1e6)
        result["errors"] = sum(result[k] for k in ("status_errors", "connect_errors",
                                                    "read_errors", "write_errors", "timeouts"))
        return result


def run(options: argparse.Namespace) -> Section:
    with workdir("bw-") as base:
        cluster = EtcdCluster(base / "etcd", 1)
        engine = MemoryEngine(base / "engine.sock", base / "engine.log")
        daemon: Daemon | None = None
        try:
            cluster.start()
            member = cluster.members[0]
            engine.start()
            daemon = Daemon(base, ["--docker", engine.url, "--etcd_nodes", member.client_url,
                                   "--etcd_prefix", "/bench-load", "--repull_period", "0"],
                            token=TOKEN).start()
            assert daemon.process is not None
            pid = daemon.process.pid
            time.sleep(2.0)
            memory = [("idle, 2 s after start", 0, vm_rss_kib(pid))]
            client = KeepAlive(daemon.port)
            path, make_body = webhook_route(client)
            headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
            began = time.monotonic()
            status, answer = client.request("POST", path, make_body("load/first", "t"), headers)
            first = time.monotonic() - began
            if status != 202:
                raise RuntimeError(f"webhook answered {status}: {answer[:200]!r}")
            client.close()
            time.sleep(1.0)
            total = 1
            memory.append(("after the first webhook", total, vm_rss_kib(pid)))
            style = "deploy" if path == "/api/deploy" else "dockerhub"
            hook = {"style": style, "path": path, "token": TOKEN}
            wrk = Wrk(base, options.connections)
            total += wrk.run(daemon.url, WEBHOOK_LUA, hook, 2)["requests"]
            memory.append(("after a 2 s warm-up", total, vm_rss_kib(pid)))
            counted = (total, daemon.log().count("\n"))
            daemon_runs, etcd_runs = [], []
            for i in range(options.runs):
                etcd_runs.append(wrk.run(member.client_url, ETCD_LUA, {}, options.duration))
                print(f"  etcd put   {etcd_runs[-1]['rate']:8.0f}/s", flush=True)
                daemon_runs.append(wrk.run(daemon.url, WEBHOOK_LUA, hook, options.duration))
                total += daemon_runs[-1]["requests"]
                print(f"  webhooks   {daemon_runs[-1]['rate']:8.0f}/s", flush=True)
                memory.append((f"after timed run {i + 1}", total, vm_rss_kib(pid)))
            while total < options.webhooks:
                rate = max(100.0, min(r["rate"] for r in daemon_runs))
                seconds = min(120, math.ceil((options.webhooks - total) / rate) + 1)
                total += wrk.run(daemon.url, WEBHOOK_LUA, hook, seconds)["requests"]
            time.sleep(3.0)  # the watch delivers the last updates; rounds finish
            memory.append(("settled, 3 s after the last webhook", total, vm_rss_kib(pid)))
            log_lines = (daemon.log().count("\n") - counted[1]) / max(1, total - counted[0])
            ceiling_hook = {**hook, "path": "/api/no-such-endpoint"}
            ceiling = wrk.run(daemon.url, WEBHOOK_LUA, ceiling_hook, max(2, options.duration // 2))
            print(f"  404s       {ceiling['rate']:8.0f}/s", flush=True)
            profile = None
            if options.profile and bench_profile.available():
                raw = base / "profile.txt"
                spy = bench_profile.record(pid, max(2, options.duration - 2), raw)
                wrk.run(daemon.url, WEBHOOK_LUA, hook, options.duration)
                spy.wait(60)
                if raw.exists():
                    profile = bench_profile.summarize(raw)
        finally:
            if daemon is not None:
                daemon.stop()
            engine.stop()
            cluster.stop()
    return _section(options, path, daemon_runs, etcd_runs, ceiling, memory, first, profile,
                    log_lines)


def _mean(runs: list[dict[str, Any]], key: str) -> float:
    return sum(r[key] for r in runs) / len(runs)


def _section(options: argparse.Namespace, path: str, daemon_runs: list[dict[str, Any]],
             etcd_runs: list[dict[str, Any]], ceiling: dict[str, Any],
             memory: list[tuple[str, int, int]],
             first: float, profile: tuple[Table, int] | None, log_lines: float) -> Section:
    def row(name: str, i: int, r: dict[str, Any]) -> tuple[str, ...]:
        return (name, str(i), f"{r['rate']:.0f}", str(r["requests"]),
                f"{r['p50_us'] / 1000:.1f}", f"{r['p90_us'] / 1000:.1f}",
                f"{r['p99_us'] / 1000:.1f}", f"{r['max_us'] / 1000:.1f}", str(r["errors"]))

    rows = []
    for i, (d, e) in enumerate(zip(daemon_runs, etcd_runs, strict=True), start=1):
        rows.append(row("raw etcd put (baseline)", i, e))
        rows.append(row(f"daemon {path}", i, d))
    rows.append(row("daemon, unknown path (404, no etcd)", 1, ceiling))
    table = Table(("target of wrk", "run", "requests/s", "requests", "p50 ms", "p90 ms",
                   "p99 ms", "max ms", "errors"), tuple(rows))
    daemon_rate, etcd_rate = _mean(daemon_runs, "rate"), _mean(etcd_runs, "rate")
    idle_kib, total, after_kib = memory[0][2], memory[-1][1], memory[-1][2]
    idle_mb, after_mb = idle_kib / 1024, after_kib / 1024
    step_mb = (memory[1][2] - idle_kib) / 1024
    rest_mb = (after_kib - memory[1][2]) / 1024
    memory_table = Table(
        ("daemon VmRSS", "webhooks so far", "MB", "change from idle MB"),
        tuple((name, str(n), f"{kib / 1024:.1f}", f"{(kib - idle_kib) / 1024:+.1f}")
              for name, n, kib in memory),
    )
    errors = sum(r["errors"] for r in daemon_runs)
    targets = [
        Target("webhooks/s ≥ raw etcd put rate (same connections)",
               f"{daemon_rate:.0f}/s vs {etcd_rate:.0f}/s ({daemon_rate / etcd_rate:.2f}x)",
               f"≥ {etcd_rate:.0f}/s", daemon_rate >= etcd_rate),
        Target("no failed webhooks under load", str(errors), "0", errors == 0),
        Target("resident memory idle after start", f"{idle_mb:.1f} MB",
               f"≤ {IDLE_LIMIT_MB:.0f} MB", idle_mb <= IDLE_LIMIT_MB),
        Target(f"memory growth after {total} webhooks", f"{after_mb - idle_mb:+.1f} MB",
               f"≤ {GROWTH_LIMIT_MB:.0f} MB", after_mb - idle_mb <= GROWTH_LIMIT_MB),
    ]
    notes = [
        f"Means over the {len(daemon_runs)} timed runs: daemon {daemon_rate:.0f} webhooks/s"
        f" (p99 {_mean(daemon_runs, 'p99_us') / 1000:.1f} ms), raw etcd put"
        f" {etcd_rate:.0f}/s (p99 {_mean(etcd_runs, 'p99_us') / 1000:.1f} ms).",
        f"Memory: the first webhook alone moved VmRSS by {step_mb:+.1f} MB (it took"
        f" {first * 1000:.0f} ms); the {total - 1} webhooks after it moved it by"
        f" {rest_mb:+.1f} MB.",
        "wrk, the daemon, etcd and the in-memory engine share the same cores; the daemon is one"
        " Python process.",
        f"The 404 row is the same daemon answering a path it does not serve: twisted.web, Klein"
        f" and the access log alone, with no etcd write, at {ceiling['rate']:.0f} requests/s."
        f" It bounds what any webhook handler in this process can reach (its 'errors' are the"
        f" 404s).",
    ]
    tables = [table, memory_table]
    if profile is not None:
        profile_table, samples = profile
        tables.append(Table(profile_table.headers, profile_table.rows,
                            caption=f"Profile of the daemon during one more {options.duration} s"
                                    f" run ({samples} py-spy samples, CPU time only):"))
    notes.append(f"The daemon writes {log_lines:.1f} log lines per webhook (counted over the"
                 " timed runs).")
    return Section(
        key=KEY, title=TITLE,
        setup=(
            f"One etcd member; the daemon in etcd mode (token auth, webhooks on `{path}`, each"
            f" for a distinct repository); `wrk -t1 -c{options.connections}`,"
            f" {options.duration} s per timed run, {options.runs} runs of each alternating, after"
            " a 2 s warm-up of the daemon."
        ),
        tables=tables, targets=targets, notes=notes,
    )


def main() -> None:
    main_for(KEY, TITLE, run, add_arguments)


if __name__ == "__main__":
    main()
