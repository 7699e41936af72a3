"""Registry credentials for pulls, from the files ``docker login`` writes.

Two formats are read: ``~/.docker/config.json`` (``{"auths": {KEY: {...}}}``) and the legacy
``~/.dockercfg`` that the Go original used (``{KEY: {...}}``). An entry holds ``auth`` (base64 of
``user:password``) or ``username``/``password``, and optionally ``identitytoken``. Keys are a
registry host (``127.0.0.1:5000``) or a URL (``https://index.docker.io/v1/``); the ``--registry``
value is the key used for images that name no registry host (Docker Hub).

The engine takes credentials per pull in the ``X-Registry-Auth`` header: base64url of a JSON
object.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from urllib.parse import urlsplit

import attrs
from twisted.logger import Logger

from deployer.errors import ConfigError
from deployer.reference import registry_host

log = Logger()

DOCKER_HUB_KEY = "https://index.docker.io/v1/"


@attrs.frozen
class RegistryAuth:
    username: str = ""
    password: str = ""
    identitytoken: str = ""
    serveraddress: str = ""

    def header(self) -> bytes:
        """The value of ``X-Registry-Auth``."""
        body: dict[str, str] = {"serveraddress": self.serveraddress}
        if self.identitytoken:
            body["identitytoken"] = self.identitytoken
        else:
            body["username"] = self.username
            body["password"] = self.password
        return base64.urlsafe_b64encode(json.dumps(body).encode())


def _host_of(key: str) -> str:
    """``https://host:port/v1/`` and ``host:port`` both give ``host:port``."""
    if "://" in key:
        return urlsplit(key).netloc.lower()
    return key.split("/", 1)[0].lower()


def _entry(key: str, raw: object, source: str) -> RegistryAuth:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: the entry for {key!r} is not an object")
    username = str(raw.get("username") or "")
    password = str(raw.get("password") or "")
    encoded = raw.get("auth")
    if encoded:
        try:
            decoded = base64.b64decode(str(encoded), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError) as e:
            raise ConfigError(f"{source}: the 'auth' of {key!r} is not base64: {e}") from e
        username, sep, password = decoded.partition(":")
        if not sep:
            raise ConfigError(f"{source}: the 'auth' of {key!r} is not user:password")
    return RegistryAuth(
        username=username,
        password=password,
        identitytoken=str(raw.get("identitytoken") or ""),
        serveraddress=key,
    )


@attrs.frozen
class Credentials:
    """Credentials by registry host. ``hub_key`` is the ``--registry`` value."""

    by_host: Mapping[str, RegistryAuth] = attrs.field(factory=dict)
    hub_key: str = DOCKER_HUB_KEY

    def for_image(self, repotag: str) -> RegistryAuth | None:
        host = registry_host(repotag)
        key = _host_of(self.hub_key) if host is None else host.lower()
        found = self.by_host.get(key)
        if found is None and host is None:
            found = self.by_host.get(_host_of(DOCKER_HUB_KEY))
        return found

    def __len__(self) -> int:
        return len(self.by_host)

    @classmethod
    def parse(cls, text: str, source: str, hub_key: str = DOCKER_HUB_KEY) -> Credentials:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{source}: not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        auths = data.get("auths", data) if "auths" in data else data
        if not isinstance(auths, dict):
            raise ConfigError(f"{source}: 'auths' is not an object")
        by_host = {}
        for key, raw in auths.items():
            if not isinstance(raw, Mapping) or not (
                raw.get("auth") or raw.get("username") or raw.get("identitytoken")
            ):
                # config.json also holds credsStore-only entries ({}); nothing to send for those.
                continue
            by_host[_host_of(key)] = _entry(key, raw, source)
        return cls(by_host=by_host, hub_key=hub_key)


def load_credentials(
    dockercfg: str | None,
    hub_key: str = DOCKER_HUB_KEY,
    environ: Mapping[str, str] | None = None,
) -> Credentials:
    """Read ``~/.docker/config.json`` (or ``$DOCKER_CONFIG/config.json``) and the dockercfg file.

    ``dockercfg`` is the ``--dockercfg`` flag: None means the default ``~/.dockercfg``, which may be
    missing (pulls then go anonymous). A file that is named and cannot be read or parsed raises
    :class:`ConfigError`. Entries of the dockercfg file win over config.json.
    """
    env = os.environ if environ is None else environ
    home = env.get("HOME") or os.path.expanduser("~")
    merged: dict[str, RegistryAuth] = {}

    config_dir = env.get("DOCKER_CONFIG") or os.path.join(home, ".docker")
    config_json = os.path.join(config_dir, "config.json")
    if os.path.exists(config_json):
        merged.update(_read(config_json, hub_key).by_host)

    explicit = dockercfg is not None
    path = os.path.join(home, ".dockercfg") if dockercfg is None else os.path.expanduser(dockercfg)
    if path.startswith("~"):
        path = os.path.join(home, path[2:])
    if explicit or os.path.exists(path):
        creds = _read(path, hub_key)
        merged.update(creds.by_host)
        if explicit and creds.for_image("busybox") is None and _host_of(hub_key) not in merged:
            log.warn(
                "{path} holds no entry for --registry {registry}; Docker Hub pulls go anonymous",
                path=path,
                registry=hub_key,
            )
    return Credentials(by_host=merged, hub_key=hub_key)


def _read(path: str, hub_key: str) -> Credentials:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read registry credentials {path}: {e.strerror}") from e
    return Credentials.parse(text, path, hub_key)
