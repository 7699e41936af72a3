"""The HTTP front door: webhooks in, health and metrics out (Klein).

Every webhook endpoint turns its payload into :class:`deployer.model.Update` values
(:mod:`deployer.formats`) and hands them to a :class:`Sink`: this host's reconciler
(standalone) or etcd (a fleet). Errors are typed (:class:`BadWebhook`, :class:`EtcdUnavailable`)
and become JSON answers in one place (:meth:`WebhookApp._bad_webhook` and its neighbours).

Endpoints (all ``POST`` but health, metrics and status):

=============================  ==================================================  ========
path                           payload                                             answer
=============================  ==================================================  ========
``--webhook_path``             Docker Hub (``repository.repo_name``, ...)         202
``/api/registry/events``       Docker Distribution notifications (envelope)        200
``/api/deploy``                ``{"repository", "tag", "digest"}`` (CI, scripts)    202
``/api/quay/events``           Quay repository push                                202
``/api/harbor/events``         Harbor ``PUSH_ARTIFACT`` / ``pushImage``            202
``/api/github/events``         GitHub ``registry_package`` / ``package``           202
``GET /healthz``               engine (and etcd watch) health                      200/503
``GET /metrics``               Prometheus text format                              200
``GET /status``                what every host runs, paused rollouts (JSON, HTML)  200/503
``/api/resume``                ``{"app": "repo:tag"}``: end a paused rollout       200/404
=============================  ==================================================  ========

``GET /status`` takes the token like a webhook (also ``?token=``, for a browser) and answers
JSON, or the status page (:mod:`deployer.status_page`) when the client prefers ``text/html``.
``POST /api/resume`` takes the token in a header only: it changes the fleet, and a URL ends up
in histories and logs.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Collection, Iterable, Sequence
from typing import Any, Protocol
from urllib.parse import urlsplit

import attrs
from klein import Klein
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource
from werkzeug.datastructures import MIMEAccept
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.http import parse_accept_header
from werkzeug.routing import RequestRedirect

from deployer.auth import peer, verify_github_signature
from deployer.errors import BadWebhook, EtcdError, EtcdUnavailable, Unauthorized
from deployer.formats import (
    JSON_CONTENT_TYPES,
    REGISTRY_CONTENT_TYPES,
    SeenEvents,
    check_content_type,
    decode_json,
    parse_dockerhub,
    parse_generic,
    parse_github,
    parse_harbor,
    parse_quay,
    parse_registry_events,
)
from deployer.metrics import Metrics
from deployer.model import Update
from deployer.reference import InvalidReference
from deployer.rollout.keys import app_name
from deployer.site import MAX_BODY
from deployer.timeouts import wait_at_most

log = Logger()
#: Harbor gives up on a webhook after 3 s; answer before that even if etcd is slow.
HARBOR_ANSWER_WITHIN = 2.5


class Sink(Protocol):
    """Where accepted updates go. ``accept`` fires once they are safely recorded, with a short
    description of where they went (for the Docker Hub callback)."""

    def accept(self, updates: Sequence[Update]) -> Awaitable[str]: ...


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


class StatusDocument(Protocol):
    def document(self) -> Deferred[dict[str, Any]]:
        """The ``/status`` document (:mod:`deployer.rollout.status`)."""
        ...


class Resumer(Protocol):
    def resume(self, app: str) -> Deferred[bool]:
        """End the pause of ``app``; False, and nothing written, when it was not paused."""
        ...


class RolloutControl(Protocol):
    """What the web layer uses of :class:`deployer.rollout.wiring.Rollouts`."""

    @property
    def status(self) -> StatusDocument: ...

    @property
    def pauses(self) -> Resumer: ...


def json_body(request: IRequest, code: int, obj: Any) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"application/json")
    request.setHeader(b"Cache-Control", b"no-store")
    return json.dumps(obj, sort_keys=True).encode() + b"\n"


#: What an answer tells of each update it accepted: these keys of ``Update.to_json()``, and the
#: pattern.
ANSWER_KEYS = ("registry", "repository", "tag", "digest", "source")


def describe_updates(updates: Sequence[Update]) -> list[dict[str, Any]]:
    described = []
    for update in updates:
        obj = update.to_json()
        described.append({**{key: obj[key] for key in ANSWER_KEYS}, "pattern": update.pattern})
    return described


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
    metrics: Metrics = attrs.field(factory=lambda: Metrics(process=False))
    github_secret: bytes | None = None
    seen: SeenEvents = attrs.field(factory=SeenEvents)
    rollouts: RolloutControl | None = None
    _writing: dict[str, _Shared] = attrs.field(init=False, factory=dict)
    app: Klein = attrs.field(init=False, factory=Klein)

    def __attrs_post_init__(self) -> None:
        route = self.app.route
        route(self.webhook_path, methods=["POST"], branch=False)(self.dockerhub)
        route("/api/registry/events", methods=["POST"])(self.registry)
        route("/api/deploy", methods=["POST"])(self.generic)
        route("/api/quay/events", methods=["POST"])(self.quay)
        route("/api/harbor/events", methods=["POST"])(self.harbor)
        route("/api/github/events", methods=["POST"])(self.github)
        route("/healthz", methods=["GET", "HEAD"])(self.healthz)
        route("/metrics", methods=["GET", "HEAD"])(self.prometheus)
        route("/status", methods=["GET", "HEAD"])(self.status)
        route("/api/resume", methods=["POST"])(self.resume)
        self.app.handle_errors(BadWebhook)(self._bad_webhook)
        self.app.handle_errors(EtcdError)(self._unavailable)
        self.app.handle_errors(MethodNotAllowed)(self._not_allowed)
        self.app.handle_errors(NotFound)(self._not_found)
        # werkzeug "redirects" /api//deploy to /api/deploy: an unknown path here, never a 500.
        self.app.handle_errors(RequestRedirect)(self._not_found)
        self.app.handle_errors(Exception)(self._unexpected)

    def resource(self) -> IResource:
        resource: IResource = self.app.resource()
        return resource

    # -- errors: the one place where they become answers --------------------------------------

    def _bad_webhook(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, BadWebhook)
        if isinstance(error, Unauthorized):
            self.metrics.webhook_auth_failures.labels(endpoint=_endpoint(request)).inc()
            log.warn("refused webhook to {path} from {peer}: {reason}", path=_path(request),
                     peer=peer(request), reason=error.reason)
            request.setHeader(b"WWW-Authenticate", b'Bearer realm="deployer"')
        else:
            log.info("bad webhook to {path} from {peer}: {reason}", path=_path(request),
                     peer=peer(request), reason=error.reason)
        return json_body(request, error.code, {"error": error.reason})

    def _unavailable(self, request: IRequest, failure: Failure) -> bytes:
        """etcd did not answer (:class:`EtcdUnavailable`) or answered with an error."""
        error = failure.value
        reason = str(error) if isinstance(error, EtcdUnavailable) else f"etcd: {error}"
        log.error("cannot answer {path}: {error}", path=_path(request), error=reason)
        return json_body(request, 503, {"error": reason})

    def _not_allowed(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        allowed = getattr(error, "valid_methods", None) or []
        request.setHeader(b"Allow", ", ".join(allowed).encode())
        method = request.method.decode("ascii", "replace")
        return json_body(request, 405, {"error": f"method {method} not allowed here; use "
                                        + (" or ".join(allowed) or "another")})

    def _not_found(self, request: IRequest, failure: Failure) -> bytes:
        return json_body(request, 404, {"error": f"no such endpoint: {_path(request)}"})

    def _unexpected(self, request: IRequest, failure: Failure) -> bytes:
        log.failure("webhook to {path} failed unexpectedly", failure, path=_path(request))
        return json_body(request, 500, {"error": "internal error; see the daemon's log"})

    # -- webhook endpoints ----------------------------------------------------------------------

    async def dockerhub(self, request: IRequest) -> bytes:
        """Docker Hub: ``repository.repo_name``, ``push_data.tag``, ``callback_url``."""
        self._start(request, "dockerhub")
        body = self._json_body(request, JSON_CONTENT_TYPES)
        hook = parse_dockerhub(body, self.clock.seconds())
        try:
            where = await self._accept([hook.update])
        except EtcdUnavailable as e:
            self._callback(hook.callback_url, "error", f"Could not record the update: {e}")
            raise
        self._callback(hook.callback_url, "success", where)
        return json_body(request, 202, _accepted([hook.update]))

    async def registry(self, request: IRequest) -> bytes:
        """Docker Distribution notifications. Answer 200 quickly, whatever the envelope holds
        that matters; each event id is acted on once (the registry retries and reorders)."""
        self._start(request, "registry")
        body = self._json_body(request, REGISTRY_CONTENT_TYPES)
        updates = parse_registry_events(body, self.clock.seconds())
        fresh: list[Update] = []
        ids: set[str] = set()
        earlier: list[Deferred[object]] = []
        for update in updates:
            event = update.event_id
            if event is None:
                fresh.append(update)
            elif event in self.seen or event in ids:
                continue
            elif event in self._writing:
                # A retry of an event whose write is still under way: its answer is that
                # write's (the registry retries after 2 s; etcd may take longer).
                earlier.append(self._writing[event].wait())
            else:
                ids.add(event)
                fresh.append(update)
        if fresh:
            write = _Shared(Deferred.fromCoroutine(self._accept(fresh)))
            for event in ids:
                self._writing[event] = write
            try:
                await write.wait()
            finally:
                for event in ids:
                    del self._writing[event]
            for event in ids:
                self.seen.first_time(event)
        for d in earlier:
            await d
        return json_body(request, 200, {
            **_accepted(fresh),
            "duplicates": len(updates) - len(fresh),
        })

    async def generic(self, request: IRequest) -> bytes:
        """``{"repository": "[host/]repo", "tag": "...", "digest": "..."}`` from CI jobs."""
        self._start(request, "deploy")
        update = parse_generic(self._json_body(request, JSON_CONTENT_TYPES), self.clock.seconds())
        await self._accept([update])
        return json_body(request, 202, _accepted([update]))

    async def quay(self, request: IRequest) -> bytes:
        self._start(request, "quay")
        updates = parse_quay(self._json_body(request, JSON_CONTENT_TYPES), self.clock.seconds())
        if updates:
            await self._accept(updates)
        return json_body(request, 202, _accepted(updates))

    async def harbor(self, request: IRequest) -> bytes:
        """Harbor gives up after 3 s: answer within :data:`HARBOR_ANSWER_WITHIN` even while the
        write still waits for etcd (it goes on, and a failure is logged)."""
        self._start(request, "harbor")
        updates = parse_harbor(self._json_body(request, JSON_CONTENT_TYPES), self.clock.seconds())
        if not updates:
            return json_body(request, 202, _accepted(updates))
        accepted = Deferred.fromCoroutine(self._accept(updates))
        done, result = await wait_at_most(self.clock, accepted, HARBOR_ANSWER_WITHIN)
        if not done:
            accepted.addErrback(
                lambda f: log.failure("harbor update {updates} was not recorded", f,
                                      updates=[u.pattern for u in updates])
            )
            return json_body(request, 202, {**_accepted(updates), "status": "pending"})
        if isinstance(result, Failure):
            result.raiseException()
        return json_body(request, 202, _accepted(updates))

    async def github(self, request: IRequest) -> bytes:
        """GitHub package events, signed with ``X-Hub-Signature-256`` (no token needed)."""
        self._start(request, "github", authenticate=False)
        if self.github_secret is None:
            raise BadWebhook("GitHub webhooks are not enabled here: start the daemon with"
                             " --github_secret", 404)
        raw = self._read(request)
        verify_github_signature(self.github_secret, raw,
                                request.getHeader(b"x-hub-signature-256"))
        event = (request.getHeader(b"x-github-event") or b"").decode("ascii", "replace")
        check_content_type(request.getHeader(b"content-type"), JSON_CONTENT_TYPES)
        if event == "ping":
            return json_body(request, 200, {"status": "pong"})
        delivery = request.getHeader(b"x-github-delivery")
        updates = parse_github(
            decode_json(raw), event, self.clock.seconds(),
            delivery.decode("ascii", "replace") if delivery else None,
        )
        if updates:
            await self._accept(updates)
        return json_body(request, 202, _accepted(updates))

    # -- health and metrics ---------------------------------------------------------------------

    async def healthz(self, request: IRequest) -> bytes:
        reason = await self.health()
        if reason is None:
            return json_body(request, 200, {"status": "ok"})
        return json_body(request, 503, {"status": "unavailable", "error": reason})

    def prometheus(self, request: IRequest) -> bytes:
        body, content_type = self.metrics.render()
        request.setHeader(b"Content-Type", content_type.encode("ascii"))
        request.setHeader(b"Cache-Control", b"no-store")
        return body

    # -- rollouts ---------------------------------------------------------------------------------

    async def status(self, request: IRequest) -> bytes:
        """The ``/status`` document: JSON, or the status page when the client prefers
        ``text/html`` (JSON when both are as welcome)."""
        self._authorize(request, "status")
        document = await self._rollouts().status.document()
        request.setHeader(b"Vary", b"Accept")
        if not prefers_html(request.requestHeaders.getRawHeaders(b"accept") or []):
            return json_body(request, 200, document)
        # The page's template machinery (twisted.web.template, xml.sax) is loaded the first
        # time a browser asks, not by every daemon at start.
        from deployer.status_page import HEADERS, render_page

        page = render_page(document)
        for name, value in HEADERS.items():
            request.setHeader(name, value)
        return page

    async def resume(self, request: IRequest) -> bytes:
        """``{"app": "repo:tag"}``: end the app's paused rollout (``deployer resume``)."""
        self._authorize(request, "resume", query_token=False)
        body = self._json_body(request, JSON_CONTENT_TYPES)
        if not isinstance(body, dict) or not isinstance(body.get("app"), str):
            raise BadWebhook('the body must be {"app": "repo:tag"}')
        try:
            app = app_name(body["app"])
        except InvalidReference as e:
            raise BadWebhook(f"invalid app: {e}") from None
        if not await self._rollouts().pauses.resume(app):
            raise BadWebhook(f"{app} is not paused", 404)
        log.info("resumed the rollout of {app} (asked from {peer})", app=app, peer=peer(request))
        return json_body(request, 200, {"status": "resumed", "app": app})

    def _rollouts(self) -> RolloutControl:
        if self.rollouts is None:
            raise BadWebhook("rollout status is not kept by this daemon", 404)
        return self.rollouts

    def _authorize(self, request: IRequest, endpoint: str, query_token: bool = True) -> None:
        """Check the caller of an endpoint that is not a webhook (not counted as one).
        Without ``query_token``, a token in the URL is refused."""
        request.deployer_endpoint = endpoint  # type: ignore[attr-defined]
        if self.auth is None:
            return
        if not query_token and b"token" in urlsplit(request.uri).query:
            raise Unauthorized(f"send the token in an Authorization header: {_path(request)}"
                               " does not take one in the URL")
        self.auth.check(request)

    # -- helpers --------------------------------------------------------------------------------

    def _start(self, request: IRequest, endpoint: str, authenticate: bool = True) -> None:
        """Count the answer once it is sent, and check the caller."""
        request.deployer_endpoint = endpoint  # type: ignore[attr-defined]

        def count(_: object) -> None:
            code = getattr(request, "code", 0)
            self.metrics.webhooks.labels(endpoint=endpoint, status=str(code)).inc()

        finished: Deferred[None] = request.notifyFinish()  # type: ignore[attr-defined]
        finished.addBoth(count)
        if authenticate and self.auth is not None:
            self.auth.check(request)

    def _json_body(self, request: IRequest, types: Collection[str]) -> Any:
        check_content_type(request.getHeader(b"content-type"), types)
        return decode_json(self._read(request))

    def _read(self, request: IRequest) -> bytes:
        content = request.content
        if content is None:
            return b""
        content.seek(0)
        body: bytes = content.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            raise BadWebhook(f"body larger than {MAX_BODY} bytes", 413)
        return body

    async def _accept(self, updates: Sequence[Update]) -> str:
        where = await self.sink.accept(updates)
        for u in updates:
            self.metrics.updates_accepted.labels(source=u.source).inc()
            log.info(
                "accepted update source={source} repository={repository} tag={tag}"
                " digest={digest}",
                source=u.source, repository=u.name, tag=u.tag or "*", digest=u.digest or "-",
                event_id=u.event_id,
            )
        return where

    def _callback(self, url: str | None, state: str, description: str) -> None:
        if not url or self.callbacks is None:
            return
        context = f"{self.context} time={int(self.clock.seconds())}".strip()
        self.callbacks.send(url, state, description[:255], context[:100], self.public_url or "")


