"""``GET /status``, the status page, ``deployer status`` and ``deployer resume`` against the
real daemon process (``twistd deployer``), standalone and in fleet mode on a real etcd, and the
page in a real browser (Debian's headless ``chromium``).

Other hosts of the fleet, and a paused rollout, are written into etcd by the test with the
layout of :mod:`deployer.rollout.keys`, as those hosts would write them.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
from base64 import b64decode
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.web.resource import Resource
from twisted.web.server import Site

from deployer.auth import TokenAuth
from deployer.errors import EtcdUnavailable
from deployer.rollout.keys import RolloutKeys
from deployer.rollout.pause import PauseRecord
from deployer.rollout.status import AppState, HostState
from deployer.webhook import WebhookApp
from tests.stack.daemon import Daemon
from tests.stack.docker_stack import Dockerd, require_binary
from tests.stack.etcd_stack import EtcdCluster, EtcdMember, etcdctl
from tests.test_status_api import FakeRollouts, Node, TreeBuilder, parse_page

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parent.parent
APP = "myorg/app:qa"
OTHER = "127.0.0.1:5000/myorg/web:prod"
ID_GOOD = "sha256:" + "0123456789abcdef" * 4
ID_BAD = "sha256:" + "fedcba9876543210" * 4
DIGEST_GOOD = "sha256:" + "aa" * 32
DIGEST_BAD = "sha256:" + "bb" * 32
REASON = "unhealthy: health check failed 3 times"
BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


# -- the daemon and the command -------------------------------------------------------------


@pytest.fixture
def daemons(tmp_path: Path, dockerd: Dockerd) -> Iterator[Callable[..., Daemon]]:
    """``daemons(*args)``: a started daemon on the session's engine; stopped after the test,
    which then checks that it stopped cleanly, logged no traceback and no secret (its token
    came in URLs)."""
    started: list[Daemon] = []

    def start(*args: str) -> Daemon:
        daemon = Daemon(tmp_path, ["--docker", dockerd.url, "--repull_period", "0", *args])
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        code = daemon.stop()
        log = daemon.log()
        assert "Traceback" not in log, log[-5000:]
        assert code in (0, -signal.SIGTERM), f"deployer exited with {code}:\n{log[-3000:]}"


def fleet_args(urls: str, prefix: str, hostname: str = "host-a") -> list[str]:
    return ["--etcd_nodes", urls, "--etcd_prefix", prefix, "--hostname", hostname,
            "--etcd_dial_timeout", "2s", "--etcd_retry_delay", "0.5s"]


def deployer(daemon: Daemon, *args: str, token: bool = True) -> tuple[int, str, str]:
    """``python -m deployer ARGS --url <daemon>``: (exit status, stdout, stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "DEPLOYER_WEBHOOK_TOKEN"}
    env["PYTHONPATH"] = str(ROOT)
    if token and daemon.token:
        env["DEPLOYER_WEBHOOK_TOKEN"] = daemon.token
    done = subprocess.run([sys.executable, "-m", "deployer", *args, "--url", daemon.url],
                          capture_output=True, text=True, timeout=60, env=env, check=False)
    return done.returncode, done.stdout, done.stderr


# -- etcd ---------------------------------------------------------------------------------------


def put(etcd: EtcdMember, key: str, value: Any) -> None:
    etcdctl(etcd.client_url, "put", key, json.dumps(value))


def snapshot(etcd: EtcdMember, prefix: str, skip: str) -> list[tuple[str, int, str]]:
    """Every key under ``prefix`` but ``skip`` (the daemon's own status, which it may rewrite
    at any time), with its mod revision and value."""
    answer = json.loads(etcdctl(etcd.client_url, "get", prefix, "--prefix", "-w", "json"))
    out = []
    for kv in answer.get("kvs", []):
        key = b64decode(kv["key"]).decode()
        if key != skip:
            out.append((key, int(kv["mod_revision"]), b64decode(kv["value"]).decode()))
    return out


