"""The daemon's configuration, in one place: every flag with its default and help
(:data:`FLAGS`), the parsing of each value (durations, listen endpoints, etcd nodes...), and
:func:`build_config`, which checks them all once at start-up and gives a :class:`Config`.

:mod:`deployer.tap` builds the command line from :data:`FLAGS`; :class:`Config`'s defaults are
the flags' defaults, parsed. A flag given as an empty string counts as not given (its environment
variable, then its default, are used), except where :attr:`Flag.empty_is_value` says otherwise.
"""

from __future__ import annotations

import math
import re
import socket
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs
from twisted.internet.endpoints import serverFromString

from deployer.auth import GITHUB_SECRET, WEBHOOK_TOKEN, load_secret
from deployer.dockercfg import DOCKER_HUB_KEY, Credentials, load_credentials
from deployer.engine_address import DEFAULT_DOCKER_URL, parse_engine_url
from deployer.errors import ConfigError
from deployer.notify import DOCKER_HUB_CALLBACK_HOSTS, check_config_url
from deployer.replace import ReplaceMode

_T = TypeVar("_T")

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
class Flag:
    """One command-line flag.

    ``default`` is the value as it would be typed (``"5s"``, ``":4500"``), None when the flag
    has none; ``env`` the environment variable read when the flag is not given; ``switch`` a flag
    that takes no value. ``shown`` replaces the default in the help when it is not simply
    ``default``.
    """

    name: str
    default: str | None
    help: str
    env: str | None = None
    switch: bool = False
    shown: str | None = None
    empty_is_value: bool = False

    @property
    def help_text(self) -> str:
        """The help line; a default that the command line cannot show is written into it."""
        if self.shown is not None:
            return f"{self.help} [default: {self.shown}]"
        if self.env is not None:
            fallback = f", else {self.default}" if self.default else ""
            return f"{self.help} [default: ${self.env}{fallback}]"
        return self.help

    @property
    def option_default(self) -> str | None:
        """The default given to the option parser: none when the environment comes first."""
        return None if self.env is not None or self.shown is not None else self.default


FLAGS: tuple[Flag, ...] = (
    # The Go original's flags, with its names and defaults.
    Flag("docker", DEFAULT_DOCKER_URL,
         "Docker endpoint to connect to: unix:///path or tcp://host:port", env="DOCKER_HOST"),
    Flag("dockercfg", None, "Path to .dockercfg authentication information",
         shown="~/.dockercfg if it exists; ~/.docker/config.json is read too"),
    Flag("etcd_dial_timeout", "5s", "How long to wait to connect to etcd nodes."),
    Flag("etcd_nodes", None,
         "Comma-separated list of etcd nodes to connect to (e.g. http://127.0.0.1:2379)."
         " Not given: standalone mode, a webhook updates this host only."),
    Flag("etcd_prefix", "/deployer", "Path prefix for etcd nodes."),
    Flag("etcd_retry_delay", "2s", "How long to wait between request retries."),
    Flag("kill_timeout", "10", "Container stop timeout, before hard kill (in seconds)."),
    Flag("listen", ":4500",
         "[IP]:port to listen for incoming connections, or a Twisted endpoint description."),
    Flag("max_threads", "4", "Maximum number of concurrent image pulls."),
    Flag("registry", DOCKER_HUB_KEY,
         "URL of docker registry (the credentials key for images that name no registry)."),
    Flag("repull_period", "24h0m0s",
         "How frequently to re-pull all images, without any notification (0 turns it off)."),
    Flag("slack_username", "Deployer", "Username to show in slack."),
    Flag("slack_webhook_url", None, "Slack incoming webhook url (optional)",
         env="SLACK_WEBHOOK_URL"),
    Flag("strong_consistency", None,
         "Set etcd consistency level as strong (linearizable reads).", switch=True),
    Flag("webhook_path", "/api/dockerhub/webhook", "Path to webhook from Docker Hub."),
    # New in deployer.
    Flag("webhook_token", None,
         "Token every webhook must carry (Authorization: Bearer TOKEN or ?token=TOKEN)",
         env=WEBHOOK_TOKEN.env),
    Flag("webhook_token_file", None, "Read the webhook token from this file."),
    Flag("insecure_webhooks", None,
         "Accept webhooks without a token (only on a trusted network).", switch=True),
    Flag("public_url", None,
         "This daemon's public URL, given as target_url in Docker Hub callbacks."),
    Flag("callback_hosts", ",".join(sorted(DOCKER_HUB_CALLBACK_HOSTS)),
         "Comma-separated hosts that Docker Hub callbacks may go to (https only).",
         empty_is_value=True),
    Flag("notify_url", None,
         "URL that gets a JSON report (what was deployed where) after each round."),
    Flag("github_secret", None, "Secret of GitHub package webhooks (X-Hub-Signature-256)",
         env=GITHUB_SECRET.env),
    Flag("github_secret_file", None, "Read the GitHub webhook secret from this file."),
    Flag("hostname", None, "Name of this host in reports", shown="the system's"),
    Flag("request_timeout", "10s",
         "A client that has not sent a whole request (headers and body) within this time is"
         " dropped."),
    Flag("pull_stall_timeout", "2m",
         "A pull that makes no progress (no answer, no progress message) for this long is"
         " cancelled and counts as failed."),
    Flag("max_unavailable", "1",
         "How many instances of one app (repo:tag) may be replaced at once across the fleet"
         " (0: no limit, all at once)."),
    Flag("min_ready", "5s",
         "A replacement without a HEALTHCHECK is ready once it has run this long."),
    Flag("ready_timeout", "5m",
         "A replacement that is not ready (healthy, or running for --min_ready) within this"
         " time is rolled back and the app's rollout paused."),
    Flag("replace", "stop",
         "How a stale container is replaced: stop (its supervisor restarts it on the new"
         " image) or recreate (re-created by the host from its configuration); a container's"
         " deployer.replace label wins."),
    Flag("label_enable", None,
         "Only touch containers labelled deployer.enable=true (without it, every container"
         " but those labelled deployer.enable=false).", switch=True),
)

