"""deployer.notify: who gets called, with what, and that nothing ever fails its caller."""

from __future__ import annotations

import json
from base64 import b64decode
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
import pytest_twisted
from treq.client import HTTPClient
from treq.testing import StubTreq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs, eventAsText
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from deployer.errors import ConfigError
from deployer.notify import (
    DeployReport,
    DockerHubCallback,
    Notifiers,
    SlackNotifier,
    WebhookNotifier,
    redact_url,
    slack_text,
)
from tests.helpers import fired

HUB_URL = "https://registry.hub.docker.com/u/svendowideit/testhook/hook/2141b5bi5i5b02bec/"
SLACK_URL = "https://hooks.slack.com/services/T000/B000/XXXXSECRETXXXX"


@attrs.define
class Seen:
    method: bytes
    path: bytes
    headers: dict[bytes, list[bytes]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Recorder(Resource):
    """Answers each request with the next of ``answers`` (status, body[, headers]); the last
    one repeats. ``None`` as an answer: never answer (until :meth:`finish_pending`)."""

    isLeaf = True

    def __init__(self, *answers: tuple[int, bytes] | tuple[int, bytes, dict[bytes, bytes]] | None
                 ) -> None:
        super().__init__()
        self.answers = list(answers) or [(200, b"ok")]
        self.seen: list[Seen] = []
        self.pending: list[Any] = []

    def render(self, request: Any) -> Any:
        self.seen.append(
            Seen(
                request.method,
                request.uri,
                dict(request.requestHeaders.getAllRawHeaders()),
                request.content.read(),
            )
        )
        answer = self.answers[min(len(self.seen), len(self.answers)) - 1]
        if answer is None:
            self.pending.append(request)
            return NOT_DONE_YET
        code, body, *extra = answer
        request.setResponseCode(code)
        for name, value in (extra[0] if extra else {}).items():
            request.setHeader(name, value)
        return body

    def finish_pending(self) -> None:
        for request in self.pending:
            if not request.finished and not request._disconnected:
                request.finish()
        self.pending.clear()


def logged(events: list[Any]) -> str:
    return "\n".join(eventAsText(e, includeTraceback=True) for e in events)


# -- URLs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, keep_path, expected",
    [
        (SLACK_URL, False, "https://hooks.slack.com"),
        ("https://user:pw@example.com:8443/a/b?key=s3cret#frag", True,
         "https://example.com:8443/a/b"),
        ("http://[::1]:80/x?y", False, "http://[::1]:80"),
        ("http://[::1/x", False, "<unparseable URL>"),
    ],
)
def test_redact_url(url: str, keep_path: bool, expected: str) -> None:
    assert redact_url(url, keep_path) == expected


# -- Docker Hub callback: which URLs ---------------------------------------------------------------


def hub(resource: Resource | None = None, **kwargs: Any) -> tuple[DockerHubCallback, Clock]:
    clock = Clock()
    http = StubTreq(resource or Recorder())
    return DockerHubCallback(http, clock, **kwargs), clock  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "url",
    [
        HUB_URL,
        "HTTPS://Registry.Hub.Docker.COM/u/x/hook/1/",
        "https://registry.hub.docker.com:443/u/x/hook/1/",
        "https://registry.hub.docker.com",
        "https://registry.hub.docker.com/u/x?y=1#z",
    ],
)
def test_callback_allowed(url: str) -> None:
    callback, _ = hub()
    assert callback.refusal(url) is None


@pytest.mark.parametrize(
    "url, why",
    [
        ("http://registry.hub.docker.com/u/x/hook/1/", "scheme"),
        ("ftp://registry.hub.docker.com/", "scheme"),
        ("//registry.hub.docker.com/x", "scheme"),
        ("registry.hub.docker.com/x", "scheme"),
        ("javascript:alert(1)", "scheme"),
        ("", "scheme"),
        ("https://registry.hub.docker.com.evil.example/x", "host"),
        ("https://evil.example/registry.hub.docker.com/", "host"),
        ("https://evil.example/?registry.hub.docker.com", "host"),
        ("https://registry.hub.docker.com./x", "host"),
        ("https://hub.docker.com/x", "host"),
        ("https://registry.hub.docker.com:8443/x", "host"),
        ("https://registry.hub.docker.com%2eevil.example/", "host"),
        ("https://registry.hub.docker.com@evil.example/", "user name"),
        ("https://user:pw@registry.hub.docker.com/", "user name"),
        ("https://evil.example#@registry.hub.docker.com/", "host"),
        ("https://evil.example\\@registry.hub.docker.com/", "backslash"),
        ("https://registry.hub.docker.com /x", "spaces"),
        ("https://registry.hub.docker.com/\nx", "control"),
        ("https://régistry.hub.docker.com/", "non-ASCII"),
        ("https://127.0.0.1/", "host"),
        ("https://[::1]/", "host"),
        ("https://0x7f000001/", "host"),
        ("https://2130706433/", "host"),
        ("https://registry.hub.docker.com:99999/", "parse"),
        ("https://[registry.hub.docker.com/", "parse"),
        ("https://registry.hub.docker.com/" + "a" * 3000, "too long"),
    ],
)
def test_callback_refused(url: str, why: str) -> None:
    callback, _ = hub()
    refusal = callback.refusal(url)
    assert refusal is not None and why in refusal


