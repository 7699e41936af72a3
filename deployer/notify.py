"""Calling out: Docker Hub's callback, Slack, and a JSON webhook of our own.

Everything here takes an injected :class:`treq.client.HTTPClient` and a reactor (for timeouts and
back-off), and nothing here ever fails its caller: a delivery that does not work is logged and
dropped. A whole exchange (connecting, the answer and its body) is bounded by ``timeout``,
redirects are never followed, answers are read up to 64 KiB, and URLs are logged without the
parts that are secrets (a Slack webhook's path, query strings, user names and passwords).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import attrs
from treq.client import HTTPClient
from treq.content import collect as collect_body
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from deployer.backoff import RetryPolicy, backoff
from deployer.errors import ConfigError
from deployer.timeouts import cancel_after

log = Logger()

BODY_LIMIT = 64 * 1024
DOCKER_HUB_CALLBACK_HOSTS = frozenset({"registry.hub.docker.com"})
DOCKER_HUB_STATES = frozenset({"success", "failure", "error"})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_URL_MAX = 2048


class DeliveryFailed(Exception):
    """The other end answered, but not with what counts as delivered."""


class _AnswerTooLarge(Exception):
    pass


# -- URLs -----------------------------------------------------------------------------------------


def redact_url(url: str, keep_path: bool = False) -> str:
    """``url`` fit for a log line: scheme, host and port, and the path only if ``keep_path``;
    never the user name, password, query or fragment."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return "<unparseable URL>"
    host = parts.hostname or "?"
    if ":" in host:
        host = f"[{host}]"
    netloc = host if port is None else f"{host}:{port}"
    path = parts.path if keep_path else ""
    return urlunsplit((parts.scheme, netloc, path, "", ""))


