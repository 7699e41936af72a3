"""The pretend registry of the in-memory Docker engine and the test knobs on pulls: what a tag
holds (:meth:`RegistryState.publish`), every build it was ever given (pulled by digest), pulls
that fail or hang, and the record of every pull.

A pull is named ``repo:tag``, or ``repo@sha256:…`` for a pull by digest; the knobs take either."""

from __future__ import annotations

import base64
import binascii
import json
import secrets
from collections.abc import Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from deployer.reference import split
from deployer.testing.memory_common import digest_of, normalize
from deployer.testing.memory_health import Behaviour, Healthcheck
from deployer.testing.memory_images import ImageState, RemoteImage

log = Logger()


@attrs.frozen
class PullRecord:
    """One ``POST /images/create``: the ``repo:tag`` (or ``repo@sha256:…``) asked for and the
    ``X-Registry-Auth`` header."""

    repotag: str
    auth: str | None

    def auth_config(self) -> dict[str, Any] | None:
        """The header decoded (base64url JSON), or None without a header."""
        if self.auth is None:
            return None
        padded = self.auth + "=" * (-len(self.auth) % 4)
        try:
            decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(padded))
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"X-Registry-Auth is not base64url JSON: {self.auth!r}") from e
        return decoded


@attrs.define
class PullFailure:
    """How pulls of a repo:tag fail (see :meth:`RegistryState.fail_pull`)."""

    message: str
    status: int | None
    once: bool


class Gate:
    """Pulls held until a test's Deferred fires; its outcome goes to every one of them.
    ``answer``: whether a held pull has answered (headers and its first line) meanwhile."""

    def __init__(self, answer: bool = True) -> None:
        self.answer = answer
        self._waiters: list[Deferred[None]] = []

    def wait(self) -> Deferred[None]:
        """Fires when the gate opens; cancelling it (the client went away) leaves the gate."""

        def leave(waiter: Deferred[None]) -> None:
            if waiter in self._waiters:
                self._waiters.remove(waiter)

        waiter: Deferred[None] = Deferred(leave)
        self._waiters.append(waiter)
        return waiter

    def open(self, result: object) -> None:
        waiters, self._waiters = self._waiters, []
        if isinstance(result, Failure) and not waiters:
            log.failure("MemoryDocker: slow_pull released with an error, no pull waiting",
                        result)
        for waiter in waiters:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(None)


