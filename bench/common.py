"""What every benchmark shares: statistics, tables, results, processes and HTTP helpers.

A benchmark module exposes ``run(options) -> Section`` and a ``main()`` that prints the section
and, with ``--out FILE``, writes it as JSON for ``bench/run``, which assembles BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "tests" / "samples"
TOKEN = "bench-token"


# -- statistics ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """The ``p``-th percentile (0-100), linear between closest ranks; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    rank = (len(ordered) - 1) * p / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@attrs.frozen
class Summary:
    n: int
    median: float
    p90: float
    p99: float
    mean: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        if not values:
            nan = math.nan
            return cls(0, nan, nan, nan, nan, nan, nan)
        return cls(
            n=len(values),
            median=percentile(values, 50),
            p90=percentile(values, 90),
            p99=percentile(values, 99),
            mean=statistics.fmean(values),
            low=min(values),
            high=max(values),
        )


def ms(seconds: float) -> str:
    """Seconds as milliseconds for a table cell."""
    if math.isnan(seconds):
        return "n/a"
    value = seconds * 1000.0
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def ratio(a: float, b: float) -> str:
    if math.isnan(a) or math.isnan(b) or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


# -- results ------------------------------------------------------------------------------------


@attrs.frozen
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str = ""

    def markdown(self) -> str:
        widths = [len(h) for h in self.headers]
        for row in self.rows:
            widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

        def line(cells: Sequence[str]) -> str:
            return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

        out = [line(self.headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line(row) for row in self.rows]
        if self.caption:
            out = [self.caption, "", *out]
        return "\n".join(out)


@attrs.frozen
class Target:
    """One target and whether this run met it."""

    name: str
    measured: str
    limit: str
    met: bool


def within_ratio(subject: str, baseline: str, measured: Summary, floor: Summary,
                 limit: float) -> list[Target]:
    """The two latency targets: ``subject``'s median and p90 at most ``limit`` x those of
    ``baseline`` (measured in the same run)."""
    targets = []
    for quantile in ("median", "p90"):
        mine, theirs = getattr(measured, quantile), getattr(floor, quantile)
        targets.append(Target(
            f"{subject} {quantile} ≤ {limit:.2f} x {baseline} {quantile}",
            f"{ms(mine)} ms vs {ms(theirs)} ms ({ratio(mine, theirs)})",
            f"≤ {ms(theirs * limit)} ms", mine <= theirs * limit))
    return targets


@attrs.define
class Section:
    """One benchmark's results: prose, tables, targets."""

    key: str
    title: str
    setup: str = ""
    tables: list[Table] = attrs.field(factory=list)
    targets: list[Target] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)
    seconds: float = 0.0
    error: str | None = None

    def markdown(self) -> str:
        out = [f"## {self.title}", ""]
        if self.setup:
            out += [self.setup, ""]
        if self.error:
            out += [f"**The benchmark failed:** `{self.error}`", ""]
        for table in self.tables:
            out += [table.markdown(), ""]
        if self.targets:
            out += ["| target | measured | limit | met |", "|---|---|---|---|"]
            for t in self.targets:
                met = "yes" if t.met else "**no**"
                out.append(f"| {t.name} | {t.measured} | {t.limit} | {met} |")
            out.append("")
        for note in self.notes:
            out += [note, ""]
        out.append(f"_Run time of this benchmark: {self.seconds:.0f} s._")
        return "\n".join(out) + "\n"

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Section:
        return cls(
            key=obj["key"],
            title=obj["title"],
            setup=obj.get("setup", ""),
            tables=[
                Table(tuple(t["headers"]), tuple(tuple(r) for r in t["rows"]), t.get("caption", ""))
                for t in obj.get("tables", [])
            ],
            targets=[Target(**t) for t in obj.get("targets", [])],
            notes=list(obj.get("notes", [])),
            seconds=float(obj.get("seconds", 0.0)),
            error=obj.get("error"),
        )


def main_for(
    key: str, title: str, run: Callable[[argparse.Namespace], Section],
    add_arguments: Callable[[argparse.ArgumentParser], None],
) -> None:
    """The command line of one benchmark: run it, print its section, write ``--out``."""
    parser = argparse.ArgumentParser(description=title)
    parser.add_argument("--out", type=Path, help="write the results as JSON to this file")
    add_arguments(parser)
    options = parser.parse_args()
    terminate_cleanly()
    started = time.monotonic()
    try:
        section = run(options)
    except BaseException as e:  # report it, then fail
        section = Section(key=key, title=title, error=f"{type(e).__name__}: {e}")
        section.seconds = time.monotonic() - started
        _emit(section, options.out)
        raise
    section.seconds = time.monotonic() - started
    _emit(section, options.out)


def _emit(section: Section, out: Path | None) -> None:
    print()
    print(section.markdown(), flush=True)
    if out is not None:
        out.write_text(json.dumps(section.to_json(), indent=1))


def terminate_cleanly() -> None:
    """SIGTERM and SIGHUP raise SystemExit, so that every ``finally`` stops its processes."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


# -- processes ----------------------------------------------------------------------------------


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A short directory under /tmp (unix socket paths must stay short), removed after."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield path
    finally:
        subprocess.run(["rm", "-rf", str(path)], check=False)


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL: for the processes a benchmark started itself."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        process.wait(10)


def vm_rss_kib(pid: int) -> int:
    """Resident memory of a process in KiB (``VmRSS`` in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def wait_for(check: Callable[[], bool], timeout: float, what: str, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout} s")
        time.sleep(interval)


@attrs.define
class MemoryEngine:
    """The in-memory Docker engine served on a unix socket, for daemons whose rounds need an
    engine that answers but has nothing to deploy."""

    socket: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> MemoryEngine:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bench.memory_engine", str(self.socket)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        wait_for(self.socket.exists, 20, f"in-memory engine on {self.socket}", 0.02)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


# -- HTTP ---------------------------------------------------------------------------------------


def dockerhub_payload(repo_name: str, tag: str) -> dict[str, Any]:
    """The Docker Hub sample, for ``repo_name:tag``, without a callback URL."""
    sample: dict[str, Any] = json.loads((SAMPLES / "dockerhub-webhook.json").read_text())
    sample["repository"]["repo_name"] = repo_name
    sample["push_data"]["tag"] = tag
    sample.pop("callback_url", None)
    return sample


class KeepAlive:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1:port, reopened when it drops."""

    def __init__(self, port: int, timeout: float = 30.0) -> None:
        self.port = port
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def request(
        self, method: str, path: str, body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, bytes]:
        for attempt in (1, 2):
            if self._conn is None:
                self._conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                        timeout=self.timeout)
            try:
                self._conn.request(method, path, body=body, headers=dict(headers or {}))
                response = self._conn.getresponse()
                return response.status, response.read()
            except (http.client.HTTPException, ConnectionError):
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def webhook_route(client: KeepAlive) -> tuple[str, Callable[[str, str], bytes]]:
    """The webhook endpoint to load: the generic ``POST /api/deploy`` when the daemon has it,
    else Docker Hub's. Returns its path and a function making a body for ``(repo, tag)``."""
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    status, _ = client.request("POST", "/api/deploy", b"{}", headers)
    if status not in (404, 405):
        return "/api/deploy", lambda repo, tag: json.dumps(
            {"repository": repo, "tag": tag}).encode()
    return "/api/dockerhub/webhook", lambda repo, tag: json.dumps(
        dockerhub_payload(repo, tag)).encode()


def auth_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    mem_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kib = int(line.split()[1])
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "memory": f"{mem_kib / 1024 / 1024:.1f} GiB",
        "kernel": os.uname().release,
    }
