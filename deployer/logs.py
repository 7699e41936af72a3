"""Log lines an operator can ship: ``twistd --logger deployer.logs.json deployer ...``.

:func:`json` is a log observer factory for twistd's ``--logger``. It writes one JSON object per
line to standard output::

    {"time": "2025-05-20T10:00:00.123+00:00", "level": "info", "namespace": "deployer.docker",
     "message": "pulled 127.0.0.1:5000/myorg/foo:qa in 0.24 s",
     "repotag": "127.0.0.1:5000/myorg/foo:qa", "seconds": 0.24}

``time`` is ISO 8601 in UTC, ``level`` one of debug/info/warn/error/critical, ``message`` the
formatted text, ``system`` Twisted's log system when the event has one, ``traceback`` the
traceback of a logged failure, and then the event's own fields that JSON can hold (strings,
numbers, booleans, null, and lists and objects of them; an exception becomes its text).

Nothing secret is written: fields named like a secret (token, secret, password,
authorization, credential, cookie, api key) are left out, and shown as ``***`` if the
message refers to them; query values and passwords in anything that looks like a URL are
masked (``?token=***``); and the values of secret flags and environment variables this process
was started with (``--webhook_token``, ``DEPLOYER_WEBHOOK_TOKEN``, ``SLACK_WEBHOOK_URL``...) are
replaced by ``***`` wherever they appear.

Events below ``info`` are dropped unless ``DEPLOYER_LOG_LEVEL`` says otherwise (``debug``,
``info``, ``warn``, ``error`` or ``critical``), as ``twist`` does by default.

``deployer.logs.text`` is Twisted's usual text at that level, and ``deployer.logs.stdout`` (the
container image's) is text, or JSON when ``DEPLOYER_LOG_FORMAT=json``.
"""

from __future__ import annotations

import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime
from json import dumps
from typing import IO, Any, NoReturn

from twisted.logger import (
    FileLogObserver,
    FilteringLogObserver,
    ILogObserver,
    LogEvent,
    LogLevel,
    LogLevelFilterPredicate,
    formatEvent,
    textFileLogObserver,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from deployer.redact import REDACTED, masked_query

LEVEL_ENV = "DEPLOYER_LOG_LEVEL"
FORMAT_ENV = "DEPLOYER_LOG_FORMAT"

# A field, flag or environment variable with such a name holds a secret.
SECRET_NAME = re.compile(
    r"token|secret|passw(?:or)?d|authori[sz]ation|credential|cookie|api[_-]?key|private[_-]?key"
    r"|slack[_-]webhook[_-]url",
    re.IGNORECASE,
)
# Values shorter than this are not searched for in the text: they would mangle it.
MIN_SECRET_LENGTH = 8
MAX_SECRETS = 64
MAX_DEPTH = 8

# What Twisted itself keeps in an event (the legacy ``twisted.python.log`` keys included).
_TWISTED_KEYS = frozenset(
    {"format", "message", "isError", "system", "time", "why", "failure", "printed", "debug"}
)
_LEVEL_NAMES: dict[object, str] = {level: level.name for level in LogLevel.iterconstants()}
_OUTPUT_KEYS = frozenset({"time", "level", "namespace", "message", "system", "traceback"})

# Something URL-like: an absolute URL, or a path, followed by a query.
_URL_QUERY = re.compile(
    r"(?P<base>(?:[A-Za-z][A-Za-z0-9+.\-]*://|/)[^\s?#\"'<>]*)\?(?P<query>[^\s#\"'<>]*)"
)
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^/\s:@\"'<>]*):"
                           r"[^/\s@\"'<>]*@")


def mask_urls(text: str) -> str:
    """``text`` with every query value and every URL password replaced by ``***``."""
    if "?" in text:
        text = _URL_QUERY.sub(_mask_query, text)
    if "@" in text:
        text = _URL_USERINFO.sub(r"\g<scheme>\g<user>:***@", text)
    return text


def _mask_query(match: re.Match[str]) -> str:
    return match.group("base") + "?" + masked_query(match.group("query"))


