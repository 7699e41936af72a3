"""One suite for the Docker client, run against two engines: the in-memory double
(:class:`deployer.testing.memory_docker.MemoryDocker`) and a real private dockerd with a real
local registry. Whatever passes here against both keeps the double honest.

Each engine offers the same small setup API (publish an image version to its registry, run a
container, look at local state without going through the client), so every test body runs
unchanged against both.
"""

from __future__ import annotations

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
    PullFailed,
)
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

    def repo(self) -> str:
        return f"{self.registry.host}/suite/{unique('repo')}"

    def publish(self, repotag: str, version: str) -> str:
        return self.builder.publish(repotag, version).image_id

    def publish_broken(self, repotag: str, version: str) -> None:
        self.builder.publish(repotag, version)
        ref = parse_reference(repotag)
        assert ref.tag is not None
        self.registry.break_layers(ref.path, ref.tag)

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

    def close(self) -> None:
        for supervisor in self._supervisors.values():
            supervisor.stop()
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
