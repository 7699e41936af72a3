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

An update's time (``received``) is the moment the webhook arrived, except for a Distribution
registry's event: its own ``timestamp`` (never later than the arrival). A registry that retries
a notification sends it with its first time, so a late one is known to be older than a newer
push (:mod:`deployer.freshness`). Docker Hub's ``pushed_at`` and Harbor's ``occur_at`` are whole
seconds: two pushes within one second would look like one update to the fleet's build records
(:mod:`deployer.rollout.builds`), so their arrival time is kept.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TypeVar

import attrs
from twisted.logger import Logger

from deployer.bodies import (
    JSON_CONTENT_TYPES,
    MAX_DEPTH,
    REGISTRY_CONTENT_TYPES,
    as_object,
    check_content_type,
    clip_reason,
    decode_json,
    get_field,
    json_kind,
    required_field,
    string_field,
)
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

def _checked(field: str, value: str, check: Callable[[str], T]) -> T:
    if not (value.isascii() and value.isprintable()) or " " in value:
        raise BadWebhook(
            clip_reason(f"{field}: {value!r} contains whitespace, control or non-ASCII characters")
        )
    try:
        return check(value)
    except InvalidReference as e:
        raise BadWebhook(clip_reason(f"{field}: {e}")) from None


def _name(field: str, value: str) -> tuple[str | None, str]:
    if value == "*":
        raise BadWebhook(f"{field}: '*' (every image) cannot be asked for by a webhook")
    host, path = _checked(field, value, parse_name)
    if host is not None and not any(c in host for c in ".:") and host != "localhost":
        # The grammar reads "MyOrg/foo" as host "MyOrg"; that is a mistyped name, not a host.
        raise BadWebhook(
            clip_reason(f"{field}: invalid repository name {value!r}: upper-case letters")
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


def sent_time(obj: object, path: str, received: float, where: str = "") -> float:
    """The sender's time of an event at ``path`` of ``obj`` (Unix seconds, or an RFC 3339 text
    with its offset), never later than ``received``; ``received`` when there is none that
    reads (a bad time is no reason to refuse an event)."""
    try:
        value = get_field(obj, path, where)
    except BadWebhook:
        return received
    seconds: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:
            seconds = None
    elif isinstance(value, str) and value.isascii() and len(value) <= 64:
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            when = None
        if when is not None and when.utcoffset() is not None:
            seconds = when.timestamp()
    if seconds is None or not math.isfinite(seconds) or seconds <= 0:
        return received
    return min(seconds, received)


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
    as_object(obj, "")
    name = _name("repository.repo_name", required_field(obj, "repository.repo_name"))
    tag = _tag("push_data.tag", string_field(obj, "push_data.tag"))
    callback_url = string_field(obj, "callback_url")
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
        raise BadWebhook(f"body must be an object with an events array, not {json_kind(obj)}")
    events = obj.get("events")
    if not isinstance(events, list):
        raise BadWebhook(
            "missing field events" if events is None else f"events must be an array, not "
            f"{json_kind(events)}"
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
    as_object(event, where)
    if string_field(event, "action", where) != "push":
        return None
    media_type = string_field(event, "target.mediaType", where)
    if media_type is None or media_type.split(";")[0].strip().lower() not in MANIFEST_MEDIA_TYPES:
        return None
    tag = _tag(f"{where}.target.tag", string_field(event, "target.tag", where))
    if tag is None:
        return None
    repository = required_field(event, "target.repository", where)
    host = required_field(event, "request.host", where)
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
        sent_time(event, "timestamp", received, where),
        tag=tag,
        digest=_digest(f"{where}.target.digest", string_field(event, "target.digest", where)),
        event_id=string_field(event, "id", where),
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
    as_object(obj, "")
    return _update(
        _name("repository", required_field(obj, "repository")),
        source,
        received,
        tag=_tag("tag", string_field(obj, "tag")),
        digest=_digest("digest", string_field(obj, "digest")),
    )


# -- Quay -----------------------------------------------------------------------------------------


def parse_quay(obj: object, received: float) -> list[Update]:
    """A Quay "Repository Push": ``docker_url`` and ``updated_tags`` (a list, or in older
    Quay an object of tag → image id). One update per tag; no tags at all means every local
    tag of the repository."""
    body = as_object(obj, "")
    name = _name("docker_url", required_field(body, "docker_url"))
    raw = body.get("updated_tags")
    if raw is None:
        names: list[object] = []
    elif isinstance(raw, list):
        names = list(raw)
    elif isinstance(raw, dict):
        names = list(raw)
    else:
        raise BadWebhook(f"updated_tags must be an array or an object, not {json_kind(raw)}")
    tags: list[str | None] = []
    for index, tag in enumerate(names):
        if not isinstance(tag, str):
            raise BadWebhook(f"updated_tags[{index}] must be a string, not {json_kind(tag)}")
        tags.append(_tag(f"updated_tags[{index}]", tag))
    return [_update(name, "quay", received, tag=tag) for tag in _unique(tags or [None])]


# -- Harbor ---------------------------------------------------------------------------------------


def parse_harbor(obj: object, received: float) -> list[Update]:
    """A Harbor push (``PUSH_ARTIFACT``, or ``pushImage`` from Harbor 1.x): one update per
    ``event_data.resources[]``. A tag that is itself a digest means "deploy by digest" (tag
    None, digest set). Other event types are ignored."""
    if required_field(as_object(obj, ""), "type") not in HARBOR_PUSH_TYPES:
        return []
    resources = get_field(obj, "event_data.resources")
    if not isinstance(resources, list):
        raise BadWebhook(
            "missing field event_data.resources"
            if resources is None
            else f"event_data.resources must be an array, not {json_kind(resources)}"
        )
    return _unique(
        _harbor_resource(resource, f"event_data.resources[{index}]", received)
        for index, resource in enumerate(resources)
    )


def _harbor_resource(resource: object, where: str, received: float) -> Update:
    as_object(resource, where)
    url = required_field(resource, "resource_url", where)
    ref = _checked(f"{where}.resource_url", url, parse_reference)
    tag_field = string_field(resource, "tag", where)
    digest = _digest(f"{where}.digest", string_field(resource, "digest", where))
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
    as_object(obj, "")
    if string_field(obj, "action") != "published":
        return []
    package = as_object(get_field(obj, event), event)
    kind = string_field(package, "package_type", event) or string_field(package, "ecosystem", event)
    if kind is None or kind.lower() not in GITHUB_CONTAINER_TYPES:
        return []
    package_name = required_field(package, "name", event)
    owner = (
        string_field(package, "owner.login", event)
        or string_field(package, "namespace", event)
        or string_field(obj, "organization.login")
        or string_field(obj, "repository.owner.login")
    )
    if owner is None:
        raise BadWebhook(f"missing field {event}.owner.login")
    version = f"{event}.package_version"
    tag = string_field(package, "package_version.container_metadata.tag.name", event)
    digest = string_field(package, "package_version.container_metadata.tag.digest", event)
    number = string_field(package, "package_version.version", event)
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
    only. Mark an id (:meth:`first_time`) only once the event has been accepted, so that a
    retry of an event whose handling failed is not mistaken for a duplicate.
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

    def __contains__(self, event_id: object) -> bool:
        return event_id in self._ids

    def __len__(self) -> int:
        return len(self._ids)


# The body helpers (JSON_CONTENT_TYPES ... decode_json) come from deployer.bodies and are kept
# here for the callers that import them from this module.
__all__ = [
    "GITHUB_CONTAINER_TYPES", "GITHUB_EVENTS", "GITHUB_REGISTRY", "HARBOR_PUSH_TYPES",
    "JSON_CONTENT_TYPES", "MANIFEST_MEDIA_TYPES", "MAX_DEPTH", "REGISTRY_CONTENT_TYPES",
    "DockerHubHook", "SeenEvents", "check_content_type", "decode_json", "parse_dockerhub",
    "parse_generic", "parse_github", "parse_harbor", "parse_quay", "parse_registry_events",
]
