"""deployer.logs: the JSON log observer for ``twistd --logger deployer.logs.json``."""

from __future__ import annotations

import io
import json
import math
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import Logger, LogLevel
from twisted.python.failure import Failure

from deployer import logs
from deployer.logs import JSONLineFormatter, json_observer, mask_urls, secrets_from
from tests.stack.daemon import Daemon, log_line_problem, readable

TOKEN = "s3cret-token-value"


def emit(level: LogLevel = LogLevel.info,
         secrets: tuple[str, ...] = ()) -> tuple[Logger, io.StringIO]:
    """A Logger whose events go through the JSON observer into the returned buffer."""
    out = io.StringIO()
    return Logger(namespace="deployer.test", observer=json_observer(out, level, secrets)), out


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    text = out.getvalue()
    assert text.endswith("\n") or not text
    parsed = [json.loads(line) for line in text.splitlines()]
    assert all(isinstance(p, dict) for p in parsed)
    return parsed


def test_one_object_per_line_with_the_event_fields() -> None:
    log, out = emit()
    log.info("pulled {repotag} in {seconds:.2f} s", repotag="127.0.0.1:5000/myorg/foo:qa",
             seconds=0.2412, host="host-a", containers=["web", "db"], count=3, ok=True,
             nothing=None, digest="sha256:" + "a" * 64)
    (line,) = lines(out)
    assert line["level"] == "info"
    assert line["namespace"] == "deployer.test"
    assert line["message"] == "pulled 127.0.0.1:5000/myorg/foo:qa in 0.24 s"
    when = datetime.fromisoformat(line["time"])
    assert when.utcoffset() is not None and when.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    assert abs(when.timestamp() - datetime.now().timestamp()) < 60
    assert {k: line[k] for k in ("repotag", "seconds", "host", "containers", "count", "ok",
                                 "nothing", "digest")} == {
        "repotag": "127.0.0.1:5000/myorg/foo:qa", "seconds": 0.2412, "host": "host-a",
        "containers": ["web", "db"], "count": 3, "ok": True, "nothing": None,
        "digest": "sha256:" + "a" * 64,
    }
    assert not any(k.startswith("log_") for k in line)
    assert out.getvalue().count("\n") == 1


def test_a_multi_line_message_stays_on_one_line() -> None:
    log, out = emit()
    log.warn("first\nsecond\r\nthird \u2028 end")
    assert out.getvalue().count("\n") == 1
    assert lines(out)[0]["message"] == "first\nsecond\r\nthird \u2028 end"


def test_fields_json_cannot_hold_are_left_out() -> None:
    log, out = emit()

    class Opaque:
        def __repr__(self) -> str:
            return f"Opaque(token={TOKEN})"

    log.error("round failed: {error}", error=ValueError("bad tag"), obj=Opaque(),
              mixed=[1, Opaque()], bad_keys={1: "x"}, tags={"b", "a"},
              nested={"a": [1, {"b": "c"}]}, raw=b"caf\xc3\xa9 \xff", nan=math.nan,
              deep=[[[[[[[[[["x"]]]]]]]]]])
    (line,) = lines(out)
    assert line["error"] == "bad tag"
    assert line["tags"] == ["a", "b"]
    assert line["nested"] == {"a": [1, {"b": "c"}]}
    assert line["raw"] == "café \ufffd"
    assert line["nan"] == "nan"
    for key in ("obj", "mixed", "bad_keys", "deep"):
        assert key not in line
    assert TOKEN not in out.getvalue()


def test_secret_fields_are_dropped_and_redacted_in_the_message() -> None:
    log, out = emit()
    log.info("auth with {token} and {Authorization}", token=TOKEN,
             Authorization=f"Bearer {TOKEN}", github_secret="x" * 20, password="hunter2-long",
             headers={"X-Api-Key": "k" * 10, "Content-Type": "application/json"},
             slack_webhook_url="https://hooks.slack.com/services/T/B/zzzzzzzzzz")
    (line,) = lines(out)
    assert line["message"] == "auth with *** and ***"
    for key in ("token", "Authorization", "github_secret", "password", "slack_webhook_url"):
        assert key not in line
    assert line["headers"] == {"Content-Type": "application/json"}
    for secret in (TOKEN, "x" * 20, "hunter2", "k" * 10, "zzzzzzzzzz"):
        assert secret not in out.getvalue()


