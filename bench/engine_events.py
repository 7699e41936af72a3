"""One engine's container events for one container name, read in a thread: the clock that
ends every timed benchmark mode (deploy latency, re-creation, fleet rollout)."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Sequence

from tests.stack.docker_stack import Dockerd, _UnixHTTPConnection

DEFAULT_ACTIONS = ("start", "die")


class ContainerEvents:
    """``actions`` events (``start``, ``die``, ``health_status``...) of container NAME on one
    engine: :attr:`events` holds (monotonic time, action, container id)."""

    def __init__(self, dockerd: Dockerd, name: str,
                 actions: Sequence[str] = DEFAULT_ACTIONS) -> None:
        self.dockerd = dockerd
        self.name = name
        self.actions = list(actions)
        self.events: list[tuple[float, str, str]] = []
        self._cond = threading.Condition()
        self._conn: _UnixHTTPConnection | None = None
        self._thread = threading.Thread(target=self._read, name=f"events-{name}", daemon=True)
        self._ready = threading.Event()
        self._closed = False

    def start(self) -> ContainerEvents:
        self._thread.start()
        if not self._ready.wait(10):
            raise TimeoutError("the engine's event stream did not open")
        return self

    def _read(self) -> None:
        filters = json.dumps(
            {"type": ["container"], "event": self.actions, "container": [self.name]}
        )
        self._conn = _UnixHTTPConnection(self.dockerd.socket, timeout=None)  # type: ignore[arg-type]
        self._conn.request("GET", "/events?filters=" + urllib.parse.quote(filters))
        response = self._conn.getresponse()
        self._ready.set()
        try:
            while True:
                line = response.readline()
                if not line:
                    return
                now = time.monotonic()
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                with self._cond:
                    self.events.append(
                        (now, str(event.get("Action", "")), str(event.get("id", "")))
                    )
                    self._cond.notify_all()
        except Exception:
            if not self._closed:
                raise

    def wait(self, after: float, action: str, image_id: str, timeout: float = 60.0) -> float:
        """When a container NAME on ``image_id`` had ``action`` at or after ``after``."""
        deadline = time.monotonic() + timeout
        checked = 0
        while True:
            with self._cond:
                while checked >= len(self.events):
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"{self.dockerd.base}: {self.name} had no {action!r}"
                                           f" on {image_id:.19}")
                    self._cond.wait(left)
                seen = self.events[checked:]
            checked += len(seen)
            for at, what, cid in seen:
                if at < after or what != action:
                    continue
                state = self.dockerd.inspect(cid)
                if state is not None and state["Image"] == image_id:
                    return at

    def last(self, action: str, after: float, before: float) -> float:
        """The time of the last ``action`` between ``after`` and ``before`` (NaN if none)."""
        with self._cond:
            found = [t for t, a, _ in self.events if a == action and after <= t <= before]
        return found[-1] if found else float("nan")

    def wait_started(
        self, after: float, image_id: str, timeout: float = 60.0
    ) -> tuple[float, float]:
        """When a container NAME started on ``image_id`` at or after ``after``, and when the
        last container NAME died before that."""
        at = self.wait(after, "start", image_id, timeout)
        return at, self.last("die", after, at)

    def close(self) -> None:
        self._closed = True
        if self._conn is not None and self._conn.sock is not None:
            try:
                self._conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._conn.close()
        self._thread.join(5)