def test_callback_ip_only_when_listed() -> None:
    callback, _ = hub(allowed_hosts=["127.0.0.1:8080", "[::1]"])
    assert callback.refusal("https://127.0.0.1:8080/x") is None
    assert callback.refusal("https://[::1]/x") is None
    assert callback.refusal("https://127.0.0.1/x") is not None
    assert callback.refusal("https://127.0.0.1:8081/x") is not None
    assert callback.refusal("https://[::1]:8443/x") is not None
    assert callback.refusal(HUB_URL) is not None


def test_callback_http_only_with_knob() -> None:
    callback, _ = hub(allowed_hosts=frozenset({"127.0.0.1:8080"}), allow_http=True)
    assert callback.refusal("http://127.0.0.1:8080/x") is None
    assert callback.refusal("https://127.0.0.1:8080/x") is None


# -- Docker Hub callback: what is sent -------------------------------------------------------------


def test_callback_sends_status() -> None:
    recorder = Recorder((200, b"{}"))
    callback, _ = hub(recorder)
    with capturedLogs() as events:
        result = fired(callback.send(HUB_URL + "#frag", "success", "Triggered etcd /deployer/x",
                                     "etcd=http://e:2379", "http://deployer.example/"))
    assert result is None
    [seen] = recorder.seen
    assert seen.method == b"POST"
    assert seen.path == b"/u/svendowideit/testhook/hook/2141b5bi5i5b02bec/"
    assert seen.headers[b"Content-Type"] == [b"application/json; charset=UTF-8"]
    assert seen.json() == {
        "state": "success",
        "description": "Triggered etcd /deployer/x",
        "context": "etcd=http://e:2379",
        "target_url": "http://deployer.example/",
    }
    assert "accepted" in logged(events)


def test_callback_truncates() -> None:
    recorder = Recorder()
    callback, _ = hub(recorder)
    fired(callback.send(HUB_URL, "error", "d" * 1000, "c" * 1000, "t"))
    body = recorder.seen[0].json()
    assert (body["description"], body["context"]) == ("d" * 255, "c" * 100)


def test_callback_refused_url_not_called_and_logged() -> None:
    recorder = Recorder()
    callback, _ = hub(recorder)
    with capturedLogs() as events:
        assert fired(callback.send("https://evil.example/hook", "success", "d", "c", "t")) is None
    assert recorder.seen == []
    text = logged(events)
    assert "Not calling the Docker Hub callback https://evil.example" in text
    assert "/hook" not in text


def test_callback_bad_state_not_sent() -> None:
    recorder = Recorder()
    callback, _ = hub(recorder)
    assert fired(callback.send(HUB_URL, "pending", "d", "c", "t")) is None
    assert recorder.seen == []


@pytest.mark.parametrize("code", [400, 404, 500])
def test_callback_error_answer_logged_at_info(code: int) -> None:
    callback, _ = hub(Recorder((code, b"nope")))
    with capturedLogs() as events:
        assert fired(callback.send(HUB_URL, "success", "d", "c", "t")) is None
    [event] = [e for e in events if "Docker Hub callback" in e.get("log_format", "")]
    assert event["log_level"] == LogLevel.info
    assert f"HTTP {code}" in eventAsText(event)


def test_callback_redirect_not_followed() -> None:
    recorder = Recorder((302, b"", {b"location": b"https://registry.hub.docker.com/elsewhere"}))
    callback, _ = hub(recorder)
    assert fired(callback.send(HUB_URL, "success", "d", "c", "t")) is None
    assert [s.path for s in recorder.seen] == [b"/u/svendowideit/testhook/hook/2141b5bi5i5b02bec/"]