def test_a_secret_seen_once_is_redacted_in_later_events() -> None:
    log, out = emit()
    log.debug("ignored {token}", token=TOKEN)  # filtered out by level, but learned
    log.info("loaded {what}", what=f"token value {TOKEN}")
    log.info("short {x}", x="ab")
    assert TOKEN not in out.getvalue()
    assert lines(out)[0]["what"] == "token value ***"


def test_known_secrets_are_redacted_everywhere() -> None:
    log, out = emit(secrets=(TOKEN, "short"))
    log.info("config {config}", config={"listen": ":4500", "note": f"x{TOKEN}y"},
             url=f"http://127.0.0.1/{TOKEN}")
    (line,) = lines(out)
    assert TOKEN not in out.getvalue()
    assert line["config"]["note"] == "x***y"
    assert line["url"] == "http://127.0.0.1/***"
    log.info("a short one: {x}", x="short")  # shorter than MIN_SECRET_LENGTH: kept
    assert lines(out)[1]["x"] == "short"


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("POST /api/deploy?token=abc&x=1 HTTP/1.1", "POST /api/deploy?token=***&x=*** HTTP/1.1"),
        ("https://h.example/cb?token=abc#frag", "https://h.example/cb?token=***#frag"),
        ("url 'http://u:pw@h:5000/v2/?a=b' done", "url 'http://u:***@h:5000/v2/?a=***' done"),
        ("https://user:p%40ss@registry/v2/", "https://user:***@registry/v2/"),
        ("/api/deploy?token", "/api/deploy?***"),
        ("what? no url=here", "what? no url=here"),
        ("a@b and user:x@host", "a@b and user:x@host"),
        ("no query http://h/p", "no query http://h/p"),
    ],
)
def test_mask_urls(text: str, masked: str) -> None:
    assert mask_urls(text) == masked


def test_urls_are_masked_in_messages_fields_and_tracebacks() -> None:
    log, out = emit()
    try:
        raise ValueError("GET http://127.0.0.1:4500/api/deploy?token=leaked failed")
    except ValueError:
        log.failure("calling {url}", Failure(), url="http://127.0.0.1:4500/x?token=leaked")
    (line,) = lines(out)
    assert "leaked" not in out.getvalue()
    assert line["level"] == "critical"
    assert line["url"] == "http://127.0.0.1:4500/x?token=***"
    assert line["message"] == "calling http://127.0.0.1:4500/x?token=***"
    assert line["traceback"].startswith("Traceback (most recent call last):")
    assert "ValueError: GET http://127.0.0.1:4500/api/deploy?token=*** failed" in line["traceback"]


def test_levels_are_filtered() -> None:
    log, out = emit()
    log.debug("not shown")
    log.info("shown")
    log.warn("warned")
    assert [(e["level"], e["message"]) for e in lines(out)] == [("info", "shown"),
                                                                ("warn", "warned")]
    log, out = emit(level=LogLevel.debug)
    log.debug("shown")
    assert [e["level"] for e in lines(out)] == ["debug"]


def test_legacy_events_get_a_level_and_no_legacy_keys() -> None:
    formatter = JSONLineFormatter()
    event = {"log_format": "{log_text}", "log_text": "legacy", "message": ("legacy",),
             "isError": 1, "system": "-", "time": 1.0, "log_time": 1.0, "why": "x"}
    line = json.loads(formatter(event) or "")
    assert line == {"time": "1970-01-01T00:00:01.000+00:00", "level": "error",
                    "namespace": "-", "message": "legacy"}


