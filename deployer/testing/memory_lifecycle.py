"""What running containers of the in-memory Docker engine do by themselves, on the engine's clock:
health probes, exits, restarts by restart policy, and a supervisor that runs a container again
when it stops (``Restart=always`` with ``docker rm -f NAME; docker run --name NAME REPO:TAG``).

:class:`Lifecycle` keeps one container's timers as dockerd keeps its monitors: probes every
``interval`` from the start (``exec_create``/``exec_start``/``exec_die`` events, a
``health_status`` event when the status changes), the exit its image's
:class:`~deployer.testing.memory_health.Behaviour` asks for, and a restart after ``100 ms``,
doubling, when its restart policy says so (``always``, ``unless-stopped``, ``on-failure[:N]``).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Protocol

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from deployer.testing.memory_common import ApiError
from deployer.testing.memory_containers import ContainerState
from deployer.testing.memory_health import ProbeResult

log = Logger()

RESTART_DELAY = 0.1
"""dockerd's first delay before it restarts a container by its restart policy."""


class Engine(Protocol):
    """What the lifecycle needs of the engine (:class:`~deployer.testing.memory_state
    .EngineState`)."""

    clock: IReactorTime | None
    down: bool

    def _now(self) -> float: ...

    def container_event(self, container: ContainerState, action: str,
                        **extra: str) -> None: ...

    def _exit(self, container: ContainerState, code: int) -> None: ...

    def _resume(self, container: ContainerState) -> None: ...

    def _exited(self, container: ContainerState) -> None: ...

    def find_container(self, name_or_id: str) -> ContainerState | None: ...

    def remove(self, name_or_id: str) -> None: ...

    def run(self, name: str | None, image_ref: str) -> str: ...


class Lifecycle:
    """The timers of every running container of one engine."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._timers: dict[str, list[IDelayedCall]] = {}

    def check(self, container: ContainerState) -> None:
        """:class:`ApiError` unless the engine can run ``container``: one that does anything
        by itself (health checks, exits) needs the engine's clock."""
        if self._engine.clock is None and (container.healthcheck is not None
                                           or container.behaviour.exits_after is not None):
            raise ApiError(500, f"MemoryDocker: {container.name} ({container.image_ref}) has a"
                                " health check or exits by itself: give the engine a clock,"
                                " MemoryDocker(clock=...)")

    def started(self, container: ContainerState) -> None:
        self.stopped(container)
        check = container.healthcheck
        if check is not None:
            self._probe_at(container, (container.started or 0.0) + check.every)
        exits_after = container.behaviour.exits_after
        if exits_after is not None:
            self._later(container, exits_after, self._exit_by_itself, container)

    def stopped(self, container: ContainerState) -> None:
        """No more timers for ``container`` (it stopped, or is removed)."""
        for call in self._timers.pop(container.id, []):
            if call.active():
                call.cancel()

    def _later(self, container: ContainerState, delay: float,
               function: Callable[[ContainerState], None], *args: ContainerState) -> None:
        clock = self._engine.clock
        assert clock is not None, "checked at start"
        calls = [c for c in self._timers.get(container.id, []) if c.active()]
        calls.append(clock.callLater(delay, self._fire, container.id, function, *args))
        self._timers[container.id] = calls

    def _fire(self, container_id: str, function: Callable[[ContainerState], None],
              container: ContainerState) -> None:
        try:
            function(container)
        except Exception:
            log.failure("MemoryDocker: the lifecycle of {id} failed", id=container_id[:12])

    # -- what containers do -----------------------------------------------------------------------

    def _probe_at(self, container: ContainerState, at: float) -> None:
        """The next probe at ``at`` (its interval counts from the last one's time, also when a
        test's Clock leaps over several); at once when ``at`` has passed already (a reactor
        that ran late: a real one refuses a negative delay)."""
        clock = self._engine.clock
        assert clock is not None, "checked at start"
        self._later(container, max(0.0, at - clock.seconds()),
                    lambda c: self._probe(c, at), container)

    def _probe(self, container: ContainerState, now: float) -> None:
        check, health = container.healthcheck, container.health
        if container.status != "running" or check is None or health is None:
            return
        engine = self._engine
        since_start = now - (container.started or now)
        code, output = container.behaviour.probe(since_start)
        exec_id = secrets.token_hex(32)
        command = check.command()
        engine.container_event(container, f"exec_create: {command}", execID=exec_id)
        engine.container_event(container, f"exec_start: {command}", execID=exec_id)
        engine.container_event(container, "exec_die", execID=exec_id, exitCode=str(code))
        if health.record(ProbeResult(now, now, code, output), since_start, check):
            engine.container_event(container, f"health_status: {health.status}")
        self._probe_at(container, now + check.every)

    def _exit_by_itself(self, container: ContainerState) -> None:
        if container.status != "running":
            return
        engine = self._engine
        engine._exit(container, container.behaviour.exit_code)
        if self.restarts(container):
            container.status = "restarting"
            container.restart_count += 1
            delay = RESTART_DELAY * 2 ** (container.restart_count - 1)
            self._later(container, delay, self._restart, container)
        else:
            engine._exited(container)

    def restarts(self, container: ContainerState) -> bool:
        """Whether its restart policy restarts ``container``, which just exited."""
        if container.manually_stopped or self._engine.down:
            return False
        policy = container.host_config.get("RestartPolicy") or {}
        name = policy.get("Name") or ""
        if name in ("always", "unless-stopped"):
            return True
        if name == "on-failure":
            most = int(policy.get("MaximumRetryCount") or 0)
            return container.exit_code != 0 and (most == 0 or container.restart_count < most)
        return False

    def _restart(self, container: ContainerState) -> None:
        if container.status == "restarting":
            self._engine._resume(container)


class MemorySupervisor:
    """Keeps a container named ``name`` of ``image_ref`` running: whenever it stops (stopped,
    killed, removed or exited by itself), ``delay`` seconds later (on the engine's clock; at
    once for 0) it removes it and runs a new one from ``image_ref``, which means whatever the
    tag points at by then. :attr:`runs` counts the containers it ran."""

    def __init__(self, engine: Engine, name: str, image_ref: str, delay: float = 0.0) -> None:
        self._engine = engine
        self.name = name
        self.image_ref = image_ref
        self.delay = delay
        self.runs = 0
        self.active = False
        self._pending: IDelayedCall | None = None

    def start(self) -> MemorySupervisor:
        """``docker rm -f NAME; docker run --name NAME IMAGE``, and so on."""
        self.active = True
        self._again()
        return self

    def stop(self) -> None:
        """Supervise no more (the container is left as it is)."""
        self.active = False
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None

    def exited(self, container: ContainerState) -> None:
        if not self.active or container.name != self.name:
            return
        clock = self._engine.clock
        if self.delay and clock is not None:
            if self._pending is None or not self._pending.active():
                self._pending = clock.callLater(self.delay, self._again)
        else:
            self._again()

    def engine_back(self) -> None:
        """The engine runs again: run the container if it does not."""
        current = self._engine.find_container(self.name)
        if self.active and (current is None or not current.running):
            self._again()

    def _again(self) -> None:
        self._pending = None
        if not self.active or self._engine.down:
            return
        if self._engine.find_container(self.name) is not None:
            self._engine.remove(self.name)
        self._run()

    def _run(self) -> None:
        self.runs += 1
        try:
            self._engine.run(self.name, self.image_ref)
        except Exception:
            log.failure("MemoryDocker: supervisor of {name} could not run {ref}",
                        name=self.name, ref=self.image_ref)


__all__ = ["RESTART_DELAY", "Lifecycle", "MemorySupervisor"]
