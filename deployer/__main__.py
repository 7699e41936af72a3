"""``deployer trigger REPO[:TAG][@DIGEST]`` (or ``python -m deployer trigger ...``): ask a running
deployer to deploy a repository now, through its ``POST /api/deploy``.

Exit status: 0 when the daemon answered 2xx, 1 for any other answer or no answer, 2 for a usage
error (a bad reference, URL or token option). The daemon's JSON answer is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn, TextIO
from urllib.parse import urlsplit

from deployer import __version__
from deployer.auth import TOKEN_ENV, load_token
from deployer.errors import ConfigError
from deployer.reference import InvalidReference, Reference, parse_reference

DEFAULT_URL = "http://127.0.0.1:4500"
DEPLOY_PATH = "/api/deploy"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deployer", description="Continuous deployment for fleets of plain Docker hosts."
    )
    parser.add_argument("--version", action="version", version=f"deployer {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    trigger = commands.add_parser(
        "trigger",
        help="ask a running deployer to deploy REPO[:TAG][@DIGEST] now",
        description="Ask a running deployer to pull REPO (every local tag of it, or only TAG)"
        " and restart the containers that run an outdated image.",
    )
    trigger.set_defaults(command_parser=trigger)
    trigger.add_argument("reference", metavar="REPO[:TAG][@DIGEST]")
    trigger.add_argument(
        "--url", default=DEFAULT_URL, help=f"the deployer's base URL (default {DEFAULT_URL})"
    )
    trigger.add_argument(
        "--token",
        help=f"the webhook token (visible to other users in the process list: prefer"
        f" ${TOKEN_ENV} or --token_file)",
    )
    trigger.add_argument("--token_file", help="a file holding the webhook token")
    trigger.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for the answer (default 30)"
    )
    return parser


def _reference(parser: argparse.ArgumentParser, text: str) -> Reference:
    if text.startswith("*"):
        parser.error("'*' (every image) cannot be triggered; name a repository")
    if not (text.isascii() and text.isprintable()) or " " in text:
        parser.error(f"invalid reference {text!r}: whitespace, control or non-ASCII characters")
    try:
        return parse_reference(text)
    except InvalidReference as e:
        parser.error(f"invalid reference {text!r}: {e}")


def _endpoint(parser: argparse.ArgumentParser, base: str) -> str:
    try:
        parts = urlsplit(base)
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as e:
        parser.error(f"--url {base!r} is not a URL: {e}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        parser.error(f"--url {base!r} must be an http:// or https:// URL")
    return base.rstrip("/") + DEPLOY_PATH


def _print_answer(code: int, body: bytes, out: TextIO) -> None:
    try:
        answer: Any = json.loads(body)
    except ValueError:
        out.write(body.decode("utf-8", "replace"))
        if body and not body.endswith(b"\n"):
            out.write("\n")
        return
    out.write(json.dumps(answer, indent=2, sort_keys=True) + "\n")


def _timed_out(result: object, timeout: float) -> NoReturn:
    raise TimeoutError(f"none within {timeout:g} s")


async def trigger(
    reactor: Any,
    url: str,
    ref: Reference,
    token: str | None,
    timeout: float,
    out: TextIO,
    err: TextIO,
) -> int:
    """POST the deploy request to ``url`` and print the answer; returns the exit status.

    ``reactor`` provides IReactorTCP, IReactorTime (and IReactorSSL for https).
    """
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool
    from twisted.web.http_headers import Headers

    pool = HTTPConnectionPool(reactor, persistent=False)
    http = HTTPClient(Agent(reactor, pool=pool))
    headers = Headers({b"Authorization": [f"Bearer {token}".encode()]} if token else {})
    payload = {"repository": ref.name, "tag": ref.tag, "digest": ref.digest}
    try:
        response = await http.post(
            url, json=payload, headers=headers, allow_redirects=False
        ).addTimeout(timeout, reactor, _timed_out)
        body = await response.content().addTimeout(timeout, reactor, _timed_out)
    except Exception as e:
        err.write(f"deployer trigger: no answer from {url}: {e}\n")
        return 1
    finally:
        await pool.closeCachedConnections()
    _print_answer(response.code, body, out)
    if 200 <= response.code < 300:
        return 0
    err.write(f"deployer trigger: {url} answered HTTP {response.code}\n")
    return 1


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> NoReturn:
    """The ``deployer`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    parser = args.command_parser
    environ = os.environ if environ is None else environ
    ref = _reference(parser, args.reference)
    url = _endpoint(parser, args.url)
    try:
        token = load_token(args.token, args.token_file, environ)
    except ConfigError as e:
        parser.error(str(e))
    if args.timeout <= 0:
        parser.error("--timeout must be positive")

    # Twisted and treq are imported only now: usage errors are reported without that delay.
    from twisted.internet.task import react

    async def run(reactor: Any) -> None:
        code = await trigger(reactor, url, ref, token, args.timeout, sys.stdout, sys.stderr)
        if code:
            raise SystemExit(code)

    react(run)


if __name__ == "__main__":
    main()