def test_an_event_that_cannot_be_formatted_still_gives_a_line() -> None:
    formatter = JSONLineFormatter()
    line = json.loads(formatter({"log_format": "{missing", "log_level": LogLevel.warn,
                                 "log_system": "HTTPChannel,0,127.0.0.1"}) or "")
    assert line["level"] == "warn"
    assert line["system"] == "HTTPChannel,0,127.0.0.1"
    assert "Unable to format event" in line["message"]


def test_secrets_from_environment_and_flags() -> None:
    environ = {"DEPLOYER_WEBHOOK_TOKEN": "env-token-1", "SLACK_WEBHOOK_URL": "https://s/T/B/C",
               "DEPLOYER_GITHUB_SECRET": "gh-secret-1", "PATH": "/usr/bin:/bin", "X_TOKEN": "ab"}
    argv = ["twistd", "-n", "deployer", "--webhook_token", "flag-token-1",
            "-github_secret=flag-secret-1", "--slack-webhook-url=https://hooks/x/y/z",
            "--webhook_token_file", "/etc/deployer/token", "--listen", ":4500"]
    assert secrets_from(environ, argv) == {
        "env-token-1", "https://s/T/B/C", "gh-secret-1", "flag-token-1", "flag-secret-1",
        "https://hooks/x/y/z",
    }


def test_the_factory_writes_to_the_stdout_of_its_call(monkeypatch: pytest.MonkeyPatch) -> None:
    real = io.StringIO()
    monkeypatch.setattr(sys, "stdout", real)
    observer = logs.json(environ={"DEPLOYER_WEBHOOK_TOKEN": TOKEN}, argv=[])
    monkeypatch.setattr(sys, "stdout", io.StringIO())  # what twistd's redirection does
    Logger(namespace="n", observer=observer).info("token is {t}", t=TOKEN)
    assert lines(real) == [{**lines(real)[0], "message": "token is ***",
                            "t": "***"}]


def test_the_factory_takes_the_level_from_the_environment(
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = io.StringIO()
    observer = logs.json(out, environ={"DEPLOYER_LOG_LEVEL": "debug"}, argv=[])
    Logger(namespace="n", observer=observer).debug("shown")
    assert [e["level"] for e in lines(out)] == ["debug"]
    observer = logs.json(out, environ={"DEPLOYER_LOG_LEVEL": "Warning"}, argv=[])
    Logger(namespace="n", observer=observer).info("hidden")
    assert len(lines(out)) == 1
    with pytest.raises(SystemExit) as e:
        logs.json(out, environ={"DEPLOYER_LOG_LEVEL": "loud"}, argv=[])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "DEPLOYER_LOG_LEVEL" in err and "'loud'" in err


def test_stdout_picks_the_format_from_the_environment(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for environ, is_json in (({}, False), ({"DEPLOYER_LOG_FORMAT": "json"}, True),
                             ({"DEPLOYER_LOG_FORMAT": " Text "}, False)):
        out = io.StringIO()
        log = Logger(namespace="deployer.x", observer=logs.stdout(out, environ, argv=[]))
        log.debug("hidden")
        log.info("shown {n}", n=1)
        text = out.getvalue()
        assert text.count("\n") == 1 and "hidden" not in text
        if is_json:
            assert json.loads(text)["message"] == "shown 1"
        else:
            assert text.endswith(" [deployer.x#info] shown 1\n")
    with pytest.raises(SystemExit) as e:
        logs.stdout(io.StringIO(), {"DEPLOYER_LOG_FORMAT": "xml"}, argv=[])
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        "twistd: DEPLOYER_LOG_FORMAT: 'xml' is not a log format: use text or json\n"
    )


def test_text_takes_the_level_from_the_environment() -> None:
    out = io.StringIO()
    log = Logger(namespace="n", observer=logs.text(out, {"DEPLOYER_LOG_LEVEL": "error"}))
    log.warn("hidden")
    log.error("shown")
    assert out.getvalue().endswith(" [n#error] shown\n") and "hidden" not in out.getvalue()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary()
    | st.builds(object) | st.builds(ValueError, st.text()),
    lambda children: st.lists(children, max_size=4) | st.tuples(children)
    | st.dictionaries(st.text(max_size=8) | st.integers(), children, max_size=4),
    max_leaves=12,
)


