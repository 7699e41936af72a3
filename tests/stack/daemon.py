"""The deployer daemon itself as a process under test: ``twistd -n deployer ...``.

It logs through ``--logger deployer.logs.json``, so every event the daemon emits in the real
tests goes through the JSON observer: :meth:`Daemon.stop` checks that each line of the log is
a JSON object of the documented shape and that no secret given to the daemon appears anywhere,
and :meth:`Daemon.log` gives the same lines back as readable text.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.stack.docker_stack import StackError, log_tail, wait_until
from tests.stack.ports import address_in_use, free_port, on_fresh_ports

# twistd as a module (twisted.scripts.twistd has no ``__main__``), with this interpreter.
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"
LEVELS = ("debug", "info", "warn", "error", "critical")
SECRET_FLAGS = ("--webhook_token", "--github_secret", "--slack_webhook_url")
SECRET_ENV = ("DEPLOYER_WEBHOOK_TOKEN", "DEPLOYER_GITHUB_SECRET", "SLACK_WEBHOOK_URL")


class Daemon:
    """One ``twistd --nodaemon deployer`` process listening on 127.0.0.1:``port``."""

    def __init__(self, workdir: Path, args: Sequence[str], token: str | None = "test-token",
                 env: Mapping[str, str] | None = None, port: int | None = None,
                 wrapper: Sequence[str] = ()) -> None:
        """``wrapper``: a command that runs the daemon (``prlimit --nofile=1024 --``).
        Without ``port``, a free one; when another process binds it first, :meth:`start` tries
        again on another (the log keeps its first name)."""
        self.workdir = workdir
        self.wrapper = list(wrapper)
        self.port_given = bool(port)
        self.port = port or free_port()
        self.token = token
        self.args = list(args)
        self.env = dict(env or {})
        self.log_path = workdir / f"deployer-{self.port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        args = [*self.wrapper, sys.executable, "-c", TWISTD, "--nodaemon", "--pidfile=",
                "--logger", "deployer.logs.json", "deployer",
                "--listen", f"127.0.0.1:{self.port}", *self.args]
        if self.token:
            args += ["--webhook_token", self.token]
        return args

    def start(self, timeout: float = 30.0, healthy: bool = True) -> Daemon:
        """Start the daemon and wait until it answers (``/healthz`` 200 when ``healthy``)."""
        began = self.log_path.stat().st_size if self.log_path.exists() else 0

        def attempt(again: bool) -> Daemon:
            if again:
                self.port = free_port()
            return self._start(timeout, healthy)

        def taken() -> bool:
            """The port was in use: the attempt's log lines are set aside (its traceback is
            not the daemon's)."""
            if self.port_given:
                return False
            with self.log_path.open("r+b") as log:
                log.seek(began)
                tail = log.read()
                if not address_in_use(tail.decode(errors="replace"), [self.port]):
                    return False
                log.truncate(began)
            aside = self.log_path.with_name(f"{self.log_path.stem}-port-{self.port}-in-use.log")
            aside.write_bytes(tail)
            return True

        return on_fresh_ports(attempt, taken)

    def _start(self, timeout: float, healthy: bool) -> Daemon:
        env = {**os.environ, "HOME": str(self.workdir), **self.env}
        env.pop("DEPLOYER_WEBHOOK_TOKEN", None)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                cwd=self.workdir, env=env,
            )
        what = "deployer /healthz 200" if healthy else "deployer listening"
        try:
            wait_until(lambda: self._answers(healthy), timeout, what, 0.05, self._dead)
        except StackError as e:
            self.stop(check=False)
            raise StackError(f"{e}\n{log_tail(self.log_path)}") from None
        return self

    def _dead(self) -> str | None:
        if self.process is not None and self.process.poll() is not None:
            return f"deployer exited with {self.process.returncode}"
        return None

    def _answers(self, healthy: bool) -> bool:
        try:
            status, _ = self.get("/healthz")
        except OSError:
            return False
        return status == 200 or not healthy

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        return self.request("GET", path, None, timeout=timeout)

    def request(self, method: str, path: str, body: bytes | None,
                headers: Mapping[str, str] | None = None, timeout: float = 10.0,
                auth: bool = True) -> tuple[int, Any]:
        h = {"Content-Type": "application/json", **(headers or {})}
        if auth and self.token:
            h.setdefault("Authorization", f"Bearer {self.token}")
        req = urllib.request.Request(self.url + path, data=body, method=method, headers=h)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                status, raw = r.status, r.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw

    def post_json(self, path: str, obj: Any, **kw: Any) -> tuple[int, Any]:
        return self.request("POST", path, json.dumps(obj).encode(), **kw)

    def raw_log(self) -> str:
        """The log as the daemon wrote it: JSON lines."""
        return self.log_path.read_text(errors="replace")

    def log(self) -> str:
        """The log as text, one ``TIME [NAMESPACE#LEVEL] MESSAGE`` line per event (tracebacks
        follow their event, indented); a line that is not JSON is kept as it is."""
        return "".join(readable(line) for line in self.raw_log().splitlines(keepends=True))

    def secrets(self) -> list[str]:
        """Every secret this daemon was given: its token, secret flags, secret environment."""
        found = [self.token] if self.token else []
        for i, arg in enumerate(self.args):
            name, eq, value = arg.partition("=")
            if name in SECRET_FLAGS:
                found.append(value if eq else self.args[i + 1] if i + 1 < len(self.args) else "")
        found += [self.env[name] for name in SECRET_ENV if name in self.env]
        return [s for s in found if s]

    def check_log(self) -> None:
        """Each line is a JSON object with time, level, namespace and message; no secret of
        :meth:`secrets` appears anywhere. :class:`StackError` says what is wrong."""
        raw = self.raw_log()
        problems = [f"line {n}: {why}: {line[:300]!r}"
                    for n, line in enumerate(raw.splitlines(), 1)
                    if (why := log_line_problem(line)) is not None]
        problems += [f"a secret given to the daemon is in its log: {secret[:3]}..."
                     for secret in self.secrets() if secret in raw]
        if problems:
            raise StackError(f"{self.log_path}: " + "; ".join(problems[:10]))

    def stop(self, timeout: float = 15.0, check: bool = True) -> int | None:
        """SIGTERM, wait (SIGKILL after ``timeout``); with ``check``, :meth:`check_log` then."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        if check:
            self.check_log()
        return self.process.returncode


def log_line_problem(line: str) -> str | None:
    """Why ``line`` is not a JSON log line of deployer.logs, or None."""
    try:
        event = json.loads(line)
    except ValueError:
        return "not JSON"
    if not isinstance(event, dict):
        return "not a JSON object"
    for key in ("time", "level", "namespace", "message"):
        if not isinstance(event.get(key), str):
            return f"no {key} string"
    if event["level"] not in LEVELS:
        return f"unknown level {event['level']!r}"
    try:
        when = datetime.fromisoformat(event["time"])
    except ValueError:
        return "time is not ISO 8601"
    if when.utcoffset() is None:
        return "time has no time zone"
    return None


def readable(line: str) -> str:
    """One JSON log line as Twisted's classic text (the line itself if it is not JSON)."""
    try:
        event = json.loads(line)
        system = event.get("system") or f"{event['namespace']}#{event['level']}"
        text = f"{event['time']} [{system}] {event['message']}"
    except (ValueError, KeyError, TypeError):
        return line
    if event.get("traceback"):
        text += "\n" + event["traceback"].rstrip("\n")
    return text.replace("\n", "\n\t") + "\n"
