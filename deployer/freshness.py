"""Never backwards: which updates are older than what a host already knows of their tag.

A registry retries a notification it could not deliver, and a late one can arrive after the
notification of a newer push; an etcd value can be read again after a newer one was applied.
Each such update carries the time its sender gave it (:mod:`deployer.formats`: a registry
event's own ``timestamp``; the etcd value keeps it) and, from most registries, the digest of
the build it announces.

:class:`TagHistory` keeps, per tag and per source of updates, the newest build known here: its
digest and its time. Times are compared within one source only (``registry`` with
``registry``...): each source has its own clock, and a webhook's arrival time on this host says
nothing of a registry's event time. It holds at most ``capacity`` entries, the least recently
used dropped first, so it never grows without limit.

An update is *older* than what the host knows (:meth:`TagHistory.newer`) when it carries a
digest, and the newest known build of its tag from the same source is another digest with a
later time; also when a newer update from the same source for that tag, with another digest, is
in the same round (:func:`judge`). Such an update is skipped: nothing is pulled for it, and one
log line names the tag, its digest and the newer one known (:func:`log_older`). An update
without a digest is never skipped: a pull by tag gets the registry's current build, which is
never older. When the pull of a tag finds another digest than the newest update asked for (the
registry's tag has moved on: a late notification the host knew nothing of), the log says so
too (:func:`log_not_current`); what the registry's tag points at is what is deployed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime

import attrs
from twisted.logger import Logger

from deployer.model import EVERY_IMAGE, Update
from deployer.reference import familiar

log = Logger()

#: Entries (tag, source) a host keeps by default.
CAPACITY = 4096


@attrs.frozen
class Known:
    """The newest build of a tag known from one ``source``: its ``digest``, and the ``time``
    its sender gave."""

    digest: str
    time: float
    source: str


def when(seconds: float) -> str:
    """A time as the log shows it: ISO 8601, UTC, milliseconds."""
    try:
        return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="milliseconds")
    except (OverflowError, OSError, ValueError):
        return f"{seconds:g}"


class TagHistory:
    """The newest build known per (tag, source); see the module docstring. Tags are given in
    their familiar form (:func:`deployer.reference.familiar`)."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._known: OrderedDict[tuple[str, str], Known] = OrderedDict()

    def __len__(self) -> int:
        return len(self._known)

    def get(self, tag: str, source: str) -> Known | None:
        return self._known.get((tag, source))

    def newer(self, tag: str, update: Update) -> Known | None:
        """The build known for ``tag`` that makes ``update`` older, or None."""
        if update.digest is None:
            return None
        known = self._known.get((tag, update.source))
        if known is not None and _older(update, known):
            return known
        return None

    def learn(self, tag: str, digest: str, time: float, source: str) -> None:
        """``tag`` pointed at ``digest`` at ``time``, as ``source`` tells; an entry for an older
        time than the one kept changes nothing."""
        key = (tag, source)
        old = self._known.get(key)
        if old is None or time >= old.time:
            self._known[key] = Known(digest, time, source)
        self._known.move_to_end(key)
        while len(self._known) > self.capacity:
            self._known.popitem(last=False)

    def learn_update(self, tag: str, update: Update) -> None:
        """An update for ``tag`` that carries a digest is the newest known unless an older
        one."""
        if update.digest is not None:
            self.learn(tag, update.digest, update.received, update.source)


    def requested(self, update: Update) -> bool:
        """Whether a requested ``update`` is to be acted on: False (and the log says why)
        when it names a tag and is older than a build known of it; the newest known
        otherwise."""
        if update.tag is None or update.repository == EVERY_IMAGE:
            return True
        key = familiar(update.pattern)
        newer = self.newer(key, update)
        if newer is not None:
            log_older(key, update, newer)
            return False
        self.learn_update(key, update)
        return True

    def judge(self, tag: str, updates: Iterable[Update]) -> Judged:
        """:func:`judge`, with a log line for each older update."""
        judged = judge(tag, updates, self)
        for update, newer in judged.older:
            log_older(tag, update, newer)
        return judged

    def pulled(self, tag: str, judged: Judged, digest: str | None) -> None:
        """After the pull of ``tag`` for the ``judged`` updates found ``digest``: say when that
        is not the build the newest update asked for, and remember the updates whose build it
        is."""
        if digest is None:
            return
        wanted = judged.wanted
        if wanted is not None and wanted.digest != digest:
            log_not_current(tag, wanted, digest)
        for update in judged.fresh:
            if update.digest == digest:
                self.learn_update(tag, update)


def _older(update: Update, known: Known) -> bool:
    return (update.digest is not None and update.source == known.source
            and update.digest != known.digest and update.received < known.time)


@attrs.frozen
class Judged:
    """The updates of one tag in a round: those to act on, and those older than a build known
    (each with that build)."""

    fresh: tuple[Update, ...]
    older: tuple[tuple[Update, Known], ...]

    @property
    def wanted(self) -> Update | None:
        """The newest fresh update that carries a digest: the build the tag should run."""
        best: Update | None = None
        for update in self.fresh:
            if update.digest is not None and (best is None or update.received > best.received):
                best = update
        return best


def judge(tag: str, updates: Iterable[Update], history: TagHistory) -> Judged:
    """Split the updates of ``tag`` into fresh and older ones (see the module docstring)."""
    updates = list(updates)
    fresh: list[Update] = []
    older: list[tuple[Update, Known]] = []
    for update in updates:
        newer = history.newer(tag, update) or _newer_among(update, updates)
        if newer is None:
            fresh.append(update)
        else:
            older.append((update, newer))
    return Judged(tuple(fresh), tuple(older))


def _newer_among(update: Update, updates: Sequence[Update]) -> Known | None:
    best: Known | None = None
    for other in updates:
        if other.digest is None:
            continue
        known = Known(other.digest, other.received, other.source)
        if _older(update, known) and (best is None or known.time > best.time):
            best = known
    return best


def log_older(tag: str, update: Update, newer: Known) -> None:
    """The one line that says why ``update`` of ``tag`` is skipped."""
    log.warn(
        "skipping the update of {tag} to {digest} ({source}, sent {sent}): older than {newer}"
        " ({newer_source}, sent {newer_sent}), the newest build of {tag} known here",
        tag=tag, digest=update.digest, source=update.source, sent=when(update.received),
        newer=newer.digest, newer_source=newer.source, newer_sent=when(newer.time),
        event_id=update.event_id,
    )


def log_not_current(tag: str, update: Update, current: str) -> None:
    """The line that says that the registry's ``tag`` no longer points at ``update``'s
    build."""
    log.warn(
        "not deploying {tag} at {digest} ({source}, sent {sent}): the registry's {tag} now"
        " points at {newer}, which is deployed instead",
        tag=tag, digest=update.digest, source=update.source, sent=when(update.received),
        newer=current, event_id=update.event_id,
    )
