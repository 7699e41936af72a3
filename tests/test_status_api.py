"""``GET /status`` and ``POST /api/resume`` of the front door, in memory.

The web layer is driven through ``StubTreq`` (see test_webhook.py) over the rollout parts the
daemon itself builds: :func:`deployer.rollout.wiring.fleet` over
:class:`~deployer.testing.fake_etcd.FakeEtcd` (through the daemon's own etcd client), and
:func:`~deployer.rollout.wiring.standalone`; a small fake where an answer must be one the
rollout core does not give.
"""

from __future__ import annotations

import hashlib
import json
import re
from base64 import b64encode
from html.parser import HTMLParser
from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.logger import capturedLogs, formatEvent

from deployer.errors import EtcdHTTPError
from deployer.rollout import wiring
from deployer.rollout.gateway import KV_PUT, b64
from deployer.rollout.keys import RolloutKeys
from deployer.rollout.pause import PauseRecord
from deployer.rollout.status import AppState, HostState
from deployer.rollout.testing import Link
from deployer.status_page import CONTENT_SECURITY_POLICY, REFRESH_SECONDS, render_page
from deployer.status_view import render_table
from deployer.testing.fake_etcd import FakeEtcd
from deployer.webhook import WebhookApp, prefers_html
from tests.helpers import fired
from tests.test_webhook import TOKEN, Answer, Front, authorization

