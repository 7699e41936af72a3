"""One suite for the Docker client, run against two engines: the in-memory double
(:class:`deployer.testing.memory_docker.MemoryDocker`) and a real private dockerd with a real
local registry. Whatever passes here against both keeps the double honest.

Each engine offers the same small setup API (publish an image version to its registry, run a
container, look at local state without going through the client), so every test body runs
unchanged against both.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import pytest
import pytest_twisted

from deployer.docker import Container, DockerClient
from deployer.errors import (
    ContainerNotFound,
    DockerError,
    DockerUnavailable,
    ImageNotFound,
    NotFound,
    PullFailed,
)
from deployer.events import since_param
from deployer.reference import parse_reference
from deployer.testing.memory_docker import ContainerState, MemoryDocker
from tests.stack.docker_stack import (
    Dockerd,
    ImageBuilder,
    Registry,
    Supervisor,
    run_container,
    unique,
)


class Engine(Protocol):
    client: DockerClient
    api_version: str

    def repo(self) -> str:
        """A fresh ``host/path`` repository name in this engine's registry."""

    def publish(self, repotag: str, version: str) -> str:
        """Make the registry hold a new image (labelled ``version``) under ``repotag``; its id."""

    def publish_broken(self, repotag: str, version: str) -> None:
        """Make the registry list ``repotag`` but fail to deliver its layers."""

    def registry_digest(self, repotag: str) -> str:
        """The manifest digest of what the registry holds under ``repotag`` now."""

    def local_image_id(self, repotag: str) -> str | None:
        """What ``repotag`` points at in the engine, seen without the client."""

    def run(self, repotag: str, name: str) -> str:
        """Start a container of a local image; its id."""

    def is_running(self, container_id: str) -> bool: ...

    def unreachable_client(self) -> DockerClient:
        """A client for an engine that does not answer."""

    def supervise(self, repotag: str, name: str) -> None:
        """Keep a container NAME of ``repotag`` running, like ``Restart=always``."""

    async def wait_running_image(self, name: str, image_id: str) -> str:
        """The id of the running container NAME once it runs ``image_id``."""

    def add_network(self, name: str) -> str:
        """``docker network create NAME``; its id."""

    def inspect(self, name: str) -> dict[str, Any] | None:
        """The container as the engine shows it, seen without the client."""

    def actions(self, container_id: str, since: int) -> list[str]:
        """The actions of the engine's events about ``container_id`` since ``since`` (ns),
        without the ``exec_*`` ones of health probes."""

    def now_nano(self) -> int: ...


def _reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


class MemoryEngine:
    registry_host = "registry.test:5000"

    def __init__(self) -> None:
        self.docker = MemoryDocker()
        self.client = DockerClient(_reactor(), agent=self.docker.agent(), base="http://docker")
        self.api_version = self.docker.api_version

    def repo(self) -> str:
        return f"{self.registry_host}/suite/{unique('repo')}"

    def publish(self, repotag: str, version: str) -> str:
        return self.docker.publish(repotag, labels={"version": version})

    def publish_broken(self, repotag: str, version: str) -> None:
        self.docker.publish(repotag, labels={"version": version})
        self.docker.fail_pull(repotag, "unknown blob")

    def registry_digest(self, repotag: str) -> str:
        return self.docker.registry_digest(repotag)

    def local_image_id(self, repotag: str) -> str | None:
        return self.docker.image_id(repotag)

    def run(self, repotag: str, name: str) -> str:
        return self.docker.run(name, repotag)

    def is_running(self, container_id: str) -> bool:
        container = self.docker.find_container(container_id)
        return container is not None and container.running

    def unreachable_client(self) -> DockerClient:
        down = MemoryDocker()
        down.down = True
        return DockerClient(_reactor(), agent=down.agent())

    def supervise(self, repotag: str, name: str) -> None:
        self.docker.run(name, repotag)

        def restart(container: ContainerState) -> None:
            if container.name == name:
                self.docker.restart_like_supervisor(container)

        self.docker.on_stop(restart)

    async def wait_running_image(self, name: str, image_id: str) -> str:
        container = self.docker.find_container(name)
        assert container is not None and container.running
        assert container.image_id == image_id
        return container.id

    def add_network(self, name: str) -> str:
        return self.docker.add_network(name)

    def inspect(self, name: str) -> dict[str, Any] | None:
        found = self.docker.find_container(name)
        return None if found is None else found.inspect()

    def actions(self, container_id: str, since: int) -> list[str]:
        return [m["Action"] for m in self.docker.events.history
                if m["Actor"]["ID"] == container_id and m["timeNano"] >= since
                and not m["Action"].startswith("exec_")]

    def now_nano(self) -> int:
        return self.docker.events.now_nano()

    def close(self) -> None:
        pytest_twisted.blockon(self.client.close())