class RegistryState:
    """The pretend registry (:attr:`remote`) and how pulls from it go."""

    images: dict[str, ImageState]

    def __init__(self) -> None:
        #: What each ``repo:tag`` holds now.
        self.remote: dict[str, RemoteImage] = {}
        #: Every build the registry was ever given, by ``repo@sha256:…`` (a registry keeps a
        #: manifest when its tag moves on).
        self.builds: dict[str, RemoteImage] = {}
        #: Every pull asked for, with its auth header.
        self.pulls: list[PullRecord] = []
        #: Pulls whose client went away before they ended (e.g. gave up on a held pull).
        self.pulls_abandoned: list[str] = []
        self._failures: dict[str, PullFailure] = {}
        self._slow: dict[str, Gate] = {}

    def publish(
        self, repotag: str, image_id: str | None = None,
        labels: Mapping[str, str] | None = None, digest: str | None = None, *,
        healthcheck: Healthcheck | None = None, behaviour: Behaviour | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> str:
        """Make the registry hold an image under ``repotag`` (a new one unless ``image_id``);
        returns its id. The local engine sees it only after a pull. The manifest digest is
        derived from the id unless given. ``healthcheck``, ``behaviour`` and ``config`` (image
        ``Config`` fields: ``Env``, ``Entrypoint``...) go with the image; an image known
        locally keeps its own unless given."""
        repotag = normalize(repotag)
        image_id = image_id or "sha256:" + secrets.token_hex(32)
        local = self.images.get(image_id)
        if local is not None:
            labels = local.labels if labels is None else labels
            healthcheck = local.healthcheck if healthcheck is None else healthcheck
            behaviour = local.behaviour if behaviour is None else behaviour
            config = local.config if config is None else config
        remote = RemoteImage(
            image_id=image_id, digest=digest or digest_of("manifest", image_id),
            labels=dict(labels or {}), healthcheck=healthcheck,
            behaviour=behaviour or Behaviour(), config=dict(config or {}),
        )
        self.remote[repotag] = remote
        self.builds[f"{split(repotag)[0]}@{remote.digest}"] = remote
        return image_id

    def registry_digest(self, repotag: str) -> str:
        """The manifest digest of what the registry holds under ``repotag`` now."""
        return self.remote[normalize(repotag)].digest

    def unpublish(self, repotag: str) -> None:
        """The registry no longer has the tag (its builds stay pullable by digest)."""
        self.remote.pop(normalize(repotag), None)

    def fail_pull(
        self, repotag: str, message: str | None = None, *, status: int | None = None,
        once: bool = False,
    ) -> None:
        """Make pulls of ``repotag`` fail. ``status`` None: the engine answers 200 and the error
        comes as a line of the stream (as for a broken blob); else it answers ``status`` with
        ``{"message": …}`` (404 is what an unknown tag gives). ``once``: only the next pull."""
        if message is None:
            message = (
                f"manifest for {normalize(repotag)} not found: manifest unknown: manifest unknown"
                if status == 404 else "unknown blob"
            )
        self._failures[normalize(repotag)] = PullFailure(message, status, once)

    def clear_pull_failure(self, repotag: str) -> None:
        self._failures.pop(normalize(repotag), None)

    def slow_pull(
        self, repotag: str, release: Deferred[None] | None = None, *, answer: bool = True
    ) -> None:
        """Pulls of ``repotag`` answer 200, send their first line, and end only when ``release``
        fires (never, without one); an errback becomes the error line of every waiting pull.
        Pulls started after it fired are quick. ``answer=False``: a registry that hangs on the
        manifest request, where the engine sends nothing, not even response headers, until
        ``release``. A held pull whose client goes away is dropped (see
        :attr:`pulls_abandoned`)."""
        repotag = normalize(repotag)
        gate = Gate(answer)
        self._slow[repotag] = gate
        if release is None:
            return

        def opened(result: object) -> None:
            if self._slow.get(repotag) is gate:
                del self._slow[repotag]
            gate.open(result)

        release.addBoth(opened)

    def clear_slow_pull(self, repotag: str) -> None:
        """Pulls of ``repotag`` started from now on are quick (held ones stay held)."""
        self._slow.pop(normalize(repotag), None)

    def auth_headers(self, repotag: str) -> list[str | None]:
        """The ``X-Registry-Auth`` header of each pull of ``repotag`` so far."""
        repotag = normalize(repotag)
        return [p.auth for p in self.pulls if p.repotag == repotag]

    # -- for the pull endpoint ------------------------------------------------------------------

    def build_for(self, ref: str) -> RemoteImage | None:
        """What a pull of ``ref`` (``repo:tag`` or ``repo@sha256:…``) brings, or None."""
        return self.builds.get(ref) if "@" in ref else self.remote.get(ref)

    def pull_failure(self, repotag: str, *, before_stream: bool) -> PullFailure | None:
        """How a pull of ``repotag`` fails now (None: it does not); a ``once`` failure is used
        up. ``before_stream``: only failures that answer with a status."""
        failure = self._failures.get(repotag)
        if failure is None or (before_stream and failure.status is None):
            return None
        if failure.once:
            del self._failures[repotag]
        return failure

    def has_failure(self, repotag: str) -> bool:
        return repotag in self._failures

    def gate(self, repotag: str) -> Gate | None:
        return self._slow.get(repotag)


__all__ = ["Gate", "PullFailure", "PullRecord", "RegistryState"]
