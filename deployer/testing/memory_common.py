"""What every part of the in-memory Docker engine shares: its error answer, its timestamps and
made-up digests, and the engine's way of writing names and durations."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime

from deployer.reference import InvalidReference, parse_reference

ENGINE_VERSION = "20.10.24-memory"
IMAGE_SIZE = 1982378
NANOS = 10**9
ZERO_TIME = "0001-01-01T00:00:00Z"

#: dockerd's ``validContainerNamePattern``.
CONTAINER_NAME = re.compile(r"^/?[a-zA-Z0-9][a-zA-Z0-9_.-]+$")


class ApiError(Exception):
    """An error answer: ``{"message": …}`` with ``status`` (plain text when ``plain``)."""

    def __init__(self, status: int, message: str, plain: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.plain = plain


def digest_of(*parts: str) -> str:
    """A made-up ``sha256:`` digest, the same for the same parts."""
    return "sha256:" + hashlib.sha256(" ".join(parts).encode()).hexdigest()


def timestamp(seconds: float) -> str:
    """``seconds`` since the epoch as the engine writes times (RFC 3339, nanoseconds, UTC)."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")


def normalize(ref: str) -> str:
    """``ref`` as the engine names it: familiar ``[host/]path:tag``, tag ``latest`` by default;
    with a digest, ``[host/]path[:tag]@sha256:…`` (no default tag). Raises
    :class:`~deployer.reference.InvalidReference`."""
    parsed = parse_reference(ref)
    if parsed.digest is not None:
        tag = f":{parsed.tag}" if parsed.tag else ""
        return f"{parsed.name}{tag}@{parsed.digest}"
    return f"{parsed.name}:{parsed.tag or 'latest'}"


def shown_name(ref: str) -> str:
    """``ref`` as an error message of the engine shows it: normalized, or as given when it is
    not a reference at all."""
    try:
        return normalize(ref)
    except InvalidReference:
        return ref


def human_duration(seconds: float) -> str:
    """The docker CLI's ``units.HumanDuration``: ``Less than a second``, ``5 seconds``,
    ``About a minute``..."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = int(seconds / 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = int(seconds / 3600 + 0.5)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{hours // 24 // 365} years"


def check_container_name(name: str, prefix: str = "") -> str:
    """``name`` without its leading slash; :class:`ApiError` 400 if dockerd refuses it."""
    if not CONTAINER_NAME.match(name):
        raise ApiError(400, f"{prefix}Invalid container name ({name}), only"
                            " [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed")
    return name.removeprefix("/")


def name_conflict(name: str, holder: str, prefix: str = "") -> ApiError:
    return ApiError(409, f'{prefix}Conflict. The container name "/{name}" is already in use by'
                         f' container "{holder}". You have to remove (or rename) that container'
                         " to be able to reuse that name.")


__all__ = [
    "CONTAINER_NAME", "ENGINE_VERSION", "IMAGE_SIZE", "NANOS", "ZERO_TIME", "ApiError",
    "check_container_name", "digest_of", "human_duration", "name_conflict", "normalize",
    "timestamp",
]