class RealEngine:
    def __init__(self, dockerd: Dockerd, registry: Registry, builder: ImageBuilder) -> None:
        self.dockerd = dockerd
        self.registry = registry
        self.builder = builder
        self.client = DockerClient.from_url(_reactor(), dockerd.url)
        self.api_version = dockerd.cli("version", "--format", "{{.Server.APIVersion}}").strip()
        self._extra: list[DockerClient] = []
        self._supervisors: dict[str, Supervisor] = {}
        self._networks: list[str] = []

    def repo(self) -> str:
        return f"{self.registry.host}/suite/{unique('repo')}"

    def publish(self, repotag: str, version: str) -> str:
        return self.builder.publish(repotag, version).image_id

    def publish_broken(self, repotag: str, version: str) -> None:
        self.builder.publish(repotag, version)
        ref = parse_reference(repotag)
        assert ref.tag is not None
        self.registry.break_layers(ref.path, ref.tag)

    def registry_digest(self, repotag: str) -> str:
        ref = parse_reference(repotag)
        assert ref.tag is not None
        digest: str = self.registry.manifest(ref.path, ref.tag)[0]
        return digest

    def local_image_id(self, repotag: str) -> str | None:
        return self.dockerd.image_id(repotag)

    def run(self, repotag: str, name: str) -> str:
        return run_container(self.dockerd, repotag, name)

    def is_running(self, container_id: str) -> bool:
        state = self.dockerd.inspect(container_id)
        return state is not None and bool(state["State"]["Running"])

    def unreachable_client(self) -> DockerClient:
        client = DockerClient.from_url(_reactor(), f"unix://{self.dockerd.base}/missing.sock")
        self._extra.append(client)
        return client

    def supervise(self, repotag: str, name: str) -> None:
        self._supervisors[name] = Supervisor(self.dockerd, name, repotag).start()

    async def wait_running_image(self, name: str, image_id: str) -> str:
        container_id: str = await self._supervisors[name].wait_running_image(image_id, 30)
        return container_id

    def add_network(self, name: str) -> str:
        network_id = self.dockerd.cli("network", "create", name).strip()
        self._networks.append(network_id)
        return network_id

    def inspect(self, name: str) -> dict[str, Any] | None:
        return self.dockerd.inspect(name)

    def actions(self, container_id: str, since: int) -> list[str]:
        out = self.dockerd.cli("events", "--since", since_param(since), "--until",
                               since_param(time.time_ns()), "--filter",
                               f"container={container_id}", "--format", "{{json .}}")
        return [a for a in (json.loads(line)["Action"] for line in out.splitlines())
                if not a.startswith("exec_")]

    def now_nano(self) -> int:
        return time.time_ns()

    def close(self) -> None:
        for supervisor in self._supervisors.values():
            supervisor.stop()
        self.dockerd.remove_all_containers()
        for network_id in self._networks:
            self.dockerd.cli("network", "rm", network_id)
        for client in [self.client, *self._extra]:
            pytest_twisted.blockon(client.close())


@pytest.fixture(params=["memory", pytest.param("real", marks=pytest.mark.real)])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    made: MemoryEngine | RealEngine
    if request.param == "memory":
        made = MemoryEngine()
    else:
        made = RealEngine(
            request.getfixturevalue("clean_dockerd"),
            request.getfixturevalue("registry"),
            request.getfixturevalue("image_builder"),
        )
    try:
        yield made
    finally:
        made.close()


