"""The client's rollout and recreation calls (events, tag, start, image_has_healthcheck, create,
rename, remove, connect) over a scripted engine: the requests they send and how they read every
answer. The same calls meet the in-memory engine and a real dockerd in one suite in
tests/test_docker_client.py, tests/test_readiness_real.py and tests/test_events_real.py."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qs

import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet import task
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.web.iweb import IAgent, IResponse
from twisted.web.resource import Resource
from twisted.web.server import Request
from zope.interface import implementer

from deployer.docker import DockerClient
from deployer.errors import (
    ContainerNotFound,
    DockerError,
    DockerUnavailable,
    ImageNotFound,
    NotFound,
)
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
        #: The JSON body and Content-Type of each request that had a body.
        self.bodies: list[tuple[Any, str]] = []

    def render(self, request: Request) -> bytes:
        method = request.method.decode()
        path = (request.path or b"").decode()
        query = parse_qs((request.uri or b"").decode().partition("?")[2])
        self.requests.append((method, path, query))
        content = request.content.read() if request.content is not None else b""
        if content:
            self.bodies.append((json.loads(content),
                                (request.getHeader(b"Content-Type") or b"").decode()))
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


# -- recreation -----------------------------------------------------------------------------------


@pytest.fixture
def bodies(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """treq writes request bodies on the global cooperator: here it runs on this Clock."""
    clock = Clock()
    monkeypatch.setattr(task, "_theCooperator",
                        task.Cooperator(scheduler=lambda work: clock.callLater(0, work)))
    return clock


def call_with_body(agent: RequestTraversalAgent, clock: Clock, coroutine: Any) -> Any:
    d = Deferred.fromCoroutine(coroutine)
    for _ in range(5):
        clock.advance(0)
        agent.flush()
    return fired(d)


def test_create_sends_the_configuration_and_returns_the_id(bodies: Clock) -> None:
    engine = Scripted()
    engine.answers[("POST", "/v1.41/containers/create")] = (
        201, b'{"Id": "4f1c", "Warnings": []}')
    docker, agent = client(engine)
    config = {"Image": "myorg/app:qa", "Env": ["A=1"],
              "HostConfig": {"RestartPolicy": {"Name": "unless-stopped"}}}
    assert call_with_body(agent, bodies, docker.create("web-new", config)) == "4f1c"
    assert engine.requests[-1] == ("POST", "/v1.41/containers/create", {"name": ["web-new"]})
    assert engine.bodies == [(config, "application/json; charset=UTF-8")]


@pytest.mark.parametrize(("status", "error"), [
    (409, DockerError), (404, NotFound), (400, DockerError), (500, DockerError)])
def test_create_refused(bodies: Clock, status: int, error: type[DockerError]) -> None:
    engine = Scripted()
    engine.answers[("POST", "/v1.41/containers/create")] = (
        status, b'{"message": "Conflict. The container name \\"/web\\" is already in use"}')
    docker, agent = client(engine)
    with pytest.raises(error, match="Conflict") as caught:
        call_with_body(agent, bodies, docker.create("web", {"Image": "myorg/app:qa"}))
    assert caught.value.status == status


def test_rename() -> None:
    engine = Scripted()
    engine.answers[("POST", "/v1.41/containers/web/rename")] = (204, b"")
    docker, agent = client(engine)
    assert call(agent, docker.rename("web", "web-old")) is None
    assert engine.requests[-1] == ("POST", "/v1.41/containers/web/rename",
                                   {"name": ["web-old"]})


def test_rename_of_an_unknown_container_and_to_a_name_in_use() -> None:
    engine = Scripted()
    docker, agent = client(engine)
    with pytest.raises(ContainerNotFound):
        call(agent, docker.rename("web", "web-old"))
    engine.answers[("POST", "/v1.41/containers/web/rename")] = (
        409, b'{"message": "Error when allocating new name: Conflict."}')
    with pytest.raises(DockerError, match="allocating new name") as caught:
        call(agent, docker.rename("web", "web-old"))
    assert caught.value.status == 409


@pytest.mark.parametrize(("force", "sent"), [(False, "0"), (True, "1")])
def test_remove(force: bool, sent: str) -> None:
    engine = Scripted()
    engine.answers[("DELETE", "/v1.41/containers/web")] = (204, b"")
    docker, agent = client(engine)
    assert call(agent, docker.remove("web", force=force)) is None
    assert engine.requests[-1] == ("DELETE", "/v1.41/containers/web", {"force": [sent]})


def test_remove_refused_and_unknown() -> None:
    engine = Scripted()
    docker, agent = client(engine)
    with pytest.raises(ContainerNotFound):
        call(agent, docker.remove("web"))
    engine.answers[("DELETE", "/v1.41/containers/web")] = (
        409, b'{"message": "You cannot remove a running container"}')
    with pytest.raises(DockerError, match="cannot remove a running") as caught:
        call(agent, docker.remove("web"))
    assert caught.value.status == 409


def test_connect_sends_the_container_and_its_endpoint(bodies: Clock) -> None:
    engine = Scripted()
    engine.answers[("POST", "/v1.41/networks/appnet/connect")] = (200, b"")
    docker, agent = client(engine)
    assert call_with_body(agent, bodies, docker.connect(
        "appnet", "4f1c", {"Aliases": ["web"]})) is None
    assert engine.bodies == [({"Container": "4f1c", "EndpointConfig": {"Aliases": ["web"]}},
                              "application/json; charset=UTF-8")]
    call_with_body(agent, bodies, docker.connect("appnet", "4f1c"))
    assert engine.bodies[-1][0] == {"Container": "4f1c", "EndpointConfig": {}}


def test_connect_to_an_unknown_network(bodies: Clock) -> None:
    engine = Scripted()
    engine.answers[("POST", "/v1.41/networks/nonet/connect")] = (
        404, b'{"message": "network nonet not found"}')
    docker, agent = client(engine)
    with pytest.raises(NotFound, match="network nonet not found"):
        call_with_body(agent, bodies, docker.connect("nonet", "4f1c"))
