"""The key layout under ``--etcd_prefix`` and the codec of the values that triggers hold.

``<prefix>`` is ``--etcd_prefix`` without any trailing slash (default ``/deployer``).

``<prefix>/<pattern>``
    A trigger. ``<pattern>`` is :attr:`deployer.model.Update.pattern`: ``[host/]repo`` (every
    local tag of the repository), ``[host/]repo:tag`` (that tag only) or ``*`` (every local
    image). These are the keys of the Go original, so ``etcdctl put /deployer/myorg/foo anything``
    deploys ``myorg/foo``. The value written is :meth:`deployer.model.Update.to_json` (keys
    ``repository``, ``registry``, ``tag``, ``digest``, ``source``, ``received`` and
    ``event_id``). A value that :meth:`~deployer.model.Update.from_json` does not accept (an
    operator's ``anything``), or one that describes another repository than its key, still
    triggers: the update then comes from the key alone, with source ``etcd``. A value keeps the
    update's own time (``received``: the sender's time of the event where it gave one), by
    which every host knows an update written before one it applied (never backwards,
    :mod:`deployer.freshness`). A key whose pattern is not a valid Docker reference is refused
    (:class:`InvalidKey`). A DELETE deploys nothing. A PUT of the very value the key already
held, when that value is one :meth:`KeyLayout.value` writes, is the same update written twice
(a write retried on another member after the first one was applied late): it deploys nothing
again (:meth:`KeyLayout.repeated`); an operator's value written twice deploys twice.

``<prefix>/_/...``
    Reserved for daemon state that must never trigger a deploy (leases, rollout slots, host
    status, pauses, the build each app's rollout deploys: :mod:`deployer.rollout.keys`).
    :meth:`KeyLayout.decode` ignores these keys; no valid repository name starts with ``_``.
    :meth:`KeyLayout.state` names them.

The watch covers ``<prefix>/`` with the slash, so a ``/deployer`` daemon never sees
``/deployer2/...``.
"""

from __future__ import annotations

import json

import attrs

from deployer.etcd._txaioetcd import KeySet
from deployer.model import EVERY_IMAGE, Update
from deployer.reference import InvalidReference, parse_reference

RESERVED = "_"
"""``<prefix>/_/...`` holds daemon state that never triggers."""


class InvalidKey(ValueError):
    """A key under the prefix that names no valid repository pattern."""


def _strip_slashes(prefix: str) -> str:
    return prefix.rstrip("/")


@attrs.frozen
class KeyLayout:
    """The mapping between updates and keys/values under one prefix (see the module docstring)."""

    prefix: str = attrs.field(converter=_strip_slashes)

    @property
    def root(self) -> bytes:
        """``<prefix>/``: every trigger and reserved key starts with it."""
        return (self.prefix + "/").encode()

    def watched(self) -> KeySet:
        """Every key under ``<prefix>/``."""
        return KeySet(self.root, prefix=True)

    def state(self, *parts: str) -> bytes:
        """The reserved key ``<prefix>/_/<part>/<part>...`` (daemon state, never a trigger)."""
        return self.root + "/".join((RESERVED, *parts)).encode()

    def key(self, update: Update) -> bytes:
        return self.root + update.pattern.encode()

    def value(self, update: Update) -> bytes:
        return json.dumps(update.to_json(), sort_keys=True, separators=(",", ":")).encode()

    def decode(self, key: bytes, value: bytes, now: float) -> Update | None:
        """The update that a PUT of ``key`` = ``value`` asks for.

        None for keys outside the prefix and reserved keys; :class:`InvalidKey` for a key
        whose pattern is not a valid reference. ``now`` is the ``received`` time of an update
        that comes from the key alone.
        """
        if not key.startswith(self.root):
            return None
        try:
            pattern = key[len(self.root):].decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidKey(f"key {key!r} is not UTF-8") from e
        if pattern == RESERVED or pattern.startswith(RESERVED + "/"):
            return None
        if pattern == EVERY_IMAGE:
            bare = Update(repository=EVERY_IMAGE, source="etcd", received=now)
        else:
            try:
                bare = Update.from_reference(parse_reference(pattern), source="etcd", received=now)
            except InvalidReference as e:
                raise InvalidKey(f"key {key!r}: {e}") from e
        return _from_value(bare, value) or bare


    def repeated(self, key: bytes, value: bytes, previous: bytes | None) -> bool:
        """True when a PUT of ``key`` = ``value`` over ``previous`` (None: the key was new)
        writes again the very update the key held (see the module docstring)."""
        if previous != value:
            return False
        try:
            bare = self.decode(key, b"", 0.0)
        except InvalidKey:
            return False
        return bare is not None and _from_value(bare, value) is not None


def _from_value(bare: Update, value: bytes) -> Update | None:
    """The update that ``value`` describes, if it is what :meth:`KeyLayout.value` writes for the
    same repository pattern as ``bare`` (the update made from the key); None otherwise."""
    try:
        written = Update.from_json(json.loads(value))
    except (ValueError, RecursionError):
        return None
    if (written.repository, written.registry, written.tag) != (
        bare.repository,
        bare.registry,
        bare.tag,
    ):
        return None
    if bare.digest is not None and written.digest not in (None, bare.digest):
        return None
    return bare.evolve(
        source=written.source,
        received=written.received,
        digest=written.digest if written.digest is not None else bare.digest,
        event_id=written.event_id,
    )