def _by_id(containers: list[Container]) -> dict[str, Container]:
    return {c.id: c for c in containers}


@pytest_twisted.ensureDeferred
async def test_ping_and_version(engine: Engine) -> None:
    await engine.client.ping()
    version = await engine.client.version()
    # The client speaks 1.41 at most; it takes the engine's version when that is older.
    assert version == min(engine.api_version, "1.41", key=_version_tuple)


@pytest_twisted.ensureDeferred
async def test_unreachable_engine(engine: Engine) -> None:
    client = engine.unreachable_client()
    with pytest.raises(DockerUnavailable):
        await client.ping()
    with pytest.raises(DockerUnavailable):
        await client.images()


@pytest_twisted.ensureDeferred
async def test_pull_then_list_and_inspect(engine: Engine) -> None:
    name = engine.repo()
    repotag = f"{name}:qa"
    image_id = engine.publish(repotag, "v1")
    assert engine.local_image_id(repotag) is None

    await engine.client.pull(repotag)

    assert engine.local_image_id(repotag) == image_id
    listed = [i for i in await engine.client.images() if repotag in i.repo_tags]
    assert [i.id for i in listed] == [image_id]
    assert listed[0].repo_tags == (repotag,)
    assert len(listed[0].repo_digests) == 1
    assert listed[0].repo_digests[0].startswith(name + "@sha256:")
    inspected = await engine.client.inspect_image(repotag)
    assert inspected.id == image_id
    assert inspected.repo_tags == (repotag,)
    assert inspected.repo_digests == listed[0].repo_digests

    # Nothing new in the registry: pulling again changes nothing.
    await engine.client.pull(repotag)
    assert (await engine.client.inspect_image(repotag)).id == image_id


@pytest_twisted.ensureDeferred
async def test_pull_of_new_version_moves_the_tag(engine: Engine) -> None:
    repotag = f"{engine.repo()}:qa"
    v1 = engine.publish(repotag, "v1")
    await engine.client.pull(repotag)
    v2 = engine.publish(repotag, "v2")
    assert v2 != v1
    assert (await engine.client.inspect_image(repotag)).id == v1  # not pulled yet

    await engine.client.pull(repotag)

    assert (await engine.client.inspect_image(repotag)).id == v2
    images = {i.id: i for i in await engine.client.images()}
    assert images[v2].repo_tags == (repotag,)
    assert v1 in images, "the old image stays, untagged"
    assert images[v1].repo_tags == ()
    # The old image keeps its digest: it is how an image without tags is listed.
    assert images[v1].repo_digests and images[v1].repo_digests != images[v2].repo_digests


@pytest_twisted.ensureDeferred
async def test_pull_of_other_tag_leaves_first(engine: Engine) -> None:
    name = engine.repo()
    qa = engine.publish(f"{name}:qa", "v1")
    prod = engine.publish(f"{name}:prod", "v2")
    await engine.client.pull(f"{name}:qa")
    await engine.client.pull(f"{name}:prod")
    tags = {t: i.id for i in await engine.client.images() for t in i.repo_tags}
    assert tags[f"{name}:qa"] == qa
    assert tags[f"{name}:prod"] == prod


