"""deployer.webhook: every endpoint of the HTTP front door, in memory.

The Klein app is driven through ``treq.testing.StubTreq`` (a real HTTP/1.1 exchange over an
in-memory transport), with a sink and a Docker Hub callback sender that record what reaches
them and a ``Clock`` for time (the HTTP server around it is tested in test_site.py). Everything
here is synchronous: a Deferred that has not fired when a helper looks at it is a failure of the
test, not something to wait for.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
from base64 import b64encode
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent
from twisted.web.http_headers import Headers

from deployer.auth import TokenAuth
from deployer.errors import EtcdUnavailable
from deployer.formats import MAX_DEPTH
from deployer.model import Update
from deployer.rollout import wiring
from deployer.site import MAX_BODY
from deployer.webhook import HARBOR_ANSWER_WITHIN, WebhookApp
from tests.helpers import assert_valid, fired, paths, replaced

SAMPLES = Path(__file__).parent / "samples"
TOKEN = "tok-5e3c8a1f"
GITHUB_SECRET = b"It's a Secret to Everybody"
PUBLIC_URL = "https://deployer.example.com/status"
CONTEXT = "deployer=host-a"
START = 1_700_000_000.0
DIGEST = "sha256:" + "ab" * 32
REGISTRY_TYPE = "application/vnd.docker.distribution.events.v1+json"


def sample(name: str) -> Any:
    return json.loads((SAMPLES / name).read_text())


CALLBACK_URL = sample("dockerhub-webhook.json")["callback_url"]


# -- doubles --------------------------------------------------------------------------------------


class RecordingSink:
    """Records every batch handed to it. By default it accepts at once; set ``failure`` to
    fail every call with it, or ``hang`` to leave the answers in :attr:`pending`."""

    def __init__(self) -> None:
        self.batches: list[tuple[Update, ...]] = []
        self.failure: Exception | None = None
        self.hang = False
        self.pending: list[Deferred[str]] = []

    def accept(self, updates: Sequence[Update]) -> Deferred[str]:
        self.batches.append(tuple(updates))
        if self.failure is not None:
            return fail(self.failure)
        if self.hang:
            d: Deferred[str] = Deferred()
            self.pending.append(d)
            return d
        return succeed("Queued " + ", ".join(u.pattern for u in updates))

    @property
    def updates(self) -> list[Update]:
        return [u for batch in self.batches for u in batch]


class RecordingCallbacks:
    """The Docker Hub callback sender: records ``(url, state, description, context,
    target_url)``."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str, str, str]] = []

    def send(
        self, callback_url: str, state: str, description: str, context: str, target_url: str
    ) -> Deferred[None]:
        self.calls.append((callback_url, state, description, context, target_url))
        return succeed(None)


async def healthy() -> None:
    return None


@attrs.frozen
class Answer:
    code: int
    headers: Headers
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.getRawHeaders(name.encode())
        return values[0].decode("latin-1") if values else None

    def json(self) -> Any:
        assert self.header("content-type") == "application/json", self
        return json.loads(self.body)

    @property
    def error(self) -> str:
        obj = self.json()
        assert isinstance(obj, dict) and set(obj) == {"error"}, obj
        assert isinstance(obj["error"], str) and obj["error"], obj
        return obj["error"]


