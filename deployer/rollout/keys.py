"""Where rollout state lives in etcd, and what names an app.

See :mod:`deployer.rollout` for the layout. An app's slot keys are the direct children of its
slot prefix: ``<prefix>/_/rollout/<app>/<lease id hex>``. An app name can be the beginning of
another's (``localhost:5000`` is the tag ``5000`` of ``localhost``, and a prefix of
``localhost:5000/foo:qa``), so readers of a slot prefix keep only the keys with no further
``/`` after it (:meth:`RolloutKeys.slot_lease`).
"""

from __future__ import annotations

import attrs

from deployer.reference import InvalidReference, parse_reference

RESERVED = "_"
"""``<prefix>/_/...`` holds daemon state that never triggers a deploy."""


def app_name(text: str) -> str:
    """The app that ``text`` names: ``repo:tag`` in its familiar form (``docker.io/library/x:1``
    is ``x:1``). :class:`~deployer.reference.InvalidReference` when ``text`` is not a
    ``repo:tag``, or carries a digest."""
    ref = parse_reference(text.strip())
    if ref.tag is None:
        raise InvalidReference(f"{text!r} names no tag: an app is repo:tag")
    if ref.digest is not None:
        raise InvalidReference(f"{text!r} carries a digest: an app is repo:tag")
    return ref.pattern


def check_hostname(hostname: str) -> str:
    """A host name usable as the last part of a key."""
    if not hostname or "/" in hostname or not hostname.isprintable() or " " in hostname:
        raise ValueError(f"{hostname!r} cannot name a host in etcd keys")
    return hostname


def _strip_slash(prefix: str) -> str:
    return prefix.rstrip("/")


@attrs.frozen
class RolloutKeys:
    """The keys under ``<prefix>/_/``; ``prefix`` is ``--etcd_prefix`` (a trailing slash is
    dropped)."""

    prefix: str = attrs.field(converter=_strip_slash)

    @property
    def reserved(self) -> str:
        return f"{self.prefix}/{RESERVED}/"

    # -- slots --------------------------------------------------------------------------------

    @property
    def rollouts(self) -> str:
        """The prefix of every app's slot keys."""
        return f"{self.reserved}rollout/"

    def slots(self, app: str) -> str:
        """The prefix of ``app``'s slot keys (with its trailing slash)."""
        return f"{self.rollouts}{app}/"

    def slot(self, app: str, lease_id: int) -> str:
        """The slot key of the host holding lease ``lease_id``."""
        return f"{self.slots(app)}{lease_id:x}"

    def slot_owner(self, key: str) -> tuple[str, int] | None:
        """``(app, lease id)`` of a slot key; None for a key that is not one."""
        if not key.startswith(self.rollouts):
            return None
        app, slash, lease = key[len(self.rollouts):].rpartition("/")
        if not slash or not app:
            return None
        try:
            return app, int(lease, 16)
        except ValueError:
            return None

    def slot_lease(self, app: str, key: str) -> int | None:
        """The lease id of ``key`` when it is one of ``app``'s slot keys, else None (a key of
        another app whose name begins with this one's)."""
        owner = self.slot_owner(key)
        return owner[1] if owner is not None and owner[0] == app else None

    # -- pauses -------------------------------------------------------------------------------

    @property
    def paused_all(self) -> str:
        return f"{self.reserved}paused/"

    def paused(self, app: str) -> str:
        return f"{self.paused_all}{app}"

    def paused_app(self, key: str) -> str | None:
        if not key.startswith(self.paused_all) or key == self.paused_all:
            return None
        return key[len(self.paused_all):]

    # -- hosts --------------------------------------------------------------------------------

    @property
    def hosts(self) -> str:
        return f"{self.reserved}hosts/"

    def host(self, hostname: str) -> str:
        return f"{self.hosts}{check_hostname(hostname)}"

    def hostname(self, key: str) -> str | None:
        if not key.startswith(self.hosts):
            return None
        name = key[len(self.hosts):]
        return name if name and "/" not in name else None

    # -- builds -------------------------------------------------------------------------------

    @property
    def builds_all(self) -> str:
        return f"{self.reserved}builds/"

    def build(self, app: str) -> str:
        """The build recorded for the rollout of ``app``'s newest update."""
        return f"{self.builds_all}{app}"

    def build_app(self, key: str) -> str | None:
        if not key.startswith(self.builds_all) or key == self.builds_all:
            return None
        return key[len(self.builds_all):]
