"""Pulls from a registry that wants a password, with the password from a credential helper
(config.json ``credHelpers`` / ``credsStore``) on PATH; helpers that fail or hang."""

from __future__ import annotations

import json
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.logger import LogLevel, capturedLogs, formatEvent

from deployer.credhelpers import NOT_FOUND, RegistryCredentials
from deployer.docker import DockerClient
from deployer.dockercfg import load_credentials
from deployer.errors import PullFailed
from deployer.model import Update
from deployer.reconcile import Reconciler, RoundReport
from tests.stack.docker_stack import Dockerd, ImageBuilder, run_container, unique
from tests.test_registry_auth_real import PASSWORD, USER, AuthRegistry

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthRegistry]:
    registry = AuthRegistry(base=tmp_path_factory.mktemp("credregistry"))
    registry.start()
    yield registry
    registry.cleanup()


@pytest.fixture(scope="module")
def builder(auth_registry: AuthRegistry, image_builder: ImageBuilder) -> Dockerd:
    engine = image_builder.builder()
    engine.cli("login", "-u", USER, "--password-stdin", auth_registry.host,
               input=PASSWORD.encode())
    return engine


def publish(builder: Dockerd, image_builder: ImageBuilder, ref: str, version: str) -> str:
    image_id = image_builder.build(builder, ref, version)
    image_builder.push(builder, ref)
    return image_id


class Home:
    """A HOME with ~/.docker/config.json and a bin directory that is the helpers' PATH."""

    def __init__(self, base: Path, registry: AuthRegistry) -> None:
        self.base = base
        self.registry = registry
        self.bin = base / "bin"
        self.bin.mkdir()
        self.environ = {"HOME": str(base), "PATH": f"{self.bin}:/usr/bin:/bin"}

    def config(self, config: dict[str, Any]) -> None:
        (self.base / ".docker").mkdir(exist_ok=True)
        (self.base / ".docker" / "config.json").write_text(json.dumps(config))

    def helper(self, name: str, body: str) -> None:
        path = self.bin / f"docker-credential-{name}"
        path.write_text(f'#!/bin/sh\nserver=$(cat)\n{body}\n')
        path.chmod(path.stat().st_mode | stat.S_IXUSR)

    def password_helper(self, name: str = "test") -> None:
        """Answers the registry's password for its host, and "not found" for anything else."""
        answer = json.dumps({"ServerURL": self.registry.host, "Username": USER,
                             "Secret": PASSWORD})
        self.helper(name, f'if [ "$server" = "{self.registry.host}" ]; then\n'
                          f"  echo '{answer}'\nelse\n  echo '{NOT_FOUND}'; exit 1\nfi")

    def resolver(self, timeout: float = 10.0) -> RegistryCredentials:
        creds = load_credentials(None, environ=self.environ)
        return RegistryCredentials(reactor, creds, timeout=timeout, environ=self.environ)


@pytest.fixture
def home(tmp_path: Path, auth_registry: AuthRegistry) -> Home:
    return Home(tmp_path, auth_registry)




def client(dockerd: Dockerd, resolver: RegistryCredentials) -> DockerClient:
    return DockerClient.from_url(reactor, dockerd.url, resolver)


async def pull(dockerd: Dockerd, ref: str, resolver: RegistryCredentials) -> None:
    c = client(dockerd, resolver)
    try:
        await c.pull(ref)
    finally:
        await c.close()


@pytest.mark.parametrize("key", ["credHelpers", "credsStore"])
@pytest_twisted.ensureDeferred
async def test_pull_with_the_password_from_a_helper(
    clean_dockerd: Dockerd, builder: Dockerd, image_builder: ImageBuilder,
    auth_registry: AuthRegistry, home: Home, key: str,
) -> None:
    ref = f"{auth_registry.host}/{unique('private')}:qa"
    image_id = publish(builder, image_builder, ref, "v1")
    home.password_helper()
    home.config({"credHelpers": {auth_registry.host: "test"}} if key == "credHelpers"
                else {"credsStore": "test", "auths": {auth_registry.host: {}}})
    with capturedLogs() as events:
        await pull(clean_dockerd, ref, home.resolver())
    assert clean_dockerd.image_id(ref) == image_id
    assert not any(PASSWORD in formatEvent(e) for e in events)
    clean_dockerd.cli("rmi", ref)