def _split_userinfo(url: str) -> tuple[str, tuple[str, str] | None]:
    """``url`` without its ``user:password@`` (returned apart, for Basic auth)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    return urlunsplit(parts._replace(netloc=hostport)), (user, password)


def check_config_url(url: str, what: str) -> str:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        raise ConfigError(f"the {what} URL is not a URL: {e}") from None
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ConfigError(f"the {what} URL must be an http:// or https:// URL with a host")
    return url


def _host_set(hosts: Iterable[str]) -> frozenset[str]:
    if isinstance(hosts, str):
        raise TypeError("allowed_hosts must be a collection of host names, not one string")
    return frozenset(hosts)


def _host_port(entry: str) -> tuple[str, int | None]:
    parts = urlsplit("//" + entry.strip().lower())
    return parts.hostname or "", parts.port


# -- one POST -------------------------------------------------------------------------------------


async def _read_limited(response: IResponse, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0

    def collect(data: bytes) -> None:
        nonlocal size
        size += len(data)
        if size > limit:
            raise _AnswerTooLarge(f"the answer is larger than {limit} bytes")
        chunks.append(data)

    await collect_body(response, collect)
    return b"".join(chunks)


def _post_json(
    http: HTTPClient,
    reactor: IReactorTime,
    url: str,
    payload: object,
    timeout: float,
) -> Deferred[tuple[int, bytes]]:
    """POST ``payload`` as JSON to ``url``; fires with (status, body) or fails, within
    ``timeout`` seconds for the whole exchange. Redirects are answers, not followed."""
    target, auth = _split_userinfo(url)

    async def exchange() -> tuple[int, bytes]:
        response = await http.post(
            target,
            json=payload,
            auth=auth,
            allow_redirects=False,
            unbuffered=True,
            headers=Headers({b"User-Agent": [b"deployer"]}),
        )
        body = await _read_limited(response, BODY_LIMIT)
        return response.code, body

    return cancel_after(Deferred.fromCoroutine(exchange()), timeout, reactor, "no complete answer")


async def _with_retries(
    reactor: IReactorTime,
    attempt: Callable[[], Awaitable[None]],
    retries: int,
    delay: RetryPolicy,
    what: str,
    where: str,
) -> bool:
    """Run ``attempt`` until it succeeds, at most ``retries`` more times, waiting ``delay(n)``
    seconds before retry ``n``. True when delivered; never raises."""
    for number in range(retries + 1):
        try:
            await attempt()
        except Exception:
            failure = Failure()
            last = number == retries
            log.failure(
                "{what} to {where} failed (attempt {number} of {total}){giving_up}",
                failure,
                level=LogLevel.warn if last else LogLevel.info,
                what=what,
                where=where,
                number=number + 1,
                total=retries + 1,
                giving_up=", giving up" if last else "",
            )
            if not last:
                await deferLater(reactor, delay(number))
        else:
            return True
    return False


def _deliver(
    reactor: IReactorTime,
    attempt: Callable[[], Awaitable[None]],
    retries: int,
    first_delay: float,
    what: str,
    where: str,
) -> Deferred[None]:
    """One delivery of a notifier: ``attempt``, retried ``retries`` times, ``first_delay``
    seconds before the first retry, then twice as long each time. Never fails."""
    tries = _with_retries(reactor, attempt, retries, backoff(first_delay, cap=math.inf),
                          what, where)
    return _never_fails(Deferred.fromCoroutine(tries), what)


def _never_fails(d: Deferred[Any], what: str) -> Deferred[None]:
    def logged(failure: Failure) -> None:
        log.failure("Unexpected error in {what}", failure, what=what)

    return d.addCallbacks(lambda _: None, logged)


# -- Docker Hub -----------------------------------------------------------------------------------


@attrs.frozen
class DockerHubCallback:
    """Answers Docker Hub's webhook on its ``callback_url``, but only on hosts we trust.

    The URL comes from the request body, so it is checked before anything is sent: ``https``
    only (``http`` too with ``allow_http``, for tests), no ``user@`` part, and a host that is
    exactly one of ``allowed_hosts`` (case-insensitive; an entry ``host`` allows the default
    port, ``host:port`` that port; an IP address only if listed). Anything else is logged and
    skipped. Docker no longer supports the callback and may answer 400: that is logged at info
    level like every other failure, and nothing is retried.
    """

    http: HTTPClient
    reactor: IReactorTime
    allowed_hosts: frozenset[str] = attrs.field(
        default=DOCKER_HUB_CALLBACK_HOSTS, converter=_host_set
    )
    timeout: float = 5.0
    allow_http: bool = False

    def refusal(self, callback_url: str) -> str | None:
        """Why ``callback_url`` may not be called, or None when it may."""
        if len(callback_url) > _URL_MAX:
            return "the URL is too long"
        if any(not ("!" <= c <= "~") or c == "\\" for c in callback_url):
            return "the URL has spaces, backslashes, control or non-ASCII characters"
        try:
            parts = urlsplit(callback_url)
            port = parts.port
        except ValueError:
            return "the URL does not parse"
        schemes = {"https", "http"} if self.allow_http else {"https"}
        if parts.scheme.lower() not in schemes:
            return f"the scheme is not {' or '.join(sorted(schemes))}"
        if "@" in parts.netloc:
            return "the URL has a user name or password"
        host = parts.hostname or ""
        default = _DEFAULT_PORTS[parts.scheme.lower()]
        for entry in self.allowed_hosts:
            allowed_host, allowed_port = _host_port(entry)
            if host == allowed_host and (port or default) == (allowed_port or default):
                return None
        return "the host is not one of the allowed callback hosts"

    def send(
        self,
        callback_url: str,
        state: str,
        description: str,
        context: str,
        target_url: str,
    ) -> Deferred[None]:
        """POST ``{state, description, context, target_url}`` to ``callback_url``. The
        Deferred always fires with None (the caller need not wait for it)."""
        where = redact_url(callback_url)
        refusal = self.refusal(callback_url)
        if refusal is None and state not in DOCKER_HUB_STATES:
            refusal = f"state {state!r} is not one of {', '.join(sorted(DOCKER_HUB_STATES))}"
        if refusal is not None:
            log.info(
                "Not calling the Docker Hub callback {where}: {refusal}",
                where=where,
                refusal=refusal,
            )
            return succeed(None)
        parts = urlsplit(callback_url)
        url = urlunsplit(parts._replace(fragment=""))
        payload = {
            "state": state,
            "description": description[:255],
            "context": context[:100],
            "target_url": target_url,
        }
        d = _post_json(self.http, self.reactor, url, payload, self.timeout)

        def answered(result: tuple[int, bytes]) -> None:
            code, _ = result
            if 200 <= code < 300:
                log.info("Docker Hub callback {where} accepted ({code})", where=where, code=code)
            else:
                log.info("Docker Hub callback {where} answered HTTP {code}", where=where,
                         code=code)

        def failed(failure: Failure) -> None:
            # Docker Hub no longer honours callbacks: a failure is expected, not a fault.
            log.info("Docker Hub callback {where} failed: {error}", where=where,
                     error=f"{failure.type.__name__}: {failure.getErrorMessage()}")

        return d.addCallbacks(answered, failed)


# -- Slack ----------------------------------------------------------------------------------------


def slack_text(container_names: Sequence[str]) -> str:
    """The Go original's message: ``Deploying a, b`` (sorted, without the leading ``/``)."""
    return "Deploying " + ", ".join(sorted(name.lstrip("/") for name in container_names))


@attrs.frozen
class SlackNotifier:
    """Tells a Slack incoming webhook which containers are being redeployed.

    Slack answers ``ok`` when it took the message; any other answer is a failure, retried
    ``retries`` times with back-off, then logged. The webhook URL is a secret: only its scheme
    and host are ever logged.
    """

    http: HTTPClient
    reactor: IReactorTime
    webhook_url: str = attrs.field(
        repr=False, validator=lambda _i, _a, v: check_config_url(v, "Slack webhook")
    )
    username: str = "Deployer"
    timeout: float = 10.0
    retries: int = 2
    backoff: float = 1.0

    def deployed(self, container_names: Sequence[str]) -> Deferred[None]:
        """Post the message; nothing when no container was stopped. Never fails."""
        if not container_names:
            return succeed(None)
        return self.say(slack_text(container_names))

    def say(self, text: str) -> Deferred[None]:
        """Post ``text``. Never fails."""
        payload = {"text": text, "username": self.username}

        async def attempt() -> None:
            code, body = await _post_json(
                self.http, self.reactor, self.webhook_url, payload, self.timeout
            )
            if code != 200 or body.strip() != b"ok":
                raise DeliveryFailed(f"Slack answered HTTP {code}: {body[:200]!r}")

        return _deliver(self.reactor, attempt, self.retries, self.backoff,
                        "Slack notification", redact_url(self.webhook_url))


