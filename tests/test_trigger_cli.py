"""``python -m deployer trigger``, run as a real process against a real HTTP server here."""

from __future__ import annotations

import json
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from deployer.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
DIGEST = "sha256:" + "0123456789abcdef" * 4


@attrs.define
class Received:
    path: bytes
    authorization: list[bytes] | None
    content_type: list[bytes] | None
    body: Any


class FakeDeployer(Resource):
    """``POST <anything>/api/deploy``: records the request and answers according to the
    repository asked for (``answer/<code>`` gives that status; ``answer/silent`` none)."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.received: list[Received] = []
        self.pending: list[Any] = []

    def render_POST(self, request: Any) -> Any:
        body = json.loads(request.content.read())
        self.received.append(
            Received(
                request.path,
                request.requestHeaders.getRawHeaders(b"authorization"),
                request.requestHeaders.getRawHeaders(b"content-type"),
                body,
            )
        )
        repository = body.get("repository", "")
        if repository == "answer/silent":
            self.pending.append(request)
            return NOT_DONE_YET
        if repository == "answer/500":
            request.setResponseCode(500)
            return b"Internal error, not JSON"
        if repository == "answer/401":
            request.setResponseCode(401)
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"error": "invalid token"}).encode()
        request.setResponseCode(202)
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"accepted": [body]}).encode()


@pytest.fixture
def deployer_url() -> Iterator[tuple[str, FakeDeployer]]:
    resource = FakeDeployer()
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    try:
        yield f"http://127.0.0.1:{port.getHost().port}", resource
    finally:
        for request in resource.pending:
            if not request._disconnected and not request.finished:
                request.finish()
        pytest_twisted.blockon(port.stopListening())


def trigger(*args: str, env: dict[str, str] | None = None) -> Deferred[tuple[int, str, str]]:
    """Run ``python -m deployer trigger ARGS``; fires with (exit status, stdout, stderr)."""
    environ = {k: v for k, v in os.environ.items() if k != "DEPLOYER_WEBHOOK_TOKEN"}
    environ.update(env or {})
    d = getProcessOutputAndValue(
        sys.executable, ["-m", "deployer", "trigger", *args], env=environ, path=str(ROOT)
    )
    return d.addCallback(lambda r: (r[2], r[0].decode(), r[1].decode()))


@pytest_twisted.ensureDeferred
async def test_trigger_posts_and_prints_the_answer(
    deployer_url: tuple[str, FakeDeployer], tmp_path: Path
) -> None:
    url, fake = deployer_url
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    runs = [
        trigger(f"127.0.0.1:5000/myorg/foo:qa@{DIGEST}", "--url", url,
                env={"DEPLOYER_WEBHOOK_TOKEN": "from-env"}),
        trigger("docker.io/library/busybox", "--url", url + "/", "--token", "from-flag",
                env={"DEPLOYER_WEBHOOK_TOKEN": "from-env"}),
        trigger("myorg/bar:v2", "--url", url + "/prefix", "--token_file", str(token_file)),
    ]
    results = await gatherResults(runs)
    for code, out, err in results:
        assert code == 0, err
        assert json.loads(out)["accepted"]
    by_repository = {r.body["repository"]: r for r in fake.received}
    assert by_repository.keys() == {"127.0.0.1:5000/myorg/foo", "busybox", "myorg/bar"}

    foo = by_repository["127.0.0.1:5000/myorg/foo"]
    assert foo.body == {"repository": "127.0.0.1:5000/myorg/foo", "tag": "qa", "digest": DIGEST}
    assert foo.authorization == [b"Bearer from-env"]
    assert foo.path == b"/api/deploy"
    assert foo.content_type is not None and foo.content_type[0].startswith(b"application/json")

    busybox = by_repository["busybox"]
    assert busybox.body == {"repository": "busybox", "tag": None, "digest": None}
    assert busybox.authorization == [b"Bearer from-flag"]

    bar = by_repository["myorg/bar"]
    assert bar.authorization == [b"Bearer from-file"]
    assert bar.path == b"/prefix/api/deploy"
    # The answer is printed as indented JSON.
    assert results[0][1].startswith("{\n  ")


@pytest_twisted.ensureDeferred
async def test_trigger_failures_exit_1(deployer_url: tuple[str, FakeDeployer]) -> None:
    url, fake = deployer_url
    unused = f"http://127.0.0.1:{_closed_port()}"
    (c401, o401, e401), (c500, o500, e500), (cdown, _, edown), (cslow, _, eslow) = (
        await gatherResults(
            [
                trigger("answer/401", "--url", url),
                trigger("answer/500", "--url", url),
                trigger("myorg/foo", "--url", unused),
                trigger("answer/silent", "--url", url, "--timeout", "0.5"),
            ]
        )
    )
    assert (c401, json.loads(o401)) == (1, {"error": "invalid token"})
    assert "HTTP 401" in e401
    assert (c500, o500) == (1, "Internal error, not JSON\n")
    assert "HTTP 500" in e500
    assert cdown == 1 and "no answer from" in edown and "refused" in edown
    assert cslow == 1 and "none within 0.5 s" in eslow
    for err in (e401, e500, edown, eslow):
        assert err.startswith("deployer trigger: ") and err.count("\n") == 1, err
    assert {r.body["repository"] for r in fake.received} == {
        "answer/401", "answer/500", "answer/silent"
    }
    assert all(r.authorization is None for r in fake.received)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest_twisted.ensureDeferred
async def test_trigger_usage_errors_exit_2(
    deployer_url: tuple[str, FakeDeployer], tmp_path: Path
) -> None:
    url, fake = deployer_url
    results = await gatherResults(
        [
            trigger("MyOrg/Foo", "--url", url),
            trigger("*", "--url", url),
            trigger("myorg/foo\n", "--url", url),
            trigger("myorg/foo:bad tag", "--url", url),
            trigger("myorg/foo", "--url", "ftp://127.0.0.1/"),
            trigger("myorg/foo", "--url", url, "--token_file", str(tmp_path / "none")),
            trigger("myorg/foo", "--url", url, "--timeout", "0"),
            trigger("--url", url),
        ]
    )
    for code, out, err in results:
        assert code == 2, (out, err)
        assert err.startswith("deployer trigger: ") and err.count("\n") == 1, err
        assert err.endswith("(see: deployer trigger --help)\n")
        assert out == ""
    assert "invalid reference 'MyOrg/Foo'" in results[0][2]
    assert "every image" in results[1][2]
    assert "cannot read the webhook token file" in results[5][2]
    assert fake.received == []


@pytest.mark.parametrize(
    "argv",
    [[], ["nope"], ["trigger"], ["trigger", "a", "--bogus"]],
)
def test_main_usage(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(argv, environ={})
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("deployer") and err.count("\n") == 1
    assert err.endswith(" --help)\n")


def test_main_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"], environ={})
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith("deployer ")