@pytest_twisted.ensureDeferred
async def test_helper_without_credentials_means_an_anonymous_pull_that_is_refused(
    clean_dockerd: Dockerd, builder: Dockerd, image_builder: ImageBuilder,
    auth_registry: AuthRegistry, home: Home,
) -> None:
    ref = f"{auth_registry.host}/{unique('private')}:qa"
    publish(builder, image_builder, ref, "v1")
    home.helper("empty", f"echo '{NOT_FOUND}'; exit 1")
    home.config({"credsStore": "empty"})
    with pytest.raises(PullFailed, match=r"(?i)auth|denied|unauthorized"):
        await pull(clean_dockerd, ref, home.resolver())
    assert clean_dockerd.image_id(ref) is None


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


@pytest_twisted.ensureDeferred
async def test_hanging_helper_is_killed_and_the_pull_fails_cleanly(
    clean_dockerd: Dockerd, builder: Dockerd, image_builder: ImageBuilder,
    auth_registry: AuthRegistry, home: Home,
) -> None:
    ref = f"{auth_registry.host}/{unique('private')}:qa"
    publish(builder, image_builder, ref, "v1")
    pidfile = home.base / "hang.pid"
    home.helper("hang", f'echo $$ > "{pidfile}"; exec sleep 600')
    home.config({"credHelpers": {auth_registry.host: "hang"}})
    started = time.monotonic()
    # Long enough for the helper to write its pid first (a shell and a cat started on a loaded
    # machine, a file created on a busy disk): killed before, it would leave no pid to check.
    with capturedLogs() as events, pytest.raises(PullFailed, match=r"(?i)auth|denied"):
        await pull(clean_dockerd, ref, home.resolver(timeout=3.0))
    assert time.monotonic() - started < 30
    assert clean_dockerd.image_id(ref) is None
    pid = int(pidfile.read_text())
    for _ in range(500):
        if not _alive(pid):
            break
        await deferLater(reactor, 0.01, lambda: None)
    assert not _alive(pid), "the hanging helper was not killed"
    errors = [formatEvent(e) for e in events if e["log_level"] == LogLevel.error]
    assert any("docker-credential-hang get: timed out after 3s" in t for t in errors), errors


@pytest_twisted.ensureDeferred
async def test_failing_helper_stops_nothing(
    clean_dockerd: Dockerd, builder: Dockerd, image_builder: ImageBuilder,
    auth_registry: AuthRegistry, home: Home,
) -> None:
    """A round whose pull has no credentials (the helper fails) leaves the running container
    alone, on the image it runs."""
    repo = unique("private")
    ref = f"{auth_registry.host}/{repo}:qa"
    v1 = publish(builder, image_builder, ref, "v1")
    home.password_helper()
    home.config({"credHelpers": {auth_registry.host: "test"}})
    await pull(clean_dockerd, ref, home.resolver())
    container = run_container(clean_dockerd, ref, unique("c"))
    publish(builder, image_builder, ref, "v2")

    home.helper("test", "echo 'the keyring is locked' >&2; exit 1")
    engine = client(clean_dockerd, home.resolver())
    reports: list[RoundReport] = []
    r = Reconciler(reactor, engine, kill_timeout=5, observers=[reports.append])
    try:
        with capturedLogs() as events:
            r.request(Update(repository=repo, registry=auth_registry.host, tag="qa",
                             source="test", received=reactor.seconds()))
            await r.wait_idle()
    finally:
        r.stop()
        await engine.close()

    report = reports[-1]
    assert ref in report.failed
    assert report.stopped == ()
    state = clean_dockerd.inspect(container)
    assert state is not None and state["State"]["Running"]
    assert state["Image"] == v1
    assert clean_dockerd.image_id(ref) == v1
    errors = [formatEvent(e) for e in events if e["log_level"] == LogLevel.error]
    assert any("the keyring is locked" in t for t in errors), errors
