"""The daemon's configuration: one value, built and checked once at start-up."""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.internet.endpoints import serverFromString

from deployer.auth import load_token
from deployer.docker import parse_engine_url
from deployer.dockercfg import Credentials, load_credentials
from deployer.errors import ConfigError
from deployer.notify import check_config_url

#: Stands in for the reactor when a listen description is only parsed.
_PARSING_ONLY: Any = object()

TOKEN_HELP = (
    "webhooks need a token: set --webhook_token TOKEN, --webhook_token_file FILE or the"
    " environment variable DEPLOYER_WEBHOOK_TOKEN (for example: export"
    " DEPLOYER_WEBHOOK_TOKEN=$(openssl rand -hex 24)), and have every registry send it as"
    " 'Authorization: Bearer TOKEN' or '?token=TOKEN'. To accept webhooks without a token on a"
    " trusted network, pass --insecure_webhooks."
)


@attrs.frozen
class Config:
    docker: str = "unix:///var/run/docker.sock"
    credentials: Credentials = attrs.field(factory=Credentials)
    etcd_nodes: tuple[str, ...] = ()
    etcd_prefix: str = "/deployer"
    etcd_dial_timeout: float = 5.0
    etcd_retry_delay: float = 2.0
    strong_consistency: bool = False
    kill_timeout: int = 10
    listen: str = "tcp:4500"
    max_threads: int = 4
    registry: str = "https://index.docker.io/v1/"
    repull_period: float = 86400.0
    slack_username: str = "Deployer"
    slack_webhook_url: str | None = None
    webhook_path: str = "/api/dockerhub/webhook"
    webhook_tokens: tuple[str, ...] = ()
    insecure_webhooks: bool = False
    public_url: str | None = None
    callback_hosts: frozenset[str] = frozenset({"registry.hub.docker.com"})
    notify_url: str | None = None
    github_secret: str | None = None
    hostname: str = attrs.field(factory=socket.gethostname)

    @property
    def standalone(self) -> bool:
        return not self.etcd_nodes


def _int(name: str, value: Any, minimum: int) -> int:
    try:
        number = int(str(value).strip())
    except ValueError as e:
        raise ConfigError(f"--{name} must be a whole number, not {value!r}") from e
    if number < minimum:
        raise ConfigError(f"--{name} must be at least {minimum}, not {number}")
    return number


