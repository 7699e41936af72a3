"""deployer.status_view: the ``/status`` document as ``deployer status`` prints it."""

from __future__ import annotations

import json
from typing import Any

import pytest

from deployer.rollout.pause import PauseRecord
from deployer.rollout.status import AppState, HostState, InLine, build_document
from deployer.status_view import (
    app_state,
    paused_line,
    printable,
    render_table,
    short_digest,
    short_id,
    when,
)

ID_OLD = "sha256:" + "0123456789abcdef" * 4
ID_NEW = "sha256:" + "fedcba9876543210" * 4
DIGEST_OLD = "sha256:" + "aa" * 32
DIGEST_NEW = "sha256:" + "bb" * 32

# A document as a fleet daemon answered it (GET /status), recorded: three hosts, an app
# paused after its new build failed on host-b, and an app rolling out.
RECORDED = json.loads("""
{"apps": {
  "127.0.0.1:5000/myorg/web:prod": {
   "converged": false,
   "hosts": {
    "host-a": {"containers": ["web-1", "web-2"], "digest": null, "health": "running",
              "image_id": "sha256:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210",
               "last_round": {"result": "ok", "time": 1699999940.0}},
    "host-c": {"containers": ["web"], "digest": null, "health": "running",
              "image_id": "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
               "last_round": {"result": "ok", "time": 1699999941.5}}},
   "images": [],
   "paused": null,
   "replacing": [{"container": "web", "host": "host-c", "since": 1699999998.0}],
   "waiting": [{"container": "web-1", "host": "host-a", "since": 1699999999.0}]},
  "myorg/app:qa": {
   "converged": false,
   "hosts": {
    "host-a": {"containers": ["app"],
               "digest": "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
               "health": "healthy",
              "image_id": "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
               "last_round": {"result": "ok", "time": 1699999995.0}},
    "host-b": {"containers": ["app"],
               "digest": "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
               "health": "healthy",
              "image_id": "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
               "last_round": {"result": "rolled back", "time": 1699999997.0}}},
   "images": [],
   "paused": {"app": "myorg/app:qa",
              "digest": "sha256:bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
              "host": "host-b",
              "image_id": "sha256:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210",
              "reason": "unhealthy: health check failed 3 times",
              "time": 1699999996.0},
   "replacing": [],
   "waiting": []}},
 "hosts": {"host-a": {"apps": {}, "time": 1700000000.0},
           "host-b": {"apps": {}, "time": 1700000000.0},
           "host-c": {"apps": {}, "time": 1700000000.0}},
 "time": 1700000001.0}
""")

TABLE = """\
APP                            HOST    IMAGE         DIGEST               HEALTH   CONTAINERS    LAST ROUND
127.0.0.1:5000/myorg/web:prod  host-a  fedcba987654  -                    running  web-1, web-2  2023-11-14 22:12:20 UTC ok
127.0.0.1:5000/myorg/web:prod  host-c  0123456789ab  -                    running  web           2023-11-14 22:12:21 UTC ok
myorg/app:qa                   host-a  0123456789ab  sha256:aaaaaaaaaaaa  healthy  app           2023-11-14 22:13:15 UTC ok
myorg/app:qa                   host-b  0123456789ab  sha256:aaaaaaaaaaaa  healthy  app           2023-11-14 22:13:17 UTC rolled back

127.0.0.1:5000/myorg/web:prod replacing: host-c (web) since 2023-11-14 22:13:18 UTC; waiting: host-a (web-1) since 2023-11-14 22:13:19 UTC
myorg/app:qa PAUSED: unhealthy: health check failed 3 times (bad image fedcba987654, digest sha256:bbbbbbbbbbbb, host host-b, since 2023-11-14 22:13:16 UTC)
"""  # noqa: E501


def test_the_table_of_a_recorded_document() -> None:
    assert render_table(RECORDED) == TABLE


def test_the_table_of_a_document_the_rollout_core_builds() -> None:
    """What :func:`build_document` makes is what the table reads."""
    hosts = {
        "host-a": HostState("host-a", 1_700_000_000.0, {
            "myorg/app:qa": AppState(ID_OLD, DIGEST_OLD, ("app",), "healthy", 1_699_999_995.0,
                                     "ok"),
        }),
    }
    paused = {"myorg/app:qa": PauseRecord("myorg/app:qa", ID_NEW, None, "host-b",
                                          "not ready within 5m", 1_699_999_990.0)}
    queues = {"myorg/app:qa": [InLine("host-b", "app", None, True)]}
    document = json.loads(json.dumps(build_document(hosts, paused, queues, 1_700_000_001.0)))
    assert render_table(document).splitlines() == [
        "APP           HOST    IMAGE         DIGEST               HEALTH   CONTAINERS  LAST ROUND",
        "myorg/app:qa  host-a  0123456789ab  sha256:aaaaaaaaaaaa  healthy  app"
        "         2023-11-14 22:13:15 UTC ok",
        "",
        "myorg/app:qa PAUSED: not ready within 5m (bad image fedcba987654, host host-b,"
        " since 2023-11-14 22:13:10 UTC)",
        "myorg/app:qa replacing: host-b (app)",
    ]