def test_callback_timeout() -> None:
    recorder = Recorder(None)
    callback, clock = hub(recorder, timeout=5)
    with capturedLogs() as events:
        d = callback.send(HUB_URL, "success", "d", "c", "t")
        results: list[Any] = []
        d.addBoth(results.append)
        clock.advance(4.9)
        assert results == []
        clock.advance(0.2)
    assert results == [None]
    failed = [e for e in events if "failed" in e.get("log_format", "")]
    assert failed and all(e["log_level"] == LogLevel.info for e in failed)
    assert not [e for e in events if "log_failure" in e], "an expected failure, no traceback"
    assert "TimeoutError" in logged(events) or "timed out" in logged(events)


# -- Slack ----------------------------------------------------------------------------------------


def slack(recorder: Recorder, **kwargs: Any) -> tuple[SlackNotifier, Clock]:
    clock = Clock()
    return SlackNotifier(StubTreq(recorder), clock, SLACK_URL, **kwargs), clock  # type: ignore


def test_slack_text() -> None:
    assert slack_text(["/web-2", "/api", "worker"]) == "Deploying api, web-2, worker"


def test_slack_message() -> None:
    recorder = Recorder((200, b"ok"))
    notifier, _ = slack(recorder, username="qa deploy")
    assert fired(notifier.deployed(["/foo.service", "/bar"])) is None
    [seen] = recorder.seen
    assert seen.path == b"/services/T000/B000/XXXXSECRETXXXX"
    assert seen.json() == {"text": "Deploying bar, foo.service", "username": "qa deploy"}


def test_slack_nothing_stopped_nothing_sent() -> None:
    recorder = Recorder()
    notifier, _ = slack(recorder)
    assert fired(notifier.deployed([])) is None
    assert recorder.seen == []


@pytest.mark.parametrize(
    "answers",
    [
        [(400, b"invalid_payload")],
        [(200, b"not ok")],
        [(200, b"")],
        [(302, b"ok", {b"location": b"https://hooks.slack.com/other"})],
        [None],
    ],
)
def test_slack_retries_then_gives_up(answers: list[Any]) -> None:
    recorder = Recorder(*answers)
    notifier, clock = slack(recorder, timeout=10, retries=2, backoff=1.0)
    with capturedLogs() as events:
        d = notifier.deployed(["/a"])
        results: list[Any] = []
        d.addBoth(results.append)
        for step in (10, 1, 10, 2, 10):  # timeouts (if no answer) and back-off delays
            clock.advance(step)
    assert results == [None]
    assert len(recorder.seen) == 3
    assert {s.path for s in recorder.seen} == {b"/services/T000/B000/XXXXSECRETXXXX"}
    text = logged(events)
    assert "giving up" in text
    assert "SECRET" not in text and "/services" not in text
    assert "https://hooks.slack.com" in text
    warnings = [e for e in events if e["log_level"] == LogLevel.warn]
    assert len(warnings) == 1


def test_slack_backoff_doubles() -> None:
    recorder = Recorder((500, b"x"))
    notifier, clock = slack(recorder, retries=3, backoff=2.0)
    notifier.deployed(["/a"])
    assert len(recorder.seen) == 1
    clock.advance(1.9)
    assert len(recorder.seen) == 1
    clock.advance(0.1)
    assert len(recorder.seen) == 2
    clock.advance(3.9)
    assert len(recorder.seen) == 2
    clock.advance(0.1)
    assert len(recorder.seen) == 3
    clock.advance(8)
    assert len(recorder.seen) == 4


def test_slack_second_attempt_succeeds() -> None:
    recorder = Recorder((500, b"x"), (200, b"ok"))
    notifier, clock = slack(recorder)
    with capturedLogs() as events:
        d = notifier.deployed(["/a"])
        clock.advance(1)
    assert fired(d) is None
    assert len(recorder.seen) == 2
    assert not [e for e in events if e["log_level"] >= LogLevel.warn]


def test_slack_url_checked_and_secret() -> None:
    with pytest.raises(ConfigError):
        SlackNotifier(StubTreq(Recorder()), Clock(), "hooks.slack.com/x")  # type: ignore
    notifier, _ = slack(Recorder())
    assert "SECRET" not in repr(notifier)


# -- the JSON webhook -----------------------------------------------------------------------------


