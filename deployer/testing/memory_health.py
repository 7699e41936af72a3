"""Health checks in the in-memory Docker engine, as dockerd 20.10 runs them.

:class:`Healthcheck` is an image's (or a container's) ``HEALTHCHECK``; :class:`Behaviour` says how
the containers of an image behave once started, on the engine's clock: from when their probes
pass or fail, when they exit and with which code. :class:`HealthState` is a container's
``State.Health`` and follows dockerd's rules (``daemon/health.go``): the first probe runs one
``interval`` after the start, a passing probe makes it ``healthy``, ``retries`` failing probes in a
row make it ``unhealthy`` (failures within ``start_period`` of a ``starting`` container do not
count), the last five probes are kept, and a stopped container's status turns ``unhealthy``
without an event.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from deployer.testing.memory_common import NANOS, timestamp

DEFAULT_INTERVAL = 30.0
DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 3
MAX_LOG_ENTRIES = 5


def _seconds(obj: Mapping[str, Any], key: str) -> float:
    value = obj.get(key) or 0
    return float(value) / NANOS if isinstance(value, int | float) else 0.0


@attrs.frozen
class Healthcheck:
    """A ``HEALTHCHECK``: ``test`` as the engine stores it (``["CMD-SHELL", "…"]``,
    ``["CMD", …]`` or ``["NONE"]``); durations in seconds, 0 for the engine's default."""

    test: tuple[str, ...]
    interval: float = 0.0
    timeout: float = 0.0
    start_period: float = 0.0
    retries: int = 0

    @classmethod
    def shell(cls, command: str, *, interval: float = 1.0, timeout: float = 2.0,
              retries: int = 2, start_period: float = 0.0) -> Healthcheck:
        """``HEALTHCHECK CMD command`` (a shell form); the defaults are those of the test images
        of :mod:`tests.stack.health_images`."""
        return cls(("CMD-SHELL", command), interval, timeout, start_period, retries)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any] | None) -> Healthcheck | None:
        if not obj:
            return None
        return cls(
            test=tuple(str(t) for t in obj.get("Test") or ()),
            interval=_seconds(obj, "Interval"), timeout=_seconds(obj, "Timeout"),
            start_period=_seconds(obj, "StartPeriod"), retries=int(obj.get("Retries") or 0),
        )

    def to_json(self) -> dict[str, Any]:
        """As the engine shows it: durations in nanoseconds, zero ones left out."""
        out: dict[str, Any] = {"Test": list(self.test)}
        for key, value in (("Interval", self.interval), ("Timeout", self.timeout),
                           ("StartPeriod", self.start_period)):
            if value:
                out[key] = round(value * NANOS)
        if self.retries:
            out["Retries"] = self.retries
        return out

    def merged(self, image: Healthcheck | None) -> Healthcheck:
        """A container's check given at create, with what it leaves out taken from the image's
        (dockerd's ``merge``)."""
        if image is None:
            return self
        return Healthcheck(
            test=self.test or image.test,
            interval=self.interval or image.interval, timeout=self.timeout or image.timeout,
            start_period=self.start_period or image.start_period,
            retries=self.retries or image.retries,
        )

    @property
    def enabled(self) -> bool:
        return bool(self.test) and self.test[0] in ("CMD", "CMD-SHELL")

    @property
    def every(self) -> float:
        return self.interval or DEFAULT_INTERVAL

    @property
    def failures_allowed(self) -> int:
        return self.retries if self.retries > 0 else DEFAULT_RETRIES

    def command(self) -> str:
        """The probe's command line, as its ``exec_create``/``exec_start`` events name it."""
        if self.test and self.test[0] == "CMD-SHELL":
            return " ".join(["/bin/sh", "-c", *self.test[1:]])
        return " ".join(self.test[1:])


@attrs.frozen
class Behaviour:
    """How a container of an image behaves once started, in seconds since its start on the
    engine's clock.

    Its health probes pass from ``healthy_after`` on (never when None) until ``unhealthy_after``
    (a build that turns bad; None: never); a failing probe says ``probe_output``. It exits by
    itself with ``exit_code`` after ``exits_after`` (None: it runs until stopped). On SIGTERM
    (``docker stop``) it exits with ``stop_code`` (0: the test images trap TERM).
    """

    healthy_after: float | None = 0.0
    unhealthy_after: float | None = None
    exits_after: float | None = None
    exit_code: int = 0
    probe_output: str = ""
    stop_code: int = 0

    @classmethod
    def never_healthy(cls, probe_output: str = "") -> Behaviour:
        """Every probe fails: ``unhealthy`` after ``retries`` probes, as dockerd counts."""
        return cls(healthy_after=None, probe_output=probe_output)

    @classmethod
    def dies(cls, after: float, code: int = 1) -> Behaviour:
        return cls(exits_after=after, exit_code=code)

    def probe(self, elapsed: float) -> tuple[int, str]:
        """Exit code and output of a probe ``elapsed`` seconds after the start."""
        passing = self.healthy_after is not None and elapsed >= self.healthy_after and (
            self.unhealthy_after is None or elapsed < self.unhealthy_after)
        return (0, "") if passing else (1, self.probe_output)


STEADY = Behaviour()
"""Runs until stopped; its probes pass."""


@attrs.frozen
class ProbeResult:
    start: float
    end: float
    exit_code: int
    output: str

    def to_json(self) -> dict[str, Any]:
        return {"Start": timestamp(self.start), "End": timestamp(self.end),
                "ExitCode": self.exit_code, "Output": self.output}


@attrs.define
class HealthState:
    """A container's ``State.Health``."""

    status: str = "starting"
    failing_streak: int = 0
    log: list[ProbeResult] = attrs.field(factory=list)

    def restart(self) -> None:
        """(Re)started: ``starting`` again, the streak reset, the log kept."""
        self.status = "starting"
        self.failing_streak = 0

    def stopped(self) -> None:
        """The monitor stopped with the container: ``unhealthy``, without an event."""
        self.status = "unhealthy"

    def record(self, result: ProbeResult, since_start: float, check: Healthcheck) -> bool:
        """Take one probe's result; True when the status changed (an event is due)."""
        old = self.status
        self.log = [*self.log[-(MAX_LOG_ENTRIES - 1):], result]
        if result.exit_code == 0:
            self.failing_streak = 0
            self.status = "healthy"
        elif not (self.status == "starting" and since_start < check.start_period):
            self.failing_streak += 1
            if self.failing_streak >= check.failures_allowed:
                self.status = "unhealthy"
        return self.status != old

    def to_json(self) -> dict[str, Any]:
        return {"Status": self.status, "FailingStreak": self.failing_streak,
                "Log": [r.to_json() for r in self.log]}


__all__ = [
    "DEFAULT_INTERVAL", "DEFAULT_RETRIES", "STEADY", "Behaviour", "HealthState", "Healthcheck",
    "ProbeResult",
]