_FLAGS = {flag.name: flag for flag in FLAGS}


# -- values ---------------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a Go duration (``5s``, ``1m30s``, ``24h0m0s``, ``250ms``) or a plain number;
    :class:`ConfigError` for anything else."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise ConfigError(f"a duration must be a finite number: {text!r}")
        if seconds < 0:
            raise ConfigError(f"a duration cannot be negative: {text!r}")
        return seconds
    if not value:
        raise ConfigError("empty duration")
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(value):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(value):
        raise ConfigError(
            f"invalid duration {text!r}: use a number of seconds or Go's form, e.g. 5s, 2m, 24h0m0s"
        )
    return total


def listen_endpoint(text: str) -> str:
    """A Twisted server endpoint description for ``--listen``.

    The Go forms ``:4500``, ``127.0.0.1:4500`` and ``[::1]:4500`` are translated; anything that
    already is an endpoint description (``tcp:4500:interface=127.0.0.1``, ``unix:/path``) is
    used as it is. The description is parsed (never listened on): a bad one is a
    :class:`ConfigError` now rather than a traceback at start.
    """
    text = text.strip()
    m = re.fullmatch(r"(?:(\[[0-9a-fA-F:.]+\])|([^:\[\]]*)):(\d+)", text)
    if m:
        host = (m.group(1) or m.group(2) or "").strip("[]")
        port = int(m.group(3))
        if not 0 <= port <= 65535:
            raise ConfigError(f"port out of range in {text!r}")
        description = (
            f"tcp:{port}:interface={host.replace(':', chr(92) + ':')}" if host else f"tcp:{port}"
        )
    elif re.fullmatch(r"\d+", text):
        description = f"tcp:{text}"
    elif re.match(r"^[a-z0-9]+:", text):
        description = text
    else:
        raise ConfigError(
            f"{text!r} is neither [IP]:port nor an endpoint like tcp:4500:interface=IP"
        )
    try:
        serverFromString(_PARSING_ONLY, description)
    except Exception as e:
        raise ConfigError(f"{text!r}: {e}") from e
    return description


def parse_etcd_nodes(value: str | None) -> tuple[str, ...]:
    """The etcd client URLs of ``--etcd_nodes``, in order; ``()`` (standalone) for none."""
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
            raise ConfigError(f"{raw!r} has a bad port: {e}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{raw!r} is not an http(s)://host:port URL")
        nodes.append(node)
    if not nodes:
        raise ConfigError("no node given")
    return tuple(nodes)


def parse_whole(text: str, minimum: int) -> int:
    """A whole number of at least ``minimum``."""
    try:
        number = int(text.strip())
    except ValueError as e:
        raise ConfigError(f"must be a whole number, not {text!r}") from e
    if number < minimum:
        raise ConfigError(f"must be at least {minimum}, not {number}")
    return number


def parse_prefix(text: str) -> str:
    prefix = "/" + text.strip("/")
    if prefix == "/":
        raise ConfigError("cannot be the root '/'")
    return prefix


_PATH = re.compile(r"(/[A-Za-z0-9._~!$&'()*+,;=@-]+)+/?")


def parse_path(text: str) -> str:
    if not _PATH.fullmatch(text):
        raise ConfigError(
            f"must be a path such as /api/dockerhub/webhook (letters, digits and"
            f" -._~!$&'()*+,;=@ between slashes): {text!r}"
        )
    return text


def parse_hosts(text: str) -> frozenset[str]:
    return frozenset(h.strip().lower() for h in text.split(",") if h.strip())


def _default(name: str) -> str:
    default = _FLAGS[name].default
    assert default is not None, name
    return default


def parse_replace_mode(text: str) -> ReplaceMode:
    try:
        return ReplaceMode(text.strip().lower())
    except ValueError:
        choices = " or ".join(mode.value for mode in ReplaceMode)
        raise ConfigError(f"{text!r} is not {choices}") from None


# -- the configuration ----------------------------------------------------------------------------