def authorization(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def github_signature(body: bytes, secret: bytes = GITHUB_SECRET) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


@attrs.define
class Front:
    """One WebhookApp with its doubles, and a client for it."""

    clock: Clock = attrs.field(factory=Clock)
    sink: RecordingSink = attrs.field(factory=RecordingSink)
    callbacks: RecordingCallbacks = attrs.field(factory=RecordingCallbacks)
    github_secret: bytes | None = GITHUB_SECRET
    public_url: str | None = PUBLIC_URL
    rollouts: Any = None
    app: WebhookApp = attrs.field(init=False)
    stub: Any = attrs.field(init=False)  # a StubTreq, whose methods mypy cannot see

    def __attrs_post_init__(self) -> None:
        self.clock.advance(START)
        self.app = WebhookApp(
            clock=self.clock,
            sink=self.sink,
            health=healthy,
            auth=TokenAuth([TOKEN]),
            callbacks=self.callbacks,
            public_url=self.public_url,
            context=CONTEXT,
            github_secret=self.github_secret,
            rollouts=self.rollouts,
        )
        self.stub = StubTreq(self.app.resource())

    def send(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str | bytes] | None = None,
        host: str = "deployer.test",
    ) -> Deferred[Any]:
        raw = Headers()
        for name, value in (headers or {}).items():
            raw.addRawHeader(name, value)
        return self.stub.request(method, f"http://{host}{path}", data=body or None, headers=raw)

    def answer(self, d: Deferred[Any], method: str = "POST") -> Answer:
        self.stub.flush()
        response = fired(d)
        content_d = response.content()
        self.stub.flush()
        content = fired(content_d)
        assert method != "HEAD" or content == b""
        return Answer(response.code, response.headers, content)

    def request(
        self,
        method: str,
        path: str,
        body: bytes = b"",
        headers: Mapping[str, str | bytes] | None = None,
        host: str = "deployer.test",
    ) -> Answer:
        return self.answer(self.send(method, path, body, headers, host), method)

    def post(
        self,
        path: str,
        obj: Any,
        content_type: str = "application/json",
        auth: bool = True,
        headers: Mapping[str, str | bytes] | None = None,
    ) -> Answer:
        all_headers: dict[str, str | bytes] = {"Content-Type": content_type}
        if auth:
            all_headers.update(authorization())
        all_headers.update(headers or {})
        body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        return self.request("POST", path, body, all_headers)

    def github(
        self, obj: Any, event: str = "registry_package", delivery: str | None = "guid-1",
        signature: str | None = "sign", headers: Mapping[str, str] | None = None,
    ) -> Answer:
        body = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        all_headers: dict[str, str | bytes] = {
            "Content-Type": "application/json", "X-GitHub-Event": event,
        }
        if delivery is not None:
            all_headers["X-GitHub-Delivery"] = delivery
        if signature == "sign":
            all_headers["X-Hub-Signature-256"] = github_signature(body)
        elif signature is not None:
            all_headers["X-Hub-Signature-256"] = signature
        all_headers.update(headers or {})
        return self.request("POST", "/api/github/events", body, all_headers)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        answer = self.request("GET", "/metrics")
        assert answer.code == 200
        assert (answer.header("content-type") or "").startswith("text/plain")
        out = {}
        for family in text_string_to_metric_families(answer.body.decode()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out


@pytest.fixture
def front() -> Front:
    return Front()


def webhooks(metrics: Mapping[Any, float], endpoint: str, status: int) -> float:
    key = ("deployer_webhooks_total", (("endpoint", endpoint), ("status", str(status))))
    return metrics.get(key, 0.0)


def auth_failures(metrics: Mapping[Any, float], endpoint: str) -> float:
    return metrics.get(("deployer_webhook_auth_failures_total", (("endpoint", endpoint),)), 0.0)


def accepted(metrics: Mapping[Any, float], source: str) -> float:
    return metrics.get(("deployer_updates_accepted_total", (("source", source),)), 0.0)


# -- payloads -------------------------------------------------------------------------------------


def registry_envelope(event_id: str = "d065ce33-7e74-4c63-8e3d-ea53322590cc",
                      **target: Any) -> dict[str, Any]:
    envelope: dict[str, Any] = sample("registry-notification-manifest-push.json")
    event = envelope["events"][0]
    event["id"] = event_id
    event["target"].update(target)
    return envelope


QUAY = {
    "name": "repository",
    "repository": "mynamespace/repository",
    "namespace": "mynamespace",
    "docker_url": "quay.io/mynamespace/repository",
    "homepage": "https://quay.io/repository/mynamespace/repository",
    "updated_tags": ["latest", "v1"],
}


def harbor(tag: str = "v1.0", resource_url: str = f"harbor.example.com/library/app@{DIGEST}",
           kind: str = "PUSH_ARTIFACT") -> dict[str, Any]:
    return {
        "type": kind,
        "occur_at": 1680501893,
        "operator": "harbor-jobservice",
        "event_data": {
            "resources": [{"digest": DIGEST, "tag": tag, "resource_url": resource_url}],
            "repository": {"name": "app", "namespace": "library",
                           "repo_full_name": "library/app", "repo_type": "private"},
        },
    }


def github_package(tag: str = "v1.2.0", owner: str = "Octo-Org") -> dict[str, Any]:
    return {
        "action": "published",
        "registry_package": {
            "name": "my-app",
            "namespace": owner,
            "package_type": "CONTAINER",
            "owner": {"login": owner},
            "package_version": {
                "version": DIGEST,
                "container_metadata": {"tag": {"name": tag, "digest": DIGEST}},
            },
        },
        "repository": {"full_name": f"{owner}/my-app", "owner": {"login": owner}},
    }


@attrs.frozen
class Endpoint:
    name: str
    path: str
    content_type: str
    good: Callable[[], Any]
    code: int
    patterns: tuple[str, ...]


ENDPOINTS = {
    e.name: e
    for e in [
        Endpoint("dockerhub", "/api/dockerhub/webhook", "application/json",
                 lambda: sample("dockerhub-webhook.json"), 202,
                 ("svendowideit/testhook:latest",)),
        Endpoint("registry", "/api/registry/events", REGISTRY_TYPE, registry_envelope, 200,
                 ("127.0.0.1:5001/myorg/foo:qa",)),
        Endpoint("deploy", "/api/deploy", "application/json",
                 lambda: {"repository": "127.0.0.1:5000/myorg/foo", "tag": "qa",
                          "digest": DIGEST}, 202,
                 ("127.0.0.1:5000/myorg/foo:qa",)),
        Endpoint("quay", "/api/quay/events", "application/json", lambda: copy.deepcopy(QUAY),
                 202, ("quay.io/mynamespace/repository:latest",
                       "quay.io/mynamespace/repository:v1")),
        Endpoint("harbor", "/api/harbor/events", "application/json", harbor, 202,
                 ("harbor.example.com/library/app:v1.0",)),
        Endpoint("github", "/api/github/events", "application/json", github_package, 202,
                 ("ghcr.io/octo-org/my-app:v1.2.0",)),
    ]
}
TOKEN_ENDPOINTS = sorted(set(ENDPOINTS) - {"github"})
SOURCES = {"dockerhub": "dockerhub", "registry": "registry", "deploy": "api", "quay": "quay",
           "harbor": "harbor", "github": "github"}


def post_good(front: Front, name: str) -> Answer:
    endpoint = ENDPOINTS[name]
    if name == "github":
        return front.github(endpoint.good())
    return front.post(endpoint.path, endpoint.good(), endpoint.content_type)


# -- each endpoint, with a good payload -----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ENDPOINTS))
def test_good_payload_reaches_the_sink(front: Front, name: str) -> None:
    endpoint = ENDPOINTS[name]
    answer = post_good(front, name)
    assert answer.code == endpoint.code, answer
    body = answer.json()
    assert body["status"] == "accepted"
    assert [u["pattern"] for u in body["updates"]] == list(endpoint.patterns)
    assert len(front.sink.batches) == 1
    assert tuple(u.pattern for u in front.sink.updates) == endpoint.patterns
    for update in front.sink.updates:
        assert_valid(update)
        assert update.source == SOURCES[name]
        assert update.received == START
    metrics = front.metrics()
    assert webhooks(metrics, name, endpoint.code) == 1
    assert accepted(metrics, SOURCES[name]) == len(endpoint.patterns)


def test_dockerhub_update(front: Front) -> None:
    assert front.post("/api/dockerhub/webhook", sample("dockerhub-webhook.json")).code == 202
    assert front.sink.batches == [
        (Update(repository="svendowideit/testhook", tag="latest", source="dockerhub",
                received=START),)
    ]


def test_registry_update_keeps_digest_and_event_id(front: Front) -> None:
    answer = front.post("/api/registry/events", registry_envelope(), REGISTRY_TYPE)
    assert answer.code == 200
    assert answer.json()["duplicates"] == 0
    assert front.sink.updates == [
        Update(
            repository="myorg/foo", registry="127.0.0.1:5001", tag="qa",
            digest="sha256:3db7d173d85ca461a96e138f251a396d8b4ff8fa4cce744d6a84470ea4a4bc08",
            event_id="d065ce33-7e74-4c63-8e3d-ea53322590cc", source="registry", received=START,
        )
    ]


@pytest.mark.parametrize(
    "content_type",
    [
        "application/vnd.docker.distribution.events.v1+json",
        "application/vnd.docker.distribution.events.v2+json",
        "application/json",
        "application/vnd.docker.distribution.events.v1+json; charset=utf-8",
    ],
)
def test_registry_content_types(front: Front, content_type: str) -> None:
    answer = front.post("/api/registry/events", registry_envelope(), content_type)
    assert answer.code == 200
    assert len(front.sink.updates) == 1


def test_registry_blob_push_is_acknowledged_and_ignored(front: Front) -> None:
    answer = front.post("/api/registry/events", sample("registry-notification-blob-push.json"),
                        REGISTRY_TYPE)
    assert answer.code == 200
    assert answer.json() == {"status": "accepted", "updates": [], "duplicates": 0}
    assert front.sink.batches == []


def test_registry_malformed_event_is_acknowledged_and_skipped(front: Front) -> None:
    bad = registry_envelope("bad-1", repository="MyOrg/Foo")["events"][0]
    good = registry_envelope("good-1", tag="v2")["events"][0]
    answer = front.post("/api/registry/events", {"events": [bad, good]}, REGISTRY_TYPE)
    assert answer.code == 200
    assert [(u.tag, u.event_id) for u in front.sink.updates] == [("v2", "good-1")]


def test_registry_event_acted_on_once(front: Front) -> None:
    first = front.post("/api/registry/events", registry_envelope(), REGISTRY_TYPE)
    again = front.post("/api/registry/events", registry_envelope(), REGISTRY_TYPE)
    assert first.code == again.code == 200
    assert again.json() == {"status": "accepted", "updates": [], "duplicates": 1}
    assert len(front.sink.batches) == 1
    # Another event of the same repository and tag is a new push: acted on.
    other = front.post("/api/registry/events", registry_envelope("another-id"), REGISTRY_TYPE)
    assert other.json()["duplicates"] == 0
    assert len(front.sink.batches) == 2
    assert accepted(front.metrics(), "registry") == 2


def sent(front: Front, path: str, obj: Any, content_type: str) -> tuple[Deferred[Any],
                                                                         list[object]]:
    """POST without waiting for the answer; the list gets the answer once there is one."""
    d = front.send("POST", path, json.dumps(obj).encode(),
                   {"Content-Type": content_type, **authorization()})
    answered: list[object] = []

    def record(result: object) -> object:
        answered.append(result)
        return result

    d.addBoth(record)
    front.stub.flush()
    return d, answered


@pytest.mark.parametrize("outcome", ["written", "failed"])
def test_registry_retry_during_the_write_waits_for_it(front: Front, outcome: str) -> None:
    """The registry retries after 2 s; a retry while the first write still waits for etcd is
    answered with that write's outcome, and the event is written once."""
    front.sink.hang = True
    first, first_answered = sent(front, "/api/registry/events", registry_envelope(), REGISTRY_TYPE)
    retry, retry_answered = sent(front, "/api/registry/events", registry_envelope(), REGISTRY_TYPE)
    assert len(front.sink.batches) == 1
    assert first_answered == retry_answered == []
    if outcome == "written":
        front.sink.pending[0].callback("Queued")
    else:
        front.sink.pending[0].errback(EtcdUnavailable("etcd gave up"))
    front.stub.flush()
    a, b = front.answer(first), front.answer(retry)
    assert len(front.sink.batches) == 1
    if outcome == "written":
        assert (a.code, b.code) == (200, 200)
        assert b.json()["duplicates"] == 1
        assert "d065ce33-7e74-4c63-8e3d-ea53322590cc" in front.app.seen
    else:
        assert (a.code, b.code) == (503, 503)
        assert "d065ce33-7e74-4c63-8e3d-ea53322590cc" not in front.app.seen


def test_registry_retry_after_etcd_failure_is_accepted(front: Front) -> None:
    front.sink.failure = EtcdUnavailable("no etcd member answered within 5 s")
    answer = front.post("/api/registry/events", registry_envelope(), REGISTRY_TYPE)
    assert answer.code == 503
    assert "no etcd member answered" in answer.error
    assert "d065ce33-7e74-4c63-8e3d-ea53322590cc" not in front.app.seen
    front.sink.failure = None
    retry = front.post("/api/registry/events", registry_envelope(), REGISTRY_TYPE)
    assert retry.code == 200
    assert retry.json()["duplicates"] == 0
    assert [u.event_id for u in front.sink.batches[-1]] == ["d065ce33-7e74-4c63-8e3d-ea53322590cc"]
    assert front.post("/api/registry/events", registry_envelope(),
                      REGISTRY_TYPE).json()["duplicates"] == 1
    metrics = front.metrics()
    assert webhooks(metrics, "registry", 503) == 1
    assert accepted(metrics, "registry") == 1


@pytest.mark.parametrize("name", sorted(ENDPOINTS))
def test_sink_unavailable_is_503(front: Front, name: str) -> None:
    front.sink.failure = EtcdUnavailable("etcd: no member answered")
    answer = post_good(front, name)
    assert answer.code == 503
    assert answer.error == "etcd: no member answered"
    assert answer.header("cache-control") == "no-store"
    metrics = front.metrics()
    assert webhooks(metrics, name, 503) == 1
    assert accepted(metrics, SOURCES[name]) == 0


def test_deploy_fields(front: Front) -> None:
    answer = front.post("/api/deploy", {"repository": "myorg/foo"})
    assert answer.code == 202
    assert front.sink.updates == [Update(repository="myorg/foo", source="api", received=START)]
    assert answer.json()["updates"] == [{"registry": None, "repository": "myorg/foo",
                                         "tag": None, "digest": None, "source": "api",
                                         "pattern": "myorg/foo"}]


def test_quay_tags_object(front: Front) -> None:
    body = dict(QUAY, updated_tags={"latest": "b" * 64, "prod": "c" * 64})
    assert front.post("/api/quay/events", body).code == 202
    assert [u.tag for u in front.sink.updates] == ["latest", "prod"]


def test_harbor_digest_tag_means_deploy_by_digest(front: Front) -> None:
    answer = front.post("/api/harbor/events", harbor(tag=DIGEST))
    assert answer.code == 202
    [update] = front.sink.updates
    assert (update.name, update.tag, update.digest) == ("harbor.example.com/library/app", None,
                                                        DIGEST)


@pytest.mark.parametrize("name, body", [
    ("harbor", harbor(kind="PULL_ARTIFACT")),
    ("harbor", harbor(kind="SCANNING_COMPLETED")),
    ("github", dict(github_package(), action="updated")),
    ("github", github_package(tag="")),  # an untagged platform manifest
])
def test_events_not_for_us_are_acknowledged(front: Front, name: str, body: Any) -> None:
    answer = front.github(body) if name == "github" else front.post(ENDPOINTS[name].path, body)
    assert answer.code == 202
    assert answer.json()["updates"] == []
    assert front.sink.batches == []


def test_quay_without_tags_means_every_tag(front: Front) -> None:
    assert front.post("/api/quay/events", dict(QUAY, updated_tags=[])).code == 202
    assert [u.pattern for u in front.sink.updates] == ["quay.io/mynamespace/repository"]


# -- GitHub ---------------------------------------------------------------------------------------


def test_github_update(front: Front) -> None:
    assert front.github(github_package(), delivery="72d3162e-cc78").code == 202
    assert front.sink.updates == [
        Update(repository="octo-org/my-app", registry="ghcr.io", tag="v1.2.0", digest=DIGEST,
               event_id="72d3162e-cc78", source="github", received=START)
    ]


def test_github_ping(front: Front) -> None:
    answer = front.github({"zen": "Keep it logically awesome.", "hook_id": 1}, event="ping")
    assert answer.code == 200
    assert answer.json() == {"status": "pong"}
    assert front.sink.batches == []


@pytest.mark.parametrize(
    "signature, headers",
    [
        (None, authorization()),  # the token is not a signature
        (None, {}),
        ("sha256=" + "0" * 64, authorization()),
        (github_signature(b"another body"), {}),
        (github_signature(json.dumps(github_package()).encode(), b"other secret"), {}),
        ("sha1=" + "0" * 40, {}),
        ("garbage", {}),
    ],
)
def test_github_needs_its_signature(
    front: Front, signature: str | None, headers: dict[str, str]
) -> None:
    answer = front.github(github_package(), signature=signature, headers=headers)
    assert answer.code == 401
    assert "X-Hub-Signature-256" in answer.error or "signature" in answer.error
    assert front.sink.batches == []
    assert auth_failures(front.metrics(), "github") == 1


def test_github_signature_covers_the_raw_body(front: Front) -> None:
    body = json.dumps(github_package()).encode()
    signature = github_signature(body)
    tampered = body.replace(b"v1.2.0", b"v6.6.6")
    assert front.github(tampered, signature=signature).code == 401
    assert front.sink.batches == []


def test_github_not_configured_is_404(front: Front) -> None:
    off = Front(github_secret=None)
    answer = off.github(github_package(), headers=authorization())
    assert answer.code == 404
    assert "--github_secret" in answer.error
    assert off.sink.batches == []


# -- who may call ---------------------------------------------------------------------------------


def basic(user: str, password: str) -> str:
    return "Basic " + b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize("name", TOKEN_ENDPOINTS)
@pytest.mark.parametrize(
    "headers, query",
    [
        ({}, ""),
        ({"Authorization": "Bearer wrong-token"}, ""),
        ({"Authorization": f"Bearer {TOKEN}x"}, ""),
        ({"Authorization": "Bearer"}, ""),
        ({"Authorization": basic("deployer", "wrong")}, ""),
        ({"Authorization": basic(TOKEN, "")}, ""),
        ({"Authorization": TOKEN}, ""),
        ({}, "?token=wrong"),
        ({}, f"?tok={TOKEN}"),
        ({"X-Hub-Signature-256": "sha256=" + "0" * 64}, ""),
    ],
)
def test_refused_without_a_valid_token(
    front: Front, name: str, headers: dict[str, str], query: str
) -> None:
    endpoint = ENDPOINTS[name]
    answer = front.post(endpoint.path + query, endpoint.good(), endpoint.content_type,
                        auth=False, headers=headers)
    assert answer.code == 401
    assert answer.error in ("missing token", "invalid token")
    assert answer.header("www-authenticate") == 'Bearer realm="deployer"'
    assert front.sink.batches == []
    assert front.callbacks.calls == []
    metrics = front.metrics()
    assert auth_failures(metrics, name) == 1
    assert webhooks(metrics, name, 401) == 1


def test_token_is_checked_before_the_body(front: Front) -> None:
    answer = front.post("/api/deploy", b"{not json", auth=False)
    assert answer.code == 401


@pytest.mark.parametrize(
    "headers, query",
    [
        ({"Authorization": f"Bearer {TOKEN}"}, ""),
        ({"Authorization": f"bearer {TOKEN}"}, ""),
        ({"Authorization": f"Token {TOKEN}"}, ""),
        ({"Authorization": basic("deployer", TOKEN)}, ""),
        ({}, f"?token={TOKEN}"),
        ({}, f"?x=1&token={quote(TOKEN)}"),
    ],
)
def test_token_forms(front: Front, headers: dict[str, str], query: str) -> None:
    answer = front.post("/api/deploy" + query, {"repository": "myorg/foo"}, auth=False,
                        headers=headers)
    assert answer.code == 202
    assert len(front.sink.updates) == 1


def test_auth_failure_logged_with_peer_never_token(front: Front) -> None:
    offered = "offered-secret-9f2"
    with capturedLogs() as events:
        front.post("/api/deploy?token=" + offered, {"repository": "myorg/foo"}, auth=False)
        front.post("/api/deploy", {"repository": "myorg/foo"}, auth=False,
                   headers={"Authorization": f"Bearer {offered}"})
    refusals = [e for e in events if "refused webhook" in e.get("log_format", "")]
    assert len(refusals) == 2
    assert all(e["peer"] == "127.0.0.1:31337" for e in refusals)
    text = "\n".join(formatEvent(e) + repr(e) for e in events)
    assert offered not in text
    assert TOKEN not in text


# -- bad input ------------------------------------------------------------------------------------


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


BAD_DEPLOY: list[tuple[bytes, str]] = [
    (b"{not json", "not JSON"),
    (b"", "not JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    (b'{"repository": NaN}', "NaN"),
    (b"[]", "body must be an object"),
    (b'"myorg/foo"', "body must be an object"),
    (b"null", "body must be an object"),
    (b'{"repository": 5}', "repository must be a string"),
    (b'{"repository": ["myorg/foo"]}', "repository must be a string"),
    (b'{"repository": {"name": "myorg/foo"}}', "repository must be a string"),
    (b'{"repository": "myorg/foo", "tag": 1}', "tag must be a string"),
    (b'{"tag": "qa"}', "missing field repository"),
    (b'{"repository": ""}', "missing field repository"),
    (b'{"repository": null}', "missing field repository"),
    (b"{}", "missing field repository"),
]
BAD_NAMES = [
    "MyOrg/foo", "myorg/Foo", "myorg/../foo", "myorg..foo", "..", "/myorg/foo", "myorg/foo/",
    "*", "myorg/*", "my*org", "foo\x00bar", "foo\nbar", "foo\rbar", "foo\tbar", "foo\x7f",
    "foo\u200b", "föö", "my org/foo", "a" * 256, "myorg/" + "a" * 250, "myorg/foo:qa",
    "myorg/foo@" + DIGEST, "http://myorg/foo",
]
BAD_TAGS = ["-x", ".x", "a b", "*", "v1*", "a" * 129, "v1\n", "v1\x00", "qa/x", "ü"]
BAD_DIGESTS = ["sha256:xyz", "md5:zz", "sha256:" + "ab" * 15, "latest", DIGEST + "\n"]


def bad_bodies() -> list[tuple[bytes, str]]:
    cases = list(BAD_DEPLOY)
    cases += [(json.dumps({"repository": name}).encode(), "repository") for name in BAD_NAMES]
    cases += [(json.dumps({"repository": "myorg/foo", "tag": tag}).encode(), "tag")
              for tag in BAD_TAGS]
    cases += [(json.dumps({"repository": "myorg/foo", "digest": d}).encode(), "digest")
              for d in BAD_DIGESTS]
    cases += [
        (nested(MAX_DEPTH + 1).encode(), "nested deeper"),
        (json.dumps({"repository": "myorg/foo", "x": [[[[{"y": json.loads(nested(40))}]]]]})
         .encode(), "nested deeper"),
        (("[" * 200_000).encode(), "nested deeper"),
    ]
    return cases


@pytest.mark.parametrize("body, words", bad_bodies())
def test_bad_deploy_body_is_400(front: Front, body: bytes, words: str) -> None:
    answer = front.post("/api/deploy", body)
    assert answer.code == 400, answer
    assert words in answer.error
    assert len(answer.error) <= 300
    assert front.sink.batches == []


def test_deploy_nesting_at_the_bound_is_read(front: Front) -> None:
    extra = json.loads(nested(MAX_DEPTH - 1))
    answer = front.post("/api/deploy", {"repository": "myorg/foo", "x": extra})
    assert answer.code == 202


@pytest.mark.parametrize(
    "name, mutate, words",
    [
        ("dockerhub", lambda b: b["repository"].update(repo_name="MyOrg/x"), "repo_name"),
        ("dockerhub", lambda b: b["repository"].pop("repo_name"), "repository.repo_name"),
        ("dockerhub", lambda b: b["push_data"].update(tag="a b"), "push_data.tag"),
        ("dockerhub", lambda b: b.update(repository="x"), "repository"),
        ("quay", lambda b: b.update(docker_url="quay.io/../x"), "docker_url"),
        ("quay", lambda b: b.update(updated_tags=[5]), "updated_tags[0]"),
        ("quay", lambda b: b.update(updated_tags="latest"), "updated_tags"),
        ("harbor", lambda b: b["event_data"].update(resources={}), "event_data.resources"),
        ("harbor", lambda b: b["event_data"]["resources"][0].update(resource_url="/x/y"),
         "resource_url"),
        ("harbor", lambda b: b.update(type=["PUSH_ARTIFACT"]), "type"),
        ("github", lambda b: b["registry_package"].update(name="My App"), "name"),
        ("github", lambda b: b["registry_package"]["package_version"]["container_metadata"]
         ["tag"].update(name="*"), "tag.name"),
        ("registry", lambda b: b.update(events={}), "events"),
        ("registry", lambda b: b.pop("events"), "events"),
    ],
)
def test_bad_payload_of_each_format_is_400(
    front: Front, name: str, mutate: Callable[[Any], Any], words: str
) -> None:
    body = ENDPOINTS[name].good()
    mutate(body)
    answer = (front.github(body) if name == "github"
              else front.post(ENDPOINTS[name].path, body, ENDPOINTS[name].content_type))
    assert answer.code == 400, answer
    assert words in answer.error
    assert front.sink.batches == []


@pytest.mark.parametrize("name", sorted(ENDPOINTS))
@pytest.mark.parametrize(
    "body, code",
    [(b"{not json", 400), (b"[]", 400), (nested(100).encode(), 400), (b"1" * 10, 400)],
)
def test_every_endpoint_refuses_junk(front: Front, name: str, body: bytes, code: int) -> None:
    answer = (front.github(body) if name == "github"
              else front.post(ENDPOINTS[name].path, body, ENDPOINTS[name].content_type))
    assert answer.code == code, answer
    assert answer.error
    assert front.sink.batches == []


@pytest.mark.parametrize("name", sorted(ENDPOINTS))
def test_body_over_1_mib_is_413(front: Front, name: str) -> None:
    """The app's own check (the daemon's Site refuses it even earlier: see test_site.py)."""
    good = json.dumps(ENDPOINTS[name].good()).encode()
    body = good[:-1] + b', "pad": "' + b"x" * MAX_BODY + b'"}'
    answer = (front.github(body) if name == "github"
              else front.post(ENDPOINTS[name].path, body, ENDPOINTS[name].content_type))
    assert answer.code == 413
    assert str(MAX_BODY) in answer.error
    assert front.sink.batches == []


@pytest.mark.parametrize("name", sorted(ENDPOINTS))
@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "application/jsonx", "json",
     "application/xml", "application/json+x"],
)
def test_unsupported_content_type_is_415(front: Front, name: str, content_type: str) -> None:
    body = ENDPOINTS[name].good()
    if name == "github":
        answer = front.github(body, headers={"Content-Type": content_type})
    else:
        answer = front.post(ENDPOINTS[name].path, body, content_type)
    assert answer.code == 415
    assert "Content-Type" in answer.error
    assert front.sink.batches == []