@pytest_twisted.ensureDeferred
async def test_pull_by_digest_brings_that_build_and_tags_nothing(engine: Engine) -> None:
    name = engine.repo()
    repotag = f"{name}:qa"
    v1 = engine.publish(repotag, "v1")
    d1 = engine.registry_digest(repotag)
    v2 = engine.publish(repotag, "v2")  # the tag moved on; its first build stays pullable
    d2 = engine.registry_digest(repotag)
    assert v1 != v2 and d1 != d2

    await engine.client.pull(f"{name}@{d1}")

    assert engine.local_image_id(repotag) is None  # nothing tagged
    by_digest = await engine.client.inspect_image(f"{name}@{d1}")
    assert (by_digest.id, by_digest.repo_tags) == (v1, ())
    assert by_digest.repo_digests == (f"{name}@{d1}",)
    listed = [i for i in await engine.client.images() if i.id == v1]
    assert [(i.repo_tags, i.repo_digests) for i in listed] == [((), (f"{name}@{d1}",))]
    with pytest.raises(ImageNotFound):
        await engine.client.inspect_image(f"{name}@{d2}")  # not pulled

    await engine.client.tag(f"{name}@{d1}", name, "qa")  # what a host does with it
    assert engine.local_image_id(repotag) == v1
    await engine.client.pull(f"{name}@{d1}")  # again: up to date, the tag stays
    assert engine.local_image_id(repotag) == v1
    await engine.client.pull(repotag)  # by tag: the registry's current build
    assert engine.local_image_id(repotag) == v2
    assert (await engine.client.inspect_image(f"{name}@{d1}")).id == v1
    assert (await engine.client.inspect_image(f"{name}@{d2}")).id == v2

    with pytest.raises(PullFailed) as unknown:
        await engine.client.pull(f"{name}@sha256:{'0' * 64}")
    assert unknown.value.status == 404
    assert f"{name}@sha256:{'0' * 64}" in unknown.value.message


@pytest_twisted.ensureDeferred
async def test_pull_of_unknown_tag_or_repository_fails(engine: Engine) -> None:
    name = engine.repo()
    engine.publish(f"{name}:qa", "v1")

    with pytest.raises(PullFailed) as unknown_tag:
        await engine.client.pull(f"{name}:nope")
    assert unknown_tag.value.status == 404
    assert "manifest unknown" in unknown_tag.value.message

    with pytest.raises(PullFailed) as unknown_repo:
        await engine.client.pull(f"{engine.repo()}:qa")
    assert unknown_repo.value.status == 404
    assert engine.local_image_id(f"{name}:nope") is None


@pytest_twisted.ensureDeferred
async def test_pull_failing_inside_the_stream(engine: Engine) -> None:
    """The engine answers 200 and reports the error as a line of the stream."""
    repotag = f"{engine.repo()}:qa"
    engine.publish_broken(repotag, "v1")

    with pytest.raises(PullFailed) as failed:
        await engine.client.pull(repotag)

    assert failed.value.status == 200
    assert "unknown blob" in failed.value.message
    assert engine.local_image_id(repotag) is None


@pytest_twisted.ensureDeferred
async def test_pull_without_tag_is_refused(engine: Engine) -> None:
    name = engine.repo()
    engine.publish(f"{name}:qa", "v1")
    with pytest.raises(PullFailed):
        await engine.client.pull(name)
    assert engine.local_image_id(f"{name}:qa") is None


@pytest_twisted.ensureDeferred
async def test_containers_carry_names_and_image_ids(engine: Engine) -> None:
    repotag = f"{engine.repo()}:qa"
    image_id = engine.publish(repotag, "v7")
    await engine.client.pull(repotag)
    name = unique("ctr")
    container_id = engine.run(repotag, name)

    found = _by_id(await engine.client.containers())[container_id]

    assert found.name == name
    assert found.image == repotag
    assert found.image_id == image_id
    assert found.labels.get("version") == "v7"


@pytest_twisted.ensureDeferred
async def test_container_image_is_its_id_once_the_tag_moved(engine: Engine) -> None:
    repotag = f"{engine.repo()}:qa"
    v1 = engine.publish(repotag, "v1")
    await engine.client.pull(repotag)
    container_id = engine.run(repotag, unique("ctr"))
    engine.publish(repotag, "v2")

    await engine.client.pull(repotag)

    found = _by_id(await engine.client.containers())[container_id]
    assert found.image_id == v1
    assert found.image == v1  # "sha256:…": how the engine says the tag moved on


@pytest_twisted.ensureDeferred
async def test_stop(engine: Engine) -> None:
    repotag = f"{engine.repo()}:qa"
    engine.publish(repotag, "v1")
    await engine.client.pull(repotag)
    stopped = engine.run(repotag, unique("ctr"))
    kept = engine.run(repotag, unique("ctr"))
    assert engine.is_running(stopped)

    await engine.client.stop(stopped, timeout=5)

    assert not engine.is_running(stopped)
    listed = _by_id(await engine.client.containers())
    assert stopped not in listed, "only running containers are listed"
    assert kept in listed
    # Already stopped (304 from the engine): not an error.
    await engine.client.stop(stopped, timeout=5)


