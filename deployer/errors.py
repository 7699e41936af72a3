"""The error types of deployer. Each layer raises its own; the web layer maps them to responses
in one place (:mod:`deployer.webhook`)."""

from __future__ import annotations


class DeployerError(Exception):
    """Base of every error that deployer raises on purpose."""


class ConfigError(DeployerError):
    """The configuration cannot be used; the message says how to fix it."""


class DockerError(DeployerError):
    """The Docker engine answered with an error.

    ``status`` is the HTTP status (0 when there was no HTTP answer), ``message`` the engine's own
    words.
    """

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.status = status

    def __str__(self) -> str:
        return f"{self.message} (HTTP {self.status})" if self.status else self.message


class DockerUnavailable(DockerError):
    """The Docker engine could not be reached at all."""


class NotFound(DockerError):
    """The engine does not know the object asked for (HTTP 404)."""


class ImageNotFound(NotFound):
    """The engine does not know the image asked for."""


class ContainerNotFound(NotFound):
    """The engine does not know the container asked for."""


class PullFailed(DockerError):
    """A pull ended in an error, possibly after the engine had answered 200."""


class CredentialHelperError(DeployerError):
    """A docker credential helper could not be run, failed, or answered with something that is
    not credentials. The message never holds what the helper wrote on its stdout."""


class PullStalled(PullFailed):
    """A pull given up on because it made no progress for its stall timeout (a registry that
    hangs): a failed pull like any other, but worth counting apart."""


class TimedOut(DeployerError, TimeoutError):
    """Work that was given up on after its time limit (see :mod:`deployer.timeouts`). It is a
    ``TimeoutError`` too, so code that expects the builtin keeps working."""


class EtcdError(DeployerError):
    """Base of etcd's errors."""


class EtcdUnavailable(EtcdError):
    """No etcd member answered in time."""


class EtcdHTTPError(EtcdError):
    """An etcd member answered a request with an HTTP error; ``code`` is etcd's (gRPC) code,
    ``status`` the HTTP status."""

    def __init__(self, url: str, status: int, code: int | None, message: str) -> None:
        super().__init__(f"{url} answered HTTP {status}: {message}")
        self.url = url
        self.status = status
        self.code = code
        self.message = message

    @property
    def member_failed(self) -> bool:
        """True when the member itself is at fault (5xx), not the request (4xx)."""
        return self.status >= 500


class WatchCanceled(EtcdError):
    """etcd ended a watch, or sent an error on the watch stream."""


class Compacted(EtcdError):
    """The revision a watch asked for was compacted away."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (compact_revision {compact_revision})")
        self.compact_revision = compact_revision


class BadWebhook(DeployerError):
    """A webhook request that is refused; ``code`` is the HTTP status to answer with."""

    def __init__(self, reason: str, code: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.code = code


class Unauthorized(BadWebhook):
    """A webhook request without valid credentials."""

    def __init__(self, reason: str = "missing or invalid token") -> None:
        super().__init__(reason, 401)
