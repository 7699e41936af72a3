"""Test images with a HEALTHCHECK, or that die, built without the internet.

They are the busybox images of :func:`tests.stack.docker_stack.build_image` (``docker import``
of a rootfs whose ``/app/run.sh`` touches ``/tmp/healthy`` and then runs until SIGTERM), with
more ``--change`` instructions: the engine's import takes ``HEALTHCHECK`` as it takes ``CMD``
(checked on dockerd 20.10), so no ``docker build`` and no base image are needed.

Each helper blocks (it runs the docker CLI); inside a test with code running on the reactor, call
it through ``threads.deferToThread``.

The ``memory_*`` helpers make the same images in the in-memory engine: the same ``CMD``, labels
and ``HEALTHCHECK`` (``--interval=1s --timeout=2s --retries=2``), and a
:class:`~deployer.testing.memory_health.Behaviour` that does what the image's scripts do (a check
that passes from the first probe, one that never passes, a container that exits).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from deployer.testing.memory_health import Behaviour, Healthcheck
from tests.stack.docker_stack import Dockerd, Rootfs, build_image

if TYPE_CHECKING:
    from deployer.testing.memory_state import EngineState

HEALTHY_TEST = "test -f /tmp/healthy"
"""A check that passes once run.sh has started."""
FAILING_TEST = "test -f /tmp/never"
"""A check that never passes."""


def healthcheck(test: str, interval: str = "1s", timeout: str = "2s", retries: int = 2,
                start_period: str | None = None) -> str:
    """A ``HEALTHCHECK`` instruction for ``--change``; the defaults judge within a few
    seconds: healthy after the first passing check (~1 s), unhealthy after ``retries``."""
    period = f" --start-period={start_period}" if start_period else ""
    return (f"HEALTHCHECK --interval={interval} --timeout={timeout} --retries={retries}{period}"
            f" CMD {test}")


def build_health_image(dockerd: Dockerd, ref: str, version: str, test: str = HEALTHY_TEST,
                       rootfs: Rootfs | None = None, changes: Sequence[str] = ()) -> str:
    """``ref`` with a HEALTHCHECK running ``test``; its image id."""
    return build_image(dockerd, ref, version, rootfs, [healthcheck(test), *changes])


def build_dying_image(dockerd: Dockerd, ref: str, version: str, after: float = 1.0,
                      code: int = 3, rootfs: Rootfs | None = None) -> str:
    """``ref`` whose container exits with ``code`` ``after`` seconds; its image id."""
    cmd = f'CMD ["/bin/sh","-c","sleep {after:g}; exit {code}"]'
    return build_image(dockerd, ref, version, rootfs, [cmd])


def image_healthcheck(dockerd: Dockerd, ref: str) -> list[str] | None:
    """The ``Test`` of ``ref``'s HEALTHCHECK as the engine stored it, seen without the client."""
    out = dockerd.cli("image", "inspect", "--format", "{{json .Config.Healthcheck}}", ref)
    found = json.loads(out)
    return None if found is None else list(found.get("Test") or [])


# -- the same images in the in-memory engine ------------------------------------------------------


def memory_healthcheck(test: str = HEALTHY_TEST) -> Healthcheck:
    """What :func:`healthcheck` stores for ``test`` (with its defaults)."""
    return Healthcheck.shell(test, interval=1.0, timeout=2.0, retries=2)


def memory_image(engine: EngineState, ref: str, version: str) -> str:
    """:func:`build_image` in the in-memory engine; its image id."""
    return engine.add_image([ref], labels={"version": version})


def memory_health_image(engine: EngineState, ref: str, version: str,
                        test: str = HEALTHY_TEST) -> str:
    """:func:`build_health_image` in the in-memory engine: ``HEALTHY_TEST`` passes from the
    first probe, ``FAILING_TEST`` never; its image id."""
    if test not in (HEALTHY_TEST, FAILING_TEST):
        raise ValueError(f"no in-memory behaviour for the health check {test!r}")
    behaviour = Behaviour() if test == HEALTHY_TEST else Behaviour.never_healthy()
    return engine.add_image([ref], labels={"version": version},
                            healthcheck=memory_healthcheck(test), behaviour=behaviour)


def memory_dying_image(engine: EngineState, ref: str, version: str, after: float = 1.0,
                       code: int = 3) -> str:
    """:func:`build_dying_image` in the in-memory engine; its image id."""
    return engine.add_image(
        [ref], labels={"version": version}, behaviour=Behaviour.dies(after, code),
        config={"Cmd": ["/bin/sh", "-c", f"sleep {after:g}; exit {code}"]},
    )


__all__ = [
    "FAILING_TEST", "HEALTHY_TEST", "build_dying_image", "build_health_image", "healthcheck",
    "image_healthcheck", "memory_dying_image", "memory_health_image", "memory_healthcheck",
    "memory_image",
]