@pytest_twisted.ensureDeferred
async def test_stop_of_missing_container(engine: Engine) -> None:
    with pytest.raises(ContainerNotFound) as missing:
        await engine.client.stop("f" * 64, timeout=1)
    assert isinstance(missing.value, DockerError)
    assert missing.value.status == 404
    assert "No such container" in missing.value.message


@pytest_twisted.ensureDeferred
async def test_inspect_of_missing_image(engine: Engine) -> None:
    repotag = f"{engine.repo()}:qa"
    engine.publish(repotag, "v1")  # in the registry, not in the engine
    with pytest.raises(ImageNotFound) as missing:
        await engine.client.inspect_image(repotag)
    assert missing.value.status == 404
    assert "No such image" in missing.value.message


@pytest_twisted.ensureDeferred
async def test_stopped_container_comes_back_on_the_new_image(engine: Engine) -> None:
    """What a deploy relies on: stop an outdated container, and its supervisor starts it
    again from the repo:tag, which now means the new image."""
    repotag = f"{engine.repo()}:qa"
    v1 = engine.publish(repotag, "v1")
    await engine.client.pull(repotag)
    name = unique("svc")
    engine.supervise(repotag, name)
    old = await engine.wait_running_image(name, v1)
    v2 = engine.publish(repotag, "v2")
    await engine.client.pull(repotag)
    (outdated,) = [c for c in await engine.client.containers() if c.name == name]
    assert (outdated.id, outdated.image, outdated.image_id) == (old, v1, v1)

    await engine.client.stop(old, timeout=5)

    new = await engine.wait_running_image(name, v2)
    assert new != old
    (current,) = [c for c in await engine.client.containers() if c.name == name]
    assert (current.id, current.image, current.image_id) == (new, repotag, v2)


# -- creating and changing containers ---------------------------------------------------------


async def _pulled(engine: Engine, version: str = "v1") -> tuple[str, str]:
    """(repo:tag, image id) of a fresh image pulled into the engine."""
    repotag = f"{engine.repo()}:qa"
    image_id = engine.publish(repotag, version)
    await engine.client.pull(repotag)
    return repotag, image_id


@pytest_twisted.ensureDeferred
async def test_create_keeps_the_configuration_with_the_images_defaults(engine: Engine) -> None:
    repotag, image_id = await _pulled(engine)
    name = unique("ctr")
    since = engine.now_nano()
    container_id = await engine.client.create(name, {
        "Image": repotag, "Env": ["A=1"], "Labels": {"role": "web"}, "Hostname": "web-1",
        "HostConfig": {"RestartPolicy": {"Name": "unless-stopped"},
                       "Binds": ["data:/data"]},
    })

    created = engine.inspect(name)
    assert created is not None and created["Id"] == container_id
    assert created["State"]["Status"] == "created" and not created["State"]["Running"]
    assert created["Image"] == image_id
    config = created["Config"]
    assert config["Image"] == repotag
    assert config["Labels"] == {"version": "v1", "role": "web"}  # the image's, then ours
    assert config["Env"] == ["A=1"]
    assert (config["Cmd"], config["Entrypoint"]) == (["/bin/sh", "/app/run.sh"], None)
    assert config["Hostname"] == "web-1"
    assert (created["Path"], created["Args"]) == ("/bin/sh", ["/app/run.sh"])
    host = created["HostConfig"]
    assert host["RestartPolicy"] == {"Name": "unless-stopped", "MaximumRetryCount": 0}
    assert host["Binds"] == ["data:/data"] and host["NetworkMode"] == "default"
    assert [(m["Type"], m["Name"], m["Destination"]) for m in created["Mounts"]] == [
        ("volume", "data", "/data")]
    listed = _by_id(await engine.client.containers())
    assert container_id not in listed, "created is not running"

    await engine.client.start(container_id)
    started = engine.inspect(container_id)
    assert started is not None and started["State"]["Status"] == "running"
    assert _by_id(await engine.client.containers())[container_id].name == name
    assert engine.actions(container_id, since) == ["create", "start"]