class _Shared:
    """One Deferred result that any number of waiters can observe, each with its own
    Deferred."""

    _unset = object()

    def __init__(self, d: Deferred[Any]) -> None:
        self._result: object = self._unset
        self._waiters: list[Deferred[object]] = []
        d.addBoth(self._fired)

    def _fired(self, result: object) -> None:
        self._result = result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            self._deliver(waiter)

    def _deliver(self, waiter: Deferred[object]) -> None:
        if isinstance(self._result, Failure):
            waiter.errback(self._result)
        else:
            waiter.callback(self._result)

    def wait(self) -> Deferred[object]:
        waiter: Deferred[object] = Deferred()
        if self._result is self._unset:
            self._waiters.append(waiter)
        else:
            self._deliver(waiter)
        return waiter


def prefers_html(accept: Iterable[bytes]) -> bool:
    """Whether ``Accept`` header values prefer ``text/html`` to ``application/json``: a
    browser. A tie (``*/*``), no ``Accept``, or neither accepted: JSON."""
    parsed = parse_accept_header(", ".join(v.decode("latin-1") for v in accept), MIMEAccept)
    return parsed.quality("text/html") > parsed.quality("application/json")


def _accepted(updates: Sequence[Update]) -> dict[str, Any]:
    return {"status": "accepted", "updates": describe_updates(updates)}


def _endpoint(request: IRequest) -> str:
    return str(getattr(request, "deployer_endpoint", "unknown"))


def _path(request: IRequest) -> str:
    return request.path.decode("ascii", "replace")[:200]