def publish_hosts(etcd: EtcdMember, keys: RolloutKeys, now: float) -> None:
    """Two other hosts of the fleet, as their deployers publish what they run."""
    put(etcd, keys.host("host-b"), HostState("host-b", now, {
        APP: AppState(ID_GOOD, DIGEST_GOOD, ("app",), "healthy", now - 20, "rolled back"),
        OTHER: AppState(ID_BAD, None, ("web-1", "web-2"), "running", now - 60, "ok"),
    }).to_json())
    put(etcd, keys.host("host-c"), HostState("host-c", now, {
        APP: AppState(ID_GOOD, DIGEST_GOOD, ("app",), "healthy", now - 10, "ok"),
    }).to_json())


# -- the browser --------------------------------------------------------------------------------


def chromium(tmp_path: Path, *args: str) -> str:
    """Headless Chromium with a profile of its own; its standard output."""
    binary = require_binary("chromium")
    profile = tmp_path / "chromium-profile"
    done = subprocess.run(
        [binary, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-extensions", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def dump_dom(tmp_path: Path, url: str) -> Node:
    """The page's DOM after 5 s of (virtual) time, serialized by the browser."""
    html = chromium(tmp_path, "--virtual-time-budget=5000", "--dump-dom", url)
    builder = TreeBuilder()
    builder.feed(html)
    builder.close()
    assert builder.stack == [builder.root], "unclosed elements in the DOM"
    return builder.root


def screenshot(tmp_path: Path, url: str, name: str) -> Path:
    path = tmp_path / name
    chromium(tmp_path, "--virtual-time-budget=5000", "--window-size=1280,800",
             f"--screenshot={path}", url)
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    assert struct.unpack(">II", raw[16:24]) == (1280, 800)
    assert len(raw) > 20_000, "an empty page"
    return path


def host_rows(section: Node) -> dict[str, Node]:
    return {r.attrs["data-host"] or "": r for r in section.all("tr") if "data-host" in r.attrs}


def app_section(dom: Node, app: str) -> Node:
    found = [s for s in dom.all("section", "app") if s.attrs.get("data-app") == app]
    assert len(found) == 1, [s.attrs for s in dom.all("section", "app")]
    return found[0]


# -- standalone ---------------------------------------------------------------------------------


def test_standalone_status_and_resume(daemons: Callable[..., Daemon]) -> None:
    daemon = daemons()
    status, document = daemon.get("/status")
    assert status == 200
    assert {"hosts", "apps"} <= set(document)
    assert set(document["hosts"]) <= {os.uname().nodename}
    for app in document["apps"].values():
        assert {"paused", "hosts"} <= set(app)
    assert deployer(daemon, "resume", APP) == (
        1, "", f"deployer resume: {APP} is not paused: nothing changed\n")
    code, out, err = deployer(daemon, "status")
    assert (code, err) == (0, "")
    assert out.startswith(("APP ", "no app reported yet"))
    assert "PAUSED" not in out
    assert deployer(daemon, "status", token=False) == (
        1, "", f"deployer status: {daemon.url}/status answered HTTP 401: missing token\n")


# -- a fleet on a real etcd ---------------------------------------------------------------------


def test_a_paused_rollout_shown_and_resumed(daemons: Callable[..., Daemon], etcd: EtcdMember,
                                           etcd_prefix: str, tmp_path: Path) -> None:
    keys = RolloutKeys(etcd_prefix)
    daemon = daemons(*fleet_args(etcd.client_url, etcd_prefix))
    _, first = daemon.get("/status")
    now = float(first["time"])
    publish_hosts(etcd, keys, now)
    own = keys.host("host-a")

    # Not paused: exit 1, and etcd is left as it was.
    before = snapshot(etcd, etcd_prefix, own)
    assert [k for k, _, _ in before] == [keys.host("host-b"), keys.host("host-c")]
    for app in (APP, "unknown/app:v9"):
        assert deployer(daemon, "resume", app) == (
            1, "", f"deployer resume: {app} is not paused: nothing changed\n")
    assert deployer(daemon, "resume", "myorg/app") == (
        2, "", "deployer resume: invalid app 'myorg/app': 'myorg/app' names no tag: an app is"
        " repo:tag (see: deployer resume --help)\n")
    assert snapshot(etcd, etcd_prefix, own) == before

    # A bad build paused the rollout on host-b.
    record = PauseRecord(APP, ID_BAD, DIGEST_BAD, "host-b", REASON, now - 30)
    put(etcd, keys.paused(APP), record.to_json())
    status, document = daemon.get("/status")
    assert status == 200
    assert {"hosts", "apps"} <= set(document)
    assert {"host-b", "host-c"} <= set(document["hosts"])
    assert document["apps"][APP]["paused"] == record.to_json()
    assert set(document["apps"][APP]["hosts"]) == {"host-b", "host-c"}
    assert document["apps"][OTHER]["paused"] is None

    code, out, err = deployer(daemon, "status")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].split() == ["APP", "HOST", "IMAGE", "DIGEST", "HEALTH", "CONTAINERS",
                                "LAST", "ROUND"]
    rows = [line.split()[:6] for line in lines[1:4]]
    assert rows == [
        [OTHER, "host-b", "fedcba987654", "-", "running", "web-1,"],
        [APP, "host-b", "0123456789ab", "sha256:aaaaaaaaaaaa", "healthy", "app"],
        [APP, "host-c", "0123456789ab", "sha256:aaaaaaaaaaaa", "healthy", "app"],
    ]
    paused = [line for line in lines if "PAUSED" in line]
    assert len(paused) == 1
    assert paused[0].startswith(
        f"{APP} PAUSED: {REASON} (bad image fedcba987654, digest sha256:bbbbbbbbbbbb,"
        " host host-b, since ")
    assert paused[0].endswith(" UTC)")
    code, out, _ = deployer(daemon, "status", "--json")
    assert code == 0 and json.loads(out)["apps"][APP]["paused"] == record.to_json()

    # The page, as a browser given the token in the URL shows it.
    url = f"{daemon.url}/status?token={daemon.token}"
    status, body = daemon.request("GET", "/status", None, {"Accept": BROWSER})
    assert status == 200 and isinstance(body, bytes) and body.startswith(b"<!DOCTYPE html>")
    dom = dump_dom(tmp_path, url)
    body_node = dom.one("body")
    assert int(body_node.attrs.get("data-refreshes") or 0) >= 1, \
        "the page did not refresh itself from /status"
    assert (dom.by_id("updated").attrs.get("class") or "") == ""
    assert dom.by_id("updated").text().startswith("as of ")
    # host-a (this daemon) is there too once it has published what it runs
    hosts = len(document["hosts"])
    assert dom.by_id("summary").text() == f"{hosts} hosts \u00b7 2 apps \u00b7 1 paused"
    section = app_section(dom, APP)
    banner = section.one("div", "banner")
    assert banner.one("span", "reason").text() == REASON
    assert "bad image fedcba987654" in banner.text() and "host host-b" in banner.text()
    assert section.one("span", "state").text() == "paused"
    rows_ = host_rows(section)
    assert list(rows_) == ["host-b", "host-c"]
    assert rows_["host-c"].one("code", "image").text() == "0123456789ab"
    assert rows_["host-c"].one("code", "digest").text() == "sha256:aaaaaaaaaaaa"
    assert rows_["host-c"].one("span", "health").text() == "healthy"
    assert rows_["host-b"].one("td", "round").text().endswith(" UTC rolled back")
    other = app_section(dom, OTHER)
    assert other.all("div", "banner") == []
    assert host_rows(other)["host-b"].one("td", "containers").text() == "web-1, web-2"
    assert set(host_rows(dom.by_id("hosts"))) >= {"host-b", "host-c"}
    # The script renders what the server renders.
    static = parse_page(body)
    for part in ("apps", "hosts", "summary"):
        assert static.by_id(part).text() == dom.by_id(part).text(), part
    shot = screenshot(tmp_path, url, "status-paused.png")
    print(f"status page screenshot: {shot}")

    # Resumed: the key is gone, nothing else changed.
    assert deployer(daemon, "resume", APP) == (0, f"resumed {APP}\n", "")
    assert etcdctl(etcd.client_url, "get", keys.paused(APP)) == ""
    assert snapshot(etcd, etcd_prefix, own) == before
    code, out, _ = deployer(daemon, "status")
    assert code == 0 and "PAUSED" not in out
    assert deployer(daemon, "resume", APP)[0] == 1
    dom = dump_dom(tmp_path, url)
    assert app_section(dom, APP).all("div", "banner") == []
    assert dom.by_id("summary").text().endswith("0 paused")
    screenshot(tmp_path, url, "status-resumed.png")


@pytest_twisted.ensureDeferred
async def test_the_open_page_says_when_a_refresh_fails(tmp_path: Path) -> None:
    """The page was served; its refresh is answered 503 (etcd went away): it says so, and
    keeps showing what it had."""
    require_binary("chromium")
    clock = Clock()
    clock.advance(1_700_000_000.0)
    rollouts = FakeRollouts(document={"time": clock.seconds(), "hosts": {}, "apps": {
        APP: {"paused": None, "hosts": {"host-b": AppState(ID_GOOD, None, ("app",),
                                                             "healthy").to_json()},
              "images": [], "converged": True, "replacing": [], "waiting": []}}})
    app = WebhookApp(clock=clock, sink=None, health=None,  # type: ignore[arg-type]
                     auth=TokenAuth(["page-token"]), rollouts=rollouts)
    answers: list[int] = []

    class Failing(Resource):
        isLeaf = True

        def render(self, request: Any) -> Any:
            if answers:  # the refresh
                rollouts.failure = EtcdUnavailable("no etcd member answered")
            answers.append(1)
            return app.resource().render(request)

    port = reactor.listenTCP(0, Site(Failing()), interface="127.0.0.1")
    try:
        url = f"http://127.0.0.1:{port.getHost().port}/status?token=page-token"
        profile = tmp_path / "chromium-profile"
        out, err, code = await getProcessOutputAndValue(
            require_binary("chromium"),
            ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             f"--user-data-dir={profile}", "--virtual-time-budget=5000", "--dump-dom", url],
            env=dict(os.environ))
    finally:
        await port.stopListening()
    assert code == 0, err[-3000:]
    assert len(answers) >= 2
    builder = TreeBuilder()
    builder.feed(out.decode())
    dom = builder.root
    updated = dom.by_id("updated")
    assert updated.attrs.get("class") == "error"
    assert updated.text().startswith("refresh failed at ")
    assert updated.text().endswith(": HTTP 503: no etcd member answered")
    assert dom.one("body").attrs.get("data-refreshes") is None
    assert list(host_rows(app_section(dom, APP))) == ["host-b"]


