"""What an update round works on and what it reports: the engine calls it needs, the state of
one round while it runs, what became of each stale container (:class:`Outcome`), and the
:class:`RoundReport` its observers get (:mod:`deployer.reconcile` runs the rounds,
:mod:`deployer.rollout_round` replaces the stale containers)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Protocol

import attrs

from deployer.docker import Container, Image
from deployer.errors import DockerUnavailable
from deployer.model import Update
from deployer.reference import matches


class Engine(Protocol):
    """What a round needs of the Docker engine (:class:`deployer.docker.DockerClient`)."""

    async def images(self) -> list[Image]: ...

    async def containers(self) -> list[Container]: ...

    async def inspect_container(self, container_id: str) -> dict[str, Any]: ...

    async def inspect_image(self, name: str) -> Image: ...

    async def pull(self, repotag: str) -> None: ...

    async def stop(self, container_id: str, timeout: int) -> None: ...


@attrs.frozen
class Stopped:
    """A container this round took down to replace it with one on ``new_image`` (stopped, so
    that its supervisor restarts it, or re-created)."""

    name: str
    id: str
    repotag: str
    old_image: str
    new_image: str


class Result(enum.Enum):
    """What became of one stale container (the ``result`` label of the replacement metric)."""

    #: Taken down, and its replacement on the new image is ready.
    REPLACED = "replaced"
    #: Taken down, its replacement was not ready: rolled back to the previous build, the app's
    #: rollout paused.
    ROLLED_BACK = "rolled_back"
    #: Left running: the app's rollout is paused for this very build.
    PAUSED = "paused"
    #: Gone before it could be replaced.
    GONE = "gone"
    #: Left running: it could not be taken down (an engine error, a replace mode refused).
    ERROR = "error"

    @property
    def taken_down(self) -> bool:
        return self in (Result.REPLACED, Result.ROLLED_BACK)


@attrs.frozen
class Outcome:
    """What became of one stale ``container`` of ``app`` (its ``repo:tag``, familiar form),
    which ran ``old_image`` while ``app`` pointed at ``new_image``. ``detail`` says why in
    words; ``waited`` is the time spent waiting for a rollout slot, ``seconds`` the time the
    slot was held (both 0 when none was taken)."""

    name: str
    id: str
    app: str
    old_image: str
    new_image: str
    result: Result
    detail: str = ""
    waited: float = 0.0
    seconds: float = 0.0
    #: The reason word of a rollback (``unhealthy``, ``exited``, ``no_replacement``,
    #: ``timeout``), else None.
    reason: str | None = None
    #: Whether a rollout slot was taken for it.
    slot: bool = False
    #: Whether this host paused the app's rollout (it was the first to find the build bad).
    paused: bool = False

    @property
    def stopped(self) -> Stopped | None:
        """The :class:`Stopped` record of a container that was taken down."""
        if not self.result.taken_down:
            return None
        return Stopped(self.name, self.id, self.app, self.old_image, self.new_image)


@attrs.frozen
class RoundReport:
    """What one round did; given to observers (notifications, metrics, tests).

    ``pulled`` maps each tag pulled to the image id it now points at, ``failed`` each tag whose
    pull failed to the reason, and ``stalled`` names the failed tags whose pull was given up on
    because it made no progress (a hung registry). ``stopped`` are the containers taken down
    (replaced, or replaced and rolled back); ``outcomes`` what became of every stale container.
    """

    patterns: tuple[str, ...]
    updates: tuple[Update, ...]
    pulled: Mapping[str, str]
    failed: Mapping[str, str]
    pull_seconds: Mapping[str, float]
    stopped: tuple[Stopped, ...]
    errors: tuple[str, ...]
    started: float
    finished: float
    stalled: tuple[str, ...] = ()
    outcomes: tuple[Outcome, ...] = ()
    #: The manifest digest each pulled tag now points at, when the engine knows it.
    digests: Mapping[str, str | None] = attrs.field(factory=dict)

    @property
    def ok(self) -> bool:
        return not self.failed and not self.errors


@attrs.define(eq=False)
class Round:
    """One round while it runs: the requests it serves and what it did so far."""

    updates: list[Update]
    patterns: set[str]
    #: The requests the round serves, by pattern: put back as a whole if the engine goes away.
    batch: dict[str, list[Update]]
    started: float
    #: True while the round reads the engine's lists: any request may still join it.
    listing: bool = True
    #: Every local tag, including those that no pattern of the round matches.
    local: frozenset[str] = frozenset()
    #: The tags whose pull has not started yet.
    waiting: set[str] = attrs.field(factory=set)
    #: Tags still being handled (pulled, then their containers replaced).
    remaining: int = 0
    pull_seconds: dict[str, float] = attrs.field(factory=dict)
    images: dict[str, str] = attrs.field(factory=dict)
    digests: dict[str, str | None] = attrs.field(factory=dict)
    failed: dict[str, str] = attrs.field(factory=dict)
    stalled: list[str] = attrs.field(factory=list)
    stopped: list[Stopped] = attrs.field(factory=list)
    outcomes: list[Outcome] = attrs.field(factory=list)
    errors: list[str] = attrs.field(factory=list)
    unavailable: DockerUnavailable | None = None

    def absorbs(self, pattern: str) -> bool:
        """True when every local tag the pattern matches still waits for its pull in this
        round."""
        if self.listing:
            return False
        wanted = {t for t in self.local if matches(pattern, t)}
        return bool(wanted) and wanted <= self.waiting

    def join(self, update: Update) -> None:
        self.updates.append(update)
        self.patterns.add(update.pattern)
        self.batch.setdefault(update.pattern, []).append(update)

    def report(self, finished: float) -> RoundReport:
        return RoundReport(
            patterns=tuple(sorted(self.patterns)),
            updates=tuple(self.updates),
            pulled={t: self.images.get(t, "") for t in self.pull_seconds},
            failed=dict(self.failed),
            pull_seconds=dict(self.pull_seconds),
            stopped=tuple(self.stopped),
            errors=tuple(self.errors),
            started=self.started,
            finished=finished,
            stalled=tuple(self.stalled),
            outcomes=tuple(self.outcomes),
            digests={t: self.digests.get(t) for t in self.pull_seconds},
        )