def test_registry_media_type_is_only_for_the_registry(front: Front) -> None:
    answer = front.post("/api/deploy", {"repository": "myorg/foo"}, REGISTRY_TYPE)
    assert answer.code == 415
    assert front.sink.batches == []


@pytest.mark.parametrize("name", sorted(ENDPOINTS))
@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "FOO"])
def test_wrong_method_is_405(front: Front, name: str, method: str) -> None:
    body = json.dumps(ENDPOINTS[name].good()).encode()
    answer = front.request(method, ENDPOINTS[name].path, body,
                           {"Content-Type": "application/json", **authorization()})
    assert answer.code == 405
    assert answer.header("allow") == "POST"
    if method != "HEAD":
        assert f"method {method} not allowed" in answer.error
    assert front.sink.batches == []


@pytest.mark.parametrize("path", ["/healthz", "/metrics"])
def test_health_and_metrics_are_get_only(front: Front, path: str) -> None:
    answer = front.request("POST", path, b"{}", authorization())
    assert answer.code == 405
    assert set((answer.header("allow") or "").split(", ")) == {"GET", "HEAD"}
    assert "GET" in answer.error and "HEAD" in answer.error


@pytest.mark.parametrize(
    "path",
    ["/", "/api", "/api/", "/api/deploy/", "/api/deploy/x", "/api/dockerhub/webhook/",
     "/API/deploy", "/healthz/", "/api/registry", "/api//deploy", "/api/deploy//",
     "/.well-known/x", "/api/github/events/../deploy"],
)
def test_unknown_path_is_404(front: Front, path: str) -> None:
    answer = front.request("POST", path, b'{"repository": "myorg/foo"}',
                           {"Content-Type": "application/json", **authorization()})
    assert answer.code == 404, answer
    assert "no such endpoint" in answer.error
    assert front.sink.batches == []


