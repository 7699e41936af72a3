"""``deployer status`` and ``deployer resume``: against the daemon's own front door (the
WebhookApp with fleet-mode rollout parts over an in-memory etcd) on a loopback port, in this
process; the installed command as a process at the end."""

from __future__ import annotations

import io
import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

from deployer.__main__ import Console, Work, guarded, run
from deployer.auth import TokenAuth
from deployer.rollout import wiring
from deployer.rollout.gateway import KV_PUT, b64
from deployer.rollout.keys import RolloutKeys
from deployer.rollout.pause import PauseRecord
from deployer.rollout.status import AppState, HostState
from deployer.rollout.testing import Link
from deployer.testing.fake_etcd import FakeEtcd
from deployer.webhook import WebhookApp
from tests.helpers import fired
from tests.test_status_api import ETCD_DOWN
from tests.test_status_view import RECORDED, TABLE

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "tok-status-cli"
PREFIX = "/deployer"
KEYS = RolloutKeys(PREFIX)
APP = "myorg/app:qa"
NOW = 1_700_000_000.0
ID_GOOD = "sha256:" + "0123456789abcdef" * 4
ID_BAD = "sha256:" + "fedcba9876543210" * 4
DIGEST_BAD = "sha256:" + "bb" * 32


class Counting(Resource):
    """The daemon's resource, counting the requests that reach it."""

    isLeaf = True

    def __init__(self, inner: IResource) -> None:
        super().__init__()
        self.inner = inner
        self.requests: list[tuple[bytes, bytes, list[bytes] | None]] = []

    def render(self, request: Any) -> Any:
        self.requests.append((request.method, request.uri,
                              request.requestHeaders.getRawHeaders(b"accept")))
        return self.inner.render(request)


class Recorded(Resource):
    """Answers every request with a fixed status and body."""

    isLeaf = True

    def __init__(self, code: int, body: bytes) -> None:
        super().__init__()
        self.code = code
        self.body = body
        self.authorization: list[list[bytes] | None] = []

    def render(self, request: Any) -> bytes:
        self.authorization.append(request.requestHeaders.getRawHeaders(b"authorization"))
        request.setResponseCode(self.code)
        request.setHeader(b"content-type", b"application/json")
        return self.body


@attrs.define
class Daemon:
    """A daemon's front door on 127.0.0.1, with fleet rollout parts over an in-memory etcd."""

    url: str
    etcd: FakeEtcd
    link: Link
    rollouts: wiring.Rollouts
    resource: Counting

    def pause(self, app: str = APP, reason: str = "unhealthy: health check failed") -> None:
        record = PauseRecord(app, ID_BAD, DIGEST_BAD, "host-b", reason, NOW - 30)
        assert fired(self.rollouts.pauses.pause(record))

    def writes(self) -> tuple[int, list[str]]:
        return self.etcd.revision, self.etcd.keys()


def listen(resource: IResource) -> tuple[str, Any]:
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    return f"http://127.0.0.1:{port.getHost().port}", port


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    clock = Clock()
    clock.advance(NOW)
    etcd = FakeEtcd(clock, progress_interval=None)
    link = Link(etcd, clock)
    rollouts = wiring.fleet(link.etcd, clock, prefix=PREFIX, hostname="host-a")
    fired(rollouts.publish({}))  # no lease yet: nothing is written
    app = WebhookApp(clock=clock, sink=None, health=None,  # type: ignore[arg-type]
                     auth=TokenAuth([TOKEN]), rollouts=rollouts)
    resource = Counting(app.resource())
    url, port = listen(resource)
    state = HostState("host-a", NOW - 1, {APP: AppState(ID_GOOD, None, ("app",), "healthy",
                                                        NOW - 5, "ok")})
    fired(link.etcd.request(KV_PUT, {"key": b64(KEYS.host("host-a")),
                                "value": b64(json.dumps(state.to_json()))}))
    try:
        yield Daemon(url, etcd, link, rollouts, resource)
    finally:
        pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def recorded() -> Iterator[Any]:
    ports = []

    def serve(code: int, body: bytes) -> tuple[str, Recorded]:
        resource = Recorded(code, body)
        url, port = listen(resource)
        ports.append(port)
        return url, resource

    yield serve
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


