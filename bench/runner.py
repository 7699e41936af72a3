"""Runs every benchmark (each in its own process) and writes BENCHMARKS.md.

    bench/run                      # all of them, default sizes (about 5-7 minutes)
    bench/run --quick              # fewer iterations, for a check of the scripts
    bench/run --only fanout,webhook_load --output /tmp/B.md
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, Section, machine, terminate_cleanly

BENCHMARKS = ("deploy_latency", "engine_calls", "fanout", "webhook_load", "recreate",
              "rollout")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help="benchmarks to run, comma-separated (default: all)")
    parser.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md",
                        help="where to write the report (default: BENCHMARKS.md at the top)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer iterations everywhere (a smoke run, not figures to keep)")
    parser.add_argument("--iterations", type=int,
                        help="deploy_latency, recreate: runs per mode (10)")
    parser.add_argument("--sizes", help="engine_calls: running containers (3,30,300)")
    parser.add_argument("--updates", type=int, help="fanout: webhooks per N (100)")
    parser.add_argument("--watchers", help="fanout: values of N (1,3,10)")
    parser.add_argument("--duration", type=int, help="webhook_load: seconds per timed run (10)")
    parser.add_argument("--runs", type=int, help="webhook_load: timed runs of each (2)")
    parser.add_argument("--connections", type=int, help="webhook_load: connections (32)")
    parser.add_argument("--webhooks", type=int, help="webhook_load: webhooks before the memory"
                                                     " reading (10000)")
    parser.add_argument("--rollouts", type=int, help="rollout: fleet rollouts per mode (8)")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each benchmark, wait up to SECONDS for the 1-minute load"
                             " average to drop below --quiet-load (default: do not wait)")
    parser.add_argument("--quiet-load", type=float, default=1.0,
                        help="load average counted as quiet (default 1.0)")
    return parser.parse_args(argv)


def benchmark_args(name: str, options: argparse.Namespace) -> list[str]:
    quick = options.quick
    flags: dict[str, list[tuple[str, object, object]]] = {
        "deploy_latency": [("--iterations", options.iterations, 3)],
        "engine_calls": [("--sizes", options.sizes, "3,30")],
        "fanout": [("--updates", options.updates, 20), ("--watchers", options.watchers, None)],
        "webhook_load": [("--duration", options.duration, 3), ("--runs", options.runs, 1),
                         ("--connections", options.connections, None),
                         ("--webhooks", options.webhooks, 2000)],
        "recreate": [("--iterations", options.iterations, 3)],
        "rollout": [("--iterations", options.rollouts, 2)],
    }
    out: list[str] = []
    for flag, value, quick_value in flags[name]:
        chosen = value if value is not None else (quick_value if quick else None)
        if chosen is not None:
            out += [flag, str(chosen)]
    return out


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def wait_quiet(limit: float, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while float(Path("/proc/loadavg").read_text().split()[0]) >= limit:
        if time.monotonic() > deadline:
            print(f"load average still {loadavg()} after {seconds:g} s; going on", flush=True)
            return
        time.sleep(5)


def run_one(name: str, options: argparse.Namespace, scratch: Path) -> tuple[Section, str, str]:
    out = scratch / f"{name}.json"
    args = [sys.executable, "-m", f"bench.{name}", "--out", str(out),
            *benchmark_args(name, options)]
    if options.wait_quiet > 0:
        wait_quiet(options.quiet_load, options.wait_quiet)
    before = loadavg()
    print(f"== {name}: {' '.join(shlex.quote(a) for a in args[1:])} (load {before})", flush=True)
    started = time.monotonic()
    process = subprocess.Popen(args, cwd=ROOT)
    try:
        code = process.wait(timeout=1200)
    except BaseException:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        raise
    after = loadavg()
    if out.exists():
        section = Section.from_json(json.loads(out.read_text()))
    else:
        section = Section(key=name, title=name, error=f"exited with {code} and wrote no results",
                          seconds=time.monotonic() - started)
    if code != 0 and section.error is None:
        section.error = f"exited with {code}"
    return section, before, after


def versions() -> list[tuple[str, str]]:
    def first_line(*cmd: str) -> str:
        try:
            done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=20,
                                  check=False)
        except OSError:
            return "not installed"
        text = (done.stdout or done.stderr).strip().splitlines()
        return text[0] if text else "?"

    found = [("Python", sys.version.split()[0])]
    for package in ("Twisted", "klein", "treq", "txaioetcd", "prometheus_client", "deployer"):
        try:
            found.append((package, importlib.metadata.version(package)))
        except importlib.metadata.PackageNotFoundError:
            found.append((package, "not installed"))
    found += [
        ("dockerd", first_line("dockerd", "--version")),
        ("docker CLI", first_line("docker", "--version")),
        ("etcd", first_line("etcd", "--version")),
        ("docker-registry", first_line("docker-registry", "--version")),
        ("wrk", first_line("wrk", "--version")),
        ("py-spy", first_line("py-spy", "--version")),
    ]
    return found


def revision() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=False).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=ROOT, capture_output=True, text=True, check=False).stdout
    except OSError:
        return "unknown"
    return f"{head}{' with uncommitted changes' if dirty.strip() else ''}" or "unknown"


def report(sections: list[tuple[Section, str, str]], options: argparse.Namespace,
           argv: list[str], seconds: float) -> str:
    m = machine()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# Benchmarks",
        "",
        "Generated by `bench/run` (see `bench/README.md`); do not edit by hand.",
        "",
        f"- Date: {now}; total run time {seconds / 60:.1f} min"
        + (" (**--quick**: smoke-test sizes, not figures to rely on)" if options.quick else ""),
        f"- Command: `{' '.join(['bench/run', *(shlex.quote(a) for a in argv)])}`",
        f"- Tree: {revision()}",
        f"- Machine: {m['nproc']} CPUs ({m['cpu']}), {m['memory']} memory, Linux {m['kernel']}",
        "- Versions: " + ", ".join(f"{k} {v}" for k, v in versions()),
        "- Load average (1, 5, 15 min) before → after each benchmark: "
        + "; ".join(f"{s.key} {b} → {a}" for s, b, a in sections),
        "",
        "Every figure is measured in the run that wrote this file, next to its baseline from"
        " the same run. A load average well above 0 means other work shared the CPUs and the"
        " figures are noisier than on an idle machine.",
        "",
        "## Targets",
        "",
        "| benchmark | target | measured | limit | met |",
        "|---|---|---|---|---|",
    ]
    for section, _, _ in sections:
        if section.error:
            out.append(f"| {section.key} | (the benchmark failed) | `{section.error[:120]}` |"
                       " | **no** |")
        for t in section.targets:
            met = "yes" if t.met else "**no**"
            out.append(f"| {section.key} | {t.name} | {t.measured} | {t.limit} | {met} |")
    out.append("")
    for section, _, _ in sections:
        out.append(section.markdown())
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    options = parse_args(argv)
    terminate_cleanly()
    names = [n.strip() for n in options.only.split(",") if n.strip()]
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        print(f"unknown benchmarks: {', '.join(unknown)}; known: {', '.join(BENCHMARKS)}",
              file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("the benchmarks start dockerd: run them as root", file=sys.stderr)
        return 2
    started = time.monotonic()
    sections = []
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        for name in names:
            sections.append(run_one(name, options, Path(scratch)))
    text = report(sections, options, argv, time.monotonic() - started)
    options.output.write_text(text)
    print(f"wrote {options.output}")
    return 1 if any(s.error for s, _, _ in sections) else 0


if __name__ == "__main__":
    sys.exit(main())