PREFIX = "/deployer"
KEYS = RolloutKeys(PREFIX)
APP = "myorg/app:qa"
NOW = 1_700_000_000.0
ID_GOOD = "sha256:" + "0123456789abcdef" * 4
ID_BAD = "sha256:" + "fedcba9876543210" * 4
DIGEST_GOOD = "sha256:" + "aa" * 32
DIGEST_BAD = "sha256:" + "bb" * 32
BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,*/*;q=0.8"
EVIL = '<img src=x onerror="alert(1)">&amp;</script><script>alert(2)</script>'


# -- the rollout parts -----------------------------------------------------------------------


@attrs.define
class Fleet:
    """The fleet-mode rollout parts over an in-memory etcd, and a front door with them."""

    clock: Clock = attrs.field(factory=Clock)
    etcd: FakeEtcd = attrs.field(init=False)
    link: Link = attrs.field(init=False)
    rollouts: wiring.Rollouts = attrs.field(init=False)
    front: Front = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.clock.advance(NOW)
        self.etcd = FakeEtcd(self.clock, progress_interval=None)
        self.link = Link(self.etcd, self.clock)
        self.rollouts = wiring.fleet(self.link.etcd, self.clock, prefix=PREFIX,
                                     hostname="host-a")
        self.front = Front(rollouts=self.rollouts)

    def put(self, key: str, value: Any) -> None:
        fired(self.link.etcd.request(KV_PUT, {"key": b64(key), "value": b64(json.dumps(value))}))

    def host(self, name: str, apps: dict[str, AppState]) -> None:
        """What ``name`` publishes that it runs (as its StatusPublisher would)."""
        self.put(KEYS.host(name), HostState(name, NOW - 1, apps).to_json())

    def pause(self, app: str = APP, reason: str = "unhealthy: health check failed",
              host: str = "host-b") -> PauseRecord:
        record = PauseRecord(app, ID_BAD, DIGEST_BAD, host, reason, NOW - 30)
        assert fired(self.rollouts.pauses.pause(record))
        return record

    def writes(self) -> tuple[int, list[str]]:
        """etcd's revision and keys: both stay the same when nothing is written."""
        return self.etcd.revision, self.etcd.keys()


@pytest.fixture
def fleet() -> Fleet:
    fleet = Fleet()
    fleet.host("host-a", {APP: AppState(ID_GOOD, DIGEST_GOOD, ("app",), "healthy", NOW - 5,
                                        "ok")})
    fleet.host("host-b", {APP: AppState(ID_GOOD, DIGEST_GOOD, ("app",), "healthy", NOW - 4,
                                        "rolled back")})
    return fleet


class _Status:
    def __init__(self, fake: FakeRollouts) -> None:
        self.fake = fake

    def document(self) -> Deferred[dict[str, Any]]:
        if self.fake.failure is not None:
            return fail(self.fake.failure)
        return succeed(self.fake.document)


@attrs.define
class FakeRollouts:
    """A RolloutControl whose answers are set by the test."""

    document: Any = attrs.field(factory=lambda: {"time": NOW, "hosts": {}, "apps": {}})
    failure: Exception | None = None
    resumed: list[str] = attrs.field(factory=list)

    @property
    def status(self) -> _Status:
        return _Status(self)

    @property
    def pauses(self) -> FakeRollouts:
        return self

    def resume(self, app: str) -> Deferred[bool]:
        if self.failure is not None:
            return fail(self.failure)
        self.resumed.append(app)
        return succeed(True)


def fake_front(fake: FakeRollouts) -> Front:
    return Front(rollouts=fake)


# -- requests ----------------------------------------------------------------------------------


def get_status(front: Front, accept: str | None = None, query: str = "",
               auth: bool = True, method: str = "GET") -> Answer:
    headers: dict[str, str | bytes] = dict(authorization()) if auth else {}
    if accept is not None:
        headers["Accept"] = accept
    return front.request(method, "/status" + query, headers=headers)


def resume(front: Front, body: Any, query: str = "", auth: bool = True,
           content_type: str = "application/json") -> Answer:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers: dict[str, str | bytes] = {"Content-Type": content_type}
    if auth:
        headers.update(authorization())
    return front.request("POST", "/api/resume" + query, raw, headers)


# -- the page as a tree ------------------------------------------------------------------------

VOID = {"meta", "link", "br", "img", "input", "hr", "col", "source", "wbr", "area", "base"}


@attrs.define
class Node:
    tag: str
    attrs: dict[str, str | None]
    children: list[Node | str] = attrs.field(factory=list)

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def all(self, tag: str | None = None, cls: str | None = None) -> list[Node]:
        found = []
        for child in self.children:
            if isinstance(child, Node):
                classes = (child.attrs.get("class") or "").split()
                if (tag is None or child.tag == tag) and (cls is None or cls in classes):
                    found.append(child)
                found += child.all(tag, cls)
        return found

    def one(self, tag: str | None = None, cls: str | None = None) -> Node:
        found = self.all(tag, cls)
        assert len(found) == 1, (tag, cls, found)
        return found[0]

    def by_id(self, id_: str) -> Node:
        found = [n for n in self.all() if n.attrs.get("id") == id_]
        assert len(found) == 1, id_
        return found[0]


class TreeBuilder(HTMLParser):
    """The page as :class:`Node` s; an end tag that closes another element than the last one
    opened fails (the page is well-formed)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#document", {})
        self.stack = [self.root]
        self.doctype: str | None = None

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, dict(attrs)))

    def handle_endtag(self, tag: str) -> None:
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(data)


def parse_page(body: bytes) -> Node:
    builder = TreeBuilder()
    builder.feed(body.decode("utf-8"))
    builder.close()
    assert builder.stack == [builder.root], "unclosed elements"
    assert builder.doctype == "DOCTYPE html"
    return builder.root


def page(front: Front, query: str = "") -> tuple[Answer, Node]:
    answer = get_status(front, BROWSER, query=query)
    assert answer.code == 200, answer
    assert answer.header("content-type") == "text/html; charset=utf-8"
    return answer, parse_page(answer.body)


def csp_sources(policy: str) -> dict[str, list[str]]:
    out = {}
    for directive in policy.split(";"):
        name, *values = directive.split()
        out[name] = values
    return out


def sha256_source(text: str) -> str:
    return "'sha256-" + b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


# -- GET /status: JSON ---------------------------------------------------------------------------


def test_status_json_has_the_fixed_keys(fleet: Fleet) -> None:
    fleet.pause()
    answer = get_status(fleet.front)
    assert answer.code == 200
    assert answer.header("vary") == "Accept"
    assert answer.header("cache-control") == "no-store"
    document = answer.json()
    assert set(document) >= {"hosts", "apps"}
    assert set(document["hosts"]) == {"host-a", "host-b"}
    app = document["apps"][APP]
    assert set(app) >= {"paused", "hosts", "images", "converged", "replacing", "waiting"}
    assert app["paused"] == {"app": APP, "image_id": ID_BAD, "digest": DIGEST_BAD,
                             "host": "host-b", "reason": "unhealthy: health check failed",
                             "time": NOW - 30}
    assert app["hosts"]["host-a"] == {
        "image_id": ID_GOOD, "digest": DIGEST_GOOD, "containers": ["app"],
        "health": "healthy", "last_round": {"time": NOW - 5, "result": "ok"},
    }
    assert app["converged"] is True
    assert document == fired(fleet.rollouts.status.document())


def test_status_standalone_shows_this_host_alone() -> None:
    clock = Clock()
    rollouts = wiring.standalone(clock, hostname="host-a")
    front = Front(rollouts=rollouts)
    assert get_status(front).json() == {"time": 0.0, "hosts": {}, "apps": {}}
    fired(rollouts.publish({APP: AppState(ID_GOOD, None, ("app",), "running")}))
    document = get_status(front).json()
    assert list(document["hosts"]) == ["host-a"]
    assert document["apps"][APP]["paused"] is None


def test_status_head(fleet: Fleet) -> None:
    answer = get_status(fleet.front, method="HEAD")
    assert (answer.code, answer.body) == (200, b"")


# -- Accept ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "html"),
    [
        (None, False),
        ("*/*", False),
        ("application/json", False),
        ("application/json, text/html", False),
        ("text/html, application/json", False),  # as welcome: JSON
        ("text/html;q=0.9, application/json;q=0.9", False),
        ("image/png", False),  # neither: JSON
        ("text/html;q=0, */*", False),
        ("text/html;q=0.5, */*", False),  # the most specific range counts
        ("text/plain", False),
        ("text/html", True),
        ("text/*", True),
        ("text/html;q=0.9, application/json;q=0.8", True),
        ("application/json;q=0.1, */*;q=0.5", True),
        (BROWSER, True),
        ("TEXT/HTML", True),
    ],
)
def test_accept_negotiation(fleet: Fleet, accept: str | None, html: bool) -> None:
    answer = get_status(fleet.front, accept)
    assert answer.code == 200
    assert answer.header("vary") == "Accept"
    if html:
        assert answer.header("content-type") == "text/html; charset=utf-8"
        assert answer.body.startswith(b"<!DOCTYPE html>")
    else:
        assert set(answer.json()) == {"time", "hosts", "apps"}


