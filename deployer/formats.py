"""Webhook payloads of every supported registry, each turned into the same :class:`Update`.

Every parser takes the decoded JSON value, whatever it is, and either returns updates or raises
:class:`~deployer.errors.BadWebhook` with the HTTP status to answer and a reason that names the
offending field. No other exception leaves this module: a value of the wrong JSON type anywhere
is a 400, never a ``KeyError`` or ``TypeError`` (and so never a 500).

Events that are well-formed but not for us (a blob push, a pull, a Harbor scan, a GitHub npm
package) are ignored: the parser returns an empty list, and the caller answers 2xx so that the
sender does not retry.

One exception to "malformed means 400": a Distribution registry envelope. The registry retries
an undelivered envelope until it gets a 2xx (a 4xx too is retried), it keeps its queue in
memory and an envelope can carry several events. So a malformed *event* inside a well-formed
envelope is logged and skipped, and the good events beside it are still acted on; only an
envelope that is not ``{"events": [...]}`` at all is refused with 400.

Names, tags and digests go through Docker's reference grammar (:mod:`deployer.reference`), and
anything with whitespace, control or non-ASCII characters is refused before that.
"""

from __future__ import annotations

import json
import re
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from typing import Any, TypeVar

import attrs
from twisted.logger import Logger

from deployer.errors import BadWebhook
from deployer.model import Update
from deployer.reference import (
    DIGEST_RE,
    DOCKER_HUB_HOSTS,
    DOMAIN_RE,
    PATH_RE,
    InvalidReference,
    check_digest,
    check_tag,
    parse_name,
    parse_reference,
)

log = Logger()

T = TypeVar("T")

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

MANIFEST_MEDIA_TYPES = frozenset(
    {
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.oci.image.index.v1+json",
    }
)

HARBOR_PUSH_TYPES = frozenset({"PUSH_ARTIFACT", "pushImage"})
GITHUB_EVENTS = frozenset({"registry_package", "package"})
GITHUB_CONTAINER_TYPES = frozenset({"container", "docker"})
GITHUB_REGISTRY = "ghcr.io"

_REASON_MAX = 300
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
        raise BadWebhook(_reason(f"body is not JSON: {e}")) from None


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
            _reason(
                f"unsupported Content-Type {name!r}; send one of {', '.join(sorted(allowed))}"
            ),
            415,
        )


# -- typed access to decoded JSON -----------------------------------------------------------------


def _reason(text: str) -> str:
    return text if len(text) <= _REASON_MAX else text[: _REASON_MAX - 1] + "…"


