"""The status page: ``GET /status`` for a browser.

One HTML page of apps x hosts, rendered on the server with ``twisted.web.template`` (which
escapes every text and attribute: app, host and container names and reasons come from etcd),
then kept fresh by a few lines of script in the page itself: every :data:`REFRESH_SECONDS` it
fetches the same ``/status`` as JSON and renders it again with the same structure, through DOM
calls only (``textContent``-like text nodes, never HTML strings). Nothing is loaded from
anywhere else; the page's ``Content-Security-Policy`` (:data:`HEADERS`) allows its own inline
script and style by their hashes, and fetches from its own origin only.

The token a browser gives as ``?token=`` is read by the script from the address bar and sent in
an ``Authorization`` header; it is never written into the page, and ``Referrer-Policy:
no-referrer`` keeps it from leaving with a link.
"""

from __future__ import annotations

import hashlib
import json
from base64 import b64encode
from collections.abc import Mapping
from typing import Any

from twisted.python.failure import Failure
from twisted.web.template import Tag, flattenString, tags

from deployer.status_view import (
    app_state,
    apps,
    hosts,
    mapping,
    pause_details,
    printable,
    rollout_line,
    row,
    text,
    when,
)

#: How often the page fetches ``/status`` again.
REFRESH_SECONDS = 3

