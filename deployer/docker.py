"""A Docker Engine API client: treq over the engine's unix socket (or TCP), no SDK.

Only the calls the daemon needs: ping, version negotiation, list images, list running
containers, inspect, pull (a streaming response), stop. Errors are typed
(:mod:`deployer.errors`) and carry the engine's own message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

import attrs
import treq
from treq.client import HTTPClient
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, ConnectionRefusedError, TimeoutError
from twisted.logger import Logger
from twisted.web._newclient import RequestGenerationFailed
from twisted.web.client import HTTPConnectionPool, ResponseFailed
from twisted.web.iweb import IAgent, IResponse

from deployer.credhelpers import RegistryCredentials
from deployer.dockercfg import Credentials
from deployer.engine_address import (
    DEFAULT_DOCKER_URL,
    engine_agent,
    engine_pool,
)
from deployer.errors import (
    ContainerNotFound,
    DockerError,
    DockerUnavailable,
    ImageNotFound,
    NotFound,
    PullFailed,
    PullStalled,
    TimedOut,
)
from deployer.lines import BadLine
from deployer.pulls import PULL_STALL_TIMEOUT, PullReader, Watchdog
from deployer.reference import registry_host, split
from deployer.timeouts import cancel_after, is_cancellation

log = Logger()

#: The newest API version this client speaks; the engine's own is used when it is older.
CLIENT_API_VERSION = "1.41"
#: The oldest engine API that has everything used here (``ImageID`` in the container list).
MIN_API_VERSION = "1.24"

_ID_RE = re.compile(r"^(sha256:)?[0-9a-f]{12,64}$")
_CONNECTION_ERRORS = (ConnectError, ConnectionRefusedError, TimeoutError, ResponseFailed,
                      RequestGenerationFailed, OSError)


def looks_like_id(image: str) -> bool:
    """True for an image field that holds an id rather than a name (its tag moved on)."""
    return bool(_ID_RE.match(image))


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split(".") if p.isdigit())


def negotiate_version(server: str) -> str:
    """The version the docker CLI would choose: ours, or the engine's when that is older."""
    if not server:
        return CLIENT_API_VERSION
    if _version_tuple(server) < _version_tuple(MIN_API_VERSION):
        raise DockerError(
            f"the engine speaks API {server}, older than {MIN_API_VERSION} that deployer needs"
        )
    if _version_tuple(server) < _version_tuple(CLIENT_API_VERSION):
        return server
    return CLIENT_API_VERSION


@attrs.frozen
class Image:
    id: str
    repo_tags: tuple[str, ...] = ()
    repo_digests: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Image:
        return cls(
            id=str(obj.get("Id", "")),
            repo_tags=tuple(t for t in (obj.get("RepoTags") or ()) if t != "<none>:<none>"),
            repo_digests=tuple(
                d for d in (obj.get("RepoDigests") or ()) if d != "<none>@<none>"
            ),
        )


@attrs.frozen
class Container:
    id: str
    name: str
    image: str
    image_id: str
    labels: Mapping[str, str] = attrs.field(factory=dict)

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> Container:
        names = obj.get("Names") or ()
        return cls(
            id=str(obj.get("Id", "")),
            name=str(names[0]).lstrip("/") if names else str(obj.get("Id", ""))[:12],
            image=str(obj.get("Image", "")),
            image_id=str(obj.get("ImageID", "")),
            labels=dict(obj.get("Labels") or {}),
        )


