"""Where a daemon's CPU goes: ``py-spy record`` on its pid, samples grouped by what they do.

Optional: without ``py-spy`` (``pip install py-spy``) benchmarks skip their profile.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

from bench.common import Table

_FRAME = re.compile(r"^(?P<function>.*) \((?P<path>.*):(?P<line>\d+)\)$")

# (category, path fragment, function prefix or "") — a sample belongs to the category of the
# frame nearest its leaf that matches one of these. twisted.internet frames (sockets, Deferred
# callbacks) and SHARED ones count for the code that called them; only samples with nothing
# else on the stack count as REACTOR.
WATCH = "the daemon's own etcd watch"
ROUNDS = "rounds (reconciler, engine client)"
CATEGORIES: tuple[tuple[str, str, str], ...] = (
    ("logging (twisted.logger, log files)", "twisted/logger/", ""),
    ("Content-Type parsing (email package, inside twisted.web)", "email/", ""),
    (WATCH, "deployer/etcd/watch.py", ""),  # WatchService, read_all
    (WATCH, "deployer/etcd/liveness.py", ""),  # the watch's check of its member
    (WATCH, "deployer/etcd/layout.py", "KeyLayout.decode"),
    (WATCH, "deployer/etcd/layout.py", "_from_value"),
    (WATCH, "deployer/etcd/client.py", "Gateway.open_stream"),
    (WATCH, "deployer/lines.py", ""),  # the JSON-lines reader: see READER_USERS
    (ROUNDS, "deployer/reconcile.py", ""),
    (ROUNDS, "deployer/rounds.py", ""),
    (ROUNDS, "deployer/docker.py", ""),
    (ROUNDS, "deployer/pulls.py", ""),
    ("etcd writes (group commit)", "deployer/etcd/", ""),
    ("etcd writes (group commit)", "txaioetcd", ""),
    ("metrics (prometheus_client)", "prometheus_client/", ""),
    ("metrics (prometheus_client)", "deployer/metrics.py", ""),
    ("webhook handling (klein, deployer.webhook, formats, auth)", "klein/", ""),
    ("webhook handling (klein, deployer.webhook, formats, auth)", "werkzeug/", ""),
    ("webhook handling (klein, deployer.webhook, formats, auth)", "deployer/", ""),
    ("HTTP client (treq, twisted.web.client)", "treq/", ""),
    ("HTTP client (treq, twisted.web.client)", "twisted/web/_newclient.py", ""),
    ("HTTP client (treq, twisted.web.client)", "twisted/web/client.py", ""),
    ("HTTP server (twisted.web)", "twisted/web/", ""),
)
SHARED = ("deployer/model.py", "deployer/reference.py")
"""Value code that webhooks, rounds and the watch all use (``Update.from_json``, the reference
split): its frames count for the code that called it, as twisted.internet's do."""
READER = "deployer/lines.py"
READER_USERS: tuple[tuple[str, str], ...] = ((ROUNDS, "deployer/pulls.py"),)
"""The JSON-lines reader (:data:`READER`) reads the etcd watch, and a pull's progress: there a
frame of ``PullReader`` (deployer/pulls.py) stands further from the leaf, and the sample counts
for the rounds. (The engine's ``/events`` stream, the one other reader, counts with the watch.)"""
REACTOR = "reactor, sockets, Deferred plumbing (twisted.internet)"


def available() -> bool:
    return shutil.which("py-spy") is not None


def record(pid: int, seconds: int, out: Path, rate: int = 100) -> subprocess.Popen[bytes]:
    """Start sampling ``pid`` for ``seconds``; wait on the returned process."""
    binary = shutil.which("py-spy")
    if binary is None:
        raise RuntimeError("py-spy is not installed")
    return subprocess.Popen(
        [binary, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", str(rate),
         "--nonblocking", "--format", "raw", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
    )


def categorize(stack: list[str]) -> str:
    plumbing = False
    for frame in reversed(stack):
        m = _FRAME.match(frame)
        if m is None:
            continue
        path, function = "/" + m.group("path"), m.group("function")
        if "/twisted/internet/" in path or "/twisted/python/" in path:
            plumbing = True
            continue
        if any(path.endswith("/" + shared) for shared in SHARED):
            continue
        for category, fragment, prefix in CATEGORIES:
            if "/" + fragment in path and function.startswith(prefix):
                if fragment == READER:
                    return _reader_user(stack) or category
                return category
    return REACTOR if plumbing else "other (stdlib, json, interpreter)"


def _reader_user(stack: list[str]) -> str | None:
    """The category of the stream the JSON-lines reader is reading, if not the watch's."""
    paths = ["/" + m.group("path") for m in map(_FRAME.match, stack) if m is not None]
    for category, fragment in READER_USERS:
        if any(path.endswith("/" + fragment) for path in paths):
            return category
    return None


def summarize(raw: Path) -> tuple[Table, int]:
    """A table of the share of samples per category, and the number of samples."""
    counts: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        counts[categorize(stack.split(";"))] += int(n)
        total += int(n)
    rows = tuple((name, f"{100 * n / total:.1f}%") for name, n in counts.most_common())
    return Table(("where the daemon's CPU time went (py-spy samples)", "share"), rows), total
