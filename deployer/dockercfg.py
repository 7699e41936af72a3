"""Registry credentials for pulls, from the files ``docker login`` writes.

Two formats are read: ``~/.docker/config.json`` (``{"auths": {KEY: {...}}}``) and the legacy
``~/.dockercfg`` that the Go original used (``{KEY: {...}}``). An entry holds ``auth`` (base64 of
``user:password``) or ``username``/``password``, and optionally ``identitytoken``. Keys are a
registry host (``127.0.0.1:5000``) or a URL (``https://index.docker.io/v1/``); the ``--registry``
value is the key used for images that name no registry host (Docker Hub).

config.json may also name credential helpers, as the docker CLI reads them: ``credHelpers``
(registry host -> helper name) and ``credsStore`` (the helper for every other registry). Here they
are only parsed; :mod:`deployer.credhelpers` runs them. The choice for one image is the CLI's:

1. an entry of the ``--dockercfg`` file for the host (a file written for the daemon, which wins
   over config.json as it always has);
2. ``credHelpers[host]``, else ``credsStore``: the helper's answer. "credentials not found" means
   anonymous, even when ``auths`` has an inline entry for the host. A helper that fails or hangs
   is logged and leaves the inline ``auths`` entry, if any, else anonymous: the CLI's store hands
   back the file's entry along with the helper's error (``docker pull`` then stops on the error;
   the daemon goes on, so that a broken helper does not stop pulls of public images);
3. the ``auths`` entry for the host;
4. none: anonymous.

The engine takes credentials per pull in the ``X-Registry-Auth`` header: base64url of a JSON
object.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Mapping
from urllib.parse import urlsplit

import attrs
from twisted.logger import Logger

from deployer.errors import ConfigError
from deployer.reference import registry_host

log = Logger()

DOCKER_HUB_KEY = "https://index.docker.io/v1/"

#: A helper's name is the tail of its program's name, ``docker-credential-<name>``.
HELPER_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*\Z")


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
class Lookup:
    """Where the credentials for one image come from.

    ``server`` is the address a helper is asked about (the registry host, or the ``--registry``
    value for Docker Hub); ``helper`` the helper to ask, None when none is configured for it;
    ``static`` the entry of the files: the answer without a helper, the fallback when the helper
    fails.
    """

    server: str
    helper: str | None = None
    static: RegistryAuth | None = None


@attrs.frozen
class Credentials:
    """Credentials by registry host. ``hub_key`` is the ``--registry`` value.

    ``helpers`` are config.json's ``credHelpers`` by host, ``store`` its ``credsStore`` ("" for
    none); ``pinned`` the hosts whose entry in ``by_host`` is used without asking a helper.
    """

    by_host: Mapping[str, RegistryAuth] = attrs.field(factory=dict)
    hub_key: str = DOCKER_HUB_KEY
    helpers: Mapping[str, str] = attrs.field(factory=dict)
    store: str = ""
    pinned: frozenset[str] = frozenset()

    def _keys(self, repotag: str) -> tuple[str | None, tuple[str, ...]]:
        """The registry host of ``repotag`` (None for Docker Hub) and its keys, best first."""
        host = registry_host(repotag)
        if host is not None:
            return host, (host.lower(),)
        return None, (_host_of(self.hub_key), _host_of(DOCKER_HUB_KEY))

    def for_image(self, repotag: str) -> RegistryAuth | None:
        """The entry of the files for ``repotag``, without asking any helper."""
        _, keys = self._keys(repotag)
        return next((self.by_host[k] for k in keys if k in self.by_host), None)

    def lookup(self, repotag: str) -> Lookup:
        """Which helper to ask for ``repotag``, if any, and the entry of the files."""
        host, keys = self._keys(repotag)
        static = self.for_image(repotag)
        server = self.hub_key if host is None else host
        if any(k in self.pinned for k in keys if k in self.by_host):
            return Lookup(server=server, static=static)
        helper = next((self.helpers[k] for k in keys if k in self.helpers), None)
        return Lookup(server=server, helper=helper or self.store or None, static=static)

    @property
    def uses_helpers(self) -> bool:
        return bool(self.helpers or self.store)

    def __len__(self) -> int:
        """How many entries and helpers there are: 0 means every pull goes anonymous."""
        return len(self.by_host) + len(self.helpers) + (1 if self.store else 0)

    def overlaid(self, top: Credentials) -> Credentials:
        """These credentials with ``top``'s over them: ``top``'s entries and helpers win, and its
        entries are used without asking a helper of these (unless ``top`` names one itself)."""
        covered = bool(top.store)
        pinned = {h for h in top.by_host if not covered and h not in top.helpers}
        pinned |= {h for h in self.pinned if not covered and h not in top.helpers}
        return Credentials(
            by_host={**self.by_host, **top.by_host},
            hub_key=top.hub_key,
            helpers={**self.helpers, **top.helpers},
            store=top.store or self.store,
            pinned=frozenset(pinned),
        )

    @classmethod
    def parse(cls, text: str, source: str, hub_key: str = DOCKER_HUB_KEY) -> Credentials:
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{source}: not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object")
        config_json = any(k in data for k in ("auths", "credHelpers", "credsStore"))
        auths = data.get("auths", {}) if config_json else data
        if not isinstance(auths, dict):
            raise ConfigError(f"{source}: 'auths' is not an object")
        helpers = _helpers(data.get("credHelpers"), source) if config_json else {}
        store = _store(data.get("credsStore"), source) if config_json else ""
        by_host = {}
        for key, raw in auths.items():
            if not isinstance(raw, Mapping) or not (
                raw.get("auth") or raw.get("username") or raw.get("identitytoken")
            ):
                # config.json also holds credsStore-only entries ({}); nothing to send for those.
                continue
            by_host[_host_of(key)] = _entry(key, raw, source)
        return cls(by_host=by_host, hub_key=hub_key, helpers=helpers, store=store)


def _helpers(raw: object, source: str) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{source}: 'credHelpers' is not an object")
    helpers = {}
    for key, name in raw.items():
        if not isinstance(name, str):
            raise ConfigError(f"{source}: the credHelpers entry for {key!r} is not a string")
        if not name:
            continue  # the docker CLI reads "" as no helper
        if not HELPER_NAME_RE.match(name):
            raise ConfigError(
                f"{source}: credHelpers names {name!r} for {key!r}, which is not a helper name"
                " (the tail of docker-credential-<name>: letters, digits, '.', '_', '-')"
            )
        helpers[_host_of(key)] = name
    return helpers


def _store(raw: object, source: str) -> str:
    if raw is None or raw == "":
        return ""
    if not isinstance(raw, str) or not HELPER_NAME_RE.match(raw):
        raise ConfigError(
            f"{source}: credsStore {raw!r} is not a helper name"
            " (the tail of docker-credential-<name>: letters, digits, '.', '_', '-')"
        )
    return raw


def load_credentials(
    dockercfg: str | None,
    hub_key: str = DOCKER_HUB_KEY,
    environ: Mapping[str, str] | None = None,
) -> Credentials:
    """Read ``~/.docker/config.json`` (or ``$DOCKER_CONFIG/config.json``) and the dockercfg file.

    ``dockercfg`` is the ``--dockercfg`` flag: None means the default ``~/.dockercfg``, which may be
    missing (pulls then go anonymous). A file that is named and cannot be read or parsed raises
    :class:`ConfigError`. Entries (and helpers) of the dockercfg file win over config.json.
    """
    env = os.environ if environ is None else environ
    home = env.get("HOME") or os.path.expanduser("~")
    merged = Credentials(hub_key=hub_key)

    config_dir = env.get("DOCKER_CONFIG") or os.path.join(home, ".docker")
    config_json = os.path.join(config_dir, "config.json")
    if os.path.exists(config_json):
        merged = _read(config_json, hub_key)
        _warn_shadowed(merged, config_json)

    explicit = dockercfg is not None
    path = os.path.join(home, ".dockercfg") if dockercfg is None else os.path.expanduser(dockercfg)
    if path.startswith("~"):
        path = os.path.join(home, path[2:])
    if explicit or os.path.exists(path):
        creds = _read(path, hub_key)
        _warn_shadowed(creds, path)
        merged = merged.overlaid(creds)
        hub = merged.lookup("busybox")
        if explicit and hub.static is None and hub.helper is None:
            log.warn(
                "{path} holds no entry for --registry {registry}; Docker Hub pulls go anonymous",
                path=path,
                registry=hub_key,
            )
    if merged.uses_helpers:
        log.info(
            "registry credentials from helpers: credHelpers {helpers}, credsStore {store}",
            helpers=", ".join(f"{h}: {n}" for h, n in sorted(merged.helpers.items())) or "none",
            store=merged.store or "none",
        )
    return merged


def _warn_shadowed(creds: Credentials, path: str) -> None:
    """The docker CLI asks the helper first for a host it covers, and uses an inline ``auths``
    entry only when the helper fails: say so once, rather than surprise later."""
    for host in sorted(creds.by_host):
        helper = creds.helpers.get(host) or creds.store
        if helper:
            log.warn(
                "{path}: the inline credentials for {host} are used only when credential helper"
                " {helper} fails, as with the docker CLI",
                path=path,
                host=host,
                helper=helper,
            )


def _read(path: str, hub_key: str) -> Credentials:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read registry credentials {path}: {e.strerror}") from e
    return Credentials.parse(text, path, hub_key)