def test_path_that_is_not_utf8_is_refused(front: Front) -> None:
    """Klein refuses it itself (400, plain text) before any route is looked at."""
    answer = front.request("POST", "/api/deploy%ff", b'{"repository": "myorg/foo"}',
                           {"Content-Type": "application/json", **authorization()})
    assert answer.code == 400
    assert front.sink.batches == []


def test_custom_webhook_path() -> None:
    sink = RecordingSink()
    app = WebhookApp(clock=Clock(), sink=sink, health=healthy, auth=None,
                     webhook_path="/hooks/hub")
    stub: Any = StubTreq(app.resource())
    d = stub.post("http://x/hooks/hub", json=sample("dockerhub-webhook.json"))
    stub.flush()
    response = fired(d)
    assert response.code == 202
    d = stub.post("http://x/api/dockerhub/webhook", json=sample("dockerhub-webhook.json"))
    stub.flush()
    response = fired(d)
    assert response.code == 404
    assert len(sink.batches) == 1


# -- Harbor: an answer within 3 s whatever etcd does ----------------------------------------------


def test_harbor_answers_pending_when_the_sink_is_slow(front: Front) -> None:
    front.sink.hang = True
    d, answered = sent(front, "/api/harbor/events", harbor(), "application/json")
    front.clock.advance(HARBOR_ANSWER_WITHIN - 0.1)
    front.stub.flush()
    assert answered == []
    front.clock.advance(0.1)
    answer = front.answer(d)
    assert answer.code == 202
    assert answer.json()["status"] == "pending"
    assert [u["pattern"] for u in answer.json()["updates"]] == [
        "harbor.example.com/library/app:v1.0"
    ]
    assert len(front.sink.batches) == 1
    # The write goes on and completes later.
    front.sink.pending[0].callback("Triggered etcd")
    assert accepted(front.metrics(), "harbor") == 1