@pytest_twisted.ensureDeferred
async def test_create_refused(engine: Engine) -> None:
    repotag, _ = await _pulled(engine)
    name = unique("ctr")
    first = await engine.client.create(name, {"Image": repotag})

    with pytest.raises(DockerError) as in_use:
        await engine.client.create(name, {"Image": repotag})
    assert in_use.value.status == 409
    assert in_use.value.message == (
        f'Conflict. The container name "/{name}" is already in use by container "{first}".'
        " You have to remove (or rename) that container to be able to reuse that name.")
    with pytest.raises(NotFound) as no_image:
        await engine.client.create(unique("ctr"), {"Image": f"{engine.repo()}:qa"})
    assert "No such image" in no_image.value.message
    with pytest.raises(DockerError) as bad_name:
        await engine.client.create("-bad", {"Image": repotag})
    assert bad_name.value.status == 400
    assert bad_name.value.message == (
        "Invalid container name (-bad), only [a-zA-Z0-9][a-zA-Z0-9_.-] are allowed")


@pytest_twisted.ensureDeferred
async def test_start_stop_and_start_again(engine: Engine) -> None:
    repotag, _ = await _pulled(engine)
    since = engine.now_nano()
    container_id = await engine.client.create(unique("ctr"), {"Image": repotag})
    await engine.client.start(container_id)
    await engine.client.start(container_id)  # 304: it runs already
    await engine.client.stop(container_id, timeout=5)
    stopped = engine.inspect(container_id)
    assert stopped is not None and stopped["State"]["Status"] == "exited"
    assert stopped["State"]["ExitCode"] == 0
    await engine.client.start(container_id)  # the same container again
    assert engine.is_running(container_id)
    assert engine.actions(container_id, since) == [
        "create", "start", "kill", "die", "stop", "start"]
    with pytest.raises(ContainerNotFound):
        await engine.client.start(unique("missing"))


@pytest_twisted.ensureDeferred
async def test_rename(engine: Engine) -> None:
    repotag, _ = await _pulled(engine)
    old, new, other = unique("ctr"), unique("ctr"), unique("ctr")
    since = engine.now_nano()
    container_id = engine.run(repotag, old)
    other_id = engine.run(repotag, other)

    await engine.client.rename(old, new)

    renamed = engine.inspect(new)
    assert renamed is not None and renamed["Id"] == container_id
    assert renamed["Name"] == "/" + new
    assert engine.inspect(old) is None
    with pytest.raises(DockerError) as in_use:
        await engine.client.rename(container_id, other)
    assert in_use.value.status == 409
    assert in_use.value.message == (
        f'Error when allocating new name: Conflict. The container name "/{other}" is already'
        f' in use by container "{other_id}". You have to remove (or rename) that container to'
        " be able to reuse that name.")
    with pytest.raises(DockerError) as same:
        await engine.client.rename(new, new)
    assert (same.value.status, same.value.message) == (
        400, "Renaming a container with the same name as its current name")
    with pytest.raises(ContainerNotFound):
        await engine.client.rename(unique("missing"), unique("ctr"))
    assert engine.actions(container_id, since) == ["create", "start", "rename"]


@pytest_twisted.ensureDeferred
async def test_remove(engine: Engine) -> None:
    repotag, _ = await _pulled(engine)
    since = engine.now_nano()
    running = engine.run(repotag, unique("ctr"))
    created = await engine.client.create(unique("ctr"), {"Image": repotag})

    with pytest.raises(DockerError) as refused:
        await engine.client.remove(running)
    assert refused.value.status == 409
    assert refused.value.message == (
        f"You cannot remove a running container {running}. Stop the container before"
        " attempting removal or force remove")
    await engine.client.remove(created)
    await engine.client.remove(running, force=True)

    assert engine.inspect(running) is None and engine.inspect(created) is None
    with pytest.raises(ContainerNotFound):
        await engine.client.remove(running)
    assert engine.actions(running, since) == ["create", "start", "kill", "die", "destroy"]
    assert engine.actions(created, since) == ["create", "destroy"]


