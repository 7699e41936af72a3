"""The in-memory Docker engine: its test knobs, and its answers compared field by field with a
real dockerd running the same scenario (``test_same_answers_as_the_real_engine``)."""

from __future__ import annotations

import base64
import http.client
import itertools
import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import attrs
import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

from deployer.docker import DockerClient
from deployer.errors import DockerError, PullFailed
from deployer.events import since_param
from deployer.lines import JSONLinesReader
from deployer.testing.memory_docker import (
    Behaviour,
    ContainerState,
    Healthcheck,
    MemoryDocker,
)
from tests.helpers import fired
from tests.stack.docker_stack import (
    Dockerd,
    HangingRegistry,
    ImageBuilder,
    Registry,
    run_container,
    unique,
    wait_until,
)
from tests.stack.health_images import FAILING_TEST, build_health_image, memory_health_image

REPO = "registry.test:5000/myorg/foo"


@implementer(IBodyProducer)
class Body:
    """A request body written at once (treq's own waits for the global reactor)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: Any) -> Deferred[None]:
        consumer.write(self.data)
        return succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class Raw:
    """Plain HTTP to the double, without the deployer client: (status, headers, body)."""

    def __init__(self, docker: MemoryDocker) -> None:
        self.http = HTTPClient(docker.agent())

    def __call__(
        self, method: str, path: str, headers: dict[bytes | str, bytes | str] | None = None,
        body: Any = None,
    ) -> tuple[int, dict[str, list[str]], bytes]:
        headers = dict(headers or {})
        data = None
        if body is not None:
            headers.setdefault("Content-Type", "application/json")
            data = Body(body if isinstance(body, bytes) else json.dumps(body).encode())
        response = fired(self.http.request(method, "http://docker" + path, headers=headers,
                                           data=data))
        content = fired(response.content())
        return response.code, {k.decode().lower(): [v.decode() for v in vs]
                               for k, vs in response.headers.getAllRawHeaders()}, content

    def json(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        code, _, content = self(method, path, body=body)
        return code, json.loads(content) if content else None

    def stream(self, path: str) -> Stream:
        """An answer that goes on (``/events``): its lines as they come."""
        response = fired(self.http.request("GET", "http://docker" + path, unbuffered=True))
        stream = Stream(response.code)
        stream.reader = JSONLinesReader(stream.lines.append, what="events")
        response.deliverBody(stream.reader)
        return stream


@attrs.define
class Stream:
    code: int
    lines: list[dict[str, Any]] = attrs.field(factory=list)
    reader: Any = None

    @property
    def actions(self) -> list[str]:
        return [m["Action"] for m in self.lines]

    @property
    def ended(self) -> bool:
        return bool(self.reader.done.called)

    def close(self) -> None:
        self.reader.done.cancel()
        self.reader.done.addErrback(lambda _: None)


@pytest.fixture
def docker() -> MemoryDocker:
    return MemoryDocker()


@pytest.fixture
def raw(docker: MemoryDocker) -> Raw:
    return Raw(docker)


@pytest.fixture
def client(docker: MemoryDocker) -> Iterator[DockerClient]:
    from twisted.internet import reactor

    yield DockerClient(reactor, agent=docker.agent())


def test_unknown_paths_and_methods(raw: Raw) -> None:
    assert raw.json("GET", "/v1.41/nothing/here") == (404, {"message": "page not found"})
    assert raw.json("GET", "/nothing") == (404, {"message": "page not found"})
    assert raw.json("GET", "/v1.41/containers/x/stop") == (404, {"message": "page not found"})
    assert raw.json("POST", "/v1.41/images/json") == (404, {"message": "page not found"})
    assert raw.json("GET", "/vabc/images/json") == (404, {"message": "page not found"})


def test_ping_and_version(raw: Raw) -> None:
    code, headers, body = raw("GET", "/_ping")
    assert (code, body) == (200, b"OK")
    assert headers["api-version"] == ["1.41"]
    assert raw("GET", "/v1.24/_ping")[2] == b"OK"
    for path in ("/version", "/v1.41/version"):
        code, version = raw.json("GET", path)
        assert code == 200
        assert (version["ApiVersion"], version["MinAPIVersion"]) == ("1.41", "1.12")


def test_api_version_out_of_range(raw: Raw) -> None:
    assert raw.json("GET", "/v1.50/images/json") == (400, {
        "message": "client version 1.50 is too new. Maximum supported API version is 1.41"})
    code, headers, body = raw("GET", "/v1.11/images/json")
    assert code == 400
    assert headers["content-type"][0].startswith("text/plain")
    assert body.startswith(b"client version 1.11 is too old")


def test_other_api_version() -> None:
    docker = MemoryDocker(api_version="1.40")
    raw = Raw(docker)
    assert raw.json("GET", "/version")[1]["ApiVersion"] == "1.40"
    assert raw.json("GET", "/v1.41/images/json")[0] == 400


def test_calls_are_recorded(docker: MemoryDocker, raw: Raw) -> None:
    raw("GET", "/_ping")
    raw("GET", "/v1.41/images/json?all=1")
    raw("GET", "/v1.41/nope")
    raw("POST", "/v1.41/containers/abc/stop")
    raw("POST", "/containers/def/stop")
    assert docker.calls == [
        ("GET", "/_ping"), ("GET", "/v1.41/images/json"), ("GET", "/v1.41/nope"),
        ("POST", "/v1.41/containers/abc/stop"), ("POST", "/containers/def/stop"),
    ]
    assert docker.count("GET", "/images/json") == 1
    assert docker.count("POST", "/containers/{id}/stop") == 2
    assert docker.count("GET", "/containers/{id}/stop") == 0
    assert docker.count("GET", "/_ping") == 1


def test_image_list_shapes(docker: MemoryDocker, raw: Raw) -> None:
    bare = docker.add_image()
    tagged = docker.add_image([f"{REPO}:qa"], labels={"version": "v1"})
    images = {i["Id"]: i for i in raw.json("GET", "/v1.41/images/json")[1]}
    assert (images[bare]["RepoTags"], images[bare]["RepoDigests"]) == (
        ["<none>:<none>"], ["<none>@<none>"])
    assert images[bare]["Labels"] is None
    assert (images[tagged]["RepoTags"], images[tagged]["RepoDigests"]) == ([f"{REPO}:qa"], None)
    assert images[tagged]["Labels"] == {"version": "v1"}
    assert list(images) == [tagged, bare], "newest first"

    # A pull moves the tag: the old image keeps only its digest, listed with RepoTags null.
    docker.publish(f"{REPO}:qa", tagged)
    raw("POST", f"/v1.41/images/create?fromImage={REPO}&tag=qa")
    old_digest = docker.images[tagged].digests
    assert old_digest == [f"{REPO}@" + docker.remote[f"{REPO}:qa"].digest]
    docker.publish(f"{REPO}:qa")
    raw("POST", f"/v1.41/images/create?fromImage={REPO}&tag=qa")
    images = {i["Id"]: i for i in raw.json("GET", "/v1.41/images/json")[1]}
    assert images[tagged]["RepoTags"] is None
    assert images[tagged]["RepoDigests"] == old_digest
    # ...while inspect shows empty lists.
    inspected = raw.json("GET", f"/v1.41/images/{tagged}/json")[1]
    assert (inspected["RepoTags"], inspected["RepoDigests"]) == ([], old_digest)


def test_image_lookup_by_name_id_and_prefix(docker: MemoryDocker, raw: Raw) -> None:
    image_id = docker.add_image(["busybox", f"{REPO}:qa"])
    for name in ("busybox", "busybox:latest", "docker.io/library/busybox:latest",
                 f"{REPO}:qa", image_id, image_id[7:], image_id[7:19]):
        code, found = raw.json("GET", f"/v1.41/images/{name}/json")
        assert (code, found["Id"]) == (200, image_id), name
    assert raw.json("GET", f"/v1.41/images/{REPO}:prod/json") == (404, {
        "message": f"no such image: {REPO}:prod: No such image: {REPO}:prod"})
    assert raw.json("GET", "/v1.41/images/nope/json") == (404, {
        "message": "no such image: nope: No such image: nope:latest"})


def test_containers_list_and_inspect(docker: MemoryDocker, raw: Raw) -> None:
    image_id = docker.add_image([f"{REPO}:qa"], labels={"version": "v1"})
    first = docker.run("first", f"{REPO}:qa", labels={"role": "web"})
    second = docker.run("second", image_id[7:19])
    docker.stop_container("second")

    running = raw.json("GET", "/v1.41/containers/json")[1]
    assert [c["Id"] for c in running] == [first]
    assert running[0]["Names"] == ["/first"]
    assert running[0]["Image"] == f"{REPO}:qa"
    assert running[0]["ImageID"] == image_id
    assert running[0]["Labels"] == {"version": "v1", "role": "web"}
    everything = raw.json("GET", "/v1.41/containers/json?all=1")[1]
    assert [c["Id"] for c in everything] == [second, first]
    assert everything[0]["State"] == "exited"
    assert everything[0]["Image"] == image_id[7:19], "started by short id, still listed so"
    assert raw.json("GET", "/v1.41/containers/json?all=0")[1] == running

    for name in ("first", "/first", first, first[:12]):
        code, inspected = raw.json("GET", f"/v1.41/containers/{name}/json")
        assert code == 200, name
        assert (inspected["Id"], inspected["Name"]) == (first, "/first")
        assert (inspected["Image"], inspected["Config"]["Image"]) == (image_id, f"{REPO}:qa")
        assert inspected["State"]["Running"] is True
    assert raw.json("GET", "/v1.41/containers/nope/json") == (404, {
        "message": "No such container: nope"})


def test_filters_are_refused_not_ignored(raw: Raw) -> None:
    assert raw.json("GET", "/v1.41/containers/json?filters=%7B%7D")[0] == 400
    assert raw.json("GET", "/v1.41/images/json?filters=%7B%7D")[0] == 400


def test_run_helpers_refuse_what_an_engine_would(docker: MemoryDocker) -> None:
    with pytest.raises(LookupError):
        docker.run("x", f"{REPO}:qa")
    docker.add_image([f"{REPO}:qa"])
    docker.run("x", f"{REPO}:qa")
    with pytest.raises(ValueError, match="already in use"):
        docker.run("x", f"{REPO}:qa")
    docker.remove("x")
    docker.run("x", f"{REPO}:qa")
    assert [c.name for c in docker.containers_running()] == ["x"]


def test_stop_codes_and_timeouts(docker: MemoryDocker, raw: Raw) -> None:
    docker.add_image([f"{REPO}:qa"])
    container_id = docker.run("web", f"{REPO}:qa")
    assert raw("POST", f"/v1.41/containers/{container_id}/stop?t=7")[0] == 204
    assert raw("POST", "/v1.41/containers/web/stop")[0] == 304
    assert raw.json("POST", "/v1.41/containers/nope/stop?t=1") == (404, {
        "message": "No such container: nope"})
    assert docker.stops == [(container_id, 7), (container_id, None)]
    assert docker.containers_running() == []


@pytest_twisted.ensureDeferred
async def test_on_stop_acts_as_supervisor(docker: MemoryDocker, client: DockerClient) -> None:
    v1 = docker.publish(f"{REPO}:qa")
    await client.pull(f"{REPO}:qa")
    old = docker.run("web", f"{REPO}:qa")
    v2 = docker.publish(f"{REPO}:qa")
    await client.pull(f"{REPO}:qa")
    seen: list[ContainerState] = []
    docker.on_stop(seen.append)
    docker.on_stop(docker.restart_like_supervisor)

    await client.stop(old, timeout=3)

    assert [c.id for c in seen] == [old]
    assert seen[0].image_id == v1
    (new,) = await client.containers()
    assert (new.name, new.image, new.image_id) == ("web", f"{REPO}:qa", v2)
    assert new.id != old
    assert docker.stops == [(old, 3)]
    assert docker.events.actions(old) == ["create", "start", "kill", "die", "stop", "destroy"]
    assert docker.events.actions(new.id) == ["create", "start"]


@pytest_twisted.ensureDeferred
async def test_a_failing_on_stop_hook_is_an_engine_error(
    docker: MemoryDocker, client: DockerClient
) -> None:
    docker.add_image([f"{REPO}:qa"])
    container_id = docker.run("web", f"{REPO}:qa")

    def broken(container: ContainerState) -> None:
        raise RuntimeError("supervisor bug")

    docker.on_stop(broken)
    with pytest.raises(DockerError, match="supervisor bug") as e:
        await client.stop(container_id, timeout=1)
    assert e.value.status == 500


@pytest_twisted.ensureDeferred
async def test_pull_records_auth(docker: MemoryDocker, client: DockerClient) -> None:
    docker.publish(f"{REPO}:qa")
    auth = base64.urlsafe_b64encode(json.dumps({"username": "u", "password": "p"}).encode())
    raw = Raw(docker)
    raw("POST", f"/v1.41/images/create?fromImage={REPO}&tag=qa",
        headers={"X-Registry-Auth": auth.decode()})
    await client.pull(f"{REPO}:qa")
    assert docker.auth_headers(f"{REPO}:qa") == [auth.decode(), None]
    assert docker.pulls[0].auth_config() == {"username": "u", "password": "p"}
    assert docker.pulls[1].auth_config() is None


@pytest_twisted.ensureDeferred
async def test_fail_pull_once_then_succeed(docker: MemoryDocker, client: DockerClient) -> None:
    image_id = docker.publish(f"{REPO}:qa")
    docker.fail_pull(f"{REPO}:qa", "registry on fire", status=500, once=True)
    with pytest.raises(PullFailed, match="registry on fire") as e:
        await client.pull(f"{REPO}:qa")
    assert e.value.status == 500
    await client.pull(f"{REPO}:qa")
    assert docker.image_id(f"{REPO}:qa") == image_id


@pytest_twisted.ensureDeferred
async def test_fail_pull_always_inside_the_stream(
    docker: MemoryDocker, client: DockerClient
) -> None:
    docker.publish(f"{REPO}:qa")
    docker.fail_pull(f"{REPO}:qa", "unknown blob")
    for _ in range(2):
        with pytest.raises(PullFailed, match="unknown blob") as e:
            await client.pull(f"{REPO}:qa")
        assert e.value.status == 200
    assert docker.image_id(f"{REPO}:qa") is None
    docker.clear_pull_failure(f"{REPO}:qa")
    await client.pull(f"{REPO}:qa")
    assert docker.image_id(f"{REPO}:qa") is not None


def test_fail_pull_of_unpublished_tag_with_default_message(raw: Raw, docker: MemoryDocker) -> None:
    docker.fail_pull(f"{REPO}:qa", status=404)
    assert raw.json("POST", f"/v1.41/images/create?fromImage={REPO}&tag=qa") == (404, {
        "message": f"manifest for {REPO}:qa not found: manifest unknown: manifest unknown"})


@pytest_twisted.ensureDeferred
async def test_slow_pull_ends_when_released(docker: MemoryDocker, client: DockerClient) -> None:
    image_id = docker.publish(f"{REPO}:qa")
    release: Deferred[None] = Deferred()
    docker.slow_pull(f"{REPO}:qa", release)

    first = Deferred.fromCoroutine(client.pull(f"{REPO}:qa"))
    second = Deferred.fromCoroutine(client.pull(f"{REPO}:qa"))
    assert not first.called and not second.called
    assert (docker.pulls_in_progress, docker.max_pulls_in_progress) == (2, 2)
    assert docker.image_id(f"{REPO}:qa") is None, "nothing pulled before the release"

    release.callback(None)

    assert first.called and second.called
    await first
    await second
    assert docker.pulls_in_progress == 0
    assert docker.image_id(f"{REPO}:qa") == image_id
    # Released: later pulls are quick.
    third = Deferred.fromCoroutine(client.pull(f"{REPO}:qa"))
    assert third.called
    await third


@pytest_twisted.ensureDeferred
async def test_slow_pull_released_with_an_error(
    docker: MemoryDocker, client: DockerClient
) -> None:
    docker.publish(f"{REPO}:qa")
    release: Deferred[None] = Deferred()
    docker.slow_pull(f"{REPO}:qa", release)
    pulls = [Deferred.fromCoroutine(client.pull(f"{REPO}:qa")) for _ in range(2)]
    release.errback(RuntimeError("connection reset by registry"))
    for pulling in pulls:
        with pytest.raises(PullFailed, match="connection reset by registry"):
            await pulling
    assert docker.image_id(f"{REPO}:qa") is None
    await client.pull(f"{REPO}:qa")
    assert docker.image_id(f"{REPO}:qa") is not None


def test_pull_line_stream(docker: MemoryDocker, raw: Raw) -> None:
    docker.publish("busybox:1.36")
    code, headers, body = raw("POST", "/v1.41/images/create?fromImage=busybox&tag=1.36")
    assert (code, headers["content-type"]) == (200, ["application/json"])
    lines = [json.loads(line) for line in body.splitlines()]
    assert lines[0] == {"status": "Pulling from library/busybox", "id": "1.36"}
    assert lines[-1] == {"status": "Status: Downloaded newer image for busybox:1.36"}
    assert lines[-2]["status"].startswith("Digest: sha256:")
    again = [json.loads(line) for line in
             raw("POST", "/v1.41/images/create?fromImage=busybox:1.36")[2].splitlines()]
    assert [line["status"] for line in again] == [
        "Pulling from library/busybox", lines[-2]["status"],
        "Status: Image is up to date for busybox:1.36"]


def test_pull_by_digest_line_stream_event_and_knobs(docker: MemoryDocker, raw: Raw) -> None:
    old = docker.publish(f"{REPO}:qa")
    digest = docker.registry_digest(f"{REPO}:qa")
    docker.publish(f"{REPO}:qa")  # the tag moved on
    ref = f"{REPO}@{digest}"
    code, _, body = raw("POST", f"/v1.41/images/create?fromImage={REPO}&tag={digest}")
    assert code == 200
    lines = [json.loads(line) for line in body.splitlines()]
    assert lines[0] == {"status": f"Pulling from {REPO.partition('/')[2]}", "id": digest}
    assert lines[-2:] == [{"status": f"Digest: {digest}"},
                          {"status": f"Status: Downloaded newer image for {ref}"}]
    assert (docker.image_id(ref), docker.image_id(f"{REPO}:qa")) == (old, None)
    [pulled] = [e for e in docker.events.history if e["Action"] == "pull"]
    assert (pulled["Actor"]["ID"], pulled["Actor"]["Attributes"]["name"]) == (ref, REPO)
    assert docker.pulls[-1].repotag == ref
    # The test knobs take a pull by digest too; a tag or a digest of another build is spared.
    docker.fail_pull(ref, status=404)
    code, error = raw.json("POST", f"/v1.41/images/create?fromImage={ref}")
    assert (code, error["message"]) == (
        404, f"manifest for {ref} not found: manifest unknown: manifest unknown")
    assert raw("POST", f"/v1.41/images/create?fromImage={REPO}&tag=qa")[0] == 200
    code, _ = raw.json("POST", f"/v1.41/images/create?fromImage={REPO}&tag=sha256:abc")
    assert code == 400


def test_pull_without_tag_pulls_every_tag(docker: MemoryDocker, raw: Raw) -> None:
    qa = docker.publish(f"{REPO}:qa")
    prod = docker.publish(f"{REPO}:prod")
    assert raw("POST", f"/v1.41/images/create?fromImage={REPO}")[0] == 200
    assert (docker.image_id(f"{REPO}:qa"), docker.image_id(f"{REPO}:prod")) == (qa, prod)


def test_invalid_reference(raw: Raw) -> None:
    code, error = raw.json("POST", "/v1.41/images/create?fromImage=Registry.test:5000/MyOrg/x")
    assert code == 400
    assert error["message"].startswith("invalid reference format")


@pytest_twisted.ensureDeferred
async def test_down_refuses_connections(docker: MemoryDocker, client: DockerClient) -> None:
    await client.ping()
    docker.down = True
    with pytest.raises(DockerError):
        await client.images()
    docker.down = False
    await client.images()


# -- events -------------------------------------------------------------------------------------

CHECK = Healthcheck.shell("test -f /tmp/healthy")  # interval 1 s, retries 2


@pytest.fixture
def clock() -> Clock:
    clock = Clock()
    clock.advance(1_800_000_000)
    return clock


@pytest.fixture
def timed(clock: Clock) -> MemoryDocker:
    """An engine on a Clock, as health checks and exits need."""
    return MemoryDocker(clock=clock)


def _filters(**fields: list[str]) -> str:
    return "filters=" + quote(json.dumps(fields))


def test_events_stream_each_new_event_as_a_line(timed: MemoryDocker) -> None:
    raw = Raw(timed)
    stream = raw.stream("/v1.41/events")
    assert stream.code == 200 and stream.lines == [] and timed.events.streams == 1
    timed.add_image([f"{REPO}:qa"], labels={"version": "v1"})
    container_id = timed.run("web", f"{REPO}:qa", {"role": "front"})
    timed.stop_container("web", 5)
    assert stream.actions == ["create", "start", "kill", "die", "stop"]
    create, _, kill, die, _ = stream.lines
    assert create == {
        "status": "create", "id": container_id, "from": f"{REPO}:qa", "Type": "container",
        "Action": "create", "Actor": {"ID": container_id, "Attributes": {
            "image": f"{REPO}:qa", "name": "web", "role": "front", "version": "v1"}},
        "scope": "local", "time": 1_800_000_000, "timeNano": create["timeNano"],
    }
    assert kill["Actor"]["Attributes"]["signal"] == "15"
    assert die["Actor"]["Attributes"]["exitCode"] == "0"
    times = [m["timeNano"] for m in stream.lines]
    assert times == sorted(set(times)), "every event has its own instant, even on a still clock"
    assert times[0] == 1_800_000_000 * 10**9
    stream.close()
    timed.flush()
    assert timed.events.streams == 0, "a client that went away is forgotten"


@pytest.mark.parametrize(("fields", "expected"), [
    ({"type": ["container"]}, ["create", "start", "exec_create", "exec_start", "exec_die",
                               "health_status: healthy", "rename"]),
    ({"type": ["image"]}, ["tag"]),
    ({"event": ["start", "rename"]}, ["start", "rename"]),
    # health_status (without a colon) is matched by prefix, and so is every other event named
    ({"event": ["health_status", "exec_d"]}, ["exec_die", "health_status: healthy"]),
    ({"event": ["exec_start"]}, ["exec_start"]),
    ({"event": ["exec_d"]}, []),  # exactly, without health_status or exec_create/exec_start
    ({"container": ["we"]}, ["create", "start", "exec_create", "exec_start", "exec_die",
                             "health_status: healthy", "rename"]),  # by prefix of the name
    ({"container": ["nope"]}, []),
    ({"label": ["role=front"], "type": ["container"]}, ["create", "start", "exec_create",
                                                        "exec_start", "exec_die",
                                                        "health_status: healthy", "rename"]),
    ({"label": ["role=back"]}, []),
    ({"image": [f"{REPO}"], "event": ["start", "tag"]}, ["start", "tag"]),
    ({"nonsense": ["x"], "event": ["start"]}, ["start"]),  # unknown keys: ignored, as dockerd
])
def test_event_filters_as_dockerd_matches_them(
    timed: MemoryDocker, clock: Clock, fields: dict[str, list[str]], expected: list[str]
) -> None:
    stream = Raw(timed).stream("/v1.41/events?" + _filters(**fields))
    timed.add_image([f"{REPO}:qa"], healthcheck=CHECK)
    timed.run("web", f"{REPO}:qa", {"role": "front"})
    clock.advance(1)
    timed.rename_container("web", "web-2")
    timed.tag_image(f"{REPO}:qa", REPO, "prod")
    assert [a.partition(":")[0] if a.startswith("exec_") else a
            for a in stream.actions] == expected


def test_event_filters_in_their_other_form_and_refused(timed: MemoryDocker) -> None:
    raw = Raw(timed)
    stream = raw.stream("/v1.41/events?filters=" + quote('{"event": {"start": true}}'))
    timed.add_image([f"{REPO}:qa"])
    timed.run("web", f"{REPO}:qa")
    assert stream.actions == ["start"]
    code, error = raw.json("GET", "/v1.41/events?filters=nope")
    assert code == 500 and error["message"]


def test_since_replays_what_is_remembered_from_that_very_instant(
    timed: MemoryDocker, clock: Clock
) -> None:
    timed.add_image([f"{REPO}:qa"])
    first = timed.run("first", f"{REPO}:qa")
    clock.advance(10)
    second = timed.run("second", f"{REPO}:qa")
    (start,) = [m for m in timed.events.history if m["Action"] == "start"
                and m["id"] == second]
    at = start["timeNano"]
    raw = Raw(timed)
    exact = raw.stream(f"/v1.41/events?since={at // 10**9}.{at % 10**9:09d}")
    assert [(m["Action"], m["id"]) for m in exact.lines] == [("start", second)]
    assert not exact.ended
    later = raw.stream(f"/v1.41/events?since={at // 10**9}.{at % 10**9 + 1:09d}")
    assert later.lines == []
    clock.advance(5)
    everything = raw.stream("/v1.41/events?since=0&until=" + str(at // 10**9 + 1)
                            + "&" + _filters(event=["start"]))
    assert [m["id"] for m in everything.lines] == [first, second]
    assert everything.ended, "until= in the past: the answer ends after the replay"
    seconds = raw.stream("/v1.41/events?since=1800000005")  # whole seconds are fine
    assert [m["id"] for m in seconds.lines] == [second, second]


def test_until_in_the_future_ends_the_answer_then(timed: MemoryDocker, clock: Clock) -> None:
    stream = Raw(timed).stream("/v1.41/events?until=1800000005")
    timed.add_image([f"{REPO}:qa"])
    timed.run("web", f"{REPO}:qa")
    clock.advance(5)
    assert stream.ended and stream.actions == ["create", "start"]
    assert timed.events.streams == 0


def test_since_and_until_refused(raw: Raw) -> None:
    assert raw.json("GET", "/v1.41/events?since=20&until=10") == (400, {
        "message": "`since` time (20) cannot be after `until` time (10)"})
    assert raw.json("GET", "/v1.41/events?since=abc") == (500, {
        "message": 'strconv.ParseInt: parsing "abc": invalid syntax'})


def test_only_the_last_256_events_are_remembered(timed: MemoryDocker) -> None:
    timed.add_image([f"{REPO}:qa"])
    for i in range(130):
        timed.run(f"c{i:03d}", f"{REPO}:qa")  # create and start: 260 events
    replay = Raw(timed).stream("/v1.41/events?since=0")
    assert len(replay.lines) == 256
    assert len(timed.events.history) == 260
    assert replay.lines[0]["Actor"]["Attributes"]["name"] == "c002"


def test_an_engine_going_away_drops_its_streams(timed: MemoryDocker) -> None:
    raw = Raw(timed)
    dropped, ended = raw.stream("/v1.41/events"), raw.stream("/v1.41/events")
    assert timed.drop_event_streams(cleanly=True) == 2
    assert dropped.ended and ended.ended
    dropped.reader.done.addErrback(lambda _: None)
    fired(ended.reader.done)  # a finished answer
    broken = raw.stream("/v1.41/events")
    assert timed.drop_event_streams() == 1
    with pytest.raises(Exception, match=r"Chunked decoder|Connection"):
        fired(broken.reader.done)


# -- health, exits, restarts --------------------------------------------------------------------


def test_a_health_check_runs_on_the_engines_clock(timed: MemoryDocker, clock: Clock) -> None:
    raw = Raw(timed)
    timed.add_image([f"{REPO}:qa"], healthcheck=CHECK, behaviour=Behaviour(
        healthy_after=2.5, unhealthy_after=6.5, probe_output="no /tmp/healthy"))
    image = raw.json("GET", f"/v1.41/images/{REPO}:qa/json")[1]
    assert image["Config"]["Healthcheck"] == {
        "Test": ["CMD-SHELL", "test -f /tmp/healthy"], "Interval": 1_000_000_000,
        "Timeout": 2_000_000_000, "Retries": 2}
    container_id = timed.create_container("web", {"Image": f"{REPO}:qa"}).id
    assert "Health" not in raw.json("GET", "/v1.41/containers/web/json")[1]["State"]
    assert raw("POST", "/v1.41/containers/web/start")[0] == 204

    def health() -> dict[str, Any]:
        return dict(raw.json("GET", "/v1.41/containers/web/json")[1]["State"]["Health"])

    assert health() == {"Status": "starting", "FailingStreak": 0, "Log": []}
    clock.advance(2)  # probes at 1 and 2 s fail: two in a row, unhealthy
    assert (health()["Status"], health()["FailingStreak"]) == ("unhealthy", 2)
    assert health()["Log"][-1]["Output"] == "no /tmp/healthy"
    clock.advance(1)  # passes from 2.5 s on
    assert (health()["Status"], health()["FailingStreak"]) == ("healthy", 0)
    clock.advance(5)  # fails again from 6.5 s on
    assert (health()["Status"], health()["FailingStreak"]) == ("unhealthy", 2)
    assert len(health()["Log"]) == 5, "the last five probes"
    assert [a for a in timed.events.actions(container_id) if a.startswith("health")] == [
        "health_status: unhealthy", "health_status: healthy", "health_status: unhealthy"]
    probes = [m for m in timed.events.history if m["Action"].startswith("exec_")]
    assert len(probes) == 3 * 8
    assert probes[0]["Action"] == "exec_create: /bin/sh -c test -f /tmp/healthy"
    assert probes[2]["Action"] == "exec_die"
    assert probes[2]["Actor"]["Attributes"]["exitCode"] == "1"
    assert probes[0]["Actor"]["Attributes"]["execID"] == probes[2]["Actor"]["Attributes"][
        "execID"]
    listed = raw.json("GET", "/v1.41/containers/json")[1][0]
    assert listed["Status"] == "Up 8 seconds (unhealthy)"

    timed.stop_container("web")
    assert health()["Status"] == "unhealthy"
    clock.advance(10)
    assert len([m for m in timed.events.history if m["Action"] == "exec_die"]) == 8
    raw("POST", "/v1.41/containers/web/start")
    assert health()["Status"] == "starting" and len(health()["Log"]) == 5


def test_health_check_defaults_start_period_and_none(timed: MemoryDocker, clock: Clock) -> None:
    timed.add_image([f"{REPO}:qa"], healthcheck=Healthcheck(("CMD", "/bin/check")),
                    behaviour=Behaviour.never_healthy())
    timed.run("slow", f"{REPO}:qa")
    clock.advance(89)
    slow = timed.find_container("slow")
    assert slow is not None and slow.health is not None
    assert (slow.health.status, slow.health.failing_streak) == ("starting", 2)
    clock.advance(1)  # dockerd's defaults: every 30 s, three failures
    assert slow.health.status == "unhealthy"

    timed.run("patient", f"{REPO}:qa", Healthcheck={"StartPeriod": 5 * 10**9,
                                                     "Interval": 10**9})
    patient = timed.find_container("patient")
    assert patient is not None and patient.health is not None
    assert patient.config["Healthcheck"] == {"Test": ["CMD", "/bin/check"],
                                             "Interval": 10**9, "StartPeriod": 5 * 10**9}
    clock.advance(4.5)  # failures within the start period do not count
    assert (patient.health.status, patient.health.failing_streak) == ("starting", 0)
    clock.advance(2)  # 5 s and 6 s count
    assert (patient.health.status, patient.health.failing_streak) == ("starting", 2)
    clock.advance(1)
    assert patient.health.status == "unhealthy"

    plain = timed.run("plain", f"{REPO}:qa", Healthcheck={"Test": ["NONE"]})
    assert "Health" not in timed.containers[plain].inspect()["State"]


class StrictClock(Clock):
    """A Clock that refuses a negative delay, as a real reactor does."""

    def callLater(self, delay: float, f: Callable[..., object], *args: Any,
                  **kw: Any) -> Any:
        assert delay >= 0, f"{delay} is not greater than or equal to 0 seconds"
        return super().callLater(delay, f, *args, **kw)


def test_probes_go_on_when_the_reactor_runs_late() -> None:
    clock = StrictClock()
    clock.advance(1_800_000_000)
    mem = MemoryDocker(clock=clock)
    mem.add_image([f"{REPO}:qa"], healthcheck=CHECK, behaviour=Behaviour(healthy_after=2.5))
    web = mem.containers[mem.run("web", f"{REPO}:qa")]
    with capturedLogs() as logged:
        clock.advance(3.5)  # the probe due at 1 s runs at 3.5 s: those due at 2 and 3 s follow
    assert [e for e in logged if "log_failure" in e] == []
    assert web.health is not None and web.health.status == "healthy"
    assert len(web.health.log) == 3
    clock.advance(0.5)
    assert len(web.health.log) == 4


def test_a_container_that_exits_by_itself(timed: MemoryDocker, clock: Clock) -> None:
    timed.add_image([f"{REPO}:qa"], behaviour=Behaviour.dies(after=1.5, code=3))
    container_id = timed.run("web", f"{REPO}:qa")
    clock.advance(1.5)
    state = timed.containers[container_id].inspect()["State"]
    assert (state["Status"], state["ExitCode"], state["Running"]) == ("exited", 3, False)
    assert timed.events.actions(container_id) == ["create", "start", "die"]


def test_restart_policies(timed: MemoryDocker, clock: Clock) -> None:
    raw = Raw(timed)
    timed.add_image([f"{REPO}:qa"], behaviour=Behaviour.dies(after=1, code=3))
    always = timed.run("always", f"{REPO}:qa", HostConfig={"RestartPolicy": {"Name": "always"}})
    twice = timed.run("twice", f"{REPO}:qa", HostConfig={
        "RestartPolicy": {"Name": "on-failure", "MaximumRetryCount": 2}})
    clock.advance(1)
    state = raw.json("GET", "/v1.41/containers/always/json")[1]
    assert (state["State"]["Status"], state["State"]["Restarting"], state["State"]["Running"],
            state["RestartCount"]) == ("restarting", True, True, 1)
    assert raw.json("GET", "/v1.41/containers/json")[1][0]["Status"].startswith(
        "Restarting (3)")
    clock.advance(0.1)  # the first restart after 100 ms
    assert timed.containers[always].status == "running"
    for _ in range(40):
        clock.advance(0.1)
    assert timed.events.actions(twice) == ["create", "start", "die", "start", "die", "start",
                                           "die"]
    assert (timed.containers[twice].status, timed.containers[twice].restart_count) == (
        "exited", 2)
    assert timed.events.actions(always)[:5] == ["create", "start", "die", "start", "die"]
    while timed.containers[always].status != "restarting":
        clock.advance(0.05)
    assert raw("POST", "/v1.41/containers/always/stop")[0] == 204
    assert timed.events.actions(always)[-2:] == ["die", "stop"]
    clock.advance(60)
    assert timed.containers[always].status == "exited", "stopped: no more restarts"


def test_without_a_clock_what_needs_one_is_refused(docker: MemoryDocker, raw: Raw) -> None:
    docker.add_image([f"{REPO}:qa"], healthcheck=CHECK)
    docker.create_container("web", {"Image": f"{REPO}:qa"})
    code, error = raw.json("POST", "/v1.41/containers/web/start")
    assert code == 500 and "give the engine a clock" in error["message"]


# -- create, start, kill, restart, rename, remove, tag, networks ---------------------------------


def test_create_merges_the_images_configuration(docker: MemoryDocker, raw: Raw) -> None:
    docker.add_image([f"{REPO}:qa"], labels={"version": "v1", "tier": "web"}, config={
        "Env": ["A=1", "B=2"], "Entrypoint": ["/bin/sh"], "Cmd": ["/app/run.sh"],
        "WorkingDir": "/app", "ExposedPorts": {"80/tcp": {}}})

    def created(**body: Any) -> dict[str, Any]:
        code, answer = raw.json("POST", "/v1.41/containers/create", {"Image": f"{REPO}:qa",
                                                                      **body})
        assert code == 201 and answer["Warnings"] == [], answer
        return dict(raw.json("GET", f"/v1.41/containers/{answer['Id']}/json")[1])

    full = created(Env=["B=3", "C=4"], Labels={"version": "mine"}, Hostname="h")
    config = full["Config"]
    assert config["Env"] == ["B=3", "C=4", "A=1"]
    assert config["Labels"] == {"version": "mine", "tier": "web"}
    assert (config["Entrypoint"], config["Cmd"]) == (["/bin/sh"], ["/app/run.sh"])
    assert (config["WorkingDir"], config["Hostname"]) == ("/app", "h")
    assert config["ExposedPorts"] == {"80/tcp": {}}
    assert (full["Path"], full["Args"], full["State"]["Status"]) == (
        "/bin/sh", ["/app/run.sh"], "created")
    assert full["Name"].startswith("/memory_")
    cmd = created(Cmd=["echo", "hi"])
    assert (cmd["Config"]["Entrypoint"], cmd["Config"]["Cmd"], cmd["Args"]) == (
        ["/bin/sh"], ["echo", "hi"], ["echo", "hi"])
    entrypoint = created(Entrypoint=["/bin/echo"])
    assert (entrypoint["Config"]["Cmd"], entrypoint["Path"], entrypoint["Args"]) == (
        None, "/bin/echo", [])
    defaults = created()
    assert defaults["Config"]["Hostname"] == defaults["Id"][:12]
    assert defaults["HostConfig"]["RestartPolicy"] == {"Name": "", "MaximumRetryCount": 0}
    assert "Runtime" not in defaults["HostConfig"], "shown once it ran"


def test_create_refused(docker: MemoryDocker, raw: Raw) -> None:
    docker.add_image([f"{REPO}:qa"], config={"Cmd": None})
    assert raw.json("POST", "/v1.41/containers/create", {}) == (400, {
        "message": "Config cannot be empty in order to create a container"})
    assert raw.json("POST", "/v1.41/containers/create", {"Image": f"{REPO}:qa"}) == (400, {
        "message": "No command specified"})
    assert raw.json("POST", "/v1.41/containers/create", {"Image": "nope:qa"}) == (404, {
        "message": "No such image: nope:qa"})
    assert raw.json("POST", "/v1.41/containers/create", {
        "Image": f"{REPO}:qa", "Cmd": ["x"], "NetworkingConfig": {
            "EndpointsConfig": {"b": {}, "a": {}}}}) == (400, {
        "message": "Container cannot be connected to network endpoints: a, b"})
    code, _, body = raw("POST", "/v1.41/containers/create", body=b"{}",
                        headers={"Content-Type": "text/plain"})
    assert (code, json.loads(body)) == (400, {
        "message": "Content-Type specified (text/plain) must be 'application/json'"})


def test_kill_and_restart(docker: MemoryDocker, raw: Raw) -> None:
    docker.add_image([f"{REPO}:qa"])
    container_id = docker.run("web", f"{REPO}:qa")
    assert raw("POST", "/v1.41/containers/web/restart?t=1")[0] == 204
    assert raw("POST", "/v1.41/containers/web/kill?signal=TERM")[0] == 204
    assert docker.containers[container_id].exit_code == 0
    assert raw.json("POST", "/v1.41/containers/web/kill") == (409, {
        "message": f"Cannot kill container: web: Container {container_id} is not running"})
    assert raw("POST", "/v1.41/containers/web/restart")[0] == 204
    assert raw("POST", "/v1.41/containers/web/kill")[0] == 204
    assert docker.containers[container_id].exit_code == 137
    assert docker.events.actions(container_id) == [
        "create", "start", "kill", "die", "stop", "start", "restart", "kill", "die", "start",
        "restart", "kill", "die"]


def test_removal_and_rename_answers(docker: MemoryDocker, raw: Raw) -> None:
    docker.add_image([f"{REPO}:qa"])
    docker.run("web", f"{REPO}:qa")
    assert raw.json("DELETE", "/v1.41/containers/nope") == (404, {
        "message": "No such container: nope"})
    assert raw.json("POST", "/v1.41/containers/web/rename?name=") == (400, {
        "message": "Neither old nor new names may be empty"})
    assert raw.json("POST", "/v1.41/containers/web/rename?name=-x") == (400, {
        "message": "Error when allocating new name: Invalid container name (/-x), only"
                   " [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed"})
    assert raw("POST", "/v1.41/containers/web/rename?name=web2")[0] == 204
    assert raw("DELETE", "/v1.41/containers/web2?force=1")[0] == 204
    assert docker.containers == {}


def test_tags_move(docker: MemoryDocker, raw: Raw) -> None:
    old = docker.add_image([f"{REPO}:qa"])
    new = docker.add_image([f"{REPO}:new"])
    assert raw("POST", f"/v1.41/images/{new}/tag?repo={REPO}&tag=qa")[0] == 201
    assert (docker.image_id(f"{REPO}:qa"), docker.images[old].tags) == (new, [])
    assert raw("POST", f"/v1.41/images/{old[7:19]}/tag?repo={REPO}")[0] == 201
    assert docker.image_id(f"{REPO}:latest") == old
    assert raw.json("POST", f"/v1.41/images/{new}/tag?repo=&tag=x") == (500, {
        "message": "invalid reference format"})
    assert raw.json("POST", f"/v1.41/images/{new}/tag?repo=x/y&tag=sha256:abc") == (500, {
        "message": "invalid tag format"})
    names = [m["Actor"]["Attributes"]["name"] for m in docker.events.history]
    assert names == [f"{REPO}:qa", REPO]


def test_networks(docker: MemoryDocker, raw: Raw) -> None:
    assert [n["Name"] for n in raw.json("GET", "/v1.41/networks")[1]] == ["none", "host"]
    code, made = raw.json("POST", "/v1.41/networks/create", {"Name": "appnet"})
    assert code == 201 and made["Warning"] == ""
    again = raw.json("POST", "/v1.41/networks/create", {"Name": "appnet"})[1]
    assert again["Warning"] == (f"Network with name appnet (id : {made['Id']}) already"
                                " exists")
    assert raw.json("GET", "/v1.41/networks/appnet") == (400, {
        "message": "2 matches found based on name: network appnet is ambiguous"})
    assert raw.json("GET", "/v1.41/networks/zz") == (404, {"message": "network zz not found"})
    assert raw.json("POST", "/v1.41/networks/create", {"Name": "host"}) == (403, {
        "message": "operation is not permitted on predefined host network "})
    docker.add_network("other")
    docker.add_image([f"{REPO}:qa"])
    web = docker.create_container("web", {"Image": f"{REPO}:qa"})
    # a container that does not run takes any network, and fails its next start
    assert raw("POST", "/v1.41/networks/nonet/connect", body={"Container": "web"})[0] == 200
    assert raw.json("POST", "/v1.41/containers/web/start") == (404, {
        "message": "network nonet not found"})
    del web.networks["nonet"]
    assert raw("POST", "/v1.41/networks/other/connect", body={"Container": "web"})[0] == 200
    assert raw("POST", "/v1.41/containers/web/start")[0] == 204
    network = raw.json("GET", "/v1.41/networks/other")[1]
    assert list(network["Containers"]) == [web.id]
    assert network["Containers"][web.id]["IPv4Address"] == "172.22.0.2/16"  # the 5th network
    assert [m["Action"] for m in docker.events.history if m["Type"] == "network"
            and m["Actor"]["Attributes"].get("container") == web.id] == ["connect", "connect"]


def test_supervise_runs_a_new_container_of_the_tag_whenever_it_stops(
    timed: MemoryDocker, clock: Clock
) -> None:
    v1 = timed.add_image([f"{REPO}:qa"], healthcheck=CHECK)
    before = timed.run("web", f"{REPO}:qa")
    supervisor = timed.supervise("web", f"{REPO}:qa", delay=0.2)
    assert before not in timed.containers, "it starts with docker rm -f NAME"
    first = timed.find_container("web")
    assert first is not None and first.image_id == v1 and supervisor.runs == 1
    v2 = timed.add_image([f"{REPO}:qa"], healthcheck=CHECK, behaviour=Behaviour.dies(3, 1))
    timed.stop_container("web")
    clock.advance(0.15)
    assert timed.find_container("web") is first, "not before its delay"
    clock.advance(0.05)
    second = timed.find_container("web")
    assert second is not None and second.id != first.id and second.image_id == v2
    assert first.id not in timed.containers
    clock.advance(1)
    assert second.health is not None and second.health.status == "healthy"
    clock.advance(2)  # it dies, and is run again
    clock.advance(0.2)
    third = timed.find_container("web")
    assert third is not None and third.id not in (first.id, second.id)
    assert supervisor.runs == 3
    assert timed.events.actions(second.id) == [
        "create", "start", "health_status: healthy", "die", "destroy"]
    supervisor.stop()
    clock.advance(3.2)
    assert timed.find_container("web") is third and third.status == "exited"


def test_stop_and_start_the_engine(timed: MemoryDocker, clock: Clock) -> None:
    timed.add_image([f"{REPO}:qa"])
    kept = timed.run("kept", f"{REPO}:qa", HostConfig={
        "RestartPolicy": {"Name": "unless-stopped"}})
    left = timed.run("left", f"{REPO}:qa")
    stream = Raw(timed).stream("/v1.41/events")
    timed.stop_engine()
    assert stream.actions == ["kill", "die", "stop", "kill", "die", "stop"]
    assert stream.ended and timed.down
    with pytest.raises(Exception, match="Chunked decoder"):
        fired(stream.reader.done)  # the connection closed mid-answer
    timed.start_engine()
    assert (timed.containers[kept].status, timed.containers[left].status) == (
        "running", "exited")
    assert Raw(timed).stream("/v1.41/events?since=0").lines == [
        m for m in timed.events.history[-1:]], "nothing remembered from before"


# -- the double against a real engine ---------------------------------------------------------


def _same_shape(memory: Any, real: Any, where: str) -> None:
    """Same JSON types; objects with the same keys, recursively."""
    if isinstance(real, dict):
        assert isinstance(memory, dict), where
        assert sorted(memory) == sorted(real), where
        for key in real:
            _same_shape(memory[key], real[key], f"{where}.{key}")
    elif isinstance(real, list):
        assert isinstance(memory, list), where
        for m, r in zip(memory, real, strict=False):
            _same_shape(m, r, f"{where}[]")
    else:
        assert type(memory) is type(real), f"{where}: {memory!r} vs {real!r}"


def _pull_lines(body: bytes) -> list[dict[str, Any]]:
    """A pull stream without its per-layer progress lines."""
    return [obj for obj in map(json.loads, body.splitlines()) if "progressDetail" not in obj]


Answers = dict[str, tuple[int, bytes]]


def _scenario(
    api: Callable[[str, str], tuple[int, bytes]], run: Callable[[str, str], str],
    publish_v2: Callable[[], object], repo: str, name: str,
) -> Answers:
    """The same steps on either engine; the answers by step."""
    out: Answers = {}
    create = f"/v1.41/images/create?fromImage={repo}"
    out["pull"] = api("POST", f"{create}&tag=qa")
    out["pull again"] = api("POST", f"{create}:qa")
    container = run(f"{repo}:qa", name)
    publish_v2()
    out["pull v2"] = api("POST", f"{create}&tag=qa")
    out["pull unknown tag"] = api("POST", f"{create}&tag=nope")
    out["pull broken"] = api("POST", f"{create}&tag=broken")
    out["images"] = api("GET", "/v1.41/images/json")
    out["image"] = api("GET", f"/v1.41/images/{repo}:qa/json")
    out["image missing"] = api("GET", f"/v1.41/images/{repo}:nope/json")
    out["containers"] = api("GET", "/v1.41/containers/json")
    out["container"] = api("GET", f"/v1.41/containers/{name}/json")
    out["stop"] = api("POST", f"/v1.41/containers/{container}/stop?t=5")
    out["stop again"] = api("POST", f"/v1.41/containers/{name}/stop?t=5")
    out["stop missing"] = api("POST", "/v1.41/containers/nope/stop?t=5")
    out["container missing"] = api("GET", "/v1.41/containers/nope/json")
    out["all containers"] = api("GET", "/v1.41/containers/json?all=1")
    out["too new"] = api("GET", "/v1.99/images/json")
    out["no such page"] = api("GET", "/v1.41/no/such/page")
    out["ping"] = api("GET", "/_ping")
    return out


@pytest.mark.real
def test_same_answers_as_the_real_engine(
    clean_dockerd: Dockerd, registry: Registry, image_builder: ImageBuilder
) -> None:
    """Run one scenario on a real engine and on the double holding the same images (same ids
    and digests), then compare the answers step by step."""
    repo = f"{registry.host}/suite/{unique('shape')}"
    name = unique("shape")
    v1 = image_builder.publish(f"{repo}:qa", "v1")
    broken = image_builder.publish(f"{repo}:broken", "broken")
    registry.break_layers(repo.split("/", 1)[1], "broken")
    v2: list[Any] = []

    real = _scenario(
        clean_dockerd.api, lambda ref, n: run_container(clean_dockerd, ref, n),
        lambda: v2.append(image_builder.publish(f"{repo}:qa", "v2")), repo, name,
    )

    memory = MemoryDocker()
    memory.publish(f"{repo}:qa", v1.image_id, {"version": "v1"}, v1.digest)
    memory.publish(f"{repo}:broken", broken.image_id, {"version": "broken"}, broken.digest)
    memory.fail_pull(f"{repo}:broken", "unknown blob")
    raw = Raw(memory)
    mine = _scenario(
        lambda method, path: (lambda r: (r[0], r[2]))(raw(method, path)),
        lambda ref, n: memory.run(n, ref),
        lambda: memory.publish(f"{repo}:qa", v2[0].image_id, {"version": "v2"}, v2[0].digest),
        repo, name,
    )

    ours = {v1.image_id, v2[0].image_id}
    for step, (code, body) in real.items():
        assert mine[step][0] == code, step
        if not body.startswith((b"{", b"[")):
            assert mine[step][1] == body, step
            continue
        if step.startswith("pull") and code == 200:
            assert _pull_lines(mine[step][1]) == _pull_lines(body), step
            continue
        got, want = json.loads(mine[step][1]), json.loads(body)
        if step == "images":
            got, want = ([i for i in images if i["Id"] in ours] for images in (got, want))
            assert [i["Id"] for i in want] == [v2[0].image_id, v1.image_id]
        elif step in ("containers", "all containers"):
            got, want = ([c for c in cs if c["Names"] == ["/" + name]] for cs in (got, want))
            assert len(want) == 1
        if step == "container":  # the double leaves out host paths, profiles and the like
            assert set(got) <= set(want), step
            _same_shape(got["State"], want["State"], step)
            got, want = ({k: c[k] for k in ("Image", "Name")} | {"Config.Image": c["Config"][
                "Image"], "Running": c["State"]["Running"]} for c in (got, want))
        elif step == "image":
            assert sorted(got) == sorted(want), step
            got, want = ({k: i[k] for k in ("Id", "RepoTags", "RepoDigests")}
                         | {"Labels": i["Config"]["Labels"]} for i in (got, want))
        else:
            _same_shape(got, want, step)
            volatile = {"Id", "Created", "Status", "Size", "VirtualSize", "Command",
                        "NetworkSettings"}
            if isinstance(want, list):
                got, want = ([{k: v for k, v in o.items() if k not in volatile} for o in x]
                             for x in (got, want))
        assert got == want, step
    stopped = next(c for c in json.loads(real["all containers"][1]) if c["Names"] == ["/" + name])
    assert stopped["Status"].startswith("Exited (0)")


@pytest.mark.real
def test_a_hanging_registry_leaves_a_pull_without_an_answer(
    clean_dockerd: Dockerd, hanging_registry: HangingRegistry
) -> None:
    """What ``slow_pull(answer=False)`` plays: a real engine pulling from a registry that
    hangs on the manifest request sends not even the response headers; a client that gives up
    is forgotten."""
    ref = f"{hanging_registry.host}/{unique('hung')}"
    with pytest.raises(TimeoutError):
        clean_dockerd.api("POST", f"/v1.41/images/create?fromImage={ref}&tag=qa", timeout=3)
    assert hanging_registry.asked.wait(10)

    memory = MemoryDocker()
    memory.publish(f"{REPO}:qa")
    memory.slow_pull(f"{REPO}:qa", answer=False)
    url = f"http://docker/v1.41/images/create?fromImage={REPO}&tag=qa"
    answer = memory.agent().request(b"POST", url.encode())
    results: list[object] = []
    answer.addBoth(results.append)
    memory.flush()
    assert results == []
    answer.cancel()
    memory.flush()
    assert len(results) == 1
    assert memory.pulls_abandoned == [f"{REPO}:qa"] and memory.pulls_in_progress == 0


# -- the lifecycle of containers, and their events, against a real engine ------------------------

_HEX_ID = re.compile(r"\b[0-9a-f]{64}\b")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z")


class UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=60)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._path)
        self.sock = sock


def _real_api(dockerd: Dockerd) -> Callable[..., tuple[int, bytes]]:
    def api(method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        conn = UnixHTTP(dockerd.socket)
        try:
            data = None if body is None else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={} if data is None else {
                "Content-Type": "application/json"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    return api


def _memory_api(memory: MemoryDocker) -> Callable[..., tuple[int, bytes]]:
    raw = Raw(memory)

    def api(method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        code, _, content = raw(method, path, body=body)
        return code, content

    return api


class Ids:
    """Every 64-hex id (and its 12-hex short form) as ``<n>``, numbered as first seen, and
    every time as ``<time>``: answers of two engines made comparable."""

    def __init__(self) -> None:
        self.names: dict[str, str] = {}

    def __call__(self, value: Any) -> Any:
        text = json.dumps(value)
        for found in _HEX_ID.findall(text):
            self.names.setdefault(found, f"<{len(self.names) + 1}>")
        for full, name in self.names.items():
            text = text.replace(full, name).replace(full[:12], name)
        return json.loads(_TIME.sub("<time>", text))


def _differences(mine: Any, real: Any, where: str = "") -> list[str]:
    """Where two JSON values differ: ``path: mine != real``."""
    if isinstance(real, dict) and isinstance(mine, dict):
        out = [f"{where}.{k}: missing here" for k in real if k not in mine]
        out += [f"{where}.{k}: not in the real one" for k in mine if k not in real]
        for key in real:
            if key in mine:
                out += _differences(mine[key], real[key], f"{where}.{key}")
        return out
    if isinstance(real, list) and isinstance(mine, list) and len(real) == len(mine):
        return [d for i, (m, r) in enumerate(zip(mine, real, strict=True))
                for d in _differences(m, r, f"{where}[{i}]")]
    return [] if mine == real else [f"{where}: {mine!r} != {real!r}"]


def _lifecycle(api: Callable[..., tuple[int, bytes]], repo: str, tag: str) -> Answers:
    """Create, run, change and remove containers on a network; the answers by step."""
    net, other, c1, c2, c3 = (f"{tag}-{n}" for n in ("net", "other", "c1", "c2", "c3"))
    out: Answers = {}
    out["pull"] = api("POST", f"/v1.41/images/create?fromImage={repo}&tag=qa")
    out["tag"] = api("POST", f"/v1.41/images/{repo}:qa/tag?repo={repo}&tag=prod")
    out["network"] = api("POST", "/v1.41/networks/create", {"Name": net})
    out["other network"] = api("POST", "/v1.41/networks/create", {"Name": other})
    out["create"] = api("POST", f"/v1.41/containers/create?name={c1}", {
        "Image": f"{repo}:qa", "Env": ["A=1"], "Labels": {"role": "web"},
        "ExposedPorts": {"8080/tcp": {}}, "WorkingDir": "/app",
        "HostConfig": {"NetworkMode": net, "RestartPolicy": {"Name": "unless-stopped"}},
        "NetworkingConfig": {"EndpointsConfig": {net: {"Aliases": ["web"]}}}})
    out["inspect created"] = api("GET", f"/v1.41/containers/{c1}/json")
    out["create again"] = api("POST", f"/v1.41/containers/create?name={c1}",
                              {"Image": f"{repo}:qa"})
    out["start"] = api("POST", f"/v1.41/containers/{c1}/start")
    out["start again"] = api("POST", f"/v1.41/containers/{c1}/start")
    update = f"/v1.41/containers/{c1}/update"
    out["update"] = api("POST", update, {"RestartPolicy": {"Name": "always"}})
    out["inspect updated"] = api("GET", f"/v1.41/containers/{c1}/json")
    out["update bad policy"] = api("POST", update, {"RestartPolicy": {"Name": "sometimes"}})
    out["update retries"] = api("POST", update, {"RestartPolicy": {
        "Name": "always", "MaximumRetryCount": 3}})
    out["update unknown"] = api("POST", f"/v1.41/containers/{tag}-none/update",
                                {"RestartPolicy": {"Name": "no"}})
    out["update back"] = api("POST", update, {"RestartPolicy": {"Name": "unless-stopped"}})
    out["rename"] = api("POST", f"/v1.41/containers/{c1}/rename?name={c1}x")
    out["connect"] = api("POST", f"/v1.41/networks/{other}/connect",
                         {"Container": f"{c1}x", "EndpointConfig": {"Aliases": ["api"]}})
    out["connect again"] = api("POST", f"/v1.41/networks/{other}/connect",
                               {"Container": f"{c1}x"})
    out["connect unknown"] = api("POST", f"/v1.41/networks/{tag}-nonet/connect",
                                 {"Container": f"{c1}x"})
    out["inspect running"] = api("GET", f"/v1.41/containers/{c1}x/json")
    out["list running"] = api("GET", "/v1.41/containers/json")
    out["stop"] = api("POST", f"/v1.41/containers/{c1}x/stop?t=5")
    out["inspect stopped"] = api("GET", f"/v1.41/containers/{c1}x/json")
    out["restart"] = api("POST", f"/v1.41/containers/{c1}x/restart?t=5")
    out["kill"] = api("POST", f"/v1.41/containers/{c1}x/kill")
    out["kill again"] = api("POST", f"/v1.41/containers/{c1}x/kill")
    out["create plain"] = api("POST", f"/v1.41/containers/create?name={c2}",
                              {"Image": f"{repo}:prod"})
    out["remove created"] = api("DELETE", f"/v1.41/containers/{c2}")
    out["create another"] = api("POST", f"/v1.41/containers/create?name={c3}",
                                {"Image": f"{repo}:qa", "Cmd": ["/bin/sh", "/app/run.sh"]})
    out["start another"] = api("POST", f"/v1.41/containers/{c3}/start")
    out["remove running"] = api("DELETE", f"/v1.41/containers/{c3}")
    out["remove forced"] = api("DELETE", f"/v1.41/containers/{c3}?force=1")
    out["list all"] = api("GET", "/v1.41/containers/json?all=1")
    out["remove stopped"] = api("DELETE", f"/v1.41/containers/{c1}x")
    return out


def _comparable(step: str, body: bytes, ids: Ids, tag: str) -> Any:
    if step == "pull":
        return _pull_lines(body)
    if not body.startswith((b"{", b"[")):
        return body
    value = json.loads(body)
    if step.startswith("list"):
        value = [{k: c[k] for k in ("Names", "Image", "Command", "Labels", "State", "Status",
                                    "HostConfig", "Ports")}
                 | {"Networks": sorted(c["NetworkSettings"]["Networks"])}
                 for c in value if c["Names"][0].startswith(f"/{tag}-")]
    elif step.startswith("inspect"):
        state = {k: v for k, v in value["State"].items() if k != "Pid"}
        networks = {name: {"Aliases": ep["Aliases"], "NetworkID": ep["NetworkID"],
                           "addressed": bool(ep["IPAddress"] and ep["EndpointID"]),
                           "Gateway": bool(ep["Gateway"]), "IPPrefixLen": bool(ep["IPPrefixLen"])}
                    for name, ep in value["NetworkSettings"]["Networks"].items()}
        value = {k: value[k] for k in ("Id", "Path", "Args", "Image", "Name", "RestartCount",
                                       "Config", "HostConfig", "Mounts")} | {
            "State": state, "Networks": networks,
            "Ports": value["NetworkSettings"]["Ports"]}
    return ids(value)


@pytest.mark.real
def test_same_lifecycle_and_events_as_the_real_engine(
    clean_dockerd: Dockerd, registry: Registry, image_builder: ImageBuilder
) -> None:
    """Create, start, rename, connect, stop, restart, kill and remove containers on a real
    engine and on the double holding the same image, then compare every answer and the events
    (without the probes' exec_*), ids numbered as first seen."""
    repo = f"{registry.host}/suite/{unique('life')}"
    published = image_builder.publish(f"{repo}:qa", "v1")
    real_api = _real_api(clean_dockerd)
    since = time.time_ns()
    tag = unique("lc")
    try:
        real = _lifecycle(real_api, repo, tag)
        time.sleep(0.5)
        code, body = real_api("GET", f"/v1.41/events?since={since_param(since)}&until="
                                     f"{since_param(time.time_ns())}")
        assert code == 200
        real_events = [json.loads(line) for line in body.splitlines()]
    finally:
        for network in (f"{tag}-net", f"{tag}-other"):
            real_api("DELETE", f"/v1.41/networks/{network}")

    memory = MemoryDocker()
    memory.publish(f"{repo}:qa", published.image_id, {"version": "v1"}, published.digest)
    mine = _lifecycle(_memory_api(memory), repo, tag)

    real_ids, my_ids = Ids(), Ids()
    for step, (code, body) in real.items():
        assert (step, mine[step][0]) == (step, code)
        differences = _differences(_comparable(step, mine[step][1], my_ids, tag),
                                   _comparable(step, body, real_ids, tag), step)
        assert not differences, "\n".join(differences)

    def events(messages: list[dict[str, Any]], ids: Ids) -> list[Any]:
        ours = [m for m in messages if not m["Action"].startswith("exec_")
                and m["Type"] != "volume" and (m["Type"] != "network" or tag in json.dumps(m))]
        # dockerd goes through a container's networks in Go's map order: sort each run of
        # network events
        runs = itertools.groupby(ours, key=lambda m: m["Type"] == "network")
        ordered = [m for network, run in runs for m in (
            sorted(run, key=lambda m: (m["Action"], m["Actor"]["Attributes"]["name"]))
            if network else run)]
        return [ids({k: v for k, v in m.items() if k not in ("time", "timeNano")})
                for m in ordered]

    mine_events, real_events = events(memory.events.history, my_ids), events(real_events,
                                                                              real_ids)
    differences = _differences(mine_events, real_events, "events")
    assert not differences, "\n".join(differences) + "\n" + "\n".join(
        f"{m['Type']} {m['Action']} / {r['Type']} {r['Action']}"
        for m, r in zip(mine_events, real_events, strict=False))


def _health_scenario(api: Callable[..., tuple[int, bytes]],
                     settle: Callable[[Callable[[], bool]], None], tag: str) -> dict[str, Any]:
    """Run a healthy and a failing container, stop and start the healthy one; the states.
    ``settle`` lets the engine's probes run until the check it is given holds."""
    out: dict[str, Any] = {}

    def state(name: str) -> dict[str, Any]:
        code, body = api("GET", f"/v1.41/containers/{tag}-{name}/json")
        assert code == 200, body
        found: dict[str, Any] = json.loads(body)["State"]
        return found

    for name, ref in (("good", f"{tag}:good"), ("bad", f"{tag}:bad")):
        code, body = api("POST", f"/v1.41/containers/create?name={tag}-{name}", {"Image": ref})
        assert code == 201, body
        out[f"start {name}"] = api("POST", f"/v1.41/containers/{tag}-{name}/start")
        if name == "good":  # before its first probe, a second after the start
            out["starting"] = state("good")

    def judged() -> bool:
        # probes every second: healthy after one, unhealthy after two failing
        good, bad = (state(name).get("Health") or {} for name in ("good", "bad"))
        return bool(good.get("Status") == "healthy" and bad.get("FailingStreak", 0) >= 2)

    settle(judged)
    out["healthy"], out["unhealthy"] = state("good"), state("bad")
    listed = json.loads(api("GET", "/v1.41/containers/json")[1])
    out["listed"] = sorted(c["Status"].partition(" (")[2] for c in listed
                           if c["Names"][0].startswith(f"/{tag}-"))
    out["stop"] = api("POST", f"/v1.41/containers/{tag}-good/stop?t=5")
    out["stopped"] = state("good")
    out["start again"] = api("POST", f"/v1.41/containers/{tag}-good/start")
    out["started again"] = state("good")
    return out


def _health_view(out: dict[str, Any]) -> dict[str, Any]:
    view = {}
    for step, value in out.items():
        if isinstance(value, tuple):
            view[step] = value
        elif isinstance(value, dict):
            health = value.get("Health") or {}
            log = health.get("Log") or []
            view[step] = {
                "Status": value["Status"], "Running": value["Running"],
                "ExitCode": value["ExitCode"], "Health": health.get("Status"),
                "failing": health.get("FailingStreak", 0) >= 2,
                "probes": sorted({(p["ExitCode"], p["Output"]) for p in log}),
                "log keys": sorted({k for p in log for k in p}),
            }
        else:
            view[step] = value
    return view


@pytest.mark.real
def test_same_health_as_the_real_engine(clean_dockerd: Dockerd) -> None:
    """Health checks on a real engine and in the double with the same images: the states they
    go through, the container list, and the events (each probe's exec_* included)."""
    tag = unique("health")
    build_health_image(clean_dockerd, f"{tag}:good", "v1")
    build_health_image(clean_dockerd, f"{tag}:bad", "v1", test=FAILING_TEST)
    real_api = _real_api(clean_dockerd)
    since = time.time_ns()

    def poll(judged: Callable[[], bool]) -> None:
        # each probe starts a second after the previous one ended, and a loaded machine
        # makes every exec slower: wait for the verdicts, not for a fixed time
        wait_until(judged, 30, "good healthy and bad failing twice", interval=0.1)

    real = _health_scenario(real_api, poll, tag)
    until = time.time_ns()  # the restarted container probes only a second after its start
    time.sleep(0.3)
    code, body = real_api("GET", f"/v1.41/events?since={since_param(since)}&until="
                                 f"{since_param(until)}")
    assert code == 200
    real_events = [json.loads(line) for line in body.splitlines()]

    clock = Clock()
    clock.advance(time.time())
    memory = MemoryDocker(clock=clock)
    memory_health_image(memory, f"{tag}:good", "v1")
    memory_health_image(memory, f"{tag}:bad", "v1", test=FAILING_TEST)

    def advance(judged: Callable[[], bool]) -> None:
        # the double's probes take no time: both verdicts within 3.5 s
        for _ in range(35):
            if judged():
                return
            clock.advance(0.1)
        assert judged(), "the double did not judge both containers within 3.5 s"

    mine = _health_scenario(_memory_api(memory), advance, tag)
    differences = _differences(_health_view(mine), _health_view(real), "health")
    assert not differences, "\n".join(differences)

    def actions(messages: list[dict[str, Any]], name: str) -> list[str]:
        return [m["Action"] for m in messages if m["Type"] == "container"
                and m["Actor"]["Attributes"]["name"] == f"{tag}-{name}"
                and not m["Action"].startswith("exec_")]

    for name in ("good", "bad"):
        assert actions(memory.events.history, name) == actions(real_events, name), name
    assert actions(real_events, "good") == [
        "create", "start", "health_status: healthy", "kill", "die", "stop", "start"]

    def probe(messages: list[dict[str, Any]], name: str) -> list[Any]:
        # the two containers' probes may overlap: one container's events at a time
        its = [m for m in messages if m["Type"] == "container"
               and m["Actor"]["Attributes"]["name"] == f"{tag}-{name}"]
        first = next(i for i, m in enumerate(its) if m["Action"].startswith("exec_create"))
        return [(m["Action"], sorted(m["Actor"]["Attributes"]), m["status"], m["from"])
                for m in its[first:first + 3]]

    for name in ("good", "bad"):
        assert probe(memory.events.history, name) == probe(real_events, name), name
