"""An in-memory Docker engine: the Engine API endpoints that deployer uses, as a Klein app.

Serve it to the real client through :class:`treq.testing.RequestTraversalAgent` so that the
client's HTTP encoding and decoding are exercised::

    mem = MemoryDocker()
    client = DockerClient(reactor, agent=mem.agent(), base="http://docker")

The answers follow Docker Engine 20.10 (API 1.41) as observed on a real engine: a pull answers
200 and streams JSON lines (an error can come as a line inside that stream), or answers 404/500
with ``{"message": …}`` before streaming when the registry does not know the tag; image lists
show ``RepoTags: null`` for an image that lost its tag but keeps a digest, and
``["<none>:<none>"]`` when it has neither; a container whose repo:tag moved on is listed with
``Image`` set to its image id (``sha256:…``); stop answers 204, 304 when already stopped, 404
when missing; unknown paths answer 404 ``{"message": "page not found"}``.

A test plays the registry with :meth:`MemoryDocker.publish`, the supervisor with
:meth:`MemoryDocker.on_stop`, and steers pulls with :meth:`MemoryDocker.fail_pull` and
:meth:`MemoryDocker.slow_pull`. Everything is recorded: :attr:`MemoryDocker.calls`,
:attr:`MemoryDocker.pulls`, :attr:`MemoryDocker.stops`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import re
import secrets
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, cast

import attrs
from klein import Klein
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer, IRequest, IResponse
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from werkzeug.exceptions import MethodNotAllowed, NotFound
from zope.interface import implementer

from deployer.reference import InvalidReference, check_tag, parse_reference

log = Logger()

API_VERSION = "1.41"
MIN_API_VERSION = "1.12"
ENGINE_VERSION = "20.10.24-memory"
IMAGE_SIZE = 1982378

_FULL_ID = re.compile(r"^(?:sha256:)?([0-9a-f]{64})$")
_HEX = re.compile(r"^[0-9a-f]+$")
_API_VERSION_RE = re.compile(r"^[0-9]+(?:\.[0-9]+)*$")
_FALSE = frozenset({"", "0", "no", "false", "none"})
#: What a container of an engine started with ``--bridge=none`` shows as its network.
_NO_NETWORK: Mapping[str, Any] = {
    "IPAMConfig": None, "Links": None, "Aliases": None, "NetworkID": "", "EndpointID": "",
    "Gateway": "", "IPAddress": "", "IPPrefixLen": 0, "IPv6Gateway": "", "GlobalIPv6Address": "",
    "GlobalIPv6PrefixLen": 0, "MacAddress": "", "DriverOpts": None,
}


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def _digest_of(*parts: str) -> str:
    return "sha256:" + hashlib.sha256(" ".join(parts).encode()).hexdigest()


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f000Z")


def normalize(ref: str) -> str:
    """``ref`` as the engine names it: familiar ``[host/]path:tag``, tag ``latest`` by default.
    Raises :class:`InvalidReference`."""
    parsed = parse_reference(ref)
    return f"{parsed.name}:{parsed.tag or 'latest'}"


def _split(repotag: str) -> tuple[str, str]:
    name, _, tag = repotag.rpartition(":")
    return name, tag


class ApiError(Exception):
    """An error answer: ``{"message": …}`` with ``status`` (plain text when ``plain``)."""

    def __init__(self, status: int, message: str, plain: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.plain = plain


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
            "RootFS": {"Type": "layers", "Layers": [_digest_of("layer", self.id)]},
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
class _PullFailure:
    message: str
    status: int | None
    once: bool


class _Agent(RequestTraversalAgent):
    """A :class:`RequestTraversalAgent` that refuses connections while the engine is down."""

    def __init__(self, engine: MemoryDocker) -> None:
        super().__init__(engine.resource())
        self._engine = engine

    def request(
        self, method: bytes, uri: bytes, headers: Any = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        if self._engine.down:
            return fail(ConnectionRefusedError("MemoryDocker is down"))
        response: Deferred[IResponse] = super().request(method, uri, headers, bodyProducer)
        return response


@implementer(IResource)
class _EngineResource(Resource):
    """Records each call and sets the engine's headers, then hands over to the Klein app."""

    isLeaf = True

    def __init__(self, engine: MemoryDocker) -> None:
        super().__init__()
        self._engine = engine
        self._app = engine.app.resource()

    def render(self, request: Request) -> bytes | int:
        path = (request.path or b"/").decode("utf-8", "replace")
        method = request.method.decode("ascii", "replace")
        self._engine.calls.append((method, path))
        failing = self._engine.failing_calls
        for i, (m, suffix, status) in enumerate(failing):
            if m == method and path.endswith(suffix):
                del failing[i]
                return _json(request, {"message": "injected engine error"}, status)
        request.setHeader(b"Api-Version", self._engine.api_version.encode())
        request.setHeader(b"Docker-Experimental", b"false")
        request.setHeader(b"Ostype", b"linux")
        request.setHeader(b"Server", f"Docker/{self._engine.engine_version} (linux)".encode())
        return cast("bytes | int", self._app.render(request))


