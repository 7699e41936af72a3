"""The HTTP front door: webhooks in, health and metrics out (Klein).

Every endpoint turns its payload into :class:`deployer.model.Update` values and hands them to a
:class:`Sink`: this host's reconciler (standalone) or etcd (a fleet). Errors are typed
(:class:`BadWebhook`, :class:`EtcdUnavailable`) and turned into JSON answers in one place,
:meth:`WebhookApp._error`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

import attrs
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from deployer.errors import BadWebhook, EtcdUnavailable, Unauthorized
from deployer.model import Update

log = Logger()

JSON_TYPES = frozenset({"application/json"})


class Sink(Protocol):
    """Where accepted updates go. ``accept`` fires once they are safely recorded."""

    def accept(self, updates: Sequence[Update]) -> Awaitable[str]:
        """Returns a short description of where they went (for the Docker Hub callback)."""
        ...


class HealthCheck(Protocol):
    def __call__(self) -> Awaitable[str | None]:
        """None when healthy, else the reason."""
        ...


class Callbacks(Protocol):
    def send(
        self, callback_url: str, state: str, description: str, context: str, target_url: str
    ) -> Deferred[None]: ...


class Authenticator(Protocol):
    def check(self, request: IRequest) -> None: ...


def json_body(request: IRequest, code: int, obj: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(obj, sort_keys=True).encode() + b"\n"


def describe_updates(updates: Sequence[Update]) -> list[dict[str, Any]]:
    return [
        {
            "registry": u.registry,
            "repository": u.repository,
            "tag": u.tag,
            "digest": u.digest,
            "source": u.source,
            "pattern": u.pattern,
        }
        for u in updates
    ]


@attrs.define
class WebhookApp:
    clock: IReactorTime
    sink: Sink
    health: HealthCheck
    auth: Authenticator | None
    callbacks: Callbacks | None = None
    webhook_path: str = "/api/dockerhub/webhook"
    public_url: str | None = None
    context: str = ""
    metrics: Any = None
    max_body: int = 1024 * 1024
    app: Klein = attrs.field(init=False, factory=Klein)

    def __attrs_post_init__(self) -> None:
        route = self.app.route
        route(self.webhook_path, methods=["POST"], branch=False)(self.dockerhub)
        route("/healthz", methods=["GET", "HEAD"])(self.healthz)
        self.app.handle_errors(BadWebhook)(self._bad_webhook)
        self.app.handle_errors(EtcdUnavailable)(self._unavailable)

    def resource(self) -> IResource:
        return self.app.resource()

    # -- error mapping (the one place) ------------------------------------------------------

    def _bad_webhook(self, request: IRequest, failure: Failure) -> bytes:
        error: BadWebhook = failure.value
        if isinstance(error, Unauthorized):
            log.warn("refused webhook from {peer}: {reason}", peer=_peer(request),
                     reason=error.reason)
        else:
            log.info("bad webhook from {peer}: {reason}", peer=_peer(request), reason=error.reason)
        return json_body(request, error.code, {"error": error.reason})

    def _unavailable(self, request: IRequest, failure: Failure) -> bytes:
        log.error("cannot record webhook: {error}", error=str(failure.value))
        return json_body(request, 503, {"error": str(failure.value)})

    # -- routes -------------------------------------------------------------------------------

    async def dockerhub(self, request: IRequest) -> bytes:
        """Docker Hub: ``repository.repo_name``, ``push_data.tag``, ``callback_url``."""
        from deployer.formats import check_content_type, decode_json, parse_dockerhub

        self._authenticate(request)
        check_content_type(request.getHeader(b"content-type"), set(JSON_TYPES))
        hook = parse_dockerhub(decode_json(self._read(request)), self.clock.seconds())
        try:
            where = await self.sink.accept([hook.update])
        except EtcdUnavailable as e:
            self._callback(hook.callback_url, "error", f"Could not record the update: {e}")
            raise
        self._callback(hook.callback_url, "success", where)
        return json_body(
            request, 202, {"status": "accepted", "updates": describe_updates([hook.update])}
        )

    async def healthz(self, request: IRequest) -> bytes:
        reason = await self.health()
        if reason is None:
            return json_body(request, 200, {"status": "ok"})
        return json_body(request, 503, {"status": "unavailable", "error": reason})

    # -- helpers ------------------------------------------------------------------------------

    def _authenticate(self, request: IRequest) -> None:
        if self.auth is not None:
            self.auth.check(request)

    def _read(self, request: IRequest) -> bytes:
        content = request.content
        if content is None:
            return b""
        content.seek(0)
        body: bytes = content.read(self.max_body + 1)
        if len(body) > self.max_body:
            raise BadWebhook(f"body larger than {self.max_body} bytes", 413)
        return body

    def _callback(self, url: str | None, state: str, description: str) -> None:
        if not url:
            log.info("webhook had no callback_url; nothing to answer")
            return
        if self.callbacks is None:
            return
        context = f"{self.context} time={int(self.clock.seconds())}".strip()
        self.callbacks.send(url, state, description[:255], context[:100], self.public_url or "")


def _peer(request: IRequest) -> str:
    addr = request.getClientAddress()
    host = getattr(addr, "host", None)
    return f"{host}:{getattr(addr, 'port', '')}" if host else str(addr)


Hook = Callable[[IRequest], Awaitable[bytes]]
