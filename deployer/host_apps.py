"""What this host runs, by app, as the rollout status publishes it.

:class:`HostApps` keeps, per running container that was started from a ``repo:tag`` (an *app*),
the image it runs and its health, and per app the last round's time and result. It learns them
without engine calls of its own: from each round's lists of images and containers, from each
replacement's outcome, and from the engine's ``health_status`` events. :meth:`HostApps.state`
gives one :class:`~deployer.rollout.status.AppState` per app that has a running container here;
:meth:`HostApps.publish` hands that to the rollout status (``<prefix>/_/hosts/<hostname>`` in a
fleet).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from deployer.docker import Container, Image
from deployer.events import ContainerEvent, EventSource
from deployer.reference import familiar, split
from deployer.rollout.status import AppState
from deployer.rounds import Result, RoundReport

log = Logger()

#: Health words from the worst to the best: an app's health is its worst container's.
HEALTH_ORDER = ("unhealthy", "starting", "unknown", "running", "healthy")

Publish = Callable[[Mapping[str, AppState]], Deferred[None]]


def _badness(health: str) -> int:
    return HEALTH_ORDER.index(health) if health in HEALTH_ORDER else HEALTH_ORDER.index("unknown")


def digest_for(repo_digests: Iterable[str], app: str) -> str | None:
    """The manifest digest of ``app``'s repository among an image's ``RepoDigests``."""
    name, _, _ = split(app)
    for entry in repo_digests:
        repository, _, digest = split(entry)
        if digest and familiar(repository) == name:
            return digest
    return None


def round_result(report: RoundReport, app: str) -> str:
    """What the round did for ``app``, in a few words."""
    if app in report.failed:
        return f"pull failed: {report.failed[app]}"
    outcomes = [o for o in report.outcomes if o.app == app]
    for result in (Result.ROLLED_BACK, Result.ERROR, Result.PAUSED):
        found = [o for o in outcomes if o.result is result]
        if found:
            return f"{result.value}: {found[0].detail}" if found[0].detail else result.value
    if any(o.result is Result.REPLACED for o in outcomes):
        return "replaced"
    return "ok"


@attrs.define
class _Running:
    app: str
    id: str
    image_id: str
    health: str = "unknown"


class HostApps:
    """See the module docstring. ``publish`` is :attr:`Rollouts.publish
    <deployer.rollout.wiring.Rollouts.publish>`; ``events``, when given, keeps the health of
    each container up to date (and publishes when an app's health changes)."""

    def __init__(self, publish: Publish, events: EventSource | None = None) -> None:
        self._publish = publish
        self._running: dict[str, _Running] = {}  # by container name
        self._replacing: Counter[str] = Counter()  # names kept across lists while replaced
        self._digests: dict[str, tuple[str, ...]] = {}  # image id -> RepoDigests
        self._rounds: dict[str, tuple[float, str]] = {}
        self._health: dict[str, str] = {}  # container id -> last health_status
        if events is not None:
            events.subscribe(self._heard)

    # -- what is learnt -------------------------------------------------------------------------

    def listed(self, running: Sequence[Container], apps: Mapping[str, str],
               images: Sequence[Image]) -> None:
        """A round's lists: the running containers, the app each was started from (by
        container id), the local images."""
        for image in images:
            if image.repo_digests:
                self._digests[image.id] = image.repo_digests
        seen: dict[str, _Running] = {}
        for container in running:
            app = apps.get(container.id)
            if app is None:
                continue
            known = self._running.get(container.name)
            health = self._health.get(container.id)
            if health is None:
                health = known.health if known is not None and known.id == container.id \
                    else "unknown"
            seen[container.name] = _Running(app, container.id, container.image_id, health)
        for name in self._replacing:
            if name in self._running and name not in seen:
                seen[name] = self._running[name]
        self._running = seen

    def learn_image(self, image: Image) -> None:
        """An image inspected after its pull: its digests."""
        if image.repo_digests:
            self._digests[image.id] = image.repo_digests

    def replacing(self, name: str) -> None:
        """``name`` is being replaced: a list taken meanwhile may not show it."""
        self._replacing[name] += 1

    def replaced(self, name: str, app: str, container_id: str, image_id: str,
                 health: str) -> None:
        """The replacement of ``name`` ended: it runs ``image_id`` now."""
        self._replacing[name] -= 1
        if self._replacing[name] <= 0:
            del self._replacing[name]
        self._running[name] = _Running(app, container_id, image_id,
                                       self._health.get(container_id, health))

    def round_ended(self, report: RoundReport) -> None:
        """The round's time and result for each app it pulled (or failed to pull)."""
        for app in (*report.pulled, *report.failed):
            self._rounds[app] = (report.finished, round_result(report, app))

    def _heard(self, event: ContainerEvent) -> None:
        if event.verb in ("die", "destroy"):
            self._health.pop(event.id, None)
            return
        health = event.health
        if health is None:
            return
        before = self._health.get(event.id)
        self._health[event.id] = health
        for running in self._running.values():
            if running.id == event.id and running.health != health:
                running.health = health
                if before != health:
                    self.publish()
                return

    # -- what is told ---------------------------------------------------------------------------

    def state(self) -> dict[str, AppState]:
        """One :class:`AppState` per app with a running container here."""
        by_app: dict[str, list[tuple[str, _Running]]] = {}
        for name, running in sorted(self._running.items()):
            by_app.setdefault(running.app, []).append((name, running))
        out = {}
        for app, containers in sorted(by_app.items()):
            images = Counter(r.image_id for _, r in containers)
            image_id = images.most_common(1)[0][0]
            health = sorted((r.health for _, r in containers), key=_badness)[0]
            round_time, result = self._rounds.get(app, (None, None))
            # (AppState's tuple converter is more than mypy can type)
            names: Any = tuple(name for name, _ in containers)
            out[app] = AppState(
                image_id=image_id,
                digest=digest_for(self._digests.get(image_id, ()), app),
                containers=names,
                health=health,
                round_time=round_time,
                round_result=result,
            )
        return out

    def publish(self) -> Deferred[None]:
        """Publish :meth:`state`; never fails (a failure is logged)."""
        try:
            d = self._publish(self.state())
        except Exception:
            log.failure("publishing this host's status failed")
            return succeed(None)

        def failed(failure: Failure) -> None:
            log.failure("publishing this host's status failed", failure)

        return d.addErrback(failed)
