"""``twistd deployer``: the command-line options and the service they build.

Every flag of the Go original keeps its name and default (``--etcd_nodes``); the dashed spelling
(``--etcd-nodes``) and the Go style with one dash (``-etcd_nodes=...``) work too.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from deployer.config import Config, build_config
from deployer.errors import ConfigError

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in a Go duration (``5s``, ``1m30s``, ``24h0m0s``, ``250ms``) or a plain number."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(seconds):
            raise usage.UsageError(f"a duration must be a finite number: {text!r}")
        if seconds < 0:
            raise usage.UsageError(f"a duration cannot be negative: {text!r}")
        return seconds
    if not value:
        raise usage.UsageError("empty duration")
    pos, total = 0, 0.0
    for m in _DURATION_PART.finditer(value):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if pos != len(value):
        raise usage.UsageError(
            f"invalid duration {text!r}: use a number of seconds or Go's form, e.g. 5s, 2m, 24h0m0s"
        )
    return total


def listen_endpoint(text: str) -> str:
    """A Twisted server endpoint description for ``--listen``.

    The Go forms ``:4500``, ``127.0.0.1:4500`` and ``[::1]:4500`` are translated; anything that
    already is an endpoint description (``tcp:4500:interface=127.0.0.1``, ``unix:/path``) is
    used as it is.
    """
    text = text.strip()
    m = re.fullmatch(r"(?:(\[[0-9a-fA-F:.]+\])|([^:\[\]]*)):(\d+)", text)
    if m:
        host = (m.group(1) or m.group(2) or "").strip("[]")
        port = int(m.group(3))
        if not 0 <= port <= 65535:
            raise usage.UsageError(f"--listen: port out of range in {text!r}")
        if not host:
            return f"tcp:{port}"
        return f"tcp:{port}:interface={host.replace(':', chr(92) + ':')}"
    if re.fullmatch(r"\d+", text):
        return f"tcp:{text}"
    if re.match(r"^[a-z0-9]+:", text):
        return text
    raise usage.UsageError(
        f"--listen: {text!r} is neither [IP]:port nor an endpoint like tcp:4500:interface=IP"
    )


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Continuous deployment for plain Docker hosts: takes registry webhooks, records them in"
        " etcd (or, without --etcd_nodes, acts on this host alone), pulls the new images and"
        " stops the containers they make outdated so that their supervisor restarts them."
    )

    optParameters: list[list[Any]] = [
        # The Go original's flags, with its names and defaults.
        ["docker", None, None,
         "Docker endpoint to connect to: unix:///path or tcp://host:port"
         " [default: $DOCKER_HOST, else unix:///var/run/docker.sock]"],
        ["dockercfg", None, None,
         "Path to .dockercfg authentication information [default: ~/.dockercfg if it exists;"
         " ~/.docker/config.json is read too]"],
        ["etcd_dial_timeout", None, "5s", "How long to wait to connect to etcd nodes."],
        ["etcd_nodes", None, None,
         "Comma-separated list of etcd nodes to connect to (e.g. http://127.0.0.1:2379)."
         " Not given: standalone mode, a webhook updates this host only."],
        ["etcd_prefix", None, "/deployer", "Path prefix for etcd nodes."],
        ["etcd_retry_delay", None, "2s", "How long to wait between request retries."],
        ["kill_timeout", None, "10", "Container stop timeout, before hard kill (in seconds)."],
        ["listen", None, ":4500",
         "[IP]:port to listen for incoming connections, or a Twisted endpoint description."],
        ["max_threads", None, "4", "Maximum number of concurrent image pulls."],
        ["registry", None, "https://index.docker.io/v1/",
         "URL of docker registry (the credentials key for images that name no registry)."],
        ["repull_period", None, "24h0m0s",
         "How frequently to re-pull all images, without any notification (0 turns it off)."],
        ["slack_username", None, "Deployer", "Username to show in slack."],
        ["slack_webhook_url", None, None,
         "Slack incoming webhook url (optional) [default: $SLACK_WEBHOOK_URL]"],
        ["webhook_path", None, "/api/dockerhub/webhook", "Path to webhook from Docker Hub."],
        # New in deployer.
        ["webhook_token", None, None,
         "Token every webhook must carry (Authorization: Bearer TOKEN or ?token=TOKEN)"
         " [default: $DEPLOYER_WEBHOOK_TOKEN]"],
        ["webhook_token_file", None, None, "Read the webhook token from this file."],
        ["public_url", None, None,
         "This daemon's public URL, given as target_url in Docker Hub callbacks."],
        ["callback_hosts", None, "registry.hub.docker.com",
         "Comma-separated hosts that Docker Hub callbacks may go to (https only)."],
        ["notify_url", None, None,
         "URL that gets a JSON report (what was deployed where) after each round."],
        ["github_secret", None, None,
         "Secret of GitHub package webhooks (X-Hub-Signature-256)"
         " [default: $DEPLOYER_GITHUB_SECRET]"],
        ["github_secret_file", None, None, "Read the GitHub webhook secret from this file."],
        ["hostname", None, None, "Name of this host in reports [default: the system's]."],
    ]
    optFlags: list[list[Any]] = [
        ["strong_consistency", None, "Set etcd consistency level as strong (linearizable reads)."],
        ["insecure_webhooks", None,
         "Accept webhooks without a token (only on a trusted network)."],
    ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.environ = dict(os.environ if environ is None else environ)
        self.config: Config | None = None

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        import sys

        args = list(sys.argv[1:] if options is None else options)
        super().parseOptions(self.normalize(args))

    def normalize(self, args: Sequence[str]) -> list[str]:
        """Accept ``-name``, ``-name=value``, ``--name-with-dashes``; leave values alone."""
        params = {p[0] for p in self.optParameters}
        flags = {f[0] for f in self.optFlags} | {"help", "version"}
        out: list[str] = []
        it = iter(args)
        for arg in it:
            if arg == "--":
                out.append(arg)
                out.extend(it)
                break
            if not arg.startswith("-") or arg == "-":
                out.append(arg)
                continue
            name, eq, value = arg.lstrip("-").partition("=")
            key = name.replace("-", "_")
            if key in params:
                out.append(f"--{key}={value}" if eq else f"--{key}")
                if not eq:
                    nxt = next(it, None)
                    if nxt is not None:
                        out.append(nxt)
            elif key in flags and not eq:
                out.append(f"--{key}")
            elif key in flags and eq:
                if value.lower() in ("true", "1", "t"):
                    out.append(f"--{key}")
                elif value.lower() not in ("false", "0", "f"):
                    raise usage.UsageError(f"--{key} takes no value, or true/false: {arg!r}")
            else:
                out.append(arg)
        return out

    def postOptions(self) -> None:
        try:
            self.config = build_config(self, self.environ)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from e


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from deployer.service import make_service

    assert options.config is not None
    return make_service(options.config, reactor)