def _kind(value: object) -> str:
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


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _object(value: object, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadWebhook(f"{where or 'body'} must be an object, not {_kind(value)}")
    return value


def _get(obj: object, path: str, where: str = "") -> object:
    """Walk a dotted path through nested objects; a missing key or a null gives None."""
    current = obj
    for key in path.split("."):
        if current is None:
            return None
        current = _object(current, where).get(key)
        where = _join(where, key)
    return current


def _string(obj: object, path: str, where: str = "") -> str | None:
    """The string at ``path``; None when missing, null or empty."""
    value = _get(obj, path, where)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise BadWebhook(f"{_join(where, path)} must be a string, not {_kind(value)}")
    return value


def _required(obj: object, path: str, where: str = "") -> str:
    """The string at ``path``; a 400 when missing, null or empty."""
    value = _string(obj, path, where)
    if value is None:
        raise BadWebhook(f"missing field {_join(where, path)}")
    return value


def _checked(field: str, value: str, check: Callable[[str], T]) -> T:
    if not (value.isascii() and value.isprintable()) or " " in value:
        raise BadWebhook(
            _reason(f"{field}: {value!r} contains whitespace, control or non-ASCII characters")
        )
    try:
        return check(value)
    except InvalidReference as e:
        raise BadWebhook(_reason(f"{field}: {e}")) from None


def _name(field: str, value: str) -> tuple[str | None, str]:
    if value == "*":
        raise BadWebhook(f"{field}: '*' (every image) cannot be asked for by a webhook")
    host, path = _checked(field, value, parse_name)
    if host is not None and not any(c in host for c in ".:") and host != "localhost":
        # The grammar reads "MyOrg/foo" as host "MyOrg"; that is a mistyped name, not a host.
        raise BadWebhook(
            _reason(f"{field}: invalid repository name {value!r}: upper-case letters")
        )
    return host, path


def _tag(field: str, value: str | None) -> str | None:
    return None if value is None else _checked(field, value, check_tag)


def _digest(field: str, value: str | None) -> str | None:
    return None if value is None else _checked(field, value, check_digest)


def _update(
    name: tuple[str | None, str],
    source: str,
    received: float,
    tag: str | None = None,
    digest: str | None = None,
    event_id: str | None = None,
) -> Update:
    host, path = name
    return Update(
        repository=path,
        registry=host,
        tag=tag,
        digest=digest,
        source=source,
        received=received,
        event_id=event_id,
    )


def _unique(items: Iterable[T]) -> list[T]:
    return list(dict.fromkeys(items))


# -- Docker Hub -----------------------------------------------------------------------------------


@attrs.frozen
class DockerHubHook:
    """A Docker Hub webhook: the update, and the URL that Docker Hub asks to be told about it
    (its legacy ``callback_url``; see :class:`deployer.notify.DockerHubCallback`)."""

    update: Update
    callback_url: str | None


def parse_dockerhub(obj: object, received: float) -> DockerHubHook:
    """``{"repository": {"repo_name": ...}, "push_data": {"tag": ...}, "callback_url": ...}``.

    ``push_data.tag`` is optional: without it every local tag of the repository is updated,
    which is what the older payloads (``push_data.images``, float ``pushed_at``) meant.
    """
    _object(obj, "")
    name = _name("repository.repo_name", _required(obj, "repository.repo_name"))
    tag = _tag("push_data.tag", _string(obj, "push_data.tag"))
    callback_url = _string(obj, "callback_url")
    return DockerHubHook(
        update=_update(name, "dockerhub", received, tag=tag), callback_url=callback_url
    )


# -- Distribution (docker-registry) notifications -------------------------------------------------


def parse_registry_events(obj: object, received: float) -> list[Update]:
    """A Distribution envelope ``{"events": [...]}``: one update per manifest pushed by tag.

    Blob pushes, pulls, deletes, mounts and pushes by digest alone are ignored. A malformed
    event is logged and skipped (see the module's documentation for why it is not a 400).
    """
    if not isinstance(obj, dict):
        raise BadWebhook(f"body must be an object with an events array, not {_kind(obj)}")
    events = obj.get("events")
    if not isinstance(events, list):
        raise BadWebhook(
            "missing field events" if events is None else f"events must be an array, not "
            f"{_kind(events)}"
        )
    updates = []
    for index, event in enumerate(events):
        where = f"events[{index}]"
        try:
            update = _registry_event(event, where, received)
        except BadWebhook as e:
            log.warn("Skipping a malformed registry event: {reason}", reason=e.reason)
            continue
        if update is not None:
            updates.append(update)
    return updates


def _registry_event(event: object, where: str, received: float) -> Update | None:
    _object(event, where)
    if _string(event, "action", where) != "push":
        return None
    media_type = _string(event, "target.mediaType", where)
    if media_type is None or media_type.split(";")[0].strip().lower() not in MANIFEST_MEDIA_TYPES:
        return None
    tag = _tag(f"{where}.target.tag", _string(event, "target.tag", where))
    if tag is None:
        return None
    repository = _required(event, "target.repository", where)
    host = _required(event, "request.host", where)
    _checked(f"{where}.request.host", host, _matching(DOMAIN_RE, "invalid registry host"))
    _checked(
        f"{where}.target.repository", repository, _matching(PATH_RE, "invalid repository path")
    )
    name = _checked(f"{where}.target.repository", f"{host}/{repository}", parse_name)
    if name[0] is None and host.lower() not in DOCKER_HUB_HOSTS:
        raise BadWebhook(
            f"{where}.request.host: {host!r} would be read as a Docker Hub namespace; make the"
            " registry reachable under a name with a '.' or a ':port'"
        )
    return _update(
        name,
        "registry",
        received,
        tag=tag,
        digest=_digest(f"{where}.target.digest", _string(event, "target.digest", where)),
        event_id=_string(event, "id", where),
    )


def _matching(pattern: re.Pattern[str], what: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if not pattern.match(value):
            raise InvalidReference(f"{what} {value!r}")
        return value

    return check


# -- the generic form (our own API, curl, CI jobs) ------------------------------------------------


def parse_generic(obj: object, received: float, source: str = "api") -> Update:
    """``{"repository": "[host/]name", "tag": ..., "digest": ...}``; tag and digest optional.

    ``*`` (every image) is refused: that re-pull is the daemon's own periodic job.
    """
    _object(obj, "")
    return _update(
        _name("repository", _required(obj, "repository")),
        source,
        received,
        tag=_tag("tag", _string(obj, "tag")),
        digest=_digest("digest", _string(obj, "digest")),
    )


# -- Quay -----------------------------------------------------------------------------------------


def parse_quay(obj: object, received: float) -> list[Update]:
    """A Quay "Repository Push": ``docker_url`` and ``updated_tags`` (a list, or in older
    Quay an object of tag → image id). One update per tag; no tags at all means every local
    tag of the repository."""
    body = _object(obj, "")
    name = _name("docker_url", _required(body, "docker_url"))
    raw = body.get("updated_tags")
    if raw is None:
        names: list[object] = []
    elif isinstance(raw, list):
        names = list(raw)
    elif isinstance(raw, dict):
        names = list(raw)
    else:
        raise BadWebhook(f"updated_tags must be an array or an object, not {_kind(raw)}")
    tags: list[str | None] = []
    for index, tag in enumerate(names):
        if not isinstance(tag, str):
            raise BadWebhook(f"updated_tags[{index}] must be a string, not {_kind(tag)}")
        tags.append(_tag(f"updated_tags[{index}]", tag))
    return [_update(name, "quay", received, tag=tag) for tag in _unique(tags or [None])]


# -- Harbor ---------------------------------------------------------------------------------------


def parse_harbor(obj: object, received: float) -> list[Update]:
    """A Harbor push (``PUSH_ARTIFACT``, or ``pushImage`` from Harbor 1.x): one update per
    ``event_data.resources[]``. A tag that is itself a digest means "deploy by digest" (tag
    None, digest set). Other event types are ignored."""
    if _required(_object(obj, ""), "type") not in HARBOR_PUSH_TYPES:
        return []
    resources = _get(obj, "event_data.resources")
    if not isinstance(resources, list):
        raise BadWebhook(
            "missing field event_data.resources"
            if resources is None
            else f"event_data.resources must be an array, not {_kind(resources)}"
        )
    return _unique(
        _harbor_resource(resource, f"event_data.resources[{index}]", received)
        for index, resource in enumerate(resources)
    )


def _harbor_resource(resource: object, where: str, received: float) -> Update:
    _object(resource, where)
    url = _required(resource, "resource_url", where)
    ref = _checked(f"{where}.resource_url", url, parse_reference)
    tag_field = _string(resource, "tag", where)
    digest = _digest(f"{where}.digest", _string(resource, "digest", where))
    tag: str | None
    if tag_field is not None and DIGEST_RE.match(tag_field):
        tag, digest = None, digest or _digest(f"{where}.tag", tag_field)
    else:
        tag = _tag(f"{where}.tag", tag_field)
    return _update(
        (ref.host, ref.path), "harbor", received, tag=tag or ref.tag, digest=digest or ref.digest
    )


# -- GitHub Packages ------------------------------------------------------------------------------


def parse_github(
    obj: object, event: str, received: float, delivery: str | None = None
) -> list[Update]:
    """A GitHub ``registry_package`` or ``package`` event (``X-GitHub-Event``), action
    ``published``, package type container (``docker`` in 2020): the image
    ``ghcr.io/<owner>/<name>:<tag>``, owner and name lower-cased.

    The tag is ``package_version.container_metadata.tag.name`` (or, for the old ``docker``
    type, ``package_version.version``); the digest is the tag's digest. A version without a
    tag is ignored: a multi-platform push publishes each platform's manifest untagged, and the
    tagged index comes in an event of its own. Other events, actions and package types are
    ignored. ``delivery`` (``X-GitHub-Delivery``) becomes the event id.
    """
    if event not in GITHUB_EVENTS:
        return []
    _object(obj, "")
    if _string(obj, "action") != "published":
        return []
    package = _object(_get(obj, event), event)
    kind = _string(package, "package_type", event) or _string(package, "ecosystem", event)
    if kind is None or kind.lower() not in GITHUB_CONTAINER_TYPES:
        return []
    package_name = _required(package, "name", event)
    owner = (
        _string(package, "owner.login", event)
        or _string(package, "namespace", event)
        or _string(obj, "organization.login")
        or _string(obj, "repository.owner.login")
    )
    if owner is None:
        raise BadWebhook(f"missing field {event}.owner.login")
    version = f"{event}.package_version"
    tag = _string(package, "package_version.container_metadata.tag.name", event)
    digest = _string(package, "package_version.container_metadata.tag.digest", event)
    number = _string(package, "package_version.version", event)
    if number is not None and DIGEST_RE.match(number):
        digest = digest or number
    elif tag is None:
        tag = number
    if tag is None:
        return []
    name = _name(f"{event}.name", f"{GITHUB_REGISTRY}/{owner.lower()}/{package_name.lower()}")
    return [
        _update(
            name,
            "github",
            received,
            tag=_tag(f"{version}.container_metadata.tag.name", tag),
            digest=_digest(f"{version}.container_metadata.tag.digest", digest),
            event_id=delivery,
        )
    ]


# -- acting on each event once --------------------------------------------------------------------


@attrs.define
class SeenEvents:
    """A bounded set of event ids, least recently seen dropped first.

    Registries retry and reorder their notifications; an event id is acted on the first time
    only. Mark an id only once the event has been accepted: when handling it fails and the
    sender will retry, :meth:`forget` it so that the retry is not mistaken for a duplicate.
    """

    capacity: int = attrs.field(default=10000, validator=attrs.validators.ge(1))
    _ids: OrderedDict[str, None] = attrs.field(factory=OrderedDict, init=False)

    def first_time(self, event_id: str) -> bool:
        """True the first time ``event_id`` is seen (and remember it), False afterwards."""
        if event_id in self._ids:
            self._ids.move_to_end(event_id)
            return False
        self._ids[event_id] = None
        if len(self._ids) > self.capacity:
            self._ids.popitem(last=False)
        return True

    def forget(self, event_id: str) -> None:
        self._ids.pop(event_id, None)

    def fresh(self, updates: Iterable[Update]) -> list[Update]:
        """The updates not seen before; those without an event id are always fresh."""
        return [u for u in updates if u.event_id is None or self.first_time(u.event_id)]

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)
