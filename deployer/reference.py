"""Docker image references: the grammar, parsing, and matching of local repo:tags.

The grammar is Docker's own (distribution/reference): a name is an optional registry host and
one or more lower-case path components; a tag is at most 128 word characters, dots and dashes;
a digest is ``algorithm:hex``. Names on Docker Hub are compared in their familiar form
(``docker.io/library/busybox`` is ``busybox``), which is how the engine lists them.
"""

from __future__ import annotations

import re

import attrs

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_PATH = rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"

DOMAIN_RE = re.compile(rf"^{_DOMAIN}\Z")
PATH_RE = re.compile(rf"^{_PATH}\Z")
TAG_RE = re.compile(r"^[\w][\w.-]{0,127}\Z", re.ASCII)
DIGEST_RE = re.compile(
    r"^[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}\Z"
)
NAME_TOTAL_LENGTH_MAX = 255

DOCKER_HUB_HOSTS = frozenset({"docker.io", "index.docker.io", "registry-1.docker.io"})


class InvalidReference(ValueError):
    """A string that Docker's reference grammar rejects; the message says why."""


@attrs.frozen
class Reference:
    """A parsed image reference. ``host`` is None for Docker Hub."""

    host: str | None
    path: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """The familiar name, as the engine lists it: ``[host/]path``."""
        return f"{self.host}/{self.path}" if self.host else self.path

    @property
    def pattern(self) -> str:
        """``name:tag`` when a tag is known, else ``name`` (every tag)."""
        return f"{self.name}:{self.tag}" if self.tag else self.name

    def __str__(self) -> str:
        out = self.pattern
        if self.digest:
            out += "@" + self.digest
        return out


def split(text: str) -> tuple[str, str | None, str | None]:
    """``[host/]path[:tag][@digest]`` cut into ``(name, tag, digest)``, nothing checked: the one
    place that knows where a tag and a digest start. A colon is a tag's only after the last
    ``/`` (``host:5000/path`` has a port, not a tag); tag and digest are None when absent."""
    rest, at, digest = text.partition("@")
    slash, colon = rest.rfind("/"), rest.rfind(":")
    name, tag = (rest[:colon], rest[colon + 1:]) if colon > slash else (rest, None)
    return name, tag, digest if at else None


def _split_host(name: str) -> tuple[str | None, str]:
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost" or first != first.lower()):
        return first, rest
    return None, name


def _familiar_name(host: str | None, path: str) -> tuple[str | None, str]:
    """Docker Hub's long forms (``docker.io/library/busybox``) in their familiar form."""
    if host in DOCKER_HUB_HOSTS:
        host = None
    if host is None and path.startswith("library/") and path.count("/") == 1:
        path = path[len("library/"):]
    return host, path


def parse_name(name: str) -> tuple[str | None, str]:
    """Split and check a repository name; returns ``(host, path)`` in familiar form."""
    if not name:
        raise InvalidReference("repository name is empty")
    if len(name) > NAME_TOTAL_LENGTH_MAX:
        raise InvalidReference(f"repository name is longer than {NAME_TOTAL_LENGTH_MAX} characters")
    host, path = _split_host(name)
    if host is not None and not DOMAIN_RE.match(host):
        raise InvalidReference(f"invalid registry host {host!r}")
    if not PATH_RE.match(path):
        raise InvalidReference(
            f"invalid repository name {name!r}: path components must be lower-case letters and"
            " digits, separated by '.', '_', '__' or dashes"
        )
    return _familiar_name(host, path)


def check_tag(tag: str) -> str:
    if not TAG_RE.match(tag):
        raise InvalidReference(
            f"invalid tag {tag!r}: at most 128 letters, digits, '_', '.' and '-', not starting"
            " with '.' or '-'"
        )
    return tag


def check_digest(digest: str) -> str:
    if not DIGEST_RE.match(digest):
        raise InvalidReference(f"invalid digest {digest!r}: expected algorithm:hex")
    return digest


def parse_reference(text: str) -> Reference:
    """Parse ``[host/]path[:tag][@digest]``."""
    name, tag, digest = split(text)
    host, path = parse_name(name)
    return Reference(
        host=host,
        path=path,
        tag=check_tag(tag) if tag is not None else None,
        digest=check_digest(digest) if digest else None,
    )


def familiar(repotag: str) -> str:
    """A local ``repo:tag`` in the familiar form that patterns are written in."""
    name, tag, digest = split(repotag)
    host, path = _familiar_name(*_split_host(name))
    name = f"{host}/{path}" if host else path
    return name + (f":{tag}" if tag is not None else "") + (f"@{digest}" if digest else "")


def with_tag(name: str) -> str:
    """An image name as a familiar ``repo:tag``: ``latest`` when it names neither a tag nor a
    digest (what ``docker run NAME`` means)."""
    _, tag, digest = split(name)
    return familiar(name if tag is not None or digest is not None else f"{name}:latest")


def matches(pattern: str, repotag: str) -> bool:
    """The Go original's three forms: ``*`` every repo:tag, ``repo`` every tag of repo,
    ``repo:tag`` exactly that one. ``<none>:<none>`` never matches."""
    if repotag in ("<none>:<none>", "") or repotag.startswith("<none>"):
        return False
    if pattern == "*":
        return True
    pattern = familiar(pattern)
    repotag = familiar(repotag)
    _, tag, digest = split(pattern)
    if tag is not None or digest is not None:
        return repotag == pattern
    return repotag.startswith(pattern + ":")


def registry_host(repotag: str) -> str | None:
    """The registry host of a local repo:tag; None for Docker Hub."""
    host, _ = _split_host(familiar(repotag))
    return host