def test_harbor_write_failing_after_the_answer_is_logged(front: Front) -> None:
    front.sink.hang = True
    d = front.send("POST", "/api/harbor/events", json.dumps(harbor()).encode(),
                   {"Content-Type": "application/json", **authorization()})
    front.stub.flush()
    front.clock.advance(HARBOR_ANSWER_WITHIN)
    assert front.answer(d).code == 202
    with capturedLogs() as events:
        front.sink.pending[0].errback(EtcdUnavailable("etcd gave up"))
    failures = [e for e in events if "log_failure" in e]
    assert len(failures) == 1, events
    assert failures[0]["log_failure"].check(EtcdUnavailable)
    assert "harbor.example.com/library/app:v1.0" in formatEvent(failures[0])
    assert accepted(front.metrics(), "harbor") == 0


def test_harbor_sink_answering_in_time(front: Front) -> None:
    front.sink.hang = True
    d = front.send("POST", "/api/harbor/events", json.dumps(harbor()).encode(),
                   {"Content-Type": "application/json", **authorization()})
    front.stub.flush()
    front.clock.advance(1.0)
    front.sink.pending[0].callback("Triggered etcd")
    answer = front.answer(d)
    assert answer.code == 202
    assert answer.json()["status"] == "accepted"
    assert front.clock.getDelayedCalls() == []  # the 2.5 s timer was cancelled