def _arg(request: IRequest, name: str) -> str | None:
    args = getattr(request, "args", {}) or {}
    values = args.get(name.encode())
    return values[0].decode() if values else None


def _json(request: IRequest, obj: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


class MemoryDocker:
    """The in-memory engine. ``clock`` (optional) gives creation times; without it a counter
    does, so that the newest object always sorts first."""

    app = Klein()

    def __init__(
        self,
        api_version: str = API_VERSION,
        min_api_version: str = MIN_API_VERSION,
        engine_version: str = ENGINE_VERSION,
        clock: IReactorTime | None = None,
    ) -> None:
        self.api_version = api_version
        self.min_api_version = min_api_version
        self.engine_version = engine_version
        self.clock = clock
        self._ticks = itertools.count(1_700_000_000)
        self.images: dict[str, ImageState] = {}
        self.containers: dict[str, ContainerState] = {}
        self.remote: dict[str, RemoteImage] = {}
        #: (method, path) of every request, in order.
        self.calls: list[tuple[str, str]] = []
        #: Every pull asked for, with its auth header.
        self.pulls: list[PullRecord] = []
        #: (container id, the ``t`` parameter or None) of every stop asked for.
        self.stops: list[tuple[str, int | None]] = []
        self.pulls_in_progress = 0
        self.max_pulls_in_progress = 0
        #: While true, agents from :meth:`agent` refuse connections (engine down).
        self.down = False
        #: (method, path suffix, status): the next matching request fails once with it.
        self.failing_calls: list[tuple[str, str, int]] = []
        self._failures: dict[str, _PullFailure] = {}
        self._slow: dict[str, _Gate] = {}
        self._on_stop: list[Callable[[ContainerState], object]] = []
        self._agents: list[_Agent] = []
        self._flushing = False
        self._flush_again = False

    # -- wiring -------------------------------------------------------------------------------

    def resource(self) -> IResource:
        """The engine as a ``twisted.web`` resource (a site's root)."""
        return _EngineResource(self)

    def agent(self) -> RequestTraversalAgent:
        """An agent over this engine; responses that end later (slow pulls) are flushed to it
        automatically."""
        agent = _Agent(self)
        self._agents.append(agent)
        return agent

    def flush(self) -> None:
        """Move pending response bytes to every agent from :meth:`agent`."""
        if self._flushing:
            self._flush_again = True
            return
        self._flushing = True
        try:
            self._flush_again = True
            while self._flush_again:
                self._flush_again = False
                for agent in list(self._agents):
                    agent.flush()
        finally:
            self._flushing = False

    def count(self, method: str, endpoint: str) -> int:
        """How many calls were made to ``endpoint`` (``/images/create``,
        ``/containers/{id}/stop`` with ``{id}`` matching any one path segment), with or
        without a version prefix."""
        pattern = re.compile(
            r"^(?:/v[0-9.]+)?" + re.escape(endpoint).replace(r"\{id\}", "[^/]+") + "$"
        )
        return sum(1 for m, path in self.calls if m == method and pattern.match(path))

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
            image_id=image_id, digest=digest or _digest_of("manifest", image_id),
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
        self._failures[normalize(repotag)] = _PullFailure(message, status, once)

    def clear_pull_failure(self, repotag: str) -> None:
        self._failures.pop(normalize(repotag), None)

    def slow_pull(self, repotag: str, release: Deferred[None]) -> None:
        """Pulls of ``repotag`` answer 200, send their first line, and end only when ``release``
        fires; an errback becomes the error line of every waiting pull. Pulls started after
        it fired are quick."""
        repotag = normalize(repotag)
        gate = _Gate()
        self._slow[repotag] = gate

        def opened(result: object) -> None:
            if self._slow.get(repotag) is gate:
                del self._slow[repotag]
            gate.open(result)

        release.addBoth(opened)

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

    # -- the API ---------------------------------------------------------------------------------

    def _check_version(self, version: str | None) -> None:
        if version is None:
            return
        if not _API_VERSION_RE.match(version):
            raise NotFound()
        if _version_tuple(version) > _version_tuple(self.api_version):
            raise ApiError(400, f"client version {version} is too new. Maximum supported API"
                                f" version is {self.api_version}")
        if _version_tuple(version) < _version_tuple(self.min_api_version):
            raise ApiError(400, f"client version {version} is too old. Minimum supported API"
                                f" version is {self.min_api_version}, please upgrade your"
                                " client to a newer version", plain=True)

    @app.handle_errors(ApiError)
    def _api_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, ApiError)
        if error.plain:
            request.setResponseCode(error.status)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return error.message.encode() + b"\n"
        return _json(request, {"message": error.message}, error.status)

    @app.handle_errors(NotFound, MethodNotAllowed)
    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return _json(request, {"message": "page not found"}, 404)

    @app.route("/_ping", methods=["GET", "HEAD"])
    @app.route("/v<version>/_ping", methods=["GET", "HEAD"])
    def _ping(self, request: IRequest, version: str | None = None) -> bytes:
        self._check_version(version)
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache, no-store, must-revalidate")
        return b"OK"

    @app.route("/version", methods=["GET"])
    @app.route("/v<version>/version", methods=["GET"])
    def _version(self, request: IRequest, version: str | None = None) -> bytes:
        self._check_version(version)
        return _json(request, {
            "Platform": {"Name": "MemoryDocker"},
            "Version": self.engine_version, "ApiVersion": self.api_version,
            "MinAPIVersion": self.min_api_version, "Os": "linux", "Arch": "amd64",
            "KernelVersion": "memory", "GoVersion": "none", "GitCommit": "memory",
        })

    @app.route("/images/json", methods=["GET"])
    @app.route("/v<version>/images/json", methods=["GET"])
    def _images(self, request: IRequest, version: str | None = None) -> bytes:
        self._check_version(version)
        if _arg(request, "filters"):
            raise ApiError(400, "MemoryDocker does not implement filters")
        return _json(request, [i.summary() for i in self._newest_first(self.images.values())])

    @app.route("/images/<path:name>/json", methods=["GET"])
    @app.route("/v<version>/images/<path:name>/json", methods=["GET"])
    def _inspect_image(self, request: IRequest, name: str, version: str | None = None) -> bytes:
        self._check_version(version)
        image = self.find_image(name)
        if image is None:
            try:
                shown = normalize(name)
            except InvalidReference:
                shown = name
            raise ApiError(404, f"no such image: {name}: No such image: {shown}")
        return _json(request, image.inspect())

    @app.route("/containers/json", methods=["GET"])
    @app.route("/v<version>/containers/json", methods=["GET"])
    def _containers(self, request: IRequest, version: str | None = None) -> bytes:
        self._check_version(version)
        if _arg(request, "filters"):
            raise ApiError(400, "MemoryDocker does not implement filters")
        everything = (_arg(request, "all") or "").strip().lower() not in _FALSE
        return _json(request, [
            {
                "Id": c.id, "Names": ["/" + c.name], "Image": self._listed_image(c),
                "ImageID": c.image_id, "Command": "/bin/sh /app/run.sh", "Created": int(c.created),
                "Ports": [], "Labels": dict(c.labels),
                "State": "running" if c.running else "exited",
                "Status": "Up Less than a second" if c.running
                else f"Exited ({c.exit_code}) Less than a second ago",
                "HostConfig": {"NetworkMode": "default"},
                "NetworkSettings": {"Networks": {"bridge": dict(_NO_NETWORK)}}, "Mounts": [],
            }
            for c in self._newest_first(self.containers.values())
            if everything or c.running
        ])

    @app.route("/containers/<name>/json", methods=["GET"])
    @app.route("/v<version>/containers/<name>/json", methods=["GET"])
    def _inspect_container(
        self, request: IRequest, name: str, version: str | None = None
    ) -> bytes:
        self._check_version(version)
        container = self.find_container(name)
        if container is None:
            raise ApiError(404, f"No such container: {name}")
        return _json(request, container.inspect())

    @app.route("/containers/<name>/stop", methods=["POST"])
    @app.route("/v<version>/containers/<name>/stop", methods=["POST"])
    def _stop(self, request: IRequest, name: str, version: str | None = None) -> bytes:
        self._check_version(version)
        t = _arg(request, "t")
        try:
            timeout = int(t) if t else None
        except ValueError as e:
            raise ApiError(400, f"strconv.Atoi: parsing {t!r}: invalid syntax") from e
        if self.find_container(name) is None:
            raise ApiError(404, f"No such container: {name}")
        try:
            stopped = self.stop_container(name, timeout)
        except Exception as e:
            log.failure("MemoryDocker: an on_stop hook failed for {name}", name=name)
            raise ApiError(500, f"MemoryDocker on_stop hook failed: {e!r}") from e
        request.setResponseCode(204 if stopped else 304)
        return b""

    @app.route("/images/create", methods=["POST"])
    @app.route("/v<version>/images/create", methods=["POST"])
    def _create_image(self, request: Request, version: str | None = None) -> Any:
        self._check_version(version)
        from_image = _arg(request, "fromImage")
        if not from_image:
            raise ApiError(400, "MemoryDocker only pulls: fromImage is required")
        tag = _arg(request, "tag") or ""
        try:
            ref = parse_reference(from_image)
            if tag.startswith("sha256:"):
                raise ApiError(400, "MemoryDocker does not pull by digest")
            if tag:
                check_tag(tag)
        except InvalidReference as e:
            raise ApiError(400, f"invalid reference format: {e}") from e
        if tag or ref.tag:
            repotags = [f"{ref.name}:{tag or ref.tag}"]
        else:  # no tag at all: the engine pulls every tag of the repository
            repotags = sorted(r for r in self.remote if _split(r)[0] == ref.name)
            if not repotags:
                repotags = [f"{ref.name}:latest"]
        auth = request.getHeader(b"X-Registry-Auth")
        for repotag in repotags:
            self.pulls.append(PullRecord(repotag, auth.decode() if auth else None))
        for repotag in repotags:  # errors before the stream starts
            failure = self._failures.get(repotag)
            if failure is not None and failure.status is not None:
                if failure.once:
                    del self._failures[repotag]
                raise ApiError(failure.status, failure.message)
            if repotag not in self.remote and failure is None:
                raise ApiError(404, f"manifest for {repotag} not found: manifest unknown:"
                                    " manifest unknown")
        request.setHeader(b"Content-Type", b"application/json")
        self.pulls_in_progress += 1
        self.max_pulls_in_progress = max(self.max_pulls_in_progress, self.pulls_in_progress)
        d = Deferred.fromCoroutine(self._stream_pull(request, ref.path, repotags))
        d.addBoth(self._pull_ended, request)
        if not d.called:
            # The answer ends later, outside any agent's pump: push it through when it does.
            request.notifyFinish().addBoth(lambda _: self.flush())
        return d

    def _pull_ended(self, result: object, request: IRequest) -> bytes:
        self.pulls_in_progress -= 1
        if isinstance(result, Failure):
            log.failure("MemoryDocker: the pull stream broke", result)
            message = f"MemoryDocker: the pull stream broke: {result.getErrorMessage()}"
            request.write(json.dumps({"errorDetail": {"message": message}, "error": message},
                                     separators=(",", ":")).encode() + b"\n")
        return b""

    async def _stream_pull(self, request: IRequest, path: str, repotags: list[str]) -> None:
        def line(obj: Mapping[str, Any]) -> None:
            request.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")

        shown_path = path if "/" in path else "library/" + path
        for repotag in repotags:
            name, tag = _split(repotag)
            line({"status": f"Pulling from {shown_path}", "id": tag})
            gate = self._slow.get(repotag)
            if gate is not None:
                try:
                    await gate.wait()
                except Exception as e:
                    line({"errorDetail": {"message": str(e)}, "error": str(e)})
                    return
            failure = self._failures.get(repotag)
            remote = self.remote.get(repotag)
            local = self.find_image(repotag)
            if failure is not None or remote is None:
                if failure is not None and failure.once:
                    del self._failures[repotag]
                message = failure.message if failure is not None else "manifest unknown"
                layer = _digest_of("layer", repotag)[7:19]
                line({"status": "Pulling fs layer", "progressDetail": {}, "id": layer})
                line({"status": "Downloading", "progressDetail": {}, "id": layer})
                line({"errorDetail": {"message": message}, "error": message})
                return
            if local is not None and local.id == remote.image_id:
                self.add_image((), local.id, digests=[f"{name}@{remote.digest}"])
                line({"status": f"Digest: {remote.digest}"})
                line({"status": f"Status: Image is up to date for {repotag}"})
                continue
            for layer_line in _layer_lines(_digest_of("layer", remote.image_id)[7:19]):
                line(layer_line)
            image_id = self.add_image(
                [repotag], remote.image_id, remote.labels, [f"{name}@{remote.digest}"]
            )
            assert image_id == remote.image_id
            line({"status": f"Digest: {remote.digest}"})
            line({"status": f"Status: Downloaded newer image for {repotag}"})


