"""The requests of one host that wait for a round, and whether one supersedes a replacement.

:class:`Pending` keeps the updates that no running round can take yet (their tags are being
handled), by pattern, in the order they arrived; each is numbered as it arrives. A round notes
that number (:attr:`Pending.arrived`) for each tag once the updates it serves for that tag are
fixed (when the pull of the tag starts); any update queued later for the tag came after.

A replacement that still waits for its rollout slot gives up when such a later update is
pending for its tag (:meth:`Pending.supersedes`): the next round pulls that build and replaces
the container once, straight to it, instead of twice. A later update is not a newer build when
it names the very digest being deployed (a duplicate: the same push heard twice, by webhook and
by etcd watch), nor when it is older than a build this host knows of the tag
(:meth:`deployer.freshness.TagHistory.newer`: the next round would skip it, and the container
would be left where it is). One that names no digest (a push without one, the periodic
re-pull), or whose build the round's image carries no digest for, does supersede: at worst the
next round pulls the same build again, which costs one look at the registry, and replaces the
container with it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from deployer.freshness import TagHistory
from deployer.model import Update
from deployer.reference import matches


class Pending:
    """The requests waiting for a round, by pattern (see the module docstring); at most
    ``limit`` per pattern, more are folded into the newest (:attr:`merged` counts them)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._queued: dict[str, list[tuple[int, Update]]] = {}
        #: How many updates arrived so far: the number of the newest.
        self.arrived = 0
        #: Requests folded into the newest one of their pattern.
        self.merged = 0

    def __bool__(self) -> bool:
        return bool(self._queued)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._queued))

    def add(self, update: Update) -> None:
        """Queue ``update`` behind those of its pattern."""
        self.arrived += 1
        queued = self._queued.setdefault(update.pattern, [])
        if len(queued) < self.limit:
            queued.append((self.arrived, update))
        else:
            # A flood for one pattern while the engine is away: one round serves them all
            # anyway; keep the oldest and the newest, and count what was merged.
            queued[-1] = (self.arrived, update)
            self.merged += 1

    def take(self, pattern: str) -> list[Update]:
        """The updates of ``pattern``, no longer queued."""
        return [update for _, update in self._queued.pop(pattern, [])]

    def put_back(self, batch: Mapping[str, list[Update]]) -> None:
        """Queue a round's requests again, in front (they arrived before any queued now)."""
        for pattern, updates in batch.items():
            self._queued.setdefault(pattern, [])[:0] = [(0, u) for u in updates]

    def supersedes(self, tag: str, after: int, digest: str | None,
                   known: TagHistory) -> Update | None:
        """A queued update for ``tag`` (familiar form) that arrived after number ``after`` and
        is a newer build than ``digest`` (the one being deployed, when known), or None."""
        for pattern, queued in self._queued.items():
            if not matches(pattern, tag):
                continue
            for number, update in queued:
                if number <= after:
                    continue
                if digest is not None and update.digest == digest:
                    continue  # the same build
                if known.newer(tag, update) is not None:
                    continue  # older than a build known: the next round skips it
                return update
        return None
