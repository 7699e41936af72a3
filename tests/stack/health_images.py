"""Test images with a HEALTHCHECK, or that die, built without the internet.

They are the busybox images of :func:`tests.stack.docker_stack.build_image` (``docker import``
of a rootfs whose ``/app/run.sh`` touches ``/tmp/healthy`` and then runs until SIGTERM), with
more ``--change`` instructions: the engine's import takes ``HEALTHCHECK`` as it takes ``CMD``
(checked on dockerd 20.10), so no ``docker build`` and no base image are needed.

Each helper blocks (it runs the docker CLI); inside a test with code running on the reactor, call
it through ``threads.deferToThread``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from tests.stack.docker_stack import Dockerd, Rootfs, build_image

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


__all__ = [
    "FAILING_TEST", "HEALTHY_TEST", "build_dying_image", "build_health_image", "healthcheck",
    "image_healthcheck",
]