def is_secret_name(name: str) -> bool:
    return SECRET_NAME.search(name) is not None


def secrets_from(environ: Mapping[str, str], argv: Sequence[str]) -> set[str]:
    """The values of secret-named environment variables and command-line flags."""
    found = {value for name, value in environ.items() if is_secret_name(name)}
    args = list(argv)
    for i, arg in enumerate(args):
        if not arg.startswith("-"):
            continue
        name, eq, value = arg.lstrip("-").partition("=")
        if not is_secret_name(name) or name.endswith("file"):
            continue
        if eq:
            found.add(value)
        elif i + 1 < len(args):
            found.add(args[i + 1])
    return {s for s in found if len(s) >= MIN_SECRET_LENGTH}


class JSONLineFormatter:
    """Turns a Twisted log event into one line of JSON (see the module's docstring).

    ``secrets`` are values that must never be written; secret-named fields seen in events are
    added to them (at most :data:`MAX_SECRETS` in all).
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self.secrets: set[str] = {s for s in secrets if len(s) >= MIN_SECRET_LENGTH}

    def __call__(self, event: Mapping[str, Any]) -> str | None:
        self.learn(event)
        return dumps(self.as_json(event), allow_nan=False) + "\n"

    def as_json(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """The JSON object of ``event``."""
        level = event.get("log_level")
        out: dict[str, Any] = {
            "time": _iso_time(event.get("log_time")),
            "level": _LEVEL_NAMES.get(level) or _legacy_level(event),
            "namespace": str(event.get("log_namespace") or "-"),
            "message": self._text(formatEvent(self._redacted(event))),
        }
        system = event.get("log_system")
        if isinstance(system, str) and system != "-":
            out["system"] = self._text(system)
        failure = event.get("log_failure")
        if isinstance(failure, Failure):
            out["traceback"] = self._text(_traceback(failure))
        for key, value in event.items():
            if (not isinstance(key, str) or key.startswith("log_") or key in _TWISTED_KEYS
                    or key in _OUTPUT_KEYS or is_secret_name(key)):
                continue
            ok, clean = self._value(value, 0)
            if ok:
                out[key] = clean
        return out

    # -- secrets --------------------------------------------------------------------------------

    def learn(self, event: Mapping[str, Any]) -> None:
        """Remember the values of the secret-named fields of ``event``."""
        for key, value in event.items():
            if (isinstance(key, str) and is_secret_name(key) and isinstance(value, str)
                    and len(value) >= MIN_SECRET_LENGTH and len(self.secrets) < MAX_SECRETS):
                self.secrets.add(value)

    def _redacted(self, event: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of ``event`` to format the message from: secret fields show as ***."""
        copy = dict(event)
        for key in event:
            if isinstance(key, str) and not key.startswith("log_") and is_secret_name(key):
                copy[key] = REDACTED
        return copy

    def _text(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return mask_urls(text)

    # -- values ---------------------------------------------------------------------------------

    def _value(self, value: Any, depth: int) -> tuple[bool, Any]:
        """``(True, a JSON-able copy)``, or ``(False, None)`` when JSON cannot hold it."""
        if value is None or isinstance(value, bool | int):
            return True, value
        if isinstance(value, float):
            return True, value if math.isfinite(value) else repr(value)
        if isinstance(value, str):
            return True, self._text(value)
        if isinstance(value, bytes):
            return True, self._text(value.decode("utf-8", "replace"))
        if isinstance(value, BaseException):
            return True, self._text(str(value) or type(value).__name__)
        if depth >= MAX_DEPTH:
            return False, None
        if isinstance(value, list | tuple | set | frozenset):
            items = []
            for item in value:
                ok, clean = self._value(item, depth + 1)
                if not ok:
                    return False, None
                items.append(clean)
            return True, sorted(items, key=repr) if isinstance(value, set | frozenset) else items
        if isinstance(value, Mapping):
            obj: dict[str, Any] = {}
            for k, v in value.items():
                if not isinstance(k, str):
                    return False, None
                if is_secret_name(k):
                    continue
                ok, clean = self._value(v, depth + 1)
                if not ok:
                    return False, None
                obj[k] = clean
            return True, obj
        return False, None


def _iso_time(when: object) -> str:
    if not isinstance(when, int | float) or not math.isfinite(when):
        return datetime.now(UTC).isoformat(timespec="milliseconds")
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds")


def _legacy_level(event: Mapping[str, Any]) -> str:
    return "error" if event.get("isError") else "info"


def _traceback(failure: Failure) -> str:
    try:
        text: str = failure.getTraceback()
    except Exception as e:  # a broken exception object must not break logging
        text = f"(no traceback: {e!r})"
    return text


def parse_level(text: str) -> LogLevel:
    """A :class:`LogLevel` by name (``warning`` is taken for ``warn``)."""
    name = text.strip().lower()
    name = {"warning": "warn"}.get(name, name)
    try:
        return LogLevel.levelWithName(name)
    except Exception:
        raise ValueError(
            f"{text!r} is not a log level: use debug, info, warn, error or critical"
        ) from None


def json_observer(
    out: IO[Any],
    level: LogLevel = LogLevel.info,
    secrets: Iterable[str] = (),
) -> ILogObserver:
    """An observer writing events of ``level`` and above to ``out`` as JSON lines."""
    formatter = JSONLineFormatter(secrets)
    writer = FileLogObserver(out, formatter)
    return _Learning(formatter, FilteringLogObserver(
        writer, [LogLevelFilterPredicate(defaultLogLevel=level)]
    ))


@implementer(ILogObserver)
class _Learning:
    """Passes every event on, after ``formatter`` learned its secrets: a token logged at a
    level that is not written is still redacted wherever it shows up later."""

    def __init__(self, formatter: JSONLineFormatter, observer: ILogObserver) -> None:
        self._formatter = formatter
        self._observer = observer

    def __call__(self, event: LogEvent) -> None:
        self._formatter.learn(event)
        self._observer(event)


def json(
    out: IO[Any] | None = None,
    environ: Mapping[str, str] | None = None,
    argv: Sequence[str] | None = None,
) -> ILogObserver:
    """The factory for ``twistd --logger deployer.logs.json``: JSON lines on standard output.

    twistd calls it with no arguments, before it redirects ``sys.stdout`` into the log, so the
    real standard output is kept here.
    """
    environ = os.environ if environ is None else environ
    argv = sys.argv if argv is None else argv
    level = _level(environ)
    return json_observer(sys.stdout if out is None else out, level, secrets_from(environ, argv))


def text(
    out: IO[Any] | None = None, environ: Mapping[str, str] | None = None
) -> ILogObserver:
    """``twistd --logger deployer.logs.text``: Twisted's text lines, at ``DEPLOYER_LOG_LEVEL``."""
    level = _level(os.environ if environ is None else environ)
    return FilteringLogObserver(
        textFileLogObserver(sys.stdout if out is None else out),
        [LogLevelFilterPredicate(defaultLogLevel=level)],
    )


def stdout(
    out: IO[Any] | None = None,
    environ: Mapping[str, str] | None = None,
    argv: Sequence[str] | None = None,
) -> ILogObserver:
    """``twistd --logger deployer.logs.stdout``: :func:`text`, or :func:`json` when
    ``DEPLOYER_LOG_FORMAT=json`` (the container image logs this way)."""
    environ = os.environ if environ is None else environ
    form = environ.get(FORMAT_ENV, "text").strip().lower()
    if form == "json":
        return json(out, environ, argv)
    if form == "text":
        return text(out, environ)
    _usage_error(f"{FORMAT_ENV}: {form!r} is not a log format: use text or json")


def _level(environ: Mapping[str, str]) -> LogLevel:
    try:
        return parse_level(environ.get(LEVEL_ENV, "info"))
    except ValueError as e:
        _usage_error(f"{LEVEL_ENV}: {e}")


def _usage_error(message: str) -> NoReturn:
    sys.stderr.write(f"twistd: {message}\n")
    sys.stderr.flush()
    raise SystemExit(2)
