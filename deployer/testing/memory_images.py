"""Images of the in-memory Docker engine: a local image (:class:`ImageState`) and what the pretend
registry holds for a tag (:class:`RemoteImage`). Both carry the image's configuration (``CMD``,
``ENV``, ``HEALTHCHECK``...) and the :class:`~deployer.testing.memory_health.Behaviour` of its
containers, so that a pull brings them along."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from deployer.testing.memory_common import (
    ENGINE_VERSION,
    IMAGE_SIZE,
    digest_of,
    timestamp,
)
from deployer.testing.memory_health import STEADY, Behaviour, Healthcheck

#: The ``CMD`` of the test images (tests/stack/docker_stack.py builds them the same way).
DEFAULT_CMD = ("/bin/sh", "/app/run.sh")

#: Config keys an image may set, in the order the engine shows them.
_CONFIG_ORDER = (
    "Hostname", "Domainname", "User", "AttachStdin", "AttachStdout", "AttachStderr",
    "ExposedPorts", "Tty", "OpenStdin", "StdinOnce", "Env", "Cmd", "Healthcheck", "ArgsEscaped",
    "Image", "Volumes", "WorkingDir", "Entrypoint", "NetworkDisabled", "MacAddress", "OnBuild",
    "Labels", "StopSignal", "StopTimeout", "Shell",
)
#: Keys the engine shows only when set.
_OPTIONAL = frozenset({"ExposedPorts", "Healthcheck", "ArgsEscaped", "NetworkDisabled",
                       "MacAddress", "StopSignal", "StopTimeout", "Shell"})
_EMPTY_CONFIG: Mapping[str, Any] = {
    "Hostname": "", "Domainname": "", "User": "", "AttachStdin": False, "AttachStdout": False,
    "AttachStderr": False, "Tty": False, "OpenStdin": False, "StdinOnce": False, "Env": None,
    "Cmd": None, "Image": "", "Volumes": None, "WorkingDir": "", "Entrypoint": None,
    "OnBuild": None, "Labels": None,
}


def ordered_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` with every key the engine always shows, in its order; others after."""
    out = {k: config.get(k, _EMPTY_CONFIG.get(k)) for k in _CONFIG_ORDER
           if k not in _OPTIONAL or config.get(k) is not None}
    out.update({k: v for k, v in config.items() if k not in out})
    return out


def image_config(labels: Mapping[str, str], healthcheck: Healthcheck | None,
                 config: Mapping[str, Any] | None) -> dict[str, Any]:
    """An image's ``Config``: the test images' ``CMD``, ``labels``, ``healthcheck``, then
    whatever ``config`` sets (``Env``, ``Entrypoint``, ``WorkingDir``, ``ExposedPorts``...)."""
    out: dict[str, Any] = {"Cmd": list(DEFAULT_CMD), "Labels": dict(labels) or None}
    if healthcheck is not None:
        out["Healthcheck"] = healthcheck.to_json()
    out.update(config or {})
    return ordered_config(out)


@attrs.define(eq=False)
class ImageState:
    """A local image. ``tags`` are ``repo:tag``, ``digests`` ``repo@sha256:…``, both familiar.
    ``config`` holds what the image sets besides labels and health check (see
    :func:`image_config`); ``behaviour``: how its containers run."""

    id: str
    created: float
    labels: dict[str, str] = attrs.field(factory=dict)
    tags: list[str] = attrs.field(factory=list)
    digests: list[str] = attrs.field(factory=list)
    healthcheck: Healthcheck | None = None
    behaviour: Behaviour = STEADY
    config: dict[str, Any] = attrs.field(factory=dict)

    def full_config(self) -> dict[str, Any]:
        return image_config(self.labels, self.healthcheck, self.config)

    def summary(self) -> dict[str, Any]:
        tags: list[str] | None = list(self.tags) or None
        digests: list[str] | None = list(self.digests) or None
        if tags is None and digests is None:
            tags, digests = ["<none>:<none>"], ["<none>@<none>"]
        return {
            "Containers": -1, "Created": int(self.created), "Id": self.id,
            "Labels": dict(self.labels) or None, "ParentId": "", "RepoDigests": digests,
            "RepoTags": tags, "SharedSize": -1, "Size": IMAGE_SIZE, "VirtualSize": IMAGE_SIZE,
        }

    def inspect(self) -> dict[str, Any]:
        return {
            "Id": self.id, "RepoTags": list(self.tags), "RepoDigests": list(self.digests),
            "Parent": "", "Comment": "Imported from -", "Created": timestamp(self.created),
            "Container": "", "ContainerConfig": ordered_config({}),
            "DockerVersion": ENGINE_VERSION, "Author": "", "Config": self.full_config(),
            "Architecture": "amd64", "Os": "linux", "Size": IMAGE_SIZE,
            "VirtualSize": IMAGE_SIZE, "GraphDriver": {"Data": None, "Name": "memory"},
            "RootFS": {"Type": "layers", "Layers": [digest_of("layer", self.id)]},
            "Metadata": {"LastTagTime": "0001-01-01T00:00:00Z"},
        }


@attrs.frozen
class RemoteImage:
    """What the pretend registry holds for a repo:tag."""

    image_id: str
    digest: str
    labels: Mapping[str, str] = attrs.field(factory=dict)
    healthcheck: Healthcheck | None = None
    behaviour: Behaviour = STEADY
    config: Mapping[str, Any] = attrs.field(factory=dict)


__all__ = ["DEFAULT_CMD", "ImageState", "RemoteImage", "image_config", "ordered_config"]
