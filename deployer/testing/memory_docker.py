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

import json
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any, cast

from klein import Klein
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IBodyProducer, IRequest, IResponse
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from werkzeug.exceptions import MethodNotAllowed, NotFound
from zope.interface import implementer

from deployer.reference import InvalidReference, check_tag, parse_reference, split
from deployer.testing.memory_state import (
    ENGINE_VERSION,
    IMAGE_SIZE,
    ContainerState,
    EngineState,
    Gate,
    ImageState,
    PullRecord,
    RemoteImage,
    digest_of,
    normalize,
)

log = Logger()

API_VERSION = "1.41"
MIN_API_VERSION = "1.12"

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


class ApiError(Exception):
    """An error answer: ``{"message": …}`` with ``status`` (plain text when ``plain``)."""

    def __init__(self, status: int, message: str, plain: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.plain = plain


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

class MemoryDocker(EngineState):
    """The in-memory engine, served over the Engine API (its state: :class:`EngineState`)."""

    app = Klein()

    def __init__(
        self,
        api_version: str = API_VERSION,
        min_api_version: str = MIN_API_VERSION,
        engine_version: str = ENGINE_VERSION,
        clock: IReactorTime | None = None,
    ) -> None:
        super().__init__(clock)
        self.api_version = api_version
        self.min_api_version = min_api_version
        self.engine_version = engine_version
        #: (method, path) of every request, in order.
        self.calls: list[tuple[str, str]] = []
        self.pulls_in_progress = 0
        self.max_pulls_in_progress = 0
        #: While true, agents from :meth:`agent` refuse connections (engine down).
        self.down = False
        #: (method, path suffix, status): the next matching request fails once with it.
        self.failing_calls: list[tuple[str, str, int]] = []
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
            repotags = sorted(r for r in self.remote if split(r)[0] == ref.name)
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
        d.addBoth(self._pull_ended, request, repotags)
        if not d.called:
            # The answer ends later, outside any agent's pump: push it through when it does.
            request.notifyFinish().addBoth(lambda _: self.flush())
        return d

    def _pull_ended(self, result: object, request: IRequest, repotags: list[str]) -> object:
        self.pulls_in_progress -= 1
        if isinstance(result, Failure) and result.check(CancelledError):
            # The client went away (Klein cancels the answer): nothing more to write.
            self.pulls_abandoned.extend(repotags)
            return result
        if isinstance(result, Failure):
            log.failure("MemoryDocker: the pull stream broke", result)
            message = f"MemoryDocker: the pull stream broke: {result.getErrorMessage()}"
            request.write(json.dumps({"errorDetail": {"message": message}, "error": message},
                                     separators=(",", ":")).encode() + b"\n")
        return b""

    @staticmethod
    async def _held(gate: Gate, line: Callable[[Mapping[str, Any]], None]) -> bool:
        """Wait for ``gate``; False when it opened with an error (then sent as an error line)."""
        try:
            await gate.wait()
        except CancelledError:
            raise
        except Exception as e:
            line({"errorDetail": {"message": str(e)}, "error": str(e)})
            return False
        return True

    async def _stream_pull(self, request: IRequest, path: str, repotags: list[str]) -> None:
        def line(obj: Mapping[str, Any]) -> None:
            request.write(json.dumps(obj, separators=(",", ":")).encode() + b"\n")

        shown_path = path if "/" in path else "library/" + path
        for repotag in repotags:
            name, tag, _ = split(repotag)
            gate = self._slow.get(repotag)
            if gate is not None and not gate.answer:
                if not await self._held(gate, line):
                    return
            line({"status": f"Pulling from {shown_path}", "id": tag})
            if gate is not None and gate.answer:
                if not await self._held(gate, line):
                    return
            failure = self._failures.get(repotag)
            remote = self.remote.get(repotag)
            local = self.find_image(repotag)
            if failure is not None or remote is None:
                if failure is not None and failure.once:
                    del self._failures[repotag]
                message = failure.message if failure is not None else "manifest unknown"
                layer = digest_of("layer", repotag)[7:19]
                line({"status": "Pulling fs layer", "progressDetail": {}, "id": layer})
                line({"status": "Downloading", "progressDetail": {}, "id": layer})
                line({"errorDetail": {"message": message}, "error": message})
                return
            if local is not None and local.id == remote.image_id:
                self.add_image((), local.id, digests=[f"{name}@{remote.digest}"])
                line({"status": f"Digest: {remote.digest}"})
                line({"status": f"Status: Image is up to date for {repotag}"})
                continue
            for layer_line in _layer_lines(digest_of("layer", remote.image_id)[7:19]):
                line(layer_line)
            image_id = self.add_image(
                [repotag], remote.image_id, remote.labels, [f"{name}@{remote.digest}"]
            )
            assert image_id == remote.image_id
            line({"status": f"Digest: {remote.digest}"})
            line({"status": f"Status: Downloaded newer image for {repotag}"})


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
