"""The ``deployer`` command (or ``python -m deployer``): talk to a running deployer.

``deployer --help`` lists the commands, ``deployer COMMAND --help`` explains one:

- ``deployer trigger REPO[:TAG][@DIGEST]``: deploy a repository now, through the daemon's
  ``POST /api/deploy``; the daemon's JSON answer is printed.
- ``deployer status``: what every host runs, app x host, and each paused rollout
  (``GET /status``); ``--json`` prints the daemon's document itself.
- ``deployer resume APP``: end the paused rollout of ``APP`` (``repo:tag``) so that it goes on
  (``POST /api/resume``).

Exit status: 0 when the command did what it was asked (the daemon answered 2xx), 1 when it
failed (any other answer, no answer, an app that is not paused, an unexpected error), 2 for a
usage error (an unknown command, a bad option or value, a malformed APP). An error is one line
on stderr, never a traceback.

A command is a :class:`Command` in :data:`COMMANDS`: its name, a line of help, a function that
adds its arguments, and a function that checks them and returns the work to run on the
reactor. Commands that talk to the daemon share :class:`DaemonClient` and its options.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, NoReturn, TextIO
from urllib.parse import urlsplit

import attrs

from deployer import __version__
from deployer.auth import TOKEN_ENV, load_token
from deployer.errors import ConfigError
from deployer.reference import InvalidReference, Reference, parse_reference
from deployer.rollout.keys import app_name
from deployer.status_view import printable, render_table

DEFAULT_URL = "http://127.0.0.1:4500"
DEPLOY_PATH = "/api/deploy"
STATUS_PATH = "/status"
RESUME_PATH = "/api/resume"
EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
EXIT_CODES = (
    "exit status: 0 success, 1 failure (an error answer, no answer, an unexpected error),"
    " 2 usage error"
)


class UsageError(Exception):
    """A bad command line: exit status 2."""


class Failed(Exception):
    """The command could not do its work: exit status 1."""


@attrs.frozen
class Console:
    """Where a command writes: its result to ``out``, errors (one line each) to ``err``."""

    out: TextIO
    err: TextIO


# The work of a command, run on the reactor: returns the exit status.
Work = Callable[[Any], Awaitable[int]]


@attrs.frozen
class Command:
    name: str
    help: str
    description: str
    arguments: Callable[[argparse.ArgumentParser], None]
    prepare: Callable[[argparse.Namespace, Mapping[str, str], Console], Work]


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as :class:`UsageError` instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


# -- talking to the daemon --------------------------------------------------------------------


def daemon_options(parser: argparse.ArgumentParser) -> None:
    """``--url``, ``--token``, ``--token_file``, ``--timeout``: for commands that call the
    daemon (see :meth:`DaemonClient.from_args`)."""
    parser.add_argument(
        "--url", default=DEFAULT_URL, help=f"the deployer's base URL (default {DEFAULT_URL})"
    )
    parser.add_argument(
        "--token",
        help=f"the webhook token (visible to other users in the process list: prefer"
        f" ${TOKEN_ENV} or --token_file)",
    )
    parser.add_argument("--token_file", help="a file holding the webhook token")
    parser.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for the answer (default 30)"
    )


@attrs.frozen
class DaemonClient:
    """A running deployer at ``url``, called with ``token`` (when there is one)."""

    url: str
    token: str | None
    timeout: float

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: Mapping[str, str]) -> DaemonClient:
        """From the :func:`daemon_options`; raises :class:`UsageError`."""
        try:
            parts = urlsplit(args.url)
            parts.port  # noqa: B018 - raises on a bad port
        except ValueError as e:
            raise UsageError(f"--url {args.url!r} is not a URL: {e}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"--url {args.url!r} must be an http:// or https:// URL")
        try:
            token = load_token(args.token, args.token_file, environ)
        except ConfigError as e:
            raise UsageError(str(e)) from None
        if not (math.isfinite(args.timeout) and args.timeout > 0):
            raise UsageError("--timeout must be a positive number of seconds")
        return cls(args.url.rstrip("/"), token, args.timeout)

    async def request(
        self, reactor: Any, method: str, path: str, payload: Any = None
    ) -> tuple[int, bytes]:
        """``(status, body)`` of ``METHOD url+path`` (``payload`` sent as JSON); raises
        :class:`Failed` when there is no answer within the timeout.

        ``reactor`` provides IReactorTCP, IReactorTime (and IReactorSSL for https).
        """
        # Twisted and treq are imported only here: usage errors are reported without that delay.
        from treq.client import HTTPClient
        from twisted.web.client import Agent, HTTPConnectionPool
        from twisted.web.http_headers import Headers

        url = self.url + path
        pool = HTTPConnectionPool(reactor, persistent=False)
        http = HTTPClient(Agent(reactor, pool=pool))
        headers = Headers({b"Accept": [b"application/json"]})
        if self.token:
            headers.addRawHeader(b"Authorization", f"Bearer {self.token}".encode())
        kwargs: dict[str, Any] = {} if payload is None else {"json": payload}
        try:
            response = await http.request(
                method, url, headers=headers, allow_redirects=False, **kwargs
            ).addTimeout(self.timeout, reactor, self._timed_out)
            body = await response.content().addTimeout(self.timeout, reactor, self._timed_out)
        except Exception as e:
            raise Failed(f"no answer from {url}: {e}") from None
        finally:
            await pool.closeCachedConnections()
        return response.code, body

    def _timed_out(self, result: object, timeout: float) -> NoReturn:
        raise TimeoutError(f"none within {timeout:g} s")


def answer_error(body: bytes) -> str:
    """The reason in an error answer: its JSON ``error``, else the start of its text (one
    line)."""
    try:
        answer: Any = json.loads(body)
    except ValueError:
        answer = None
    if isinstance(answer, dict) and isinstance(answer.get("error"), str):
        return printable(answer["error"])
    return printable(body[:200].decode("utf-8", "replace").strip()) or "no reason given"


def print_answer(body: bytes, out: TextIO) -> None:
    """The daemon's answer: indented JSON, or the text as it came."""
    try:
        answer: Any = json.loads(body)
    except ValueError:
        out.write(body.decode("utf-8", "replace"))
        if body and not body.endswith(b"\n"):
            out.write("\n")
        return
    out.write(json.dumps(answer, indent=2, sort_keys=True) + "\n")