def test_an_empty_fleet() -> None:
    assert render_table({"apps": {}, "hosts": {}, "time": 1.0}) == (
        "no app reported yet (hosts: none)\n"
    )
    assert render_table({"apps": {}, "hosts": {"a": {}, "b": {}}}) == (
        "no app reported yet (hosts: a, b)\n"
    )


def test_a_paused_app_that_no_host_reports() -> None:
    pause = PauseRecord("myorg/app:qa", "", None, "", "unreadable pause record: 'x'", 0.0)
    document = build_document({}, {"myorg/app:qa": pause}, {}, 1.0)
    assert render_table(document).splitlines() == [
        "APP           HOST  IMAGE  DIGEST  HEALTH  CONTAINERS  LAST ROUND",
        "myorg/app:qa  -     -      -       -       -           -",
        "",
        "myorg/app:qa PAUSED: unreadable pause record: 'x' (bad image -, host -, since -)",
    ]


@pytest.mark.parametrize("document", [None, [], {}, {"apps": []}, {"apps": "x"}, "apps"])
def test_what_is_no_status_document(document: Any) -> None:
    with pytest.raises(ValueError, match="no apps object"):
        render_table(document)


def test_a_document_of_another_shape_still_makes_a_table() -> None:
    """Fields missing or of other types show as ``-``; nothing raises."""
    document = {"apps": {"a:1": {"hosts": {"h": {"image_id": 7, "containers": "x",
                                                 "last_round": {"time": "x"}}},
                                 "paused": {"reason": None, "time": "soon"},
                                 "replacing": [None, {"host": 3}]},
                         "b:1": None}}
    assert render_table(document).splitlines() == [
        "APP  HOST  IMAGE  DIGEST  HEALTH  CONTAINERS  LAST ROUND",
        "a:1  h     -      -       -       -           -",
        "b:1  -     -      -       -       -           -",
        "",
        "a:1 PAUSED: - (bad image -, host -, since -)",
        "a:1 replacing: - (-), - (-)",
    ]


def test_names_from_etcd_cannot_drive_the_terminal() -> None:
    evil = "app\x1b[2J\x1b]0;pwned\x07:qa"
    document = {"apps": {evil: {"hosts": {"host\r\nX": {"health": "ok\x9b31m",
                                                         "containers": ["c\u202e"]}},
                                "paused": {"reason": "bad\nbuild", "host": "h\x00"}}}}
    out = render_table(document)
    assert all(c.isprintable() for c in out.replace("\n", ""))
    assert out.count("\n") == 4  # header, row, blank, PAUSED
    assert "app\\x1b[2J\\x1b]0;pwned\\x07:qa" in out
    assert "host\\r\\nX" in out and "ok\\x9b31m" in out and "c\\u202e" in out
    assert "PAUSED: bad\\nbuild (bad image -, host h\\x00, since -)" in out


@pytest.mark.parametrize(
    ("value", "shown"),
    [(ID_OLD, "0123456789ab"), ("0123456789abcdef", "0123456789ab"), ("sha256:ab", "ab"),
     ("", "-"), (None, "-"), (12, "-")],
)
def test_short_id(value: object, shown: str) -> None:
    assert short_id(value) == shown


@pytest.mark.parametrize(
    ("value", "shown"),
    [(DIGEST_OLD, "sha256:aaaaaaaaaaaa"), ("sha512:" + "c" * 128, "sha512:cccccccccccc"),
     ("", "-"), (None, "-"), (["x"], "-")],
)
def test_short_digest(value: object, shown: str) -> None:
    assert short_digest(value) == shown


@pytest.mark.parametrize(
    ("value", "shown"),
    [(1_700_000_000, "2023-11-14 22:13:20 UTC"), (1_700_000_000.9, "2023-11-14 22:13:20 UTC"),
     (0, "-"), (-5, "-"), (None, "-"), ("1700000000", "-"), (True, "-"),
     (float("nan"), "-"), (float("inf"), "-"), (1e300, "-")],
)
def test_when(value: object, shown: str) -> None:
    assert when(value) == shown


def test_paused_line() -> None:
    record = PauseRecord("myorg/app:qa", ID_NEW, DIGEST_NEW, "host-b", "exited with 1",
                         1_700_000_000.0)
    assert paused_line(record.to_json()) == (
        "PAUSED: exited with 1 (bad image fedcba987654, digest sha256:bbbbbbbbbbbb,"
        " host host-b, since 2023-11-14 22:13:20 UTC)"
    )


@pytest.mark.parametrize(
    ("app", "state"),
    [({"paused": {"reason": "x"}, "replacing": [{}]}, "paused"),
     ({"paused": None, "replacing": [{}], "converged": False}, "rolling"),
     ({"paused": None, "waiting": [{}]}, "rolling"),
     ({"paused": None, "converged": True}, "converged"),
     ({"paused": None, "converged": False}, "mixed"),
     ({}, "converged")],
)
def test_app_state(app: dict[str, Any], state: str) -> None:
    assert app_state(app) == state


def test_printable() -> None:
    assert printable("plain text: ok") == "plain text: ok"
    assert printable("a\tb\x7f\u200bc") == "a\\tb\\x7f\\u200bc"
    assert printable(None) == ""
    assert printable(3) == "3"