@given(fields=st.dictionaries(st.text(min_size=1, max_size=12), json_values, max_size=6),
       text=st.text(max_size=40))
def test_any_event_gives_one_valid_line_without_the_secret(fields: dict[str, Any],
                                                           text: str) -> None:
    formatter = JSONLineFormatter([TOKEN])
    event = {**fields, "log_format": text.replace("{", "{{").replace("}", "}}") + TOKEN,
             "log_level": LogLevel.info, "log_namespace": "n", "log_time": 0.0,
             "token": TOKEN, "note": f"/x?token={TOKEN}"}
    line = formatter(event)
    assert line is not None and line.endswith("\n") and line.count("\n") == 1
    parsed = json.loads(line)
    assert log_line_problem(line) is None
    assert TOKEN not in line
    assert parsed["note"] == "/x?token=***"


def test_readable_text_of_a_line() -> None:
    line = json.dumps({"time": "2025-01-01T00:00:00.000+00:00", "level": "error",
                       "namespace": "deployer.x", "message": "a\nb",
                       "traceback": "Traceback (most recent call last):\nValueError\n"})
    assert readable(line + "\n") == (
        "2025-01-01T00:00:00.000+00:00 [deployer.x#error] a\n\tb\n"
        "\tTraceback (most recent call last):\n\tValueError\n"
    )
    assert readable("not json\n") == "not json\n"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("[]", "not a JSON object"),
        ("{", "not JSON"),
        ('{"time": "x", "level": "info", "namespace": "n", "message": "m"}',
         "time is not ISO 8601"),
        ('{"time": "2025-01-01T00:00:00", "level": "info", "namespace": "n", "message": "m"}',
         "time has no time zone"),
        ('{"time": "2025-01-01T00:00:00Z", "level": "loud", "namespace": "n", "message": "m"}',
         "unknown level 'loud'"),
        ('{"time": "2025-01-01T00:00:00Z", "level": "info", "namespace": "n"}',
         "no message string"),
    ],
)
def test_log_line_problems(line: str, problem: str) -> None:
    assert log_line_problem(line) == problem


@pytest.mark.real
def test_the_daemon_logs_json_lines_without_its_token(tmp_path: Path) -> None:
    """A daemon whose engine is missing: start-up, engine errors, webhooks with the token in
    the query (refused and accepted), SIGTERM; every line is checked by Daemon.stop."""
    daemon = Daemon(tmp_path, ["--docker", f"unix://{tmp_path}/missing.sock",
                               "--repull_period", "0", "--github_secret", "gh-secret-value"],
                    token=TOKEN, env={"SLACK_WEBHOOK_URL": "http://127.0.0.1:9/slack-secret"})
    daemon.start(healthy=False)
    try:
        for query in (f"?token={TOKEN}", "?token=wrong-token-value"):
            status, _ = daemon.request("POST", "/api/deploy" + query,
                                       json.dumps({"repository": "myorg/foo"}).encode(),
                                       auth=False)
            assert status in (202, 401)
        status, _ = daemon.request("GET", f"/nowhere?token={TOKEN}", None, auth=False)
        assert status == 404
    finally:
        code = daemon.stop()
    raw = daemon.raw_log()
    assert TOKEN not in raw and "gh-secret-value" not in raw and "slack-secret" not in raw
    events = [json.loads(line) for line in raw.splitlines()]
    assert any(e["namespace"] == "deployer.webhook" and e.get("repository") == "myorg/foo"
               for e in events), raw[-3000:]
    assert any("/nowhere?token=*** " in e["message"] for e in events)
    assert any(e["level"] == "warn" and "refused webhook" in e["message"] for e in events)
    assert "Main loop terminated" in daemon.log()
    assert code in (0, -15)
