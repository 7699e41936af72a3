"""What an update round works on and what it reports: the engine calls it needs, the state of
one round while it runs, and the :class:`RoundReport` its observers get
(:mod:`deployer.reconcile` runs the rounds)."""

from __future__ import annotations

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
    """A container this round stopped so that its supervisor restarts it on ``new_image``."""

    name: str
    id: str
    repotag: str
    old_image: str
    new_image: str


@attrs.frozen
class RoundReport:
    """What one round did; given to observers (notifications, metrics, tests).

    ``pulled`` maps each tag pulled to the image id it now points at, ``failed`` each tag whose
    pull failed to the reason, and ``stalled`` names the failed tags whose pull was given up on
    because it made no progress (a hung registry).
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
    failed: dict[str, str] = attrs.field(factory=dict)
    stalled: list[str] = attrs.field(factory=list)
    stopped: list[Stopped] = attrs.field(factory=list)
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
        )