def test_accept_in_several_headers(fleet: Fleet) -> None:
    answer = fleet.front.answer(fleet.front.stub.request(
        "GET", "http://deployer.test/status",
        headers={"Accept": ["application/json;q=0.5", "text/html"], **authorization()}))
    assert answer.header("content-type") == "text/html; charset=utf-8"


# -- the token ------------------------------------------------------------------------------------


@pytest.mark.parametrize("accept", [None, BROWSER])
def test_status_needs_the_token(fleet: Fleet, accept: str | None) -> None:
    for query in ("", "?token=", "?token=wrong", "?tok=" + TOKEN):
        answer = get_status(fleet.front, accept, query=query, auth=False)
        assert answer.code == 401, query
        assert answer.error in ("missing token", "invalid token")
        assert answer.header("www-authenticate") == 'Bearer realm="deployer"'
    assert get_status(fleet.front, accept, query="?token=" + TOKEN, auth=False).code == 200
    assert get_status(fleet.front, accept).code == 200


def test_the_token_from_the_url_is_never_written_into_the_page(fleet: Fleet) -> None:
    fleet.pause()
    answer, tree = page(fleet.front, query="?token=" + TOKEN)
    assert TOKEN.encode() not in answer.body
    for node in tree.all():
        for name, value in node.attrs.items():
            assert TOKEN not in (value or ""), (node.tag, name)
    # The script reads it from the address bar and sends it as a header, to this path only.
    script = tree.one("script").text()
    assert 'new URLSearchParams(window.location.search).get("token")' in script
    assert 'headers.Authorization = "Bearer " + token' in script
    assert "fetch(window.location.pathname," in script
    assert "console" not in script


def test_resume_takes_the_token_in_a_header_only(fleet: Fleet) -> None:
    fleet.pause()
    before = fleet.writes()
    for query, auth in (("?token=" + TOKEN, False), ("?token=" + TOKEN, True),
                        ("?a=1&token=x", True)):
        answer = resume(fleet.front, {"app": APP}, query=query, auth=auth)
        assert answer.code == 401, query
        assert "Authorization header" in answer.error
    assert resume(fleet.front, {"app": APP}, auth=False).code == 401
    assert fleet.writes() == before
    assert resume(fleet.front, {"app": APP}).code == 200


