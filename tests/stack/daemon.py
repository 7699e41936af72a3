"""The deployer daemon itself as a process under test: ``twistd -n deployer ...``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tests.stack.docker_stack import StackError, free_port, log_tail, wait_until


class Daemon:
    """One ``twistd --nodaemon deployer`` process listening on 127.0.0.1:``port``."""

    def __init__(self, workdir: Path, args: Sequence[str], token: str | None = "test-token",
                 env: Mapping[str, str] | None = None, port: int | None = None,
                 wrapper: Sequence[str] = ()) -> None:
        """``wrapper``: a command that runs the daemon (``prlimit --nofile=1024 --``)."""
        self.workdir = workdir
        self.wrapper = list(wrapper)
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
        args = [*self.wrapper, sys.executable, "-m", "twisted", "--log-format=text", "deployer",
                "--listen", f"127.0.0.1:{self.port}", *self.args]
        if self.token:
            args += ["--webhook_token", self.token]
        return args

    def start(self, timeout: float = 30.0, healthy: bool = True) -> Daemon:
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
            self.stop()
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

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode
