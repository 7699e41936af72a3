"""The in-memory Docker engine: its test knobs, and its answers compared field by field with a
real dockerd running the same scenario (``test_same_answers_as_the_real_engine``)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet.defer import Deferred

from deployer.docker import DockerClient
from deployer.errors import DockerError, PullFailed
from deployer.testing.memory_docker import ContainerState, MemoryDocker
from tests.helpers import fired
from tests.stack.docker_stack import (
    Dockerd,
    HangingRegistry,
    ImageBuilder,
    Registry,
    run_container,
    unique,
)

REPO = "registry.test:5000/myorg/foo"


class Raw:
    """Plain HTTP to the double, without the deployer client: (status, headers, body)."""

    def __init__(self, docker: MemoryDocker) -> None:
        self.http = HTTPClient(docker.agent())

    def __call__(
        self, method: str, path: str, headers: dict[bytes | str, bytes | str] | None = None
    ) -> tuple[int, dict[str, list[str]], bytes]:
        response = fired(self.http.request(method, "http://docker" + path,
                                           headers=headers or {}))
        body = fired(response.content())
        return response.code, {k.decode().lower(): [v.decode() for v in vs]
                               for k, vs in response.headers.getAllRawHeaders()}, body

    def json(self, method: str, path: str) -> tuple[int, Any]:
        code, _, body = self(method, path)
        return code, json.loads(body) if body else None


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