def test_auth_failures_are_counted_by_endpoint(fleet: Fleet) -> None:
    get_status(fleet.front, auth=False)
    resume(fleet.front, {"app": APP}, auth=False)
    metrics = fleet.front.metrics()
    for endpoint in ("status", "resume"):
        key = ("deployer_webhook_auth_failures_total", (("endpoint", endpoint),))
        assert metrics[key] == 1.0


# -- the page -------------------------------------------------------------------------------------


def test_the_page_shows_apps_by_host(fleet: Fleet) -> None:
    fleet.host("host-c", {
        APP: AppState(ID_BAD, DIGEST_BAD, ("app", "app-2"), "starting", NOW - 2, "replacing"),
        "myorg/web:prod": AppState(ID_GOOD, None, ("web",), "running", None, None),
    })
    _, tree = page(fleet.front)
    assert tree.by_id("summary").text() == "3 hosts \u00b7 2 apps \u00b7 0 paused"
    assert tree.by_id("updated").text() == "as of 2023-11-14 22:13:20 UTC"
    sections = tree.all("section", "app")
    assert [s.attrs["data-app"] for s in sections] == [APP, "myorg/web:prod"]
    app = sections[0]
    assert app.one("span", "state").text() == "mixed"
    assert app.all("div", "banner") == []
    rows = {row.attrs["data-host"]: row for row in app.all("tr") if "data-host" in row.attrs}
    assert list(rows) == ["host-a", "host-b", "host-c"]
    c = rows["host-c"]
    assert c.one("code", "image").text() == "fedcba987654"
    assert c.one("code", "image").attrs["title"] == ID_BAD
    assert c.one("code", "digest").text() == "sha256:bbbbbbbbbbbb"
    assert c.one("code", "digest").attrs["title"] == DIGEST_BAD
    assert c.one("span", "health").text() == "starting"
    assert "h-warn" in (c.one("span", "health").attrs["class"] or "")
    assert c.one("td", "containers").text() == "app, app-2"
    assert c.one("td", "round").text() == "2023-11-14 22:13:18 UTC replacing"
    assert "h-ok" in (rows["host-a"].one("span", "health").attrs["class"] or "")
    web = sections[1]
    assert web.one("span", "state").text() == "converged"
    assert web.one("code", "digest").text() == "-"
    assert web.one("td", "round").text() == "-"
    hosts = tree.by_id("hosts")
    assert [r.attrs["data-host"] for r in hosts.all("tr") if "data-host" in r.attrs] == [
        "host-a", "host-b", "host-c"]
    assert [td.text() for td in hosts.all("td")][-3:] == [
        "host-c", "2023-11-14 22:13:19 UTC", "2"]


def test_a_paused_rollout_is_a_red_banner_with_its_reason(fleet: Fleet) -> None:
    fleet.pause(reason="unhealthy: health check failed 3 times")
    _, tree = page(fleet.front)
    assert tree.by_id("summary").text().endswith("1 paused")
    section = tree.one("section", "app")
    assert section.one("span", "state").text() == "paused"
    banner = section.one("div", "banner")
    assert banner.attrs["role"] == "alert"
    assert banner.one("strong").text() == "PAUSED: "
    assert banner.one("span", "reason").text() == "unhealthy: health check failed 3 times"
    assert banner.one("p", "details").text() == (
        "bad image fedcba987654, digest sha256:bbbbbbbbbbbb, host host-b,"
        " since 2023-11-14 22:12:50 UTC. Resume with deployer resume myorg/app:qa")
    style = tree.one("style").text()
    assert ".banner{background:#b00020;color:#fff" in style


def test_a_rollout_under_way(fleet: Fleet) -> None:
    document = fired(fleet.rollouts.status.document())
    document["apps"][APP]["replacing"] = [{"host": "host-b", "container": "app",
                                           "since": NOW - 3}]
    document["apps"][APP]["waiting"] = [{"host": "host-a", "container": "app", "since": None}]
    _, tree = page(fake_front(FakeRollouts(document)))
    section = tree.one("section", "app")
    assert section.one("span", "state").text() == "rolling"
    assert section.one("p", "rollout").text() == (
        "replacing: host-b (app) since 2023-11-14 22:13:17 UTC; waiting: host-a (app)")


