"""The ``/status`` document read for people: short image ids, times, the paused line, and the
table that ``deployer status`` prints.

The document is :func:`deployer.rollout.status.build_document`'s (see there); this module only
reads it, and reads it leniently: a field that is missing or of another type shows as ``-``, so
that a daemon of another version still gets a table. Every text that comes from the document
(app and host names, reasons, container names come from etcd) is passed through
:func:`printable` before it reaches a terminal.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

import attrs

NONE = "-"
HEX_SHOWN = 12
"""Hex digits shown of an image id or digest, as ``docker ps`` and ``docker images`` do."""

HEADERS = ("APP", "HOST", "IMAGE", "DIGEST", "HEALTH", "CONTAINERS", "LAST ROUND")


def printable(value: object) -> str:
    """``value`` as one line of text that cannot drive a terminal: control and other
    unprintable characters as Python escapes (``\\x1b``, ``\\n``)."""
    text = value if isinstance(value, str) else "" if value is None else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def short_id(image_id: object) -> str:
    """The first 12 hex digits of an image id (``sha256:0123…`` -> ``0123456789ab``)."""
    if not isinstance(image_id, str) or not image_id:
        return NONE
    return image_id.partition(":")[2][:HEX_SHOWN] if ":" in image_id else image_id[:HEX_SHOWN]


def short_digest(digest: object) -> str:
    """``sha256:`` and the first 12 hex digits of a digest."""
    if not isinstance(digest, str) or not digest:
        return NONE
    algorithm, colon, hex_digits = digest.partition(":")
    return f"{algorithm}:{hex_digits[:HEX_SHOWN]}" if colon else digest[:HEX_SHOWN]


def when(seconds: object) -> str:
    """A Unix time as ``YYYY-MM-DD HH:MM:SS UTC``; ``-`` when there is none (or it is 0)."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return NONE
    if not math.isfinite(seconds) or seconds <= 0:
        return NONE
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(seconds))
    except (OverflowError, OSError, ValueError):
        return NONE


def mapping(value: object) -> Mapping[str, Any]:
    """``value`` when it is a JSON object, else an empty one."""
    return value if isinstance(value, Mapping) else {}


def sequence(value: object) -> list[Any]:
    """``value`` when it is a JSON array, else an empty one."""
    return value if isinstance(value, list) else []


def text(value: object) -> str:
    """A string of the document, :func:`printable`; ``-`` for anything else or empty."""
    return printable(value) if isinstance(value, str) and value else NONE


def last_round(state: Mapping[str, Any]) -> str:
    """``<time> <result>`` of an app state's last round."""
    round_ = state.get("last_round")
    if not isinstance(round_, Mapping):
        return NONE
    parts = [when(round_.get("time")), text(round_.get("result"))]
    return " ".join(p for p in parts if p != NONE) or NONE


def containers(state: Mapping[str, Any]) -> str:
    names = [printable(c) for c in sequence(state.get("containers")) if isinstance(c, str)]
    return ", ".join(names) or NONE


def pause_details(pause: Mapping[str, Any]) -> str:
    """``bad image <12 hex>[, digest …], host <host>, since <time>`` of a pause record."""
    details = [f"bad image {short_id(pause.get('image_id'))}"]
    if isinstance(pause.get("digest"), str) and pause["digest"]:
        details.append(f"digest {short_digest(pause['digest'])}")
    details += [f"host {text(pause.get('host'))}", f"since {when(pause.get('time'))}"]
    return ", ".join(details)


def paused_line(pause: Mapping[str, Any]) -> str:
    """``PAUSED: <reason> (bad image <12 hex>[, digest …], host <host>, since <time>)``."""
    return f"PAUSED: {text(pause.get('reason'))} ({pause_details(pause)})"


def _in_line(entry: object) -> str:
    entry = mapping(entry)
    shown = f"{text(entry.get('host'))} ({text(entry.get('container'))})"
    since = when(entry.get("since"))
    return shown if since == NONE else f"{shown} since {since}"