def test_etcd_down(daemons: Callable[..., Daemon], etcd_cluster: Callable[..., EtcdCluster],
                   tmp_path: Path) -> None:
    cluster = etcd_cluster(1)
    prefix = "/deployer"
    daemon = daemons(*fleet_args(cluster.urls[0], prefix))
    put(cluster.members[0], RolloutKeys(prefix).paused(APP),
        PauseRecord(APP, ID_BAD, None, "host-b", REASON, 1.0).to_json())
    url = f"{daemon.url}/status?token={daemon.token}"
    dom = dump_dom(tmp_path, url)
    assert app_section(dom, APP).one("span", "reason").text() == REASON

    cluster.members[0].stop()
    code, out, err = deployer(daemon, "status")
    assert (code, out) == (1, "")
    assert err.startswith(f"deployer status: {daemon.url}/status answered HTTP 503: ")
    assert err.count("\n") == 1 and "Traceback" not in err
    code, out, err = deployer(daemon, "resume", APP)
    assert (code, out) == (1, "")
    assert err.startswith(f"deployer resume: {daemon.url}/api/resume answered HTTP 503: ")
    assert err.count("\n") == 1
    status, body = daemon.request("GET", "/status", None, {"Accept": BROWSER})
    assert status == 503 and isinstance(body, dict) and body["error"]

    cluster.members[0].start()
    cluster.members[0].wait_ready()
    assert etcdctl(cluster.urls[0], "get", RolloutKeys(prefix).paused(APP)) != "", \
        "the pause was lost while etcd was down"
    assert deployer(daemon, "resume", APP) == (0, f"resumed {APP}\n", "")
