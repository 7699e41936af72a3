"""The client's rollout calls (events, tag, start, image_has_healthcheck) over a scripted engine:
the requests they send and how they read every answer. The same calls meet a real dockerd in
tests/test_readiness_real.py and tests/test_events_real.py."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.web.iweb import IAgent, IResponse
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from deployer.docker import DockerClient
from deployer.errors import ContainerNotFound, DockerError, DockerUnavailable, ImageNotFound
from deployer.lines import JSONLinesReader
from tests.helpers import fired


class Scripted(Resource):
    """Answers ``(method, path)`` with ``(status, body)``; records each request."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[tuple[str, str], tuple[int, bytes]] = {
            ("GET", "/version"): (200, b'{"ApiVersion": "1.41", "Version": "20.10.24"}'),
        }
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []

    def render(self, request: Request) -> bytes:
        method = request.method.decode()
        path = (request.path or b"").decode()
        query = parse_qs((request.uri or b"").decode().partition("?")[2])
        self.requests.append((method, path, query))
        status, body = self.answers.get((method, path), (404, b'{"message": "page not found"}'))
        request.setResponseCode(status)
        return body


@implementer(IAgent)
class Switch:
    """An agent that refuses every connection while ``down``."""

    def __init__(self, agent: RequestTraversalAgent) -> None:
        self.agent = agent
        self.down = False

    def request(self, method: bytes, uri: bytes, headers: Any = None,
                bodyProducer: Any = None) -> Deferred[IResponse]:
        if self.down:
            return fail(ConnectionRefusedError("no socket"))
        response: Deferred[IResponse] = self.agent.request(method, uri, headers, bodyProducer)
        return response


def client(engine: Scripted) -> tuple[DockerClient, RequestTraversalAgent]:
    agent = RequestTraversalAgent(engine)
    return DockerClient(Clock(), agent), agent


def call(agent: RequestTraversalAgent, coroutine: Any) -> Any:
    d = Deferred.fromCoroutine(coroutine)
    agent.flush()
    return fired(d)


def test_events_asks_for_the_filters_and_since_and_streams_the_body() -> None:
    engine = Scripted()
    lines = b'{"Type":"container","Action":"start","Actor":{"ID":"x"}}\n' * 2
    engine.answers[("GET", "/v1.41/events")] = (200, lines)
    docker, agent = client(engine)
    filters = {"type": ["container"], "event": ["start", "health_status"]}
    response = call(agent, docker.events(filters, since="1796033092.000000015"))
    received: list[dict[str, Any]] = []
    reader = JSONLinesReader(received.append)
    response.deliverBody(reader)
    agent.flush()
    fired(reader.done)
    assert len(received) == 2
    (_, path, query) = engine.requests[-1]
    assert path == "/v1.41/events"
    assert json.loads(query["filters"][0]) == filters
    assert query["since"] == ["1796033092.000000015"]


def test_events_without_since_asks_for_none() -> None:
    engine = Scripted()
    engine.answers[("GET", "/v1.41/events")] = (200, b"")
    docker, agent = client(engine)
    call(agent, docker.events({"type": ["container"]}))
    assert "since" not in engine.requests[-1][2]


def test_events_refused_by_the_engine() -> None:
    engine = Scripted()
    engine.answers[("GET", "/v1.41/events")] = (400, b'{"message": "invalid filter"}')
    docker, agent = client(engine)
    with pytest.raises(DockerError, match="invalid filter") as caught:
        call(agent, docker.events({"nonsense": ["x"]}))
    assert caught.value.status == 400


def test_events_of_an_engine_that_is_not_there() -> None:
    switch = Switch(RequestTraversalAgent(Scripted()))
    docker = DockerClient(Clock(), switch)
    call(switch.agent, docker.version())
    switch.down = True
    with pytest.raises(DockerUnavailable, match="cannot reach the Docker engine"):
        call(switch.agent, docker.events({"type": ["container"]}))
    assert docker._version is None  # negotiated again next time


def test_tag() -> None:
    engine = Scripted()
    engine.answers[("POST", "/v1.41/images/sha256:abc/tag")] = (201, b"")
    docker, agent = client(engine)
    call(agent, docker.tag("sha256:abc", "127.0.0.1:5000/myorg/app", "qa"))
    assert engine.requests[-1] == ("POST", "/v1.41/images/sha256:abc/tag",
                                   {"repo": ["127.0.0.1:5000/myorg/app"], "tag": ["qa"]})


def test_tag_of_an_unknown_image() -> None:
    engine = Scripted()
    engine.answers[("POST", "/v1.41/images/sha256:abc/tag")] = (
        404, b'{"message": "No such image: sha256:abc"}')
    docker, agent = client(engine)
    with pytest.raises(ImageNotFound, match="No such image"):
        call(agent, docker.tag("sha256:abc", "app", "qa"))


@pytest.mark.parametrize("status", [204, 304])
def test_start_of_a_stopped_or_running_container(status: int) -> None:
    engine = Scripted()
    engine.answers[("POST", "/v1.41/containers/web/start")] = (status, b"")
    docker, agent = client(engine)
    assert call(agent, docker.start("web")) is None


def test_start_of_an_unknown_container() -> None:
    engine = Scripted()
    docker, agent = client(engine)
    with pytest.raises(ContainerNotFound):
        call(agent, docker.start("web"))


def test_start_refused() -> None:
    engine = Scripted()
    engine.answers[("POST", "/v1.41/containers/web/start")] = (
        500, b'{"message": "network x not found"}')
    docker, agent = client(engine)
    with pytest.raises(DockerError, match="network x not found"):
        call(agent, docker.start("web"))


@pytest.mark.parametrize(("config", "expected"), [
    ({"Healthcheck": {"Test": ["CMD-SHELL", "test -f /tmp/healthy"]}}, True),
    ({"Healthcheck": {"Test": ["CMD", "/bin/check"]}}, True),
    ({"Healthcheck": {"Test": ["NONE"]}}, False),
    ({"Healthcheck": {"Test": []}}, False),
    ({"Healthcheck": None}, False),
    ({}, False),
    (None, False),
])
def test_image_has_healthcheck(config: Any, expected: bool) -> None:
    engine = Scripted()
    engine.answers[("GET", "/v1.41/images/myorg/app:qa/json")] = (
        200, json.dumps({"Id": "sha256:abc", "Config": config}).encode())
    docker, agent = client(engine)
    assert call(agent, docker.image_has_healthcheck("myorg/app:qa")) is expected


def test_image_has_healthcheck_of_an_unknown_image() -> None:
    docker, agent = client(Scripted())
    with pytest.raises(ImageNotFound):
        call(agent, docker.image_has_healthcheck("sha256:abc"))