def test_an_empty_fleet_page() -> None:
    _, tree = page(fake_front(FakeRollouts()))
    assert tree.by_id("apps").text() == "No host has reported an app yet."
    assert tree.by_id("summary").text() == "0 hosts \u00b7 0 apps \u00b7 0 paused"


def test_everything_from_etcd_is_escaped(fleet: Fleet) -> None:
    """Host names, app names, containers, health, results and reasons from etcd are text."""
    evil_host = "h<b>" + EVIL.replace(" ", "")
    document = {
        "time": NOW,
        "hosts": {evil_host: {"time": NOW, "apps": {}}},
        "apps": {EVIL: {
            "paused": {"app": EVIL, "image_id": EVIL, "digest": EVIL, "host": EVIL,
                       "reason": EVIL, "time": NOW},
            "hosts": {evil_host: {"image_id": EVIL, "digest": EVIL, "containers": [EVIL],
                                  "health": EVIL, "last_round": {"time": NOW,
                                                                  "result": EVIL}}},
            "images": [], "converged": True,
            "replacing": [{"host": EVIL, "container": EVIL, "since": NOW}], "waiting": [],
        }},
    }
    answer, tree = page(fake_front(FakeRollouts(document)))
    tags = {node.tag for node in tree.all()}
    assert tags <= {"html", "head", "meta", "link", "title", "style", "body", "header", "h1",
                    "h2", "p", "main", "section", "span", "div", "strong", "code", "table",
                    "thead", "tbody", "tr", "th", "td", "script"}
    assert len(tree.all("script")) == 1 and "img" not in tags and "b" not in tags
    assert b"<img" not in answer.body and b"<b>" not in answer.body
    assert all(not name.startswith("on") for n in tree.all() for name in n.attrs)
    section = tree.one("section", "app")
    assert section.attrs["data-app"] == EVIL
    assert section.one("span", "name").text() == EVIL
    assert section.one("span", "reason").text() == EVIL
    assert section.one("td", "containers").text() == EVIL
    assert section.one("td", "host").text() == evil_host
    assert section.one("span", "health").text() == EVIL
    assert "h-unknown" in (section.one("span", "health").attrs["class"] or "")
    assert EVIL in section.one("p", "rollout").text()
    assert section.one("code", "image").attrs["title"] == EVIL


def test_control_characters_from_etcd_are_shown_escaped(fleet: Fleet) -> None:
    name = "host-\u202ex"  # etcd holds any key, whatever a deployer would write
    fleet.put(KEYS.hosts + name, HostState(name, NOW, {
        APP: AppState(ID_GOOD, None, ("a\x1bb",), "healthy")}).to_json())
    _, tree = page(fleet.front)
    rows = [r for r in tree.one("section", "app").all("tr") if "data-host" in r.attrs]
    shown = {r.one("td", "host").text() for r in rows}
    assert "host-\\u202ex" in shown
    assert "a\\x1bb" in {r.one("td", "containers").text() for r in rows}


def test_the_page_loads_nothing_from_anywhere(fleet: Fleet) -> None:
    fleet.pause()
    answer, tree = page(fleet.front)
    assert not re.search(rb"(?i)https?:|//[a-z0-9]", answer.body.replace(b"://", b"")), \
        "an absolute URL in the page"
    for node in tree.all():
        for name in ("src", "href", "action", "srcset", "data"):
            assert node.attrs.get(name) in (None, "data:,"), (node.tag, name)
    assert tree.one("link").attrs == {"rel": "icon", "href": "data:,"}
    script = tree.one("script").text()
    for word in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                 "import(", "XMLHttpRequest", "new Function"):
        assert word not in script
    assert script.count("fetch(") == 1
    assert f"var REFRESH_MS = {REFRESH_SECONDS * 1000};" in script
    assert "window.setTimeout(refresh, REFRESH_MS)" in script


