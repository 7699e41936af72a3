"""Value objects shared by every part of the daemon."""

from __future__ import annotations

import attrs

from deployer.reference import Reference


@attrs.frozen
class Update:
    """One accepted notice that a repository has a new build, whatever its source.

    ``repository`` is the path without the registry host (``myorg/foo``); ``registry`` the host
    (``127.0.0.1:5000``) or None for Docker Hub; ``tag`` None means every local tag of the
    repository; ``repository == "*"`` means every local image (the safety re-pull).
    """

    repository: str
    source: str
    received: float
    registry: str | None = None
    tag: str | None = None
    digest: str | None = None
    event_id: str | None = None

    @classmethod
    def from_reference(
        cls, ref: Reference, source: str, received: float, event_id: str | None = None
    ) -> Update:
        return cls(
            repository=ref.path,
            registry=ref.host,
            tag=ref.tag,
            digest=ref.digest,
            source=source,
            received=received,
            event_id=event_id,
        )

    @property
    def name(self) -> str:
        """``[registry/]repository``, the familiar name the engine lists."""
        return f"{self.registry}/{self.repository}" if self.registry else self.repository

    @property
    def pattern(self) -> str:
        """The repo pattern of the Go original: ``*``, ``repo`` or ``repo:tag``."""
        if self.repository == "*":
            return "*"
        return f"{self.name}:{self.tag}" if self.tag else self.name

    def describe(self) -> str:
        out = self.pattern
        if self.digest:
            out += "@" + self.digest
        return f"{out} (from {self.source})"