def test_harbor_sink_failing_fast_is_503(front: Front) -> None:
    front.sink.failure = EtcdUnavailable("etcd down")
    answer = front.post("/api/harbor/events", harbor())
    assert answer.code == 503
    assert answer.error == "etcd down"


def test_harbor_sink_failing_within_the_wait_is_503(front: Front) -> None:
    front.sink.hang = True
    d = front.send("POST", "/api/harbor/events", json.dumps(harbor()).encode(),
                   {"Content-Type": "application/json", **authorization()})
    front.stub.flush()
    front.clock.advance(2.0)
    front.sink.pending[0].errback(EtcdUnavailable("etcd down"))
    answer = front.answer(d)
    assert answer.code == 503
    assert front.clock.getDelayedCalls() == []


# -- Docker Hub callback --------------------------------------------------------------------------


def test_dockerhub_callback_success(front: Front) -> None:
    answer = front.request("POST", "/api/dockerhub/webhook",
                           json.dumps(sample("dockerhub-webhook.json")).encode(),
                           {"Content-Type": "application/json", **authorization()},
                           host="evil.example.net")
    assert answer.code == 202
    assert front.callbacks.calls == [
        (CALLBACK_URL, "success", "Queued svendowideit/testhook:latest",
         f"{CONTEXT} time={int(START)}", PUBLIC_URL)
    ]


