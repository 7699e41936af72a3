"""Reading a webhook's body: its content type, its JSON, and typed access to what it holds.

Whatever goes wrong is a :class:`~deployer.errors.BadWebhook` whose reason names the offending
field (a value of the wrong JSON type is a 400, never a ``KeyError`` or ``TypeError``); each
sender's own parser (:mod:`deployer.formats`) is built on these.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from typing import Any

from deployer.errors import BadWebhook

MAX_DEPTH = 32
"""Deepest nesting of arrays and objects accepted in a body (the deepest real payload, GitHub's,
is 7)."""

JSON_CONTENT_TYPES = frozenset({"application/json"})
REGISTRY_CONTENT_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.events.v1+json",  # Distribution 2.x
        "application/vnd.docker.distribution.events.v2+json",  # Distribution 3.x
        "application/json",
    }
)

REASON_MAX = 300
_STRING_RE = re.compile(r'"[^"]*"')
_NOT_BRACKET_RE = re.compile(r"[^\[\]{}]+")
_OPEN_CLOSE = str.maketrans("[{]}", "(())")


# -- decoding -------------------------------------------------------------------------------------


def _nesting_exceeds(text: str, limit: int) -> bool:
    """Whether arrays/objects in ``text`` nest deeper than ``limit``, found without recursion.

    Escapes and then strings are cut out so that brackets inside strings do not count; what is
    left is reduced to parentheses, and each round removes the innermost pairs: a pair left
    after ``limit`` rounds is nested deeper. A long run of openers counts as too deep even
    when unbalanced. On text that is not JSON the answer may be wrong, but then the decoder
    refuses it anyway.
    """
    unescaped = text.replace("\\\\", "").replace('\\"', "")
    brackets = _NOT_BRACKET_RE.sub("", _STRING_RE.sub("", unescaped)).translate(_OPEN_CLOSE)
    if "(" * (limit + 1) in brackets:
        return True
    for _ in range(limit):
        reduced = brackets.replace("()", "")
        if reduced == brackets:
            return False
        brackets = reduced
    return "()" in brackets


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def decode_json(body: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """Decode a UTF-8 JSON body. Anything else, including nesting deeper than ``max_depth``
    and the non-standard ``NaN``/``Infinity``, is a 400. With duplicate keys the last wins."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadWebhook(f"body is not JSON: not UTF-8 ({e.reason} at byte {e.start})") from None
    if _nesting_exceeds(text, max_depth):
        raise BadWebhook(f"body is not JSON we accept: nested deeper than {max_depth} levels")
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:
        raise BadWebhook(clip_reason(f"body is not JSON: {e}")) from None


def check_content_type(
    header: bytes | None, allowed: Collection[str], missing_ok: bool = True
) -> None:
    """Refuse (415) a request whose media type is not one of ``allowed``.

    Parameters such as ``charset`` are ignored and the comparison is case-insensitive. A
    request without a Content-Type is accepted when ``missing_ok`` (the default): JSON
    endpoints are also called by hand and by small scripts that send none, and the body is
    still checked by :func:`decode_json`.
    """
    media = b"" if header is None else header.split(b";", 1)[0].strip()
    if not media:
        if missing_ok:
            return
        raise BadWebhook("missing Content-Type header", 415)
    name = media.decode("latin-1").lower()
    if name not in {a.lower() for a in allowed}:
        raise BadWebhook(
            clip_reason(
                f"unsupported Content-Type {name!r}; send one of {', '.join(sorted(allowed))}"
            ),
            415,
        )


# -- typed access to decoded JSON -----------------------------------------------------------------


def clip_reason(text: str) -> str:
    """``text`` cut to :data:`REASON_MAX` characters, for an error answer."""
    return text if len(text) <= REASON_MAX else text[: REASON_MAX - 1] + "…"


def json_kind(value: object) -> str:
    """The JSON name of a decoded value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def join_path(where: str, key: str) -> str:
    """The name of field ``key`` inside ``where`` (``a.b``), for messages."""
    return f"{where}.{key}" if where else key


def as_object(value: object, where: str) -> dict[str, Any]:
    """``value`` when it is a JSON object; a 400 naming ``where`` otherwise."""
    if not isinstance(value, dict):
        raise BadWebhook(f"{where or 'body'} must be an object, not {json_kind(value)}")
    return value


def get_field(obj: object, path: str, where: str = "") -> object:
    """Walk a dotted path through nested objects; a missing key or a null gives None."""
    current = obj
    for key in path.split("."):
        if current is None:
            return None
        current = as_object(current, where).get(key)
        where = join_path(where, key)
    return current


def string_field(obj: object, path: str, where: str = "") -> str | None:
    """The string at ``path``; None when missing, null or empty."""
    value = get_field(obj, path, where)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadWebhook(f"{join_path(where, path)} must be a string, not {json_kind(value)}")
    return value


def required_field(obj: object, path: str, where: str = "") -> str:
    """The string at ``path``; a 400 when missing, null or empty."""
    value = string_field(obj, path, where)
    if value is None:
        raise BadWebhook(f"missing field {join_path(where, path)}")
    return value