class DockerClient:
    """The engine client. Build it with :meth:`from_url`, or give it any ``IAgent`` (tests give
    one over an in-memory engine). ``reactor`` is also the clock of every timeout:
    ``request_timeout`` for an engine call's answer, ``pull_stall_timeout`` for a pull that
    makes no progress (see :meth:`pull`)."""

    def __init__(
        self,
        reactor: Any,
        agent: IAgent,
        base: str = "http://docker",
        credentials: Credentials | RegistryCredentials | None = None,
        pool: HTTPConnectionPool | None = None,
        request_timeout: float = 60.0,
        pull_stall_timeout: float = PULL_STALL_TIMEOUT,
    ) -> None:
        self.reactor = reactor
        self.pull_stall_timeout = pull_stall_timeout
        self.http = HTTPClient(agent)
        self.base = base.rstrip("/")
        self.credentials = RegistryCredentials.of(reactor, credentials)
        self.pool = pool
        self.request_timeout = request_timeout
        self._version: str | None = None

    @classmethod
    def from_url(
        cls,
        reactor: Any,
        url: str = DEFAULT_DOCKER_URL,
        credentials: Credentials | RegistryCredentials | None = None,
        *,
        pull_stall_timeout: float = PULL_STALL_TIMEOUT,
    ) -> DockerClient:
        pool = engine_pool(reactor)
        return cls(
            reactor,
            engine_agent(reactor, url, pool),
            "http://docker",
            credentials,
            pool,
            pull_stall_timeout=pull_stall_timeout,
        )

    def close(self) -> Deferred[None]:
        if self.pool is None:
            return Deferred.fromCoroutine(_nothing())
        return self.pool.closeCachedConnections()

    # -- plumbing ---------------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None = None,
        headers: Mapping[bytes | str, bytes | str] | None = None,
        versioned: bool = True,
        timeout: float | None = None,
        body: Any = None,
        unbuffered: bool = False,
    ) -> IResponse:
        if versioned:
            path = f"/v{await self.version()}{path}"
        url = self.base + path
        if params:
            url += "?" + urlencode(params)
        seconds = timeout or self.request_timeout
        extra: dict[str, Any] = {"unbuffered": True} if unbuffered else {}
        if body is not None:
            extra["json"] = body
        request = self.http.request(method, url, headers=dict(headers or {}), **extra)
        try:
            response = await cancel_after(request, seconds, self.reactor, f"{method} {path}")
        except TimedOut as e:
            self._version = None
            raise DockerUnavailable(f"the Docker engine did not answer: {e}") from e
        except _CONNECTION_ERRORS as e:
            if is_cancellation(e):
                raise CancelledError(f"{method} {path} cancelled") from e  # by us, not the engine
            self._version = None  # the engine may come back with another version
            raise DockerUnavailable(f"cannot reach the Docker engine: {_describe(e)}") from e
        return response

    async def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._request(method, path, **kwargs)
        body = await self._body(response)
        if response.code >= 400:
            raise _error(response.code, body, path)
        try:
            return json.loads(body) if body else None
        except ValueError as e:
            raise DockerError(f"{method} {path}: the engine sent no JSON: {body[:200]!r}",
                              response.code) from e

    async def _body(self, response: IResponse) -> bytes:
        try:
            body: bytes = await treq.content(response)
        except _CONNECTION_ERRORS as e:
            why = _describe(e)
            raise DockerUnavailable(f"the Docker engine closed the connection: {why}") from e
        return body

    # -- the calls ----------------------------------------------------------------------------

    async def ping(self) -> None:
        response = await self._request("GET", "/_ping", versioned=False, timeout=10)
        body = await self._body(response)
        if response.code != 200:
            raise DockerUnavailable(f"the engine answered /_ping with {body[:200]!r}",
                                    response.code)

    async def version(self) -> str:
        if self._version is None:
            response = await self._request("GET", "/version", versioned=False, timeout=10)
            body = await self._body(response)
            if response.code != 200:
                raise _error(response.code, body, "/version")
            try:
                info = json.loads(body)
            except ValueError as e:
                raise DockerError(f"/version: no JSON: {body[:200]!r}") from e
            self._version = negotiate_version(str(info.get("ApiVersion", "")))
            log.info("Docker engine {engine}, API {api}", engine=info.get("Version", "?"),
                     api=self._version)
        return self._version

    async def images(self) -> list[Image]:
        return [Image.from_json(obj) for obj in await self._json("GET", "/images/json") or ()]

    async def containers(self) -> list[Container]:
        """The running containers."""
        found = await self._json("GET", "/containers/json") or ()
        return [Container.from_json(obj) for obj in found]

    async def inspect_image(self, name: str) -> Image:
        try:
            obj = await self._json("GET", f"/images/{quote(name, safe='/:@')}/json")
        except NotFound as e:
            raise ImageNotFound(e.message, e.status) from e
        return Image.from_json(obj)

    async def inspect_container(self, container_id: str) -> dict[str, Any]:
        try:
            obj: dict[str, Any] = await self._json(
                "GET", f"/containers/{quote(container_id, safe='')}/json"
            )
        except NotFound as e:
            raise ContainerNotFound(e.message, e.status) from e
        return obj

    async def pull(self, repotag: str, timeout: float = 3600.0) -> None:
        """Pull one ``repo:tag``; raises :class:`PullFailed` when the engine reports an error,
        even inside a 200 stream.

        A pull that makes no progress for :attr:`pull_stall_timeout` seconds (no response
        headers yet, or nothing more in its stream) is cancelled and raises
        :class:`PullStalled`. ``timeout`` bounds the wait for the engine's answer."""
        name, tag, digest = split(repotag)
        if digest:
            tag = digest
        elif tag is None:
            raise PullFailed(f"{repotag!r} names no tag; refusing to pull every tag")
        started = self.reactor.seconds()
        watchdog = Watchdog(self.reactor, self.pull_stall_timeout)
        work = Deferred.fromCoroutine(self._pull(repotag, name, tag, timeout, watchdog))
        watchdog.start(work.cancel)
        try:
            await work
        except Exception as e:
            if not watchdog.expired:
                raise
            registry = registry_host(repotag) or "docker.io"
            log.error("pull {repotag}: no progress from registry {registry} for {seconds:g} s;"
                      " giving up", repotag=repotag, registry=registry,
                      seconds=self.pull_stall_timeout)
            raise PullStalled(f"pull {repotag}: no progress from registry {registry} for"
                              f" {self.pull_stall_timeout:g} s") from e
        finally:
            watchdog.stop()
        log.info("pulled {repotag} in {seconds:.2f} s", repotag=repotag,
                 seconds=self.reactor.seconds() - started)

    async def _pull(
        self, repotag: str, name: str, tag: str, timeout: float, watchdog: Watchdog
    ) -> None:
        headers: dict[bytes | str, bytes | str] = {}
        auth = await self.credentials.for_image(repotag)
        if auth is not None:
            headers["X-Registry-Auth"] = auth.header()
        response = await self._request(
            "POST",
            "/images/create",
            params={"fromImage": name, "tag": tag},
            headers=headers,
            timeout=timeout,
        )
        watchdog.alive()
        if response.code != 200:
            body = await self._body(response)
            error = _error(response.code, body, "/images/create")
            raise PullFailed(f"pull {repotag}: {error.message}", response.code)
        reader = PullReader(repotag, self.reactor, watchdog)
        response.deliverBody(reader)
        try:
            await reader.done
        except CancelledError:
            raise
        except BadLine as e:
            raise PullFailed(str(e), 200) from e
        except Exception as e:
            why = _describe(e)
            raise DockerUnavailable(f"pull {repotag}: connection lost: {why}") from e
        if reader.error is not None:
            raise PullFailed(f"pull {repotag}: {reader.error}", 200)

    async def stop(self, container_id: str, timeout: int) -> None:
        """Stop a container, killing it after ``timeout`` seconds; a stopped one is fine."""
        try:
            await self._json(
                "POST",
                f"/containers/{quote(container_id, safe='')}/stop",
                params={"t": str(int(timeout))},
                timeout=timeout + 30,
            )
        except NotFound as e:
            raise ContainerNotFound(e.message, e.status) from e

    # -- rollouts -------------------------------------------------------------------------------

    async def events(self, filters: Mapping[str, list[str]], since: str = "") -> IResponse:
        """``GET /events`` (``since``: ``seconds.nanos``); read the body's JSON lines with
        ``deliverBody``. Unbuffered: treq would otherwise keep every event of the stream."""
        params = {"filters": json.dumps(dict(filters)), **({"since": since} if since else {})}
        response = await self._request("GET", "/events", params=params, unbuffered=True)
        if response.code != 200:
            raise _error(response.code, await self._body(response), "/events")
        return response

    async def tag(self, image: str, repository: str, tag: str) -> None:
        await self._typed(ImageNotFound, "POST", f"/images/{quote(image, safe='/:@')}/tag",
                          params={"repo": repository, "tag": tag})

    async def start(self, container_id: str) -> None:
        """Start a container; one that runs already is fine (304)."""
        path = f"/containers/{quote(container_id, safe='')}/start"
        await self._typed(ContainerNotFound, "POST", path)

    async def image_has_healthcheck(self, image: str) -> bool:
        obj = await self._typed(ImageNotFound, "GET", f"/images/{quote(image, safe='/:@')}/json")
        test = ((obj.get("Config") or {}).get("Healthcheck") or {}).get("Test")
        return bool(test) and test != ["NONE"]

    # -- recreation ------------------------------------------------------------------------

    async def image_json(self, image: str) -> dict[str, Any]:
        """``GET /images/{image}/json`` whole (its ``Config`` holds the image's defaults)."""
        obj: dict[str, Any] = await self._typed(
            ImageNotFound, "GET", f"/images/{quote(image, safe='/:@')}/json")
        return obj

    async def all_containers(self) -> list[dict[str, Any]]:
        """``GET /containers/json?all=1``: every container, running or not, as listed."""
        found = await self._json("GET", "/containers/json", params={"all": "1"})
        return list(found or ())

    async def network_json(self, network: str) -> dict[str, Any]:
        """``GET /networks/{network}``; :class:`NotFound` if there is none."""
        obj: dict[str, Any] = await self._json("GET", f"/networks/{quote(network, safe='')}")
        return obj

    async def create(self, name: str, config: Mapping[str, Any]) -> str:
        """``POST /containers/create``; the new container's id."""
        created = await self._json("POST", "/containers/create", params={"name": name},
                                   body=dict(config))
        return str(created["Id"])

    async def rename(self, container_id: str, name: str) -> None:
        path = f"/containers/{quote(container_id, safe='')}/rename"
        await self._typed(ContainerNotFound, "POST", path, params={"name": name})

    async def set_restart_policy(self, container_id: str, policy: Mapping[str, Any]) -> None:
        """Change a container's ``RestartPolicy`` (``{"Name": "no"}``...), nothing else."""
        path = f"/containers/{quote(container_id, safe='')}/update"
        await self._typed(ContainerNotFound, "POST", path, body={"RestartPolicy": dict(policy)})

    async def remove(self, container_id: str, force: bool = False) -> None:
        path = f"/containers/{quote(container_id, safe='')}"
        await self._typed(ContainerNotFound, "DELETE", path,
                          params={"force": "1" if force else "0"})

    async def connect(self, network: str, container_id: str,
                      endpoint: Mapping[str, Any] | None = None) -> None:
        """Attach a container to one more network (``EndpointConfig``: aliases...)."""
        body = {"Container": container_id, "EndpointConfig": dict(endpoint or {})}
        await self._json("POST", f"/networks/{quote(network, safe='')}/connect", body=body)

    async def _typed(self, error: type[NotFound], method: str, path: str, **kw: Any) -> Any:
        try:
            return await self._json(method, path, **kw)
        except NotFound as e:
            raise error(e.message, e.status) from e


async def _nothing() -> None:
    return None


def _describe(e: BaseException) -> str:
    if isinstance(e, ResponseFailed):
        return "; ".join(str(r.value) for r in e.reasons) or "response failed"
    return str(e) or type(e).__name__


def _error(code: int, body: bytes, what: str) -> DockerError:
    message = body.decode("utf-8", "replace").strip()
    try:
        obj = json.loads(body)
        if isinstance(obj, dict) and obj.get("message"):
            message = str(obj["message"])
    except ValueError:
        pass
    message = message or f"{what} failed"
    if code == 404:
        return NotFound(message, code)
    return DockerError(message, code)