def test_dockerhub_callback_error_when_etcd_unavailable(front: Front) -> None:
    front.sink.failure = EtcdUnavailable("no etcd member answered")
    answer = front.post("/api/dockerhub/webhook", sample("dockerhub-webhook.json"))
    assert answer.code == 503
    [(url, state, description, context, target)] = front.callbacks.calls
    assert (url, state, context, target) == (CALLBACK_URL, "error",
                                             f"{CONTEXT} time={int(START)}", PUBLIC_URL)
    assert "no etcd member answered" in description


def test_dockerhub_callback_target_is_never_the_host_header() -> None:
    front = Front(public_url=None)
    answer = front.request("POST", "/api/dockerhub/webhook",
                           json.dumps(sample("dockerhub-webhook.json")).encode(),
                           {"Content-Type": "application/json", **authorization()},
                           host="evil.example.net:8080")
    assert answer.code == 202
    [call] = front.callbacks.calls
    assert call[4] == ""
    assert "evil" not in repr(call)


@pytest.mark.parametrize("callback_url", [None, ""])
def test_dockerhub_without_callback_url_calls_nothing(front: Front, callback_url: Any) -> None:
    body = sample("dockerhub-webhook.json")
    if callback_url is None:
        del body["callback_url"]
    else:
        body["callback_url"] = callback_url
    assert front.post("/api/dockerhub/webhook", body).code == 202
    assert front.callbacks.calls == []


def test_dockerhub_refused_hooks_call_nothing(front: Front) -> None:
    body = sample("dockerhub-webhook.json")
    front.post("/api/dockerhub/webhook", body, auth=False)
    body["repository"]["repo_name"] = "Bad/Name"
    front.post("/api/dockerhub/webhook", body)
    assert front.callbacks.calls == []


def test_dockerhub_description_is_bounded(front: Front) -> None:
    body = sample("dockerhub-webhook.json")
    body["repository"]["repo_name"] = "myorg/" + "a" * 240
    front.sink.failure = EtcdUnavailable("x" * 1000)
    front.post("/api/dockerhub/webhook", body)
    [(_, _, description, context, _)] = front.callbacks.calls
    assert len(description) <= 255 and len(context) <= 100


# -- metrics and health ---------------------------------------------------------------------------


def test_metrics_count_what_happened(front: Front) -> None:
    front.post("/api/deploy", {"repository": "myorg/a"})
    front.post("/api/deploy", {"repository": "myorg/b", "tag": "qa"})
    front.post("/api/deploy", {"repository": "MyOrg/b"})
    front.post("/api/deploy", b"x", "text/plain")
    front.post("/api/dockerhub/webhook", sample("dockerhub-webhook.json"), auth=False)
    front.post("/api/registry/events", registry_envelope(), REGISTRY_TYPE)
    front.post("/api/registry/events", registry_envelope(), REGISTRY_TYPE)
    front.post("/api/quay/events", QUAY)
    metrics = front.metrics()
    assert webhooks(metrics, "deploy", 202) == 2
    assert webhooks(metrics, "deploy", 400) == 1
    assert webhooks(metrics, "deploy", 415) == 1
    assert webhooks(metrics, "dockerhub", 401) == 1
    assert webhooks(metrics, "registry", 200) == 2
    assert webhooks(metrics, "quay", 202) == 1
    assert auth_failures(metrics, "dockerhub") == 1
    assert auth_failures(metrics, "deploy") == 0
    assert accepted(metrics, "api") == 2
    assert accepted(metrics, "registry") == 1
    assert accepted(metrics, "quay") == 2
    assert accepted(metrics, "dockerhub") == 0
    total = sum(v for (name, _), v in metrics.items() if name == "deployer_webhooks_total")
    assert total == 8  # health and metrics themselves are not webhooks