# -- a JSON webhook -------------------------------------------------------------------------------


def _strings(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(values)


def _mapping(values: Mapping[str, str]) -> dict[str, str]:
    return dict(values)


@attrs.frozen
class DeployReport:
    """What one deployment round did on one host, as sent to the notifiers."""

    host: str
    pattern: str
    stopped: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    images: Mapping[str, str] = attrs.field(factory=dict, converter=_mapping, hash=False)
    failures: tuple[str, ...] = attrs.field(default=(), converter=_strings)
    source: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "pattern": self.pattern,
            "source": self.source,
            "containers_stopped": sorted(name.lstrip("/") for name in self.stopped),
            "images": dict(self.images),
            "failures": list(self.failures),
        }


@attrs.frozen
class PauseNotice:
    """The rollout of ``app`` paused on ``host``: its build ``image_id`` (``digest``) was not
    ready in ``container`` (``reason``: ``unhealthy``, ``exited``, ``no_replacement`` or
    ``timeout``; ``detail`` in words), and the host went back to ``previous_image``."""

    host: str
    app: str
    container: str
    image_id: str
    digest: str | None
    reason: str
    detail: str
    previous_image: str

    def text(self) -> str:
        """The one line that Slack gets and the log holds."""
        return (f"Rollout of {self.app} paused on {self.host}: {self.reason}: {self.detail};"
                f" {self.container} is back on the previous build"
                f" {self.previous_image.removeprefix('sha256:')[:12]}")

    def as_json(self) -> dict[str, Any]:
        return {
            "event": "rollout_paused",
            "host": self.host,
            "app": self.app,
            "container": self.container,
            "image_id": self.image_id,
            "digest": self.digest,
            "reason": self.reason,
            "detail": self.detail,
            "previous_image": self.previous_image,
            "message": self.text(),
        }


@attrs.frozen
class WebhookNotifier:
    """POSTs a JSON report to ``url`` after each round; any 2xx is delivered. Failures are
    retried ``retries`` times with back-off and then logged. A ``user:password@`` in the URL is
    sent as Basic auth; logs show the URL without it and without the query string."""

    http: HTTPClient
    reactor: IReactorTime
    url: str = attrs.field(
        repr=False, validator=lambda _i, _a, v: check_config_url(v, "notification webhook")
    )
    timeout: float = 10.0
    retries: int = 2
    backoff: float = 1.0

    def deployed(self, report: Mapping[str, Any]) -> Deferred[None]:
        """Post ``report`` (a JSON-able mapping). Never fails."""
        payload = dict(report)

        async def attempt() -> None:
            code, body = await _post_json(self.http, self.reactor, self.url, payload,
                                          self.timeout)
            if not 200 <= code < 300:
                raise DeliveryFailed(f"answered HTTP {code}: {body[:200]!r}")

        return _deliver(self.reactor, attempt, self.retries, self.backoff,
                        "Deployment report", redact_url(self.url, keep_path=True))


@attrs.frozen
class Notifiers:
    """Every configured notifier, told about each round without holding it up.

    Slack hears about rounds that stopped containers; the JSON webhook about rounds that
    stopped containers or had failures; both about a paused rollout (:meth:`paused`).
    Each returns a Deferred that never fails and that the caller does not have to wait for.
    """

    slack: SlackNotifier | None = None
    webhook: WebhookNotifier | None = None

    def deployed(self, report: DeployReport) -> Deferred[None]:
        pending: list[Deferred[None]] = []
        if self.slack is not None and report.stopped:
            pending.append(maybeDeferred(self.slack.deployed, report.stopped))
        if self.webhook is not None and (report.stopped or report.failures):
            pending.append(maybeDeferred(self.webhook.deployed, report.as_json()))
        return _all(pending)

    def paused(self, notice: PauseNotice) -> Deferred[None]:
        """A rollout paused: Slack gets :meth:`PauseNotice.text`, the JSON webhook
        :meth:`PauseNotice.as_json`."""
        pending: list[Deferred[None]] = []
        if self.slack is not None:
            pending.append(maybeDeferred(self.slack.say, notice.text()))
        if self.webhook is not None:
            pending.append(maybeDeferred(self.webhook.deployed, notice.as_json()))
        return _all(pending)


def _all(pending: list[Deferred[None]]) -> Deferred[None]:
    for d in pending:
        _never_fails(d, "a notifier")
    return gatherResults(pending).addCallback(lambda _: None)
