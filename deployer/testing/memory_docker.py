"""An in-memory Docker engine: the Engine API endpoints that deployer uses, as a Klein app.

Serve it to the real client through :class:`treq.testing.RequestTraversalAgent` so that the
client's HTTP encoding and decoding are exercised::

    mem = MemoryDocker(clock=reactor)
    client = DockerClient(reactor, agent=mem.agent(), base="http://docker")

The answers follow Docker Engine 20.10 (API 1.41) as observed on a real engine (and checked
against one by tests/test_memory_docker.py and the suites run on both): pulls (a 200 stream of
JSON lines, an error as a line of it, or 404/500 before it), image and container lists and
inspects, ``/events`` (a stream held open, with ``since``/``until`` and dockerd's filters),
create, start, stop, kill, restart, rename and remove of containers, tags, and networks (list,
inspect, create, connect). Unknown paths answer 404 ``{"message": "page not found"}``.

A test plays the registry with :meth:`MemoryDocker.publish`, a supervisor with
:meth:`MemoryDocker.supervise` (or :meth:`MemoryDocker.on_stop`), an image's health check and
how its containers behave with ``healthcheck=``/``behaviour=`` of ``publish``/``add_image``,
an engine going away with :meth:`MemoryDocker.stop_engine`, and steers pulls with
:meth:`MemoryDocker.fail_pull` and :meth:`MemoryDocker.slow_pull`. Everything is recorded:
:attr:`MemoryDocker.calls`, :attr:`MemoryDocker.pulls`, :attr:`MemoryDocker.stops`, every event
in ``MemoryDocker.events.history``.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from typing import Any, cast

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

from deployer.testing.memory_common import ENGINE_VERSION, ApiError, normalize, shown_name
from deployer.testing.memory_containers import ContainerState
from deployer.testing.memory_events import EventFilter, parse_time
from deployer.testing.memory_health import Behaviour, Healthcheck
from deployer.testing.memory_images import ImageState, RemoteImage
from deployer.testing.memory_lifecycle import MemorySupervisor
from deployer.testing.memory_pulls import Pulls
from deployer.testing.memory_registry import PullRecord
from deployer.testing.memory_state import EngineState

log = Logger()

API_VERSION = "1.41"
MIN_API_VERSION = "1.12"

_API_VERSION_RE = re.compile(r"^[0-9]+(?:\.[0-9]+)*$")
_FALSE = frozenset({"", "0", "no", "false", "none"})
_app = Klein()


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def _api(path: str, *methods: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Route ``path`` and ``/v<version>path`` to the handler, after the version check."""

    def decorate(handler: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(handler)
        def checked(self: MemoryDocker, request: IRequest, version: str | None = None,
                    **kw: Any) -> Any:
            self._check_version(version)
            return handler(self, request, **kw)

        _app.route(path, methods=list(methods))(checked)
        _app.route("/v<version>" + path, methods=list(methods))(checked)
        return checked

    return decorate


@implementer(IBodyProducer)
class _FlushingProducer:
    """A request body that pushes itself to the engine once written: treq writes bodies later,
    on the global reactor's cooperator, outside any pump."""

    def __init__(self, producer: IBodyProducer, flush: Callable[[], None]) -> None:
        self._producer = producer
        self._flush = flush
        self.length = producer.length

    def startProducing(self, consumer: Any) -> Deferred[None]:
        def written(result: None) -> None:
            self._flush()
            return result

        d: Deferred[None] = self._producer.startProducing(consumer)
        return d.addCallback(written)

    def pauseProducing(self) -> None:
        self._producer.pauseProducing()

    def resumeProducing(self) -> None:
        self._producer.resumeProducing()

    def stopProducing(self) -> None:
        self._producer.stopProducing()


class _Agent(RequestTraversalAgent):
    """A :class:`RequestTraversalAgent` that refuses connections while the engine is down, and
    delivers request bodies written later."""

    def __init__(self, engine: MemoryDocker) -> None:
        super().__init__(engine.resource())
        self._engine = engine

    def request(
        self, method: bytes, uri: bytes, headers: Any = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        if self._engine.down:
            return fail(ConnectionRefusedError("MemoryDocker is down"))
        if bodyProducer is not None:
            bodyProducer = _FlushingProducer(bodyProducer, self._engine.flush)
        response: Deferred[IResponse] = super().request(method, uri, headers, bodyProducer)
        return response


@implementer(IResource)
class _EngineResource(Resource):
    """Records each call and sets the engine's headers, then hands over to the Klein app. Event
    lines written while a request is being answered are pushed to the clients after it."""

    isLeaf = True

    def __init__(self, engine: MemoryDocker) -> None:
        super().__init__()
        self._engine = engine
        self._app = engine.app.resource()

    def render(self, request: Request) -> bytes | int:
        engine = self._engine
        path = (request.path or b"/").decode("utf-8", "replace")
        method = request.method.decode("ascii", "replace")
        engine.calls.append((method, path))
        failing = engine.failing_calls
        for i, (m, suffix, status) in enumerate(failing):
            if m == method and path.endswith(suffix):
                del failing[i]
                return _json(request, {"message": "injected engine error"}, status)
        request.setHeader(b"Api-Version", engine.api_version.encode())
        request.setHeader(b"Docker-Experimental", b"false")
        request.setHeader(b"Ostype", b"linux")
        request.setHeader(b"Server", f"Docker/{engine.engine_version} (linux)".encode())
        engine._rendering += 1
        try:
            return cast("bytes | int", self._app.render(request))
        finally:
            engine._rendering -= 1
            if not engine._rendering and engine._flush_pending:
                engine._flush_pending = False
                engine.flush()


def _arg(request: IRequest, name: str) -> str | None:
    args = getattr(request, "args", {}) or {}
    values = args.get(name.encode())
    return values[0].decode() if values else None


def _flag(request: IRequest, name: str) -> bool:
    return (_arg(request, name) or "").strip().lower() not in _FALSE


def _json(request: IRequest, obj: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def _body(request: IRequest) -> dict[str, Any]:
    """The JSON body, checked as dockerd's ``CheckForJSON`` does."""
    content_type = (request.getHeader(b"Content-Type") or b"").decode()
    data = request.content.read() if request.content is not None else b""
    if not content_type and not data:
        return {}
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise ApiError(400, f"Content-Type specified ({content_type}) must be"
                            " 'application/json'")
    try:
        obj = json.loads(data) if data else {}
    except ValueError as e:
        raise ApiError(400, str(e)) from e
    if not isinstance(obj, dict):
        raise ApiError(400, "json: cannot unmarshal into an object")
    return obj


def _empty(request: IRequest, code: int) -> bytes:
    request.setResponseCode(code)
    return b""


class MemoryDocker(EngineState):
    """The in-memory engine, served over the Engine API (its state: :class:`EngineState`)."""

    app = _app

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
        #: (method, path suffix, status): the next matching request fails once with it.
        self.failing_calls: list[tuple[str, str, int]] = []
        self._pulls = Pulls(self)
        self._agents: list[_Agent] = []
        self._flushing = False
        self._flush_again = False
        self._rendering = 0
        self._flush_pending = False

    @property
    def pulls_in_progress(self) -> int:
        return self._pulls.in_progress

    @property
    def max_pulls_in_progress(self) -> int:
        return self._pulls.max_in_progress

    # -- wiring -------------------------------------------------------------------------------

    def resource(self) -> IResource:
        """The engine as a ``twisted.web`` resource (a site's root)."""
        return _EngineResource(self)

    def agent(self) -> RequestTraversalAgent:
        """An agent over this engine; responses that go on later (slow pulls, event streams)
        are pushed to it automatically."""
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

    def _deliver(self) -> None:
        if self._rendering:
            self._flush_pending = True
        else:
            self.flush()

    def drop_event_streams(self, *, cleanly: bool = False) -> int:
        """End every open ``/events`` answer (see :meth:`EventLog.drop`); how many there were."""
        return self.events.drop(cleanly=cleanly)

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

    @_app.handle_errors(ApiError)
    def _api_error(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, ApiError)
        if error.plain:
            request.setResponseCode(error.status)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            return error.message.encode() + b"\n"
        return _json(request, {"message": error.message}, error.status)

    @_app.handle_errors(NotFound, MethodNotAllowed)
    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return _json(request, {"message": "page not found"}, 404)

    @_api("/_ping", "GET", "HEAD")
    def _ping(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache, no-store, must-revalidate")
        return b"OK"

    @_api("/version", "GET")
    def _version(self, request: IRequest) -> bytes:
        return _json(request, {
            "Platform": {"Name": "MemoryDocker"},
            "Version": self.engine_version, "ApiVersion": self.api_version,
            "MinAPIVersion": self.min_api_version, "Os": "linux", "Arch": "amd64",
            "KernelVersion": "memory", "GoVersion": "none", "GitCommit": "memory",
        })

    @_api("/events", "GET")
    def _events(self, request: Request) -> Any:
        filters = EventFilter.parse(_arg(request, "filters"))
        since_arg, until_arg = _arg(request, "since") or "", _arg(request, "until") or ""
        since = parse_time(since_arg) if since_arg else None
        until = parse_time(until_arg) if until_arg else None
        if since is not None and until is not None and since > until:
            raise ApiError(400, f"`since` time ({since_arg}) cannot be after `until` time"
                                f" ({until_arg})")
        return self.events.open(request, filters, since, until)

    # -- images ---------------------------------------------------------------------------------

    @_api("/images/json", "GET")
    def _images(self, request: IRequest) -> bytes:
        if _arg(request, "filters"):
            raise ApiError(400, "MemoryDocker does not implement filters")
        return _json(request, [i.summary() for i in self._newest_first(self.images.values())])

    @_api("/images/<path:name>/json", "GET")
    def _inspect_image(self, request: IRequest, name: str) -> bytes:
        image = self.find_image(name)
        if image is None:
            raise ApiError(404, f"no such image: {name}: No such image: {shown_name(name)}")
        return _json(request, image.inspect())

    @_api("/images/<path:name>/tag", "POST")
    def _tag_image(self, request: IRequest, name: str) -> bytes:
        self.tag_image(name, _arg(request, "repo") or "", _arg(request, "tag") or "")
        return _empty(request, 201)

    @_api("/images/create", "POST")
    def _create_image(self, request: Request) -> Any:
        return self._pulls.answer(request)

    # -- containers -----------------------------------------------------------------------------

    @_api("/containers/json", "GET")
    def _containers(self, request: IRequest) -> bytes:
        if _arg(request, "filters"):
            raise ApiError(400, "MemoryDocker does not implement filters")
        everything = _flag(request, "all")
        now = self._now() if self.clock is not None else 0.0
        return _json(request, [
            c.summary(self._listed_image(c), now)
            for c in self._newest_first(self.containers.values()) if everything or c.running
        ])

    @_api("/containers/create", "POST")
    def _create_container(self, request: IRequest) -> bytes:
        body = _body(request)
        container = self.create_container(_arg(request, "name"), body)
        return _json(request, {"Id": container.id, "Warnings": []}, 201)

    @_api("/containers/<name>/json", "GET")
    def _inspect_container(self, request: IRequest, name: str) -> bytes:
        return _json(request, self._get(name).inspect())

    @_api("/containers/<name>/start", "POST")
    def _start(self, request: IRequest, name: str) -> bytes:
        return _empty(request, 204 if self.start_container(name) else 304)

    @_api("/containers/<name>/stop", "POST")
    def _stop(self, request: IRequest, name: str) -> bytes:
        timeout = _seconds(_arg(request, "t"))
        self._get(name)
        try:
            stopped = self.stop_container(name, timeout)
        except ApiError:
            raise
        except Exception as e:
            log.failure("MemoryDocker: an on_stop hook failed for {name}", name=name)
            raise ApiError(500, f"MemoryDocker on_stop hook failed: {e!r}") from e
        return _empty(request, 204 if stopped else 304)

    @_api("/containers/<name>/kill", "POST")
    def _kill(self, request: IRequest, name: str) -> bytes:
        self.kill_container(name, _arg(request, "signal") or "KILL")
        return _empty(request, 204)

    @_api("/containers/<name>/restart", "POST")
    def _restart(self, request: IRequest, name: str) -> bytes:
        self.restart_container(name, _seconds(_arg(request, "t")))
        return _empty(request, 204)

    @_api("/containers/<name>/rename", "POST")
    def _rename(self, request: IRequest, name: str) -> bytes:
        self.rename_container(name, _arg(request, "name") or "")
        return _empty(request, 204)

    @_api("/containers/<name>/update", "POST")
    def _update(self, request: IRequest, name: str) -> bytes:
        self.update_container(name, _body(request))
        return _json(request, {"Warnings": None})

    @_api("/containers/<name>", "DELETE")
    def _remove(self, request: IRequest, name: str) -> bytes:
        self.remove_container(name, force=_flag(request, "force"))
        return _empty(request, 204)

    # -- networks -------------------------------------------------------------------------------

    @_api("/networks", "GET")
    def _networks(self, request: IRequest) -> bytes:
        if _arg(request, "filters"):
            raise ApiError(400, "MemoryDocker does not implement filters")
        return _json(request, [n.summary() for n in self.networks])

    @_api("/networks/create", "POST")
    def _create_network(self, request: IRequest) -> bytes:
        body = _body(request)
        name = str(body.get("Name") or "")
        existing = self.networks.find(name) if name else None
        network_id = self.add_network(name, str(body.get("Driver") or "bridge"))
        warning = (f"Network with name {name} (id : {existing.id}) already exists"
                   if existing is not None else "")
        return _json(request, {"Id": network_id, "Warning": warning}, 201)

    @_api("/networks/<name>", "GET")
    def _inspect_network(self, request: IRequest, name: str) -> bytes:
        return _json(request, self.networks.get(name).summary(self.containers.values()))

    @_api("/networks/<name>/connect", "POST")
    def _connect(self, request: IRequest, name: str) -> bytes:
        body = _body(request)
        self.connect_network(name, str(body.get("Container") or ""), body.get("EndpointConfig"))
        return _empty(request, 200)


def _seconds(t: str | None) -> int | None:
    try:
        return int(t) if t else None
    except ValueError as e:
        raise ApiError(400, f"strconv.Atoi: parsing {t!r}: invalid syntax") from e


__all__ = [
    "API_VERSION", "ApiError", "Behaviour", "ContainerState", "Healthcheck", "ImageState",
    "MemoryDocker", "MemorySupervisor", "PullRecord", "RemoteImage", "normalize",
]