# -- trigger ------------------------------------------------------------------------------------


def parse_trigger_reference(text: str) -> Reference:
    if text.startswith("*"):
        raise UsageError("'*' (every image) cannot be triggered; name a repository")
    if not (text.isascii() and text.isprintable()) or " " in text:
        raise UsageError(
            f"invalid reference {text!r}: whitespace, control or non-ASCII characters"
        )
    try:
        return parse_reference(text)
    except InvalidReference as e:
        raise UsageError(f"invalid reference {text!r}: {e}") from None


def _trigger_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("reference", metavar="REPO[:TAG][@DIGEST]")
    daemon_options(parser)


def _trigger(args: argparse.Namespace, environ: Mapping[str, str], console: Console) -> Work:
    ref = parse_trigger_reference(args.reference)
    daemon = DaemonClient.from_args(args, environ)

    async def work(reactor: Any) -> int:
        payload = {"repository": ref.name, "tag": ref.tag, "digest": ref.digest}
        code, body = await daemon.request(reactor, "POST", DEPLOY_PATH, payload)
        print_answer(body, console.out)
        if 200 <= code < 300:
            return EXIT_OK
        raise Failed(f"{daemon.url}{DEPLOY_PATH} answered HTTP {code}")

    return work


TRIGGER = Command(
    name="trigger",
    help="ask a running deployer to deploy REPO[:TAG][@DIGEST] now",
    description="Ask a running deployer to pull REPO (every local tag of it, or only TAG)"
    " and restart the containers that run an outdated image (POST /api/deploy).",
    arguments=_trigger_arguments,
    prepare=_trigger,
)

# -- status -------------------------------------------------------------------------------------


def _status_arguments(parser: argparse.ArgumentParser) -> None:
    daemon_options(parser)
    parser.add_argument("--json", action="store_true",
                        help="print the daemon's JSON document instead of the table")


def _status(args: argparse.Namespace, environ: Mapping[str, str], console: Console) -> Work:
    daemon = DaemonClient.from_args(args, environ)

    async def work(reactor: Any) -> int:
        url = daemon.url + STATUS_PATH
        code, body = await daemon.request(reactor, "GET", STATUS_PATH)
        if code != 200:
            raise Failed(f"{url} answered HTTP {code}: {answer_error(body)}")
        try:
            document = json.loads(body)
            table = render_table(document)
        except ValueError as e:
            raise Failed(f"{url} answered with no status document ({e})") from None
        if args.json:
            console.out.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
        else:
            console.out.write(table)
        return EXIT_OK

    return work


STATUS = Command(
    name="status",
    help="show what every host runs, app x host, and the paused rollouts",
    description="Show what every host runs (GET /status): per app and host the image (the"
    " first 12 hex digits of its id, as docker ps shows it), its digest, health, containers"
    " and the last round, then a PAUSED line for each paused rollout and who is replacing or"
    " waiting in each rollout under way.",
    arguments=_status_arguments,
    prepare=_status,
)


# -- resume -------------------------------------------------------------------------------------


def _resume_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("app", metavar="APP", help="the app whose rollout is paused: repo:tag")
    daemon_options(parser)