def test_metrics_need_no_token(front: Front) -> None:
    assert front.request("GET", "/metrics").code == 200
    assert front.request("HEAD", "/metrics").code == 200


def test_healthz(front: Front) -> None:
    answer = front.request("GET", "/healthz")
    assert answer.code == 200
    assert answer.json() == {"status": "ok"}


def test_healthz_unhealthy() -> None:
    async def broken() -> str:
        return "docker: connection refused"

    app = WebhookApp(clock=Clock(), sink=RecordingSink(), health=broken, auth=None)
    stub: Any = StubTreq(app.resource())
    d = stub.get("http://x/healthz")
    stub.flush()
    response = fired(d)
    assert response.code == 503
    body = response.json()
    stub.flush()
    assert fired(body) == {"status": "unavailable",
                                                   "error": "docker: connection refused"}


# -- anything at every endpoint -------------------------------------------------------------------


PATHS = [e.path for e in ENDPOINTS.values()] + ["/healthz", "/metrics", "/nope", "/api/",
                                               "/status", "/api/resume"]
GOOD_BODIES = [e.good for e in ENDPOINTS.values()]

json_scalars = (
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
interesting = st.sampled_from(
    ["", "*", "push", "published", "PUSH_ARTIFACT", "CONTAINER", "myorg/foo", "MyOrg/foo",
     "127.0.0.1:5000", "quay.io/ns/repo", "h.example.com/ns/a:v1", f"h.example.com/ns/a@{DIGEST}",
     "latest", "v1\n", "a b", DIGEST, "..", "/x", "a" * 300, "\x00", "é",
     "application/vnd.docker.distribution.manifest.v2+json"]
) | st.text(max_size=10)
json_values = st.recursive(
    json_scalars | interesting,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8) | interesting, children, max_size=4),
    max_leaves=20,
)


@st.composite
def mutated_payloads(draw: st.DrawFn) -> bytes:
    good = draw(st.sampled_from(GOOD_BODIES))()
    where = draw(st.sampled_from(list(paths(good))))
    return json.dumps(replaced(good, where, draw(json_values))).encode()


bodies = (
    st.binary(max_size=200)
    | json_values.map(lambda v: json.dumps(v).encode())
    | mutated_payloads()
    | st.sampled_from(GOOD_BODIES).map(lambda good: json.dumps(good()).encode())
    | st.integers(min_value=MAX_DEPTH - 2, max_value=MAX_DEPTH + 3).map(
        lambda n: nested(n).encode())
)
header_values = st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f\x85"),
    max_size=40,
).map(lambda s: s.encode("latin-1"))
content_types = st.sampled_from(
    [None, "application/json", REGISTRY_TYPE, "application/vnd.docker.distribution.events.v2+json",
     "text/plain", "application/json; charset=utf-8", "", ";", "APPLICATION/JSON"]
).map(lambda s: None if s is None else s.encode()) | header_values
authorizations = st.sampled_from(
    [None, f"Bearer {TOKEN}", f"Token {TOKEN}", basic("u", TOKEN), "Bearer", "Basic !!!", "Basic",
     f"Bearer {TOKEN} extra", "Digest x"]
).map(lambda s: None if s is None else s.encode()) | header_values
methods = st.sampled_from(["POST"] * 6 + ["GET", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH",
                                          "FOO"])


@st.composite
def request_paths(draw: st.DrawFn) -> str:
    """An endpoint's path, sometimes bent: a slash doubled or added, a letter upper-cased."""
    path = draw(st.sampled_from(PATHS))
    bend = draw(st.sampled_from(["none", "none", "none", "double", "trailing", "upper"]))
    at = draw(st.integers(min_value=0, max_value=len(path) - 1))
    if bend == "double":
        at = draw(st.sampled_from([i for i, c in enumerate(path) if c == "/"]))
        return path[:at] + "/" + path[at:]
    if bend == "trailing":
        return path + "/"
    if bend == "upper":
        return path[:at] + path[at].upper() + path[at + 1:]
    return path


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=request_paths(),
    method=methods,
    body=bodies,
    content_type=content_types,
    authorization_header=authorizations,
    query=st.sampled_from(["", f"?token={TOKEN}", "?token=", "?token=%ff", "?a=b&token=x"]),
    sign=st.booleans(),
    github_event=st.sampled_from(["registry_package", "package", "ping", "push", ""]),
)
def test_anything_at_any_endpoint(
    path: str, method: str, body: bytes, content_type: bytes | None,
    authorization_header: bytes | None, query: str, sign: bool, github_event: str,
) -> None:
    front = Front(rollouts=wiring.standalone(Clock(), hostname="host-a"))
    headers: dict[str, str | bytes] = {"X-GitHub-Event": github_event}
    if content_type is not None:
        headers["Content-Type"] = content_type
    if authorization_header is not None:
        headers["Authorization"] = authorization_header
    if sign:
        headers["X-Hub-Signature-256"] = github_signature(body)
    with capturedLogs() as events:
        answer = front.request(method, path + query, body, headers)
    assert answer.code < 500, answer
    assert [e for e in events if "log_failure" in e] == []
    if answer.code >= 400:
        assert front.sink.batches == [], answer
        if method != "HEAD":
            assert answer.error
    for update in front.sink.updates:
        assert_valid(update)
    assert front.request("GET", "/healthz").code == 200


def test_form_bodies_never_reach_the_sink(front: Front) -> None:
    """Twisted itself parses form bodies: a malformed multipart one is refused (400, from
    Twisted, before the app); a well-formed one is the app's 415."""
    broken = front.post("/api/deploy", b'{"repository": "myorg/foo"}',
                        "multipart/form-data; boundary=x")
    assert broken.code == 400
    body = (b"--x\r\nContent-Disposition: form-data; name=\"repository\"\r\n\r\nmyorg/foo\r\n"
            b"--x--\r\n")
    form = front.post("/api/deploy", body, "multipart/form-data; boundary=x")
    assert form.code == 415
    assert "Content-Type" in form.error
    assert front.sink.batches == []
