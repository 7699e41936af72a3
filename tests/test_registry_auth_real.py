"""Pulls from a registry that wants a password, with credentials from the files docker login
writes (the legacy ~/.dockercfg and ~/.docker/config.json)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor

from deployer.docker import DockerClient
from deployer.dockercfg import load_credentials
from deployer.errors import PullFailed
from tests.stack.docker_stack import Dockerd, ImageBuilder, Registry, unique

pytestmark = pytest.mark.real

USER, PASSWORD = "alice", "wonder land"
#: bcrypt of PASSWORD (cost 4), as ``htpasswd -B`` writes it.
PASSWORD_HASH = "$2b$04$4v5AcbZeHF6GXGn53CngY.JdZ5U.67tR1Q2Ook1OkEa66fbvdwzNG"


@attrs.define(eq=False)
class AuthRegistry(Registry):
    """A registry that answers only with HTTP basic auth (htpasswd)."""

    def config(self) -> dict[str, Any]:
        htpasswd = self.base / "htpasswd"
        htpasswd.write_text(f"{USER}:{PASSWORD_HASH}\n")
        config = super().config()
        config["auth"] = {"htpasswd": {"realm": "deployer-tests", "path": str(htpasswd)}}
        return config

    def answers(self) -> bool:
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(self.url + "/v2/", timeout=2)
        except urllib.error.HTTPError as e:
            return e.code == 401
        except OSError:
            return False
        return True


@pytest.fixture(scope="module")
def auth_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthRegistry]:
    registry = AuthRegistry(base=tmp_path_factory.mktemp("authregistry"))
    registry.start()
    yield registry
    registry.cleanup()


@pytest.fixture(scope="module")
def published(auth_registry: AuthRegistry, image_builder: ImageBuilder) -> tuple[str, str]:
    engine = image_builder.builder()
    engine.cli("login", "-u", USER, "--password-stdin", auth_registry.host,
               input=PASSWORD.encode())
    ref = f"{auth_registry.host}/{unique('private')}:qa"
    image_id = image_builder.build(engine, ref, "v1")
    image_builder.push(engine, ref)
    return ref, image_id


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path


async def _pull(dockerd: Dockerd, ref: str, home: Path, dockercfg: str | None) -> None:
    creds = load_credentials(dockercfg, environ={"HOME": str(home)})
    client = DockerClient.from_url(reactor, dockerd.url, creds)
    try:
        await client.pull(ref)
    finally:
        await client.close()


@pytest_twisted.ensureDeferred
async def test_pull_without_credentials_fails(
    clean_dockerd: Dockerd, published: tuple[str, str], home: Path,
) -> None:
    ref, _ = published
    with pytest.raises(PullFailed, match=r"(?i)auth|denied|unauthorized"):
        await _pull(clean_dockerd, ref, home, None)
    assert clean_dockerd.image_id(ref) is None


@pytest_twisted.ensureDeferred
async def test_legacy_dockercfg_named_by_flag(
    clean_dockerd: Dockerd, published: tuple[str, str], auth_registry: AuthRegistry, home: Path,
) -> None:
    ref, image_id = published
    cfg = home / "creds.dockercfg"
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    cfg.write_text(json.dumps({f"https://{auth_registry.host}": {"auth": auth, "email": "a@b"}}))
    await _pull(clean_dockerd, ref, home, str(cfg))
    assert clean_dockerd.image_id(ref) == image_id
    clean_dockerd.cli("rmi", ref)


@pytest_twisted.ensureDeferred
async def test_docker_config_json_in_home(
    clean_dockerd: Dockerd, published: tuple[str, str], auth_registry: AuthRegistry, home: Path,
) -> None:
    ref, image_id = published
    (home / ".docker").mkdir()
    (home / ".docker" / "config.json").write_text(json.dumps(
        {"auths": {auth_registry.host: {"username": USER, "password": PASSWORD}}}
    ))
    await _pull(clean_dockerd, ref, home, None)
    assert clean_dockerd.image_id(ref) == image_id
    clean_dockerd.cli("rmi", ref)


@pytest_twisted.ensureDeferred
async def test_wrong_password_fails(
    clean_dockerd: Dockerd, published: tuple[str, str], auth_registry: AuthRegistry, home: Path,
) -> None:
    ref, _ = published
    (home / ".docker").mkdir()
    (home / ".docker" / "config.json").write_text(json.dumps(
        {"auths": {auth_registry.host: {"username": USER, "password": "not it"}}}
    ))
    with pytest.raises(PullFailed):
        await _pull(clean_dockerd, ref, home, None)
    assert clean_dockerd.image_id(ref) is None