def _etcd_nodes(value: str | None) -> tuple[str, ...]:
    if not value:
        return ()
    nodes = []
    for raw in value.split(","):
        node = raw.strip().rstrip("/")
        if not node:
            continue
        if "://" not in node:
            node = "http://" + node
        parts = urlsplit(node)
        try:
            parts.port  # noqa: B018 - raises on a port that is not a number
        except ValueError as e:
            raise ConfigError(f"--etcd_nodes: {raw!r} has a bad port: {e}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"--etcd_nodes: {raw!r} is not an http(s)://host:port URL")
        nodes.append(node)
    if not nodes:
        raise ConfigError("--etcd_nodes is empty")
    return tuple(nodes)


def _secret(value: str | None, path: str | None, env_value: str | None, flag: str) -> str | None:
    if value:
        return value
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read().strip()
        except OSError as e:
            raise ConfigError(f"--{flag}_file {path}: {e.strerror}") from e
        if not text:
            raise ConfigError(f"--{flag}_file {path} is empty")
        return text
    return env_value or None


def build_config(opts: Mapping[str, Any], environ: Mapping[str, str]) -> Config:
    """Check the options and turn them into a :class:`Config`; :class:`ConfigError` says what is
    wrong and how to put it right."""
    from deployer.tap import listen_endpoint, parse_duration

    def duration(name: str) -> float:
        try:
            return parse_duration(str(opts[name]))
        except Exception as e:
            raise ConfigError(f"--{name}: {e}") from e

    def endpoint(name: str) -> str:
        try:
            description = listen_endpoint(str(opts[name]))
            # Parsed, never listened on (so no reactor is needed yet): a bad description is
            # a usage error now rather than a traceback at start.
            serverFromString(_PARSING_ONLY, description)
        except Exception as e:
            raise ConfigError(f"--{name} {opts[name]!r}: {e}") from e
        return description

    docker = opts.get("docker") or environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    try:
        parse_engine_url(docker)
    except ValueError as e:
        raise ConfigError(
            f"--docker {docker!r}: {e}; use unix:///path/to/docker.sock or tcp://host:port"
        ) from None
    if docker.startswith("tcp://") and environ.get("DOCKER_TLS_VERIFY"):
        raise ConfigError(
            "DOCKER_TLS_VERIFY is set, but deployer speaks to the Docker engine without TLS:"
            " use its unix socket, or a TCP endpoint on a trusted network without TLS"
        )

    token = load_token(opts.get("webhook_token"), opts.get("webhook_token_file"), environ)
    insecure = bool(opts.get("insecure_webhooks"))
    if not token and not insecure:
        raise ConfigError(TOKEN_HELP)

    prefix = "/" + str(opts.get("etcd_prefix") or "/deployer").strip("/")
    if prefix == "/":
        raise ConfigError("--etcd_prefix cannot be the root '/'")

    path = str(opts.get("webhook_path") or "/api/dockerhub/webhook")
    if not re.fullmatch(r"(/[A-Za-z0-9._~!$&'()*+,;=@-]+)+/?", path):
        raise ConfigError(
            f"--webhook_path must be a path such as /api/dockerhub/webhook (letters, digits and"
            f" -._~!$&'()*+,;=@ between slashes): {path!r}"
        )

    public_url = opts.get("public_url")
    if public_url and urlsplit(public_url).scheme not in ("http", "https"):
        raise ConfigError(f"--public_url {public_url!r} is not an http(s) URL")

    slack_url = opts.get("slack_webhook_url") or environ.get("SLACK_WEBHOOK_URL")
    if slack_url:
        check_config_url(slack_url, "--slack_webhook_url")
    if opts.get("notify_url"):
        check_config_url(opts["notify_url"], "--notify_url")

    registry = str(opts.get("registry") or "https://index.docker.io/v1/")
    credentials: Credentials = load_credentials(opts.get("dockercfg"), registry, environ)

    dial_timeout = duration("etcd_dial_timeout")
    if dial_timeout <= 0:
        raise ConfigError("--etcd_dial_timeout must be more than 0")
    retry_delay = duration("etcd_retry_delay")
    if retry_delay <= 0:
        raise ConfigError("--etcd_retry_delay must be more than 0")

    return Config(
        docker=docker,
        credentials=credentials,
        etcd_nodes=_etcd_nodes(opts.get("etcd_nodes")),
        etcd_prefix=prefix,
        etcd_dial_timeout=dial_timeout,
        etcd_retry_delay=retry_delay,
        strong_consistency=bool(opts.get("strong_consistency")),
        kill_timeout=_int("kill_timeout", opts.get("kill_timeout", 10), 0),
        listen=endpoint("listen"),
        max_threads=_int("max_threads", opts.get("max_threads", 4), 1),
        registry=registry,
        repull_period=duration("repull_period"),
        slack_username=str(opts.get("slack_username") or "Deployer"),
        slack_webhook_url=slack_url,
        webhook_path=path,
        webhook_tokens=(token,) if token else (),
        insecure_webhooks=insecure,
        public_url=public_url,
        callback_hosts=frozenset(
            h.strip().lower() for h in str(opts.get("callback_hosts") or "").split(",") if h.strip()
        ),
        notify_url=opts.get("notify_url"),
        github_secret=_secret(
            opts.get("github_secret"), opts.get("github_secret_file"),
            environ.get("DEPLOYER_GITHUB_SECRET"), "github_secret",
        ),
        hostname=opts.get("hostname") or socket.gethostname(),
    )