def test_the_content_security_policy_allows_the_page_itself_only(fleet: Fleet) -> None:
    answer, tree = page(fleet.front)
    policy = answer.header("content-security-policy")
    assert policy == CONTENT_SECURITY_POLICY
    sources = csp_sources(policy)
    assert sources["default-src"] == ["'none'"]
    assert sources["script-src"] == [sha256_source(tree.one("script").text())]
    assert sources["style-src"] == [sha256_source(tree.one("style").text())]
    assert sources["connect-src"] == ["'self'"]
    assert sources["img-src"] == ["data:"]
    assert sources["base-uri"] == sources["form-action"] == sources["frame-ancestors"] == [
        "'none'"]
    assert "unsafe" not in policy
    assert tree.all(cls=None) and all("style" not in n.attrs for n in tree.all())
    assert all(not name.startswith("on") for n in tree.all() for name in n.attrs)
    assert answer.header("x-content-type-options") == "nosniff"
    assert answer.header("referrer-policy") == "no-referrer"
    assert answer.header("x-frame-options") == "DENY"
    assert answer.header("cache-control") == "no-store"


# -- etcd down, no rollouts ---------------------------------------------------------------------

ETCD_DOWN = ("no etcd member answered {path} within 5s each: http://10.0.0.1:2379:"
             " ConnectionRefusedError: Connection was refused by other side: 10.0.0.1: 2379.")


@pytest.mark.parametrize("accept", [None, BROWSER])
def test_status_when_etcd_is_down_is_503(fleet: Fleet, accept: str | None) -> None:
    fleet.link.cut = True
    with capturedLogs() as events:
        answer = get_status(fleet.front, accept)
    assert answer.code == 503
    assert answer.error == ETCD_DOWN.format(path="/v3/kv/range")
    assert [formatEvent(e) for e in events if e["log_level"].name == "error"] == [
        "cannot answer /status: " + ETCD_DOWN.format(path="/v3/kv/range")]
    assert [e for e in events if "log_failure" in e] == []


def test_an_etcd_error_is_503_too() -> None:
    failure = EtcdHTTPError("http://127.0.0.1:2379", 500, 14, "etcdserver: leader changed")
    front = fake_front(FakeRollouts(failure=failure))
    answer = get_status(front)
    assert answer.code == 503
    assert answer.error == ("etcd: http://127.0.0.1:2379 answered HTTP 500:"
                            " etcdserver: leader changed")
    assert resume(front, {"app": APP}).code == 503


def test_without_rollout_parts_status_is_404() -> None:
    front = Front()
    assert get_status(front).code == 404
    assert resume(front, {"app": APP}).code == 404
    assert get_status(front, auth=False).code == 401


@pytest.mark.parametrize(("method", "path", "allowed"),
                         [("POST", "/status", {"GET", "HEAD"}),
                          ("DELETE", "/status", {"GET", "HEAD"}),
                          ("GET", "/api/resume", {"POST"}),
                          ("PUT", "/api/resume", {"POST"})])
def test_wrong_methods(fleet: Fleet, method: str, path: str, allowed: set[str]) -> None:
    answer = fleet.front.request(method, path, b"{}", authorization())
    assert answer.code == 405
    assert set((answer.header("allow") or "").split(", ")) == allowed


# -- POST /api/resume ------------------------------------------------------------------------


def test_resume_a_paused_app(fleet: Fleet) -> None:
    fleet.pause()
    assert KEYS.paused(APP) in fleet.etcd.keys()
    with capturedLogs() as events:
        answer = resume(fleet.front, {"app": APP})
    assert answer.code == 200
    assert answer.json() == {"status": "resumed", "app": APP}
    assert KEYS.paused(APP) not in fleet.etcd.keys()
    assert get_status(fleet.front).json()["apps"][APP]["paused"] is None
    assert any(formatEvent(e).startswith(f"resumed the rollout of {APP} (asked from ")
               for e in events)


def test_resume_takes_any_form_of_the_app(fleet: Fleet) -> None:
    fleet.pause()
    answer = resume(fleet.front, {"app": "docker.io/myorg/app:qa"})
    assert answer.json() == {"status": "resumed", "app": APP}


def test_resume_of_an_app_that_is_not_paused_is_404_and_writes_nothing(fleet: Fleet) -> None:
    fleet.pause("myorg/other:qa")
    before = fleet.writes()
    for app in (APP, "unknown/app:v1"):
        answer = resume(fleet.front, {"app": app})
        assert answer.code == 404
        assert answer.error == f"{app} is not paused"
    assert fleet.writes() == before