async def cli(*argv: str, env: dict[str, str] | None = None,
              token: bool = True) -> tuple[int, str, str]:
    """``deployer ARGV`` in this process, on the running reactor: (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    works: list[tuple[Work, str]] = []

    def runner(work: Work, prog: str, _: TextIO) -> int:
        works.append((work, prog))
        return -1

    environ = {"DEPLOYER_WEBHOOK_TOKEN": TOKEN} if token else {}
    code = run(list(argv), {**environ, **(env or {})}, Console(out, err), runner=runner)
    if works:
        work, prog = works[0]
        code = await guarded(work, reactor, prog, err)
    return code, out.getvalue(), err.getvalue()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- deployer status --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_status_prints_the_table_of_a_recorded_document(recorded: Any) -> None:
    url, resource = recorded(200, json.dumps(RECORDED).encode())
    assert await cli("status", "--url", url) == (0, TABLE, "")
    assert resource.authorization == [[f"Bearer {TOKEN}".encode()]]


@pytest_twisted.ensureDeferred
async def test_status_json_prints_the_document(recorded: Any) -> None:
    url, _ = recorded(200, json.dumps(RECORDED).encode())
    code, out, err = await cli("status", "--json", "--url", url)
    assert (code, err) == (0, "")
    assert json.loads(out) == RECORDED


@pytest_twisted.ensureDeferred
async def test_status_of_a_paused_app(daemon: Daemon) -> None:
    daemon.pause(reason="unhealthy: health check failed 3 times")
    code, out, err = await cli("status", "--url", daemon.url)
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "APP           HOST    IMAGE         DIGEST  HEALTH   CONTAINERS  LAST ROUND",
        "myorg/app:qa  host-a  0123456789ab  -       healthy  app         2023-11-14 22:13:15"
        " UTC ok",
        "",
        "myorg/app:qa PAUSED: unhealthy: health check failed 3 times (bad image fedcba987654,"
        " digest sha256:bbbbbbbbbbbb, host host-b, since 2023-11-14 22:12:50 UTC)",
    ]
    assert daemon.resource.requests == [(b"GET", b"/status", [b"application/json"])]


@pytest_twisted.ensureDeferred
async def test_status_errors_are_one_line(daemon: Daemon, recorded: Any) -> None:
    status_url = daemon.url + "/status"
    assert await cli("status", "--url", daemon.url, token=False) == (
        1, "", f"deployer status: {status_url} answered HTTP 401: missing token\n")
    daemon.link.cut = True
    assert await cli("status", "--url", daemon.url) == (
        1, "", f"deployer status: {status_url} answered HTTP 503: "
        + ETCD_DOWN.format(path="/v3/kv/range") + "\n")
    url, _ = recorded(200, b"<html>not json</html>")
    code, out, err = await cli("status", "--url", url)
    assert (code, out) == (1, "")
    assert err.startswith(f"deployer status: {url}/status answered with no status document")
    assert err.count("\n") == 1
    url, _ = recorded(200, b'{"hosts": {}}')
    assert (await cli("status", "--url", url))[2] == (
        f"deployer status: {url}/status answered with no status document (no apps object)\n")
    url, _ = recorded(500, b"Internal error,\nnot JSON")
    assert (await cli("status", "--url", url))[2] == (
        f"deployer status: {url}/status answered HTTP 500: Internal error,\\nnot JSON\n")
    port = closed_port()
    code, out, err = await cli("status", "--url", f"http://127.0.0.1:{port}")
    assert (code, out) == (1, "")
    assert err.startswith(f"deployer status: no answer from http://127.0.0.1:{port}/status: ")
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest_twisted.ensureDeferred
async def test_status_usage_errors_exit_2() -> None:
    assert await cli("status", "--url", "ftp://x") == (
        2, "", "deployer status: --url 'ftp://x' must be an http:// or https:// URL"
        " (see: deployer status --help)\n")
    assert await cli("status", "extra") == (
        2, "", "deployer status: unrecognized arguments: extra (see: deployer status --help)\n")


# -- deployer resume ---------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_resume_a_paused_app(daemon: Daemon) -> None:
    daemon.pause()
    assert await cli("resume", APP, "--url", daemon.url) == (0, f"resumed {APP}\n", "")
    assert KEYS.paused(APP) not in daemon.etcd.keys()
    assert (await cli("status", "--url", daemon.url))[1].count("PAUSED") == 0


@pytest_twisted.ensureDeferred
async def test_resume_of_an_app_that_is_not_paused_exits_1(daemon: Daemon) -> None:
    daemon.pause("myorg/other:qa")
    before = daemon.writes()
    for app in (APP, "unknown/app:v1", "docker.io/library/busybox:latest"):
        shown = app.removeprefix("docker.io/library/")
        assert await cli("resume", app, "--url", daemon.url) == (
            1, "", f"deployer resume: {shown} is not paused: nothing changed\n")
    assert daemon.writes() == before


@pytest_twisted.ensureDeferred
async def test_resume_when_etcd_is_down_exits_1(daemon: Daemon) -> None:
    daemon.pause()
    daemon.link.cut = True
    assert await cli("resume", APP, "--url", daemon.url) == (
        1, "", f"deployer resume: {daemon.url}/api/resume answered HTTP 503: "
        + ETCD_DOWN.format(path="/v3/kv/txn") + "\n")
    daemon.link.cut = False
    assert KEYS.paused(APP) in daemon.etcd.keys()


@pytest_twisted.ensureDeferred
async def test_resume_without_the_token_exits_1(daemon: Daemon, tmp_path: Path) -> None:
    daemon.pause()
    assert await cli("resume", APP, "--url", daemon.url, token=False) == (
        1, "", f"deployer resume: {daemon.url}/api/resume answered HTTP 401: missing token\n")
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token\n")
    assert (await cli("resume", APP, "--url", daemon.url, "--token_file", str(wrong),
                      token=False))[2].endswith("answered HTTP 401: invalid token\n")
    right = tmp_path / "right"
    right.write_text(TOKEN + "\n")
    assert (await cli("resume", APP, "--url", daemon.url, "--token_file", str(right),
                      token=False))[0] == 0


@pytest.mark.parametrize(
    ("app", "message"),
    [
        ("myorg/app", "invalid app 'myorg/app': 'myorg/app' names no tag: an app is repo:tag"),
        (f"myorg/app:qa@{DIGEST_BAD}", "carries a digest: an app is repo:tag"),
        ("myorg/App:qa", "invalid app 'myorg/App:qa': invalid repository name"),
        ("my app:qa", "invalid app 'my app:qa': whitespace, control or non-ASCII characters"),
        ("caf\u00e9:1", "whitespace, control or non-ASCII characters"),
        ("", "invalid app ''"),
        ("*", "invalid app '*'"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_malformed_app_is_refused_before_sending(daemon: Daemon, app: str,
                                                         message: str) -> None:
    daemon.pause()
    code, out, err = await cli("resume", app, "--url", daemon.url)
    assert (code, out) == (2, "")
    assert err.startswith("deployer resume: ") and message in err
    assert err.endswith(" (see: deployer resume --help)\n") and err.count("\n") == 1
    assert daemon.resource.requests == []


@pytest_twisted.ensureDeferred
async def test_resume_usage_errors_exit_2() -> None:
    assert await cli("resume") == (
        2, "", "deployer resume: the following arguments are required: APP"
        " (see: deployer resume --help)\n")
    assert (await cli("resume", APP, "--timeout", "0"))[0] == 2
    assert (await cli("resume", APP, "--token", "a", "--token_file", "/dev/null"))[0] == 2


# -- the installed command -------------------------------------------------------------------


def command(*args: str, env: dict[str, str] | None = None) -> Deferred[tuple[int, str, str]]:
    environ = {k: v for k, v in os.environ.items() if k != "DEPLOYER_WEBHOOK_TOKEN"}
    environ.update(env or {})
    d = getProcessOutputAndValue(sys.executable, ["-m", "deployer", *args], env=environ,
                                 path=str(ROOT))
    return d.addCallback(lambda r: (r[2], r[0].decode(), r[1].decode()))


@pytest_twisted.ensureDeferred
async def test_the_commands_as_processes(daemon: Daemon) -> None:
    daemon.pause()
    env = {"DEPLOYER_WEBHOOK_TOKEN": TOKEN, "PYTHONPATH": str(ROOT)}
    code, out, err = await command("status", "--url", daemon.url, env=env)
    assert (code, err) == (0, "")
    assert f"{APP} PAUSED: unhealthy: health check failed (bad image fedcba987654," in out
    assert await command("resume", APP, "--url", daemon.url, env=env) == (
        0, f"resumed {APP}\n", "")
    assert await command("resume", APP, "--url", daemon.url, env=env) == (
        1, "", f"deployer resume: {APP} is not paused: nothing changed\n")
    assert await command("resume", "nope", "--url", daemon.url, env=env) == (
        2, "", "deployer resume: invalid app 'nope': 'nope' names no tag: an app is repo:tag"
        " (see: deployer resume --help)\n")