REPORT = DeployReport(
    host="node-1",
    pattern="127.0.0.1:5000/myorg/foo:qa",
    stopped=["/foo-1", "/foo-2"],
    images={"127.0.0.1:5000/myorg/foo:qa": "sha256:" + "1" * 64},
    failures=["pull 127.0.0.1:5000/myorg/bar:qa: manifest unknown"],
    source="registry",
)


def test_report_json() -> None:
    assert REPORT.as_json() == {
        "host": "node-1",
        "pattern": "127.0.0.1:5000/myorg/foo:qa",
        "source": "registry",
        "containers_stopped": ["foo-1", "foo-2"],
        "images": {"127.0.0.1:5000/myorg/foo:qa": "sha256:" + "1" * 64},
        "failures": ["pull 127.0.0.1:5000/myorg/bar:qa: manifest unknown"],
    }
    json.dumps(REPORT.as_json())


def webhook(recorder: Recorder, url: str = "https://hooks.example.com/deploys?key=s3cret",
            **kwargs: Any) -> tuple[WebhookNotifier, Clock]:
    clock = Clock()
    return WebhookNotifier(StubTreq(recorder), clock, url, **kwargs), clock  # type: ignore


@pytest.mark.parametrize("code", [200, 201, 204])
def test_webhook_delivers(code: int) -> None:
    recorder = Recorder((code, b""))
    notifier, _ = webhook(recorder)
    assert fired(notifier.deployed(REPORT.as_json())) is None
    [seen] = recorder.seen
    assert seen.path == b"/deploys?key=s3cret"
    assert seen.json() == REPORT.as_json()


def test_webhook_userinfo_becomes_basic_auth_and_is_not_logged() -> None:
    recorder = Recorder((503, b"busy"))
    notifier, clock = webhook(recorder, "https://deployer:pa55word@hooks.example.com/d?key=s3cret",
                              retries=1)
    with capturedLogs() as events:
        d = notifier.deployed({"x": 1})
        clock.advance(1)
    assert fired(d) is None
    assert len(recorder.seen) == 2
    [authorization] = recorder.seen[0].headers[b"Authorization"]
    assert b64decode(authorization.split()[1]) == b"deployer:pa55word"
    text = logged(events)
    assert "https://hooks.example.com/d" in text
    for secret in ("pa55word", "deployer:", "s3cret", "key="):
        assert secret not in text


def test_webhook_timeout_then_retry() -> None:
    recorder = Recorder(None, (200, b""))
    notifier, clock = webhook(recorder, timeout=3, retries=2, backoff=1)
    d = notifier.deployed({"x": 1})
    clock.advance(3)  # the first attempt times out
    assert len(recorder.seen) == 1
    clock.advance(1)
    assert len(recorder.seen) == 2
    assert fired(d) is None


# -- Notifiers ------------------------------------------------------------------------------------


def test_notifiers_fan_out() -> None:
    slack_recorder, hook_recorder = Recorder((200, b"ok")), Recorder((204, b""))
    notifiers = Notifiers(slack(slack_recorder)[0], webhook(hook_recorder)[0])
    assert fired(notifiers.deployed(REPORT)) is None
    assert slack_recorder.seen[0].json()["text"] == "Deploying foo-1, foo-2"
    assert hook_recorder.seen[0].json() == REPORT.as_json()


def test_notifiers_who_hears_what() -> None:
    slack_recorder, hook_recorder = Recorder((200, b"ok")), Recorder((204, b""))
    notifiers = Notifiers(slack(slack_recorder)[0], webhook(hook_recorder)[0])
    fired(notifiers.deployed(DeployReport(host="h", pattern="x", failures=["boom"])))
    assert (len(slack_recorder.seen), len(hook_recorder.seen)) == (0, 1)
    fired(notifiers.deployed(DeployReport(host="h", pattern="x")))
    assert (len(slack_recorder.seen), len(hook_recorder.seen)) == (0, 1)
    assert fired(Notifiers().deployed(REPORT)) is None


def test_notifiers_do_not_hold_up_the_caller() -> None:
    slack_recorder = Recorder(None)
    notifier, clock = slack(slack_recorder, timeout=10, retries=0)
    d = Notifiers(slack=notifier).deployed(REPORT)
    results: list[Any] = []
    d.addBoth(results.append)
    assert results == [] and len(slack_recorder.seen) == 1  # sent, not waited for
    clock.advance(10)
    assert results == [None]