def test_resume_twice(fleet: Fleet) -> None:
    fleet.pause()
    assert resume(fleet.front, {"app": APP}).code == 200
    before = fleet.writes()
    assert resume(fleet.front, {"app": APP}).error == f"{APP} is not paused"
    assert fleet.writes() == before


def test_resume_standalone() -> None:
    rollouts = wiring.standalone(Clock(), hostname="host-a")
    front = Front(rollouts=rollouts)
    assert resume(front, {"app": APP}).code == 404
    fired(rollouts.pauses.pause(PauseRecord(APP, ID_BAD, None, "host-a", "exited", NOW)))
    assert resume(front, {"app": APP}).json() == {"status": "resumed", "app": APP}
    assert fired(rollouts.pauses.all()) == {}


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"app": "myorg/app"}, "names no tag"),
        ({"app": f"myorg/app:qa@{DIGEST_BAD}"}, "carries a digest"),
        ({"app": "myorg/App:qa"}, "invalid app"),
        ({"app": "my org/app:qa"}, "invalid app"),
        ({"app": ""}, "invalid app"),
        ({"app": "*"}, "invalid app"),
        ({"app": "a:" + "t" * 200}, "invalid app"),
        ({"app": 3}, '{"app": "repo:tag"}'),
        ({"app": None}, '{"app": "repo:tag"}'),
        ({"apps": APP}, '{"app": "repo:tag"}'),
        ([APP], '{"app": "repo:tag"}'),
        (APP, '{"app": "repo:tag"}'),
        (b"{not json", "JSON"),
    ],
)
def test_a_malformed_app_is_400_and_writes_nothing(fleet: Fleet, body: Any,
                                                    words: str) -> None:
    fleet.pause()
    before = fleet.writes()
    requests = len(fleet.etcd.requests)
    answer = resume(fleet.front, body)
    assert answer.code == 400, answer
    assert words in answer.error
    assert fleet.writes() == before
    assert len(fleet.etcd.requests) == requests, "etcd was asked"


def test_resume_needs_json(fleet: Fleet) -> None:
    assert resume(fleet.front, {"app": APP}, content_type="text/plain").code == 415


def test_resume_when_etcd_is_down_is_503(fleet: Fleet) -> None:
    fleet.pause()
    fleet.link.cut = True
    answer = resume(fleet.front, {"app": APP})
    assert answer.code == 503
    assert answer.error == ETCD_DOWN.format(path="/v3/kv/txn")
    fleet.link.cut = False
    assert KEYS.paused(APP) in fleet.etcd.keys()


def test_the_web_layer_takes_the_daemons_rollout_parts() -> None:
    """What service.py passes (``Rollouts``) is a ``RolloutControl``."""
    clock = Clock()
    rollouts = wiring.standalone(clock, hostname="h")
    app = WebhookApp(clock=clock, sink=None, health=None, auth=None,  # type: ignore[arg-type]
                     rollouts=rollouts)
    assert app.rollouts is rollouts


# -- anything ---------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=True) | st.integers() | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=8), children, max_size=3),
    max_leaves=12,
)
app_entries = st.fixed_dictionaries({}, optional={
    key: json_values | st.dictionaries(st.text(max_size=8), json_values, max_size=2)
    for key in ("paused", "hosts", "images", "converged", "replacing", "waiting")
})


@settings(max_examples=150, deadline=None)
@given(document=st.fixed_dictionaries(
    {"apps": st.dictionaries(st.text(max_size=10), app_entries | json_values, max_size=3)},
    optional={"hosts": json_values, "time": json_values},
))
def test_any_document_makes_a_well_formed_page_and_table(document: dict[str, Any]) -> None:
    """Whatever etcd held, the page is well-formed HTML with the page's own script only, and
    the table is printable text."""
    body = render_page(document)
    tree = parse_page(body)
    assert len(tree.all("script")) == 1
    assert len(tree.all("section", "app")) == len(document["apps"])
    table = render_table(document)
    assert all(c.isprintable() for c in table.replace("\n", ""))


@given(st.lists(st.binary(max_size=40), max_size=3))
def test_any_accept_header_is_an_answer(values: list[bytes]) -> None:
    assert prefers_html(values) in (True, False)