def _resume(args: argparse.Namespace, environ: Mapping[str, str], console: Console) -> Work:
    if not (args.app.isascii() and args.app.isprintable()) or " " in args.app:
        raise UsageError(f"invalid app {args.app!r}: whitespace, control or non-ASCII characters")
    try:
        app = app_name(args.app)
    except InvalidReference as e:
        raise UsageError(f"invalid app {args.app!r}: {e}") from None
    daemon = DaemonClient.from_args(args, environ)

    async def work(reactor: Any) -> int:
        code, body = await daemon.request(reactor, "POST", RESUME_PATH, {"app": app})
        if code == 200:
            console.out.write(f"resumed {app}\n")
            return EXIT_OK
        reason = answer_error(body)
        if code == 404 and reason.endswith("is not paused"):
            raise Failed(f"{reason}: nothing changed")
        raise Failed(f"{daemon.url}{RESUME_PATH} answered HTTP {code}: {reason}")

    return work


RESUME = Command(
    name="resume",
    help="end the paused rollout of APP (repo:tag)",
    description="End the paused rollout of APP (repo:tag, e.g. myorg/app:qa) after a bad"
    " build stopped it (POST /api/resume, which deletes its pause): hosts go on replacing"
    " their containers of APP. Fails, changing nothing, when APP is not paused.",
    arguments=_resume_arguments,
    prepare=_resume,
)

COMMANDS: tuple[Command, ...] = (TRIGGER, STATUS, RESUME)


# -- the command line ---------------------------------------------------------------------------


def build_parser(commands: Sequence[Command] = COMMANDS) -> argparse.ArgumentParser:
    parser = _Parser(
        prog="deployer",
        description="Continuous deployment for fleets of plain Docker hosts: talk to a running"
        " deployer. (The daemon itself is `twistd deployer`.)",
        epilog=EXIT_CODES,
    )
    parser.add_argument("--version", action="version", version=f"deployer {__version__}")
    sub = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=_Parser,
        title="commands", help=f"one of: {', '.join(c.name for c in commands)}",
    )
    for command in commands:
        command_parser = sub.add_parser(
            command.name, help=command.help, description=command.description, epilog=EXIT_CODES
        )
        command_parser.set_defaults(command_object=command, command_prog=command_parser.prog)
        command.arguments(command_parser)
    return parser


def _prog(argv: Sequence[str], commands: Sequence[Command]) -> str:
    """``deployer COMMAND`` when the command line names one, for error lines."""
    names = {c.name for c in commands}
    for arg in argv:
        if arg in names:
            return f"deployer {arg}"
        if not arg.startswith("-"):
            break
    return "deployer"


async def guarded(work: Work, reactor: Any, prog: str, err: TextIO) -> int:
    """Run ``work``: :class:`Failed` and any unexpected exception become one line and 1."""
    try:
        return await work(reactor)
    except Failed as e:
        err.write(f"{prog}: {e}\n")
    except Exception as e:
        err.write(f"{prog}: unexpected error: {type(e).__name__}: {e}\n")
    return EXIT_FAILURE


def run_on_reactor(work: Work, prog: str, err: TextIO) -> int:
    """Run ``work`` on the global reactor (which is then stopped); its exit status."""
    from twisted.internet.defer import Deferred
    from twisted.internet.task import react

    codes: list[int] = []

    async def body(reactor: Any) -> None:
        codes.append(await guarded(work, reactor, prog, err))

    try:
        react(lambda reactor: Deferred.fromCoroutine(body(reactor)))
    except SystemExit:
        pass  # react() always exits; the status is the work's
    return codes[0] if codes else EXIT_FAILURE


def run(
    argv: Sequence[str],
    environ: Mapping[str, str],
    console: Console,
    commands: Sequence[Command] = COMMANDS,
    runner: Callable[[Work, str, TextIO], int] = run_on_reactor,
) -> int:
    """The ``deployer`` command line ``argv``; returns the exit status (``--help`` and
    ``--version`` exit 0 through SystemExit, as argparse does)."""
    prog = _prog(argv, commands)
    try:
        args = build_parser(commands).parse_args(list(argv))
        prog = args.command_prog
        work = args.command_object.prepare(args, environ, console)
    except UsageError as e:
        console.err.write(f"{prog}: {e} (see: {prog} --help)\n")
        return EXIT_USAGE
    except Exception as e:
        console.err.write(f"{prog}: unexpected error: {type(e).__name__}: {e}\n")
        return EXIT_FAILURE
    return runner(work, prog, console.err)


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> NoReturn:
    """The ``deployer`` console script."""
    try:
        code = run(
            sys.argv[1:] if argv is None else argv,
            os.environ if environ is None else environ,
            Console(sys.stdout, sys.stderr),
        )
    except KeyboardInterrupt:
        sys.stderr.write("deployer: interrupted\n")
        code = 130
    raise SystemExit(code)


if __name__ == "__main__":
    main()