@pytest_twisted.ensureDeferred
async def test_networks_and_connect(engine: Engine) -> None:
    repotag, _ = await _pulled(engine)
    first, second = unique("net"), unique("net")
    first_id = engine.add_network(first)
    engine.add_network(second)
    name = unique("ctr")
    container_id = await engine.client.create(name, {
        "Image": repotag, "HostConfig": {"NetworkMode": first},
        "NetworkingConfig": {"EndpointsConfig": {first: {"Aliases": ["web"]}}},
    })
    created = engine.inspect(name)
    assert created is not None
    assert created["NetworkSettings"]["Networks"][first]["Aliases"] == ["web"]

    await engine.client.start(container_id)
    await engine.client.connect(second, container_id, {"Aliases": ["api"]})

    networks = engine.inspect(name)["NetworkSettings"]["Networks"]  # type: ignore[index]
    assert sorted(networks) == sorted([first, second])
    assert networks[first]["Aliases"] == ["web", container_id[:12]]
    assert networks[second]["Aliases"] == ["api", container_id[:12]]
    assert networks[first]["NetworkID"] == first_id
    assert networks[first]["IPAddress"] and networks[first]["EndpointID"]
    with pytest.raises(DockerError) as twice:
        await engine.client.connect(second, container_id)
    assert (twice.value.status, twice.value.message) == (
        403, f"endpoint with name {name} already exists in network {second}")
    with pytest.raises(NotFound) as no_network:
        await engine.client.connect(unique("net"), container_id)
    assert no_network.value.message.startswith("network net-")
    with pytest.raises(NotFound) as no_container:
        await engine.client.connect(first, unique("missing"))
    assert "No such container" in no_container.value.message


@pytest_twisted.ensureDeferred
async def test_a_missing_network_fails_the_start(engine: Engine) -> None:
    repotag, _ = await _pulled(engine)
    name, network = unique("ctr"), unique("net")
    container_id = await engine.client.create(name, {
        "Image": repotag, "HostConfig": {"NetworkMode": network}})

    with pytest.raises(NotFound) as failed:
        await engine.client.start(container_id)

    assert failed.value.message == f"network {network} not found"
    state = engine.inspect(name)["State"]  # type: ignore[index]
    assert (state["Status"], state["ExitCode"], state["Error"]) == (
        "created", 128, f"network {network} not found")


@pytest_twisted.ensureDeferred
async def test_tag_refused(engine: Engine) -> None:
    repotag, image_id = await _pulled(engine)
    with pytest.raises(ImageNotFound):
        await engine.client.tag(f"{engine.repo()}:qa", engine.repo(), "qa")
    with pytest.raises(DockerError) as upper:
        await engine.client.tag(image_id, "Upper/Case", "qa")
    assert (upper.value.status, upper.value.message) == (
        500, "invalid reference format: repository name must be lowercase")
    await engine.client.tag(repotag, repotag.rpartition(":")[0], "prod")
    assert engine.local_image_id(repotag.rpartition(":")[0] + ":prod") == image_id


# -- real engine only -------------------------------------------------------------------------


@pytest.mark.real
@pytest_twisted.ensureDeferred
async def test_engine_restart(dockerd_factory: Callable[..., Dockerd],
                              image_builder: ImageBuilder) -> None:
    """The client survives its engine going away and coming back (a new connection, the
    version negotiated again)."""
    host = dockerd_factory()
    client = DockerClient.from_url(_reactor(), host.url)
    try:
        repotag = image_builder.ref(f"suite/{unique('repo')}", "qa")
        image_id = image_builder.publish(repotag, "v1").image_id
        await client.pull(repotag)
        host.stop()
        with pytest.raises(DockerUnavailable):
            await client.images()
        host.start()
        assert (await client.inspect_image(repotag)).id == image_id
    finally:
        await client.close()