#: The CSS class of each health word; any other word is ``h-unknown``.
HEALTH_CLASSES = {
    "healthy": "h-ok", "running": "h-ok", "starting": "h-warn",
    "unhealthy": "h-bad", "exited": "h-bad", "dead": "h-bad", "restarting": "h-bad",
}

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 2rem 2rem;color:#1d1d1f;background:#f6f6f6}
h1{font-size:1.4rem;margin:1rem 0 .2rem}
header p{margin:.1rem 0;color:#555}
#updated.error{color:#b00020;font-weight:600}
section.app{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6rem 1rem;
 margin:1rem 0}
section.app h2{font-size:1.1rem;margin:.2rem 0 .5rem}
.state{font-size:.72rem;font-weight:600;text-transform:uppercase;padding:.1rem .4rem;
 border-radius:3px;margin-left:.4rem;vertical-align:middle;background:#e4e4e4}
.state.converged{background:#d7f5dd;color:#14662a}
.state.rolling{background:#dbe9ff;color:#1c4fa0}
.state.mixed{background:#fff1c2;color:#7a5a00}
.state.paused{background:#b00020;color:#fff}
.banner{background:#b00020;color:#fff;border-radius:4px;padding:.6rem .8rem;margin:.4rem 0 .7rem}
.banner p{margin:.25rem 0 0}
.banner code{color:#fff;background:rgba(255,255,255,.18);padding:0 .3rem;border-radius:3px}
.rollout{color:#1c4fa0;margin:.2rem 0 .5rem}
table{border-collapse:collapse;width:100%;table-layout:fixed}
td{overflow-wrap:anywhere}
section.app th:nth-child(1){width:15%}section.app th:nth-child(2){width:13%}
section.app th:nth-child(3){width:16%}section.app th:nth-child(4){width:10%}
section.app th:nth-child(5){width:20%}
#hosts table{width:auto;min-width:50%;table-layout:auto}
th,td{text-align:left;padding:.3rem .6rem;border-bottom:1px solid #eee;vertical-align:top}
th{font-weight:600;color:#666;font-size:.75rem;text-transform:uppercase}
code{font:12px ui-monospace,SFMono-Regular,Menlo,monospace}
.health{font-weight:600}
.h-ok{color:#14662a}.h-warn{color:#7a5a00}.h-bad{color:#b00020}.h-unknown{color:#777}
.empty{color:#777;font-style:italic}
#hosts{margin-top:1.5rem}
#hosts h2{font-size:1.1rem}
"""

# The same rendering as the Python below, for the document fetched as JSON. Text goes into the
# page as text nodes only (Element.append of a string), never as HTML.
SCRIPT = r"""
(function () {
"use strict";
var REFRESH_MS = __REFRESH_MS__;
var token = new URLSearchParams(window.location.search).get("token");
var headers = {"Accept": "application/json"};
if (token) { headers.Authorization = "Bearer " + token; }
var HEALTH = __HEALTH__;
var refreshes = 0, shown = null;
var ODD = new RegExp("[\\u0000-\\u001f\\u007f-\\u00a0\\u00ad\\u2000-\\u200f" +
                     "\\u2028-\\u202f\\u205f-\\u206f\\ufeff]", "g");
function printable(v) {
  return String(v).replace(ODD, function (c) {
    var n = c.charCodeAt(0);
    var names = {9: "\\t", 10: "\\n", 13: "\\r"};
    if (names[n]) { return names[n]; }
    return n < 256 ? "\\x" + ("0" + n.toString(16)).slice(-2)
                   : "\\u" + ("000" + n.toString(16)).slice(-4);
  });
}
function el(tag, attrs) {
  var node = document.createElement(tag);
  Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
  for (var i = 2; i < arguments.length; i++) {
    if (arguments[i] !== null) { node.append(arguments[i]); }
  }
  return node;
}
function obj(v) { return v && typeof v === "object" && !Array.isArray(v) ? v : {}; }
function list(v) { return Array.isArray(v) ? v : []; }
function names(o) { return Object.keys(o).sort(); }
function text(v) { return typeof v === "string" && v ? printable(v) : "-"; }
function shortId(v) {
  if (typeof v !== "string" || !v) { return "-"; }
  var i = v.indexOf(":");
  return i >= 0 ? v.slice(i + 1, i + 13) : v.slice(0, 12);
}
function shortDigest(v) {
  if (typeof v !== "string" || !v) { return "-"; }
  var i = v.indexOf(":");
  return i >= 0 ? v.slice(0, i + 13) : v.slice(0, 12);
}
function when(t) {
  if (typeof t !== "number" || !isFinite(t) || t <= 0) { return "-"; }
  return new Date(t * 1000).toISOString().slice(0, 19).replace("T", " ") + " UTC";
}
function plural(n, word) { return n + " " + word + (n === 1 ? "" : "s"); }
function lastRound(state) {
  var r = state.last_round;
  if (!r || typeof r !== "object") { return "-"; }
  var parts = [when(r.time), text(r.result)].filter(function (p) { return p !== "-"; });
  return parts.join(" ") || "-";
}
function containers(state) {
  return list(state.containers).filter(function (c) { return typeof c === "string"; })
    .map(printable).join(", ") || "-";
}
function pauseDetails(p) {
  var d = ["bad image " + shortId(p.image_id)];
  if (typeof p.digest === "string" && p.digest) { d.push("digest " + shortDigest(p.digest)); }
  d.push("host " + text(p.host), "since " + when(p.time));
  return d.join(", ");
}
function inLine(e) {
  e = obj(e);
  var s = text(e.host) + " (" + text(e.container) + ")", since = when(e.since);
  return since === "-" ? s : s + " since " + since;
}
function rolloutLine(app) {
  var parts = [], r = list(app.replacing).map(inLine), w = list(app.waiting).map(inLine);
  if (r.length) { parts.push("replacing: " + r.join(", ")); }
  if (w.length) { parts.push("waiting: " + w.join(", ")); }
  return parts.join("; ") || null;
}
function appState(app) {
  if (app.paused) { return "paused"; }
  if (list(app.replacing).length || list(app.waiting).length) { return "rolling"; }
  return app.converged === false ? "mixed" : "converged";
}
function hostRow(host, state) {
  state = obj(state);
  var health = text(state.health);
  return el("tr", {"data-host": host},
    el("td", {"class": "host"}, printable(host)),
    el("td", {}, el("code", {"class": "image", "title": text(state.image_id)},
                    shortId(state.image_id))),
    el("td", {}, el("code", {"class": "digest", "title": text(state.digest)},
                    shortDigest(state.digest))),
    el("td", {}, el("span", {"class": "health " + (HEALTH[health] || "h-unknown")}, health)),
    el("td", {"class": "containers"}, containers(state)),
    el("td", {"class": "round"}, lastRound(state)));
}
function appSection(name, app) {
  var state = appState(app), pause = app.paused, rolling = rolloutLine(app);
  var running = obj(app.hosts), hostNames = names(running);
  var section = el("section", {"class": "app", "data-app": name},
    el("h2", {}, el("span", {"class": "name"}, printable(name)),
       el("span", {"class": "state " + state}, state)));
  if (pause && typeof pause === "object") {
    section.append(el("div", {"class": "banner", "role": "alert"},
      el("strong", {}, "PAUSED: "), el("span", {"class": "reason"}, text(pause.reason)),
      el("p", {"class": "details"}, pauseDetails(pause) + ". Resume with ",
         el("code", {}, "deployer resume " + printable(name)))));
  }
  if (rolling) { section.append(el("p", {"class": "rollout"}, rolling)); }
  if (!hostNames.length) {
    section.append(el("p", {"class": "empty"}, "No host reports this app."));
    return section;
  }
  var head = el("tr", {});
  ["host", "image", "digest", "health", "containers", "last round"].forEach(function (h) {
    head.append(el("th", {}, h));
  });
  var body = el("tbody", {});
  hostNames.forEach(function (h) { body.append(hostRow(h, running[h])); });
  section.append(el("table", {}, el("thead", {}, head), body));
  return section;
}
function render(doc) {
  var apps = obj(doc.apps), appNames = names(apps), hosts = obj(doc.hosts);
  var paused = appNames.filter(function (a) { return obj(apps[a]).paused; }).length;
  document.getElementById("summary").textContent = plural(names(hosts).length, "host") +
    " \u00b7 " + plural(appNames.length, "app") + " \u00b7 " + paused + " paused";
  var main = document.getElementById("apps");
  var sections = appNames.map(function (a) { return appSection(a, obj(apps[a])); });
  if (!sections.length) {
    sections = [el("p", {"class": "empty"}, "No host has reported an app yet.")];
  }
  main.replaceChildren.apply(main, sections);
  var rowsOut = names(hosts).map(function (h) {
    var s = obj(hosts[h]);
    return el("tr", {"data-host": h}, el("td", {"class": "host"}, printable(h)),
              el("td", {}, when(s.time)), el("td", {}, String(names(obj(s.apps)).length)));
  });
  var tbody = document.querySelector("#hosts tbody");
  tbody.replaceChildren.apply(tbody, rowsOut);
}
function say(message, error) {
  var p = document.getElementById("updated");
  p.textContent = message;
  p.className = error ? "error" : "";
}
function refresh() {
  fetch(window.location.pathname, {headers: headers, cache: "no-store",
                                   credentials: "same-origin", redirect: "error"})
    .then(function (r) {
      return r.json().catch(function () { return {}; }).then(function (body) {
        if (!r.ok) { throw new Error("HTTP " + r.status + ": " + text(obj(body).error)); }
        return body;
      });
    })
    .then(function (doc) {
      render(obj(doc));
      shown = obj(doc).time;
      refreshes += 1;
      document.body.setAttribute("data-refreshes", String(refreshes));
      say("as of " + when(shown), false);
    }, function (e) {
      say("refresh failed at " + when(Date.now() / 1000) + ": " + e.message +
          (shown ? "; showing the state as of " + when(shown) : ""), true);
    })
    .then(function () { window.setTimeout(refresh, REFRESH_MS); });
}
window.setTimeout(refresh, REFRESH_MS);
})();
""".replace("__REFRESH_MS__", str(REFRESH_SECONDS * 1000)).replace(
    "__HEALTH__", json.dumps(HEALTH_CLASSES, sort_keys=True)
)


def _sha256(source: str) -> str:
    return "sha256-" + b64encode(hashlib.sha256(source.encode()).digest()).decode("ascii")


CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; script-src '{_sha256(SCRIPT)}'; style-src '{_sha256(STYLE)}';"
    " connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none';"
    " frame-ancestors 'none'"
)

#: The headers of the page.
HEADERS: Mapping[bytes, bytes] = {
    b"Content-Type": b"text/html; charset=utf-8",
    b"Content-Security-Policy": CONTENT_SECURITY_POLICY.encode("ascii"),
    b"Cache-Control": b"no-store",
    b"Referrer-Policy": b"no-referrer",
    b"X-Content-Type-Options": b"nosniff",
    b"X-Frame-Options": b"DENY",
}

_HEAD = (
    '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
    '<meta name="viewport" content="width=device-width, initial-scale=1">'
    '<meta name="referrer" content="no-referrer"><link rel="icon" href="data:,">'
    f"<title>deployer status</title><style>{STYLE}</style></head>"
).encode()
_TAIL = f"<script>{SCRIPT}</script></body></html>\n".encode()


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _host_row(host: str, state: object) -> Tag:
    shown = row("", host, state)
    health_class = "health " + HEALTH_CLASSES.get(shown.health, "h-unknown")
    return tags.tr(
        tags.td(shown.host, class_="host"),
        tags.td(tags.code(shown.image, class_="image", title=shown.image_id)),
        tags.td(tags.code(shown.digest, class_="digest", title=shown.full_digest)),
        tags.td(tags.span(shown.health, class_=health_class)),
        tags.td(shown.containers, class_="containers"),
        tags.td(shown.last_round, class_="round"),
        **{"data-host": host},
    )


def _app_section(name: str, app: Mapping[str, Any]) -> Tag:
    state = app_state(app)
    section = tags.section(class_="app", **{"data-app": name})(
        tags.h2(tags.span(printable(name), class_="name"),
                tags.span(state, class_="state " + state))
    )
    pause = app.get("paused")
    if isinstance(pause, Mapping):
        section(tags.div(
            tags.strong("PAUSED: "), tags.span(text(pause.get("reason")), class_="reason"),
            tags.p(pause_details(pause) + ". Resume with ",
                   tags.code("deployer resume " + printable(name)), class_="details"),
            class_="banner", role="alert",
        ))
    rolling = rollout_line(app)
    if rolling is not None:
        section(tags.p(rolling, class_="rollout"))
    running = mapping(app.get("hosts"))
    if not running:
        return section(tags.p("No host reports this app.", class_="empty"))
    head = tags.tr(*[tags.th(h) for h in
                     ("host", "image", "digest", "health", "containers", "last round")])
    body = tags.tbody(*[_host_row(str(h), s) for h, s in sorted(running.items())])
    return section(tags.table(tags.thead(head), body))


def _body(document: Mapping[str, Any]) -> Tag:
    found = apps(document)
    known = hosts(document)
    paused = sum(1 for _, app in found if app.get("paused"))
    sections = [_app_section(name, app) for name, app in found] or [
        tags.p("No host has reported an app yet.", class_="empty")
    ]
    host_rows = [
        tags.tr(tags.td(h.shown, class_="host"), tags.td(h.published), tags.td(str(h.apps)),
                **{"data-host": h.name})
        for h in known
    ]
    return tags.body(
        tags.header(
            tags.h1("deployer"),
            tags.p(f"{_plural(len(known), 'host')} \u00b7 {_plural(len(found), 'app')}"
                   f" \u00b7 {paused} paused", id="summary"),
            tags.p(f"as of {when(document.get('time'))}", id="updated", role="status"),
        ),
        Tag("main")(*sections, id="apps"),
        tags.section(
            tags.h2("Hosts"),
            tags.table(tags.thead(tags.tr(tags.th("host"), tags.th("last report"),
                                          tags.th("apps"))),
                       tags.tbody(*host_rows)),
            id="hosts",
        ),
    )


def render_page(document: Mapping[str, Any]) -> bytes:
    """The page for a ``/status`` document; ValueError when it is not one."""
    results: list[bytes | Failure] = []
    flattenString(None, _body(document)).addBoth(results.append)
    if not results:
        raise ValueError("the status page waits for something: it cannot be rendered")
    body = results[0]
    if isinstance(body, Failure):
        raise ValueError(f"the status page could not be rendered: {body.getErrorMessage()}")
    assert body.endswith(b"</body>")
    return _HEAD + body[: -len(b"</body>")] + _TAIL