class _Gate:
    """Pulls held until a test's Deferred fires; its outcome goes to every one of them."""

    def __init__(self) -> None:
        self._waiters: list[Deferred[None]] = []

    def wait(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred()
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


def _layer_lines(layer: str) -> Iterator[dict[str, Any]]:
    size = IMAGE_SIZE // 2
    bar = "[==================================================>]"
    yield {"status": "Pulling fs layer", "progressDetail": {}, "id": layer}
    yield {"status": "Downloading", "progressDetail": {"current": 32768, "total": size},
           "progress": "[=>                                                 ]  32.77kB/1.065MB",
           "id": layer}
    yield {"status": "Downloading", "progressDetail": {"current": size, "total": size},
           "progress": f"{bar}  1.065MB/1.065MB", "id": layer}
    yield {"status": "Verifying Checksum", "progressDetail": {}, "id": layer}
    yield {"status": "Download complete", "progressDetail": {}, "id": layer}
    yield {"status": "Extracting", "progressDetail": {"current": size, "total": size},
           "progress": f"{bar}  1.065MB/1.065MB", "id": layer}
    yield {"status": "Pull complete", "progressDetail": {}, "id": layer}


__all__ = [
    "API_VERSION", "ApiError", "ContainerState", "ImageState", "MemoryDocker",
    "PullRecord", "RemoteImage", "normalize",
]
