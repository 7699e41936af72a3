"""Value objects shared by every part of the daemon."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs

from deployer.reference import InvalidReference, Reference, check_digest, parse_reference

EVERY_IMAGE = "*"
"""The repository of an update that asks for every local image (the safety re-pull)."""


@attrs.frozen(init=False)
class Update:
    """One accepted notice that a repository has a new build, whatever its source.

    ``ref`` names what was pushed: its ``path`` is the repository without the registry host
    (``myorg/foo``), ``host`` the registry (``127.0.0.1:5000``) or None for Docker Hub; a ``tag``
    of None means every local tag of the repository; the path ``*`` means every local image (the
    safety re-pull). ``repository``, ``registry``, ``tag`` and ``digest`` read through to it.
    """

    ref: Reference
    source: str
    received: float
    event_id: str | None = None

    def __init__(
        self,
        repository: str,
        source: str,
        received: float,
        registry: str | None = None,
        tag: str | None = None,
        digest: str | None = None,
        event_id: str | None = None,
    ) -> None:
        self.__attrs_init__(
            Reference(host=registry, path=repository, tag=tag, digest=digest),
            source,
            received,
            event_id,
        )

    @classmethod
    def from_reference(
        cls, ref: Reference, source: str, received: float, event_id: str | None = None
    ) -> Update:
        return cls(ref.path, source, received, ref.host, ref.tag, ref.digest, event_id)

    @property
    def repository(self) -> str:
        return self.ref.path

    @property
    def registry(self) -> str | None:
        return self.ref.host

    @property
    def tag(self) -> str | None:
        return self.ref.tag

    @property
    def digest(self) -> str | None:
        return self.ref.digest

    @property
    def name(self) -> str:
        """``[registry/]repository``, the familiar name the engine lists."""
        return self.ref.name

    @property
    def pattern(self) -> str:
        """The repo pattern of the Go original: ``*``, ``repo`` or ``repo:tag``."""
        if self.repository == EVERY_IMAGE:
            return EVERY_IMAGE
        return self.ref.pattern

    def evolve(self, **changes: Any) -> Update:
        """A copy with some of the constructor's fields changed."""
        fields: dict[str, Any] = {
            "repository": self.repository,
            "source": self.source,
            "received": self.received,
            "registry": self.registry,
            "tag": self.tag,
            "digest": self.digest,
            "event_id": self.event_id,
        }
        fields.update(changes)
        return Update(**fields)

    def describe(self) -> str:
        out = self.pattern
        if self.digest:
            out += "@" + self.digest
        return f"{out} (from {self.source})"

    def to_json(self) -> dict[str, Any]:
        """The update as JSON: what etcd values hold and webhook answers list."""
        return {
            "repository": self.repository,
            "registry": self.registry,
            "tag": self.tag,
            "digest": self.digest,
            "source": self.source,
            "received": self.received,
            "event_id": self.event_id,
        }

    @classmethod
    def from_json(cls, obj: object) -> Update:
        """The update that :meth:`to_json` wrote; :class:`ValueError` says what is wrong."""
        if not isinstance(obj, Mapping):
            raise ValueError("an update is a JSON object")
        repository, registry, tag = obj.get("repository"), obj.get("registry"), obj.get("tag")
        source, received = obj.get("source"), obj.get("received")
        digest, event_id = obj.get("digest"), obj.get("event_id")
        if not isinstance(repository, str) or not repository:
            raise ValueError("repository must be a non-empty string")
        for name, value in (("registry", registry), ("tag", tag), ("digest", digest),
                            ("event_id", event_id)):
            if not (value is None or isinstance(value, str)):
                raise ValueError(f"{name} must be a string or null")
        if not isinstance(source, str) or not source:
            raise ValueError("source must be a non-empty string")
        if not isinstance(received, int | float) or isinstance(received, bool):
            raise ValueError("received must be a number")
        try:
            seconds = float(received)
        except OverflowError:
            raise ValueError("received is out of range") from None
        if not math.isfinite(seconds):
            raise ValueError("received must be finite")
        if repository != EVERY_IMAGE:
            name = f"{registry}/{repository}" if registry else repository
            try:
                parsed = parse_reference(name + (f":{tag}" if tag else ""))
            except InvalidReference as e:
                raise ValueError(str(e)) from None
            if (parsed.host, parsed.path) != (registry, repository):
                raise ValueError(f"{name!r} is not in its familiar form")
        if digest is not None:
            try:
                check_digest(digest)
            except InvalidReference as e:
                raise ValueError(str(e)) from None
        return cls(repository, source, seconds, registry, tag, digest, event_id)