def rollout_line(app: Mapping[str, Any]) -> str | None:
    """``replacing: a (web) since …; waiting: b (web)`` while the app rolls out, else None."""
    parts = []
    replacing = [_in_line(e) for e in sequence(app.get("replacing"))]
    waiting = [_in_line(e) for e in sequence(app.get("waiting"))]
    if replacing:
        parts.append("replacing: " + ", ".join(replacing))
    if waiting:
        parts.append("waiting: " + ", ".join(waiting))
    return "; ".join(parts) or None


def app_state(app: Mapping[str, Any]) -> str:
    """One word for an app: ``paused``, ``rolling`` (hosts hold or wait for a slot),
    ``converged`` (every host on one image) or ``mixed`` (hosts on different images)."""
    if app.get("paused"):
        return "paused"
    if sequence(app.get("replacing")) or sequence(app.get("waiting")):
        return "rolling"
    return "converged" if app.get("converged", True) else "mixed"


@attrs.frozen
class Row:
    """One host's view of one app, as shown."""

    app: str
    host: str
    image: str
    image_id: str
    digest: str
    full_digest: str
    health: str
    containers: str
    last_round: str

    def cells(self) -> tuple[str, ...]:
        return (self.app, self.host, self.image, self.digest, self.health, self.containers,
                self.last_round)


def apps(document: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """``(app, its entry)`` of the document, by name; ValueError when there is no ``apps``
    object (not a ``/status`` document)."""
    found = document.get("apps") if isinstance(document, Mapping) else None
    if not isinstance(found, Mapping):
        raise ValueError("no apps object")
    return sorted(((str(name), mapping(entry)) for name, entry in found.items()),
                  key=lambda pair: pair[0])


def row(app: str, host: str, state: object) -> Row:
    """What ``host`` runs of ``app`` (its app state in the document)."""
    state = mapping(state)
    image_id, digest = state.get("image_id"), state.get("digest")
    return Row(
        app=printable(app),
        host=printable(host),
        image=short_id(image_id),
        image_id=text(image_id),
        digest=short_digest(digest),
        full_digest=text(digest),
        health=text(state.get("health")),
        containers=containers(state),
        last_round=last_round(state),
    )


def rows(name: str, app: Mapping[str, Any]) -> list[Row]:
    """One :class:`Row` per host that runs ``app``, by host name."""
    return [row(name, str(host), state)
            for host, state in sorted(mapping(app.get("hosts")).items())]


@attrs.frozen
class HostLine:
    """A host of the document: its ``name`` (as in the document), as ``shown``, when it
    last ``published`` what it runs, and how many ``apps`` it runs."""

    name: str
    shown: str
    published: str
    apps: int


def hosts(document: Mapping[str, Any]) -> list[HostLine]:
    """Every host of the document, by name."""
    out = []
    for host, state in sorted(mapping(document.get("hosts")).items()):
        state = mapping(state)
        out.append(HostLine(str(host), printable(host), when(state.get("time")),
                            len(mapping(state.get("apps")))))
    return out


def render_table(document: Mapping[str, Any]) -> str:
    """What ``deployer status`` prints: a table of app x host, then for each paused app its
    ``PAUSED:`` line and for each app that rolls out who replaces and who waits."""
    table: list[tuple[str, ...]] = [HEADERS]
    notes: list[str] = []
    for name, app in apps(document):
        shown = [row.cells() for row in rows(name, app)]
        table += shown or [(printable(name), *[NONE] * (len(HEADERS) - 1))]
        pause = app.get("paused")
        if isinstance(pause, Mapping):
            notes.append(f"{printable(name)} {paused_line(pause)}")
        rolling = rollout_line(app)
        if rolling is not None:
            notes.append(f"{printable(name)} {rolling}")
    lines = []
    if len(table) == 1:
        known = ", ".join(h.shown for h in hosts(document)) or "none"
        lines.append(f"no app reported yet (hosts: {known})")
    else:
        widths = [max(len(row[i]) for row in table) for i in range(len(HEADERS))]
        for row in table:
            lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"