@attrs.frozen
class Config:
    """Every setting of one daemon, checked. The defaults are the flags' defaults."""

    docker: str = _default("docker")
    credentials: Credentials = attrs.field(factory=Credentials)
    etcd_nodes: tuple[str, ...] = ()
    etcd_prefix: str = parse_prefix(_default("etcd_prefix"))
    etcd_dial_timeout: float = parse_duration(_default("etcd_dial_timeout"))
    etcd_retry_delay: float = parse_duration(_default("etcd_retry_delay"))
    strong_consistency: bool = False
    kill_timeout: int = parse_whole(_default("kill_timeout"), 0)
    listen: str = listen_endpoint(_default("listen"))
    max_threads: int = parse_whole(_default("max_threads"), 1)
    registry: str = _default("registry")
    repull_period: float = parse_duration(_default("repull_period"))
    slack_username: str = _default("slack_username")
    slack_webhook_url: str | None = None
    webhook_path: str = parse_path(_default("webhook_path"))
    webhook_tokens: tuple[str, ...] = ()
    insecure_webhooks: bool = False
    public_url: str | None = None
    callback_hosts: frozenset[str] = parse_hosts(_default("callback_hosts"))
    notify_url: str | None = None
    github_secret: str | None = None
    hostname: str = attrs.field(factory=socket.gethostname)
    request_timeout: float = parse_duration(_default("request_timeout"))
    pull_stall_timeout: float = parse_duration(_default("pull_stall_timeout"))
    max_unavailable: int = parse_whole(_default("max_unavailable"), 0)
    min_ready: float = parse_duration(_default("min_ready"))
    ready_timeout: float = parse_duration(_default("ready_timeout"))
    replace: ReplaceMode = parse_replace_mode(_default("replace"))  # noqa: RUF009 - an enum member
    label_enable: bool = False

    @property
    def standalone(self) -> bool:
        return not self.etcd_nodes


def build_config(opts: Mapping[str, Any], environ: Mapping[str, str]) -> Config:
    """Check the options (flag name → value as given, or None) and turn them into a
    :class:`Config`; :class:`ConfigError` says what is wrong and how to put it right."""

    def given(name: str) -> str | None:
        flag = _FLAGS[name]
        value = opts.get(name)
        if value is not None and (value != "" or flag.empty_is_value):
            return str(value)
        if flag.env is not None and environ.get(flag.env):
            return environ[flag.env]
        return flag.default

    def parsed(name: str, parse: Callable[[str], _T]) -> _T:
        try:
            return parse(given(name) or "")
        except ConfigError as e:
            raise ConfigError(f"--{name}: {e}") from None

    def positive(name: str) -> float:
        seconds = parsed(name, parse_duration)
        if seconds <= 0:
            raise ConfigError(f"--{name} must be more than 0")
        return seconds

    docker = given("docker") or DEFAULT_DOCKER_URL
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

    token = load_secret(WEBHOOK_TOKEN, opts.get("webhook_token"),
                        opts.get("webhook_token_file"), environ)
    insecure = bool(opts.get("insecure_webhooks"))
    if not token and not insecure:
        raise ConfigError(TOKEN_HELP)

    public_url = given("public_url")
    if public_url and urlsplit(public_url).scheme not in ("http", "https"):
        raise ConfigError(f"--public_url {public_url!r} is not an http(s) URL")
    slack_url = given("slack_webhook_url")
    if slack_url:
        check_config_url(slack_url, "--slack_webhook_url")
    notify_url = given("notify_url")
    if notify_url:
        check_config_url(notify_url, "--notify_url")

    registry = given("registry") or DOCKER_HUB_KEY
    credentials = load_credentials(given("dockercfg"), registry, environ)

    return Config(
        docker=docker,
        credentials=credentials,
        etcd_nodes=parsed("etcd_nodes", parse_etcd_nodes),
        etcd_prefix=parsed("etcd_prefix", parse_prefix),
        etcd_dial_timeout=positive("etcd_dial_timeout"),
        etcd_retry_delay=positive("etcd_retry_delay"),
        strong_consistency=bool(opts.get("strong_consistency")),
        kill_timeout=parsed("kill_timeout", lambda text: parse_whole(text, 0)),
        listen=parsed("listen", listen_endpoint),
        max_threads=parsed("max_threads", lambda text: parse_whole(text, 1)),
        registry=registry,
        repull_period=parsed("repull_period", parse_duration),
        slack_username=given("slack_username") or "",
        slack_webhook_url=slack_url,
        webhook_path=parsed("webhook_path", parse_path),
        webhook_tokens=(token,) if token else (),
        insecure_webhooks=insecure,
        public_url=public_url,
        callback_hosts=parse_hosts(given("callback_hosts") or ""),
        notify_url=notify_url,
        github_secret=load_secret(GITHUB_SECRET, opts.get("github_secret"),
                                  opts.get("github_secret_file"), environ),
        hostname=given("hostname") or socket.gethostname(),
        request_timeout=positive("request_timeout"),
        pull_stall_timeout=positive("pull_stall_timeout"),
        max_unavailable=parsed("max_unavailable", lambda text: parse_whole(text, 0)),
        min_ready=parsed("min_ready", parse_duration),
        ready_timeout=positive("ready_timeout"),
        replace=parsed("replace", parse_replace_mode),
        label_enable=bool(opts.get("label_enable")),
    )

