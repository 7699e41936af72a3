"""The state of the in-memory Docker engine: local images and containers, and the pretend
registry they are pulled from. :class:`deployer.testing.memory_docker.MemoryDocker` serves it
over the Engine API; a test reads and steers it directly (publish, run, fail a pull, ...).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from deployer.reference import InvalidReference, parse_reference

log = Logger()

ENGINE_VERSION = "20.10.24-memory"
IMAGE_SIZE = 1982378

_FULL_ID = re.compile(r"^(?:sha256:)?([0-9a-f]{64})$")
_HEX = re.compile(r"^[0-9a-f]+$")


def digest_of(*parts: str) -> str:
    """A made-up ``sha256:`` digest, the same for the same parts."""
    return "sha256:" + hashlib.sha256(" ".join(parts).encode()).hexdigest()


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")


def normalize(ref: str) -> str:
    """``ref`` as the engine names it: familiar ``[host/]path:tag``, tag ``latest`` by default.
    Raises :class:`InvalidReference`."""
    parsed = parse_reference(ref)
    return f"{parsed.name}:{parsed.tag or 'latest'}"


@attrs.define(eq=False)
class ImageState:
    """A local image. ``tags`` are ``repo:tag``, ``digests`` ``repo@sha256:…``, both familiar."""

    id: str
    created: float
    labels: dict[str, str] = attrs.field(factory=dict)
    tags: list[str] = attrs.field(factory=list)
    digests: list[str] = attrs.field(factory=list)

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
        config = {
            "Hostname": "", "Domainname": "", "User": "", "Env": None, "Image": "",
            "Cmd": ["/bin/sh", "/app/run.sh"], "Entrypoint": None, "WorkingDir": "",
            "Labels": dict(self.labels) or None, "Volumes": None, "OnBuild": None,
        }
        return {
            "Id": self.id, "RepoTags": list(self.tags), "RepoDigests": list(self.digests),
            "Parent": "", "Comment": "Imported from -", "Created": _timestamp(self.created),
            "Container": "", "ContainerConfig": config, "DockerVersion": ENGINE_VERSION,
            "Author": "", "Config": config, "Architecture": "amd64", "Os": "linux",
            "Size": IMAGE_SIZE, "VirtualSize": IMAGE_SIZE,
            "GraphDriver": {"Data": None, "Name": "memory"},
            "RootFS": {"Type": "layers", "Layers": [digest_of("layer", self.id)]},
            "Metadata": {"LastTagTime": "0001-01-01T00:00:00Z"},
        }


@attrs.define(eq=False)
class ContainerState:
    """A container. ``image_ref`` is what it was started with (``Config.Image``)."""

    id: str
    name: str
    image_ref: str
    image_id: str
    created: float
    labels: dict[str, str] = attrs.field(factory=dict)
    running: bool = True
    exit_code: int = 0
    finished: float | None = None

    def inspect(self) -> dict[str, Any]:
        state = {
            "Status": "running" if self.running else "exited", "Running": self.running,
            "Paused": False, "Restarting": False, "OOMKilled": False, "Dead": False,
            "Pid": (int(self.id[:4], 16) + 1) if self.running else 0,
            "ExitCode": self.exit_code, "Error": "", "StartedAt": _timestamp(self.created),
            "FinishedAt": _timestamp(self.finished) if self.finished is not None
            else "0001-01-01T00:00:00Z",
        }
        return {
            "Id": self.id, "Created": _timestamp(self.created), "Path": "/bin/sh",
            "Args": ["/app/run.sh"], "State": state, "Image": self.image_id,
            "Name": "/" + self.name, "RestartCount": 0, "Driver": "memory", "Platform": "linux",
            "HostConfig": {"NetworkMode": "default", "RestartPolicy": {"Name": "no"}},
            "Config": {
                "Hostname": self.id[:12], "Image": self.image_ref, "Labels": dict(self.labels),
                "Cmd": ["/bin/sh", "/app/run.sh"], "Env": None, "Entrypoint": None,
            },
            "Mounts": [], "NetworkSettings": {"Networks": {}},
        }


@attrs.frozen
class RemoteImage:
    """What the pretend registry holds for a repo:tag."""

    image_id: str
    digest: str
    labels: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class PullRecord:
    """One ``POST /images/create``: the repo:tag asked for and the ``X-Registry-Auth`` header."""

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
    """How pulls of a repo:tag fail (see :meth:`EngineState.fail_pull`)."""

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


class EngineState:
    """Local images and containers, the pretend registry, and the test knobs on pulls.
    ``clock`` (optional) gives creation times; without it a counter does, so that the newest
    object always sorts first."""

    def __init__(self, clock: IReactorTime | None = None) -> None:
        self.clock = clock
        self._ticks = itertools.count(1_700_000_000)
        self.images: dict[str, ImageState] = {}
        self.containers: dict[str, ContainerState] = {}
        self.remote: dict[str, RemoteImage] = {}
        #: Every pull asked for, with its auth header.
        self.pulls: list[PullRecord] = []
        #: (container id, the ``t`` parameter or None) of every stop asked for.
        self.stops: list[tuple[str, int | None]] = []
        #: Pulls whose client went away before they ended (e.g. gave up on a held pull).
        self.pulls_abandoned: list[str] = []
        self._failures: dict[str, PullFailure] = {}
        self._slow: dict[str, Gate] = {}
        self._on_stop: list[Callable[[ContainerState], object]] = []

    def _now(self) -> float:
        return self.clock.seconds() if self.clock is not None else float(next(self._ticks))

    # -- the pretend registry -------------------------------------------------------------------

    def publish(
        self, repotag: str, image_id: str | None = None,
        labels: Mapping[str, str] | None = None, digest: str | None = None,
    ) -> str:
        """Make the registry hold an image under ``repotag`` (a new one unless ``image_id``);
        returns its id. The local engine sees it only after a pull. The manifest digest is
        derived from the id unless given."""
        repotag = normalize(repotag)
        image_id = image_id or "sha256:" + secrets.token_hex(32)
        if image_id in self.images and labels is None:
            labels = self.images[image_id].labels
        self.remote[repotag] = RemoteImage(
            image_id=image_id, digest=digest or digest_of("manifest", image_id),
            labels=dict(labels or {}),
        )
        return image_id

    def unpublish(self, repotag: str) -> None:
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
        if release is None:
            self._slow[repotag] = gate
            return
        self._slow[repotag] = gate

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

    # -- local state helpers ---------------------------------------------------------------------

    def add_image(
        self, repotags: Iterable[str] = (), image_id: str | None = None,
        labels: Mapping[str, str] | None = None, digests: Iterable[str] = (),
    ) -> str:
        """A local image (tags move to it from any other image); returns its id."""
        image_id = image_id or "sha256:" + secrets.token_hex(32)
        image = self.images.get(image_id)
        if image is None:
            image = self.images[image_id] = ImageState(
                id=image_id, created=self._now(), labels=dict(labels or {})
            )
        for repotag in repotags:
            self._tag(image, normalize(repotag))
        for digest in digests:
            if digest not in image.digests:
                image.digests.append(digest)
        return image_id

    def _tag(self, image: ImageState, repotag: str) -> None:
        for other in self.images.values():
            if other is not image and repotag in other.tags:
                other.tags.remove(repotag)
        if repotag not in image.tags:
            image.tags.append(repotag)

    def image_id(self, ref: str) -> str | None:
        """The local image ``ref`` (a repo:tag or an id) resolves to, or None."""
        image = self.find_image(ref)
        return image.id if image is not None else None

    def find_image(self, ref: str) -> ImageState | None:
        full = _FULL_ID.match(ref)
        if full is not None:
            return self.images.get("sha256:" + full.group(1))
        try:
            parsed = parse_reference(ref)
        except InvalidReference:
            parsed = None
        if parsed is not None:
            if parsed.digest is not None:
                wanted = f"{parsed.name}@{parsed.digest}"
                for image in self.images.values():
                    if wanted in image.digests:
                        return image
                return None
            wanted = f"{parsed.name}:{parsed.tag or 'latest'}"
            for image in self.images.values():
                if wanted in image.tags:
                    return image
        prefix = ref.removeprefix("sha256:")
        if _HEX.match(prefix):
            found = [i for i in self.images.values() if i.id[len("sha256:"):].startswith(prefix)]
            if len(found) == 1:
                return found[0]
        return None

    def run(
        self, name: str | None, image_ref: str, labels: Mapping[str, str] | None = None
    ) -> str:
        """Start a container from a local image (by repo:tag or id); returns its id."""
        image = self.find_image(image_ref)
        if image is None:
            raise LookupError(f"MemoryDocker: no local image {image_ref!r}; pull or add it first")
        container_id = secrets.token_hex(32)
        name = name or f"memory_{container_id[:8]}"
        if any(c.name == name.removeprefix("/") for c in self.containers.values()):
            raise ValueError(f"MemoryDocker: the container name {name!r} is already in use")
        self.containers[container_id] = ContainerState(
            id=container_id, name=name, image_ref=image_ref, image_id=image.id,
            created=self._now(), labels={**image.labels, **(labels or {})},
        )
        return container_id

    def remove(self, name_or_id: str) -> None:
        container = self.find_container(name_or_id)
        if container is None:
            raise LookupError(f"MemoryDocker: no container {name_or_id!r}")
        del self.containers[container.id]

    def find_container(self, name_or_id: str) -> ContainerState | None:
        if name_or_id in self.containers:
            return self.containers[name_or_id]
        name = name_or_id.removeprefix("/")
        for container in self.containers.values():
            if container.name == name:
                return container
        if _HEX.match(name_or_id):
            found = [c for c in self.containers.values() if c.id.startswith(name_or_id)]
            if len(found) == 1:
                return found[0]
        return None

    def containers_running(self) -> list[ContainerState]:
        return [c for c in self._newest_first(self.containers.values()) if c.running]

    def stop_container(self, name_or_id: str, timeout: int | None = None) -> bool:
        """What ``POST /containers/{id}/stop`` does; False when it was not running."""
        container = self.find_container(name_or_id)
        if container is None:
            raise LookupError(f"MemoryDocker: no container {name_or_id!r}")
        self.stops.append((container.id, timeout))
        if not container.running:
            return False
        container.running = False
        container.finished = self._now()
        for hook in list(self._on_stop):
            hook(container)
        return True

    def on_stop(self, callback: Callable[[ContainerState], object]) -> None:
        """Call ``callback(container)`` after each stop; e.g. :meth:`restart_like_supervisor`."""
        self._on_stop.append(callback)

    def restart_like_supervisor(self, container: ContainerState) -> str:
        """What ``Restart=always`` with ``docker rm -f NAME; docker run --name NAME REPO:TAG``
        does: a new container of the same name on whatever the ref points at now."""
        self.remove(container.id)
        return self.run(container.name, container.image_ref)

    @staticmethod
    def _newest_first(items: Iterable[Any]) -> list[Any]:
        return sorted(items, key=lambda x: x.created, reverse=True)

    def _listed_image(self, container: ContainerState) -> str:
        """``Image`` in the container list: the name it was run with while that name still
        points at its image, else its image id."""
        if container.image_ref != container.image_id:
            image = self.find_image(container.image_ref)
            if image is None or image.id != container.image_id:
                return container.image_id
        return container.image_ref