def test_notifiers_survive_a_broken_notifier() -> None:
    class Broken:
        def deployed(self, names: Any) -> Deferred[None]:
            raise RuntimeError("broken")

    hook_recorder = Recorder((204, b""))
    notifiers = Notifiers(Broken(), webhook(hook_recorder)[0])  # type: ignore[arg-type]
    with capturedLogs() as events:
        assert fired(notifiers.deployed(REPORT)) is None
    assert len(hook_recorder.seen) == 1
    assert "broken" in logged(events)


# -- against a real HTTP server on 127.0.0.1 ------------------------------------------------------


@pytest.fixture
def server() -> Iterator[tuple[str, Resource, dict[str, Recorder]]]:
    recorders = {
        "callback": Recorder((200, b"{}")),
        "redirect": Recorder((302, b"", {b"location": b"/elsewhere"})),
        "elsewhere": Recorder((200, b"{}")),
        "slack": Recorder((200, b"ok")),
        "hook": Recorder((204, b"")),
        "silent": Recorder(None),
    }
    root = Resource()
    for name, recorder in recorders.items():
        root.putChild(name.encode(), recorder)
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")
    try:
        yield f"127.0.0.1:{port.getHost().port}", root, recorders
    finally:
        recorders["silent"].finish_pending()
        pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def http() -> Iterator[HTTPClient]:
    pool = HTTPConnectionPool(reactor, persistent=False)
    yield HTTPClient(Agent(reactor, pool=pool))
    pytest_twisted.blockon(pool.closeCachedConnections())


@pytest_twisted.ensureDeferred
async def test_real_callback_only_to_allowed_host(
    server: tuple[str, Resource, dict[str, Recorder]], http: HTTPClient
) -> None:
    host, _, recorders = server
    url = f"http://{host}/callback"
    # The default allowed host is Docker Hub's: a callback_url naming 127.0.0.1 is not called.
    await DockerHubCallback(http, reactor, allow_http=True).send(url, "success", "d", "c", "t")
    assert recorders["callback"].seen == []
    # Listed (with its port), it is.
    allowed = DockerHubCallback(http, reactor, allowed_hosts=frozenset({host}), allow_http=True)
    await allowed.send(url, "success", "Triggered", "ctx", "http://me/")
    [seen] = recorders["callback"].seen
    assert seen.json()["description"] == "Triggered"
    # Without the knob, plain http is refused even for a listed host.
    strict = DockerHubCallback(http, reactor, allowed_hosts=frozenset({host}))
    await strict.send(url, "success", "d", "c", "t")
    assert len(recorders["callback"].seen) == 1
    # A redirect from an allowed host is not followed.
    await allowed.send(f"http://{host}/redirect", "success", "d", "c", "t")
    assert len(recorders["redirect"].seen) == 1
    assert recorders["elsewhere"].seen == []


@pytest_twisted.ensureDeferred
async def test_real_slack_and_webhook(
    server: tuple[str, Resource, dict[str, Recorder]], http: HTTPClient
) -> None:
    host, _, recorders = server
    notifiers = Notifiers(
        SlackNotifier(http, reactor, f"http://{host}/slack/T0/B0/secret"),
        WebhookNotifier(http, reactor, f"http://user:pw@{host}/hook?k=v", timeout=5, retries=0),
    )
    with capturedLogs() as events:
        await notifiers.deployed(REPORT)
    assert recorders["slack"].seen[0].json() == {
        "text": "Deploying foo-1, foo-2", "username": "Deployer"
    }
    [hook] = recorders["hook"].seen
    assert hook.json() == REPORT.as_json()
    assert hook.headers[b"Authorization"] == [b"Basic dXNlcjpwdw=="]
    assert not [e for e in events if e["log_level"] >= LogLevel.warn]


@pytest_twisted.ensureDeferred
async def test_real_timeout(
    server: tuple[str, Resource, dict[str, Recorder]], http: HTTPClient
) -> None:
    host, _, recorders = server
    notifier = WebhookNotifier(http, reactor, f"http://{host}/silent", timeout=0.3, retries=1,
                               backoff=0.1)
    with capturedLogs() as events:
        started = reactor.seconds()
        await notifier.deployed({"x": 1})
        elapsed = reactor.seconds() - started
    assert len(recorders["silent"].seen) == 2
    assert 0.6 <= elapsed < 3
    assert "giving up" in logged(events)
