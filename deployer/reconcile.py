"""The update round: pull what a push changed, then stop the containers it made stale.

One :class:`Reconciler` per host. :meth:`Reconciler.request` takes an :class:`Update` from any
source (webhook, etcd watch, the periodic re-pull) and never blocks; rounds run one at a time.

A round, for the patterns requested since the last one:

1. list images and running containers (two engine calls, whatever the number of containers);
2. pull every local ``repo:tag`` that a pattern matches, at most ``max_pulls`` at once;
3. list images again to learn the id each pulled tag now points at;
4. stop, one after the other, each running container whose tag was pulled successfully in this
   round and now points at another image than the one it runs.

Coalescing: a request whose tags are all still waiting for their pull in the running round is
merged into that round; any other request waits for the next round, and all requests that arrive
during a round are merged into one. A burst of webhooks for one repository during a pull thus
costs at most one more pull, and a push during a pull is never lost.

Safety: a tag whose pull failed has none of its containers stopped; a container is stopped only
when its tag now points at an image the engine has. An engine that cannot be reached puts the
round's requests back and retries later with a capped backoff; no error ends the daemon.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from deployer.backoff import backoff
from deployer.docker import Container, Image, looks_like_id
from deployer.errors import ContainerNotFound, DockerError, DockerUnavailable
from deployer.model import Update
from deployer.reference import familiar, matches, with_tag

log = Logger()

#: Requests kept per pattern while they wait for a round; more are folded into the newest.
MAX_QUEUED_PER_PATTERN = 1000


class Engine(Protocol):
    """What a round needs of the Docker engine (:class:`deployer.docker.DockerClient`)."""

    async def images(self) -> list[Image]: ...

    async def containers(self) -> list[Container]: ...

    async def inspect_container(self, container_id: str) -> dict[str, Any]: ...

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
    """What one round did; given to observers (notifications, metrics, tests)."""

    patterns: tuple[str, ...]
    updates: tuple[Update, ...]
    pulled: Mapping[str, str]
    failed: Mapping[str, str]
    pull_seconds: Mapping[str, float]
    stopped: tuple[Stopped, ...]
    errors: tuple[str, ...]
    started: float
    finished: float

    @property
    def ok(self) -> bool:
        return not self.failed and not self.errors


@attrs.define
class _Round:
    updates: list[Update]
    patterns: set[str]
    #: The requests the round serves, by pattern: put back as a whole if the engine goes away.
    batch: dict[str, list[Update]] = attrs.field(factory=dict)
    #: Every local tag, including those that no pattern of the round matches.
    local: frozenset[str] = frozenset()
    tags: frozenset[str] = frozenset()
    waiting: set[str] = attrs.field(factory=set)

    def absorbs(self, pattern: str) -> bool:
        """True when every local tag the pattern matches still waits for its pull in this
        round."""
        wanted = {t for t in self.local if matches(pattern, t)}
        return bool(wanted) and wanted <= self.waiting

    def join(self, update: Update) -> None:
        self.updates.append(update)
        self.patterns.add(update.pattern)
        self.batch.setdefault(update.pattern, []).append(update)


class Reconciler:
    def __init__(
        self,
        reactor: IReactorTime,
        engine: Engine,
        kill_timeout: int = 10,
        max_pulls: int = 4,
        observers: Iterable[Callable[[RoundReport], object]] = (),
        retry_delay: float = 2.0,
        retry_max: float = 60.0,
    ) -> None:
        self.reactor = reactor
        self.engine = engine
        self.kill_timeout = kill_timeout
        self.semaphore = DeferredSemaphore(max(1, max_pulls))
        self.observers = list(observers)
        self.retry_delay = retry_delay
        self.retry_max = retry_max
        self._retry_policy = backoff(retry_delay, retry_max)
        self._pending: dict[str, list[Update]] = {}
        self._round: _Round | None = None
        self._running = False
        self._retry: IDelayedCall | None = None
        self._failures = 0
        self._idle: list[Deferred[None]] = []
        self._config_images: dict[str, str] = {}
        self._stopped = False
        #: Requests folded into the newest one of their pattern (see MAX_QUEUED_PER_PATTERN).
        self.merged = 0

    # -- requests ---------------------------------------------------------------------------

    def request(self, update: Update) -> None:
        """Take one update; the round that serves it runs as soon as the previous one ends."""
        pattern = update.pattern
        current = self._round
        if current is not None and current.absorbs(pattern):
            log.info("update {update} joins the running round", update=update.describe())
            current.join(update)
            return
        queued = self._pending.setdefault(pattern, [])
        if len(queued) < MAX_QUEUED_PER_PATTERN:
            queued.append(update)
        else:
            # A flood for one pattern while the engine is away: one round serves them all
            # anyway; keep the oldest and the newest, and count what was merged.
            queued[-1] = update
            self.merged += 1
        self._kick()

    @property
    def busy(self) -> bool:
        return self._running or bool(self._pending)

    def wait_idle(self) -> Deferred[None]:
        """Fires once no round runs and none is pending (retries waiting count as pending)."""
        d: Deferred[None] = Deferred()
        if not self.busy:
            d.callback(None)
        else:
            self._idle.append(d)
        return d

    def stop(self) -> None:
        """Cancel a scheduled retry and start no more rounds (the service is stopping)."""
        self._stopped = True
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None

    def _kick(self) -> None:
        if self._running or not self._pending or self._stopped:
            return
        if self._retry is not None and self._retry.active():
            return
        self._running = True
        d = Deferred.fromCoroutine(self._work())
        d.addErrback(self._crashed)

    def _crashed(self, failure: Failure) -> None:
        # _work catches every expected error; reaching here is a bug, which must not end
        # the daemon either.
        log.failure("update loop failed unexpectedly", failure)
        self._running = False
        self._notify_idle()

    def _notify_idle(self) -> None:
        if self.busy:
            return
        waiting, self._idle = self._idle, []
        for d in waiting:
            d.callback(None)

    async def _work(self) -> None:
        while self._pending and not self._stopped:
            batch, self._pending = self._pending, {}
            try:
                await self._run(batch)
            except DockerError as e:
                # The engine is away or failed to list what the round needs: keep the
                # requests and try again later (pull and stop errors never get here).
                self._requeue(batch, e)
                break
            except Exception:
                log.failure("update round for {patterns} failed", patterns=sorted(batch))
            else:
                self._failures = 0
        self._running = False
        self._notify_idle()

    def _requeue(self, batch: dict[str, list[Update]], error: DockerError) -> None:
        for pattern, updates in batch.items():
            self._pending.setdefault(pattern, [])[:0] = updates
        if self._stopped:
            log.info("stopping with {patterns} not deployed ({error})",
                     patterns=sorted(self._pending), error=str(error))
            return
        self._failures += 1
        delay = self._retry_policy(self._failures - 1)
        log.warn(
            "Docker engine error ({error}); retrying {patterns} in {delay:.1f} s",
            error=str(error),
            patterns=sorted(self._pending),
            delay=delay,
        )

        def retry() -> None:
            self._retry = None
            self._kick()

        self._retry = self.reactor.callLater(delay, retry)

    # -- one round ----------------------------------------------------------------------------

    async def _run(self, batch: dict[str, list[Update]]) -> RoundReport:
        started = self.reactor.seconds()
        state = _Round(
            updates=[u for us in batch.values() for u in us], patterns=set(batch), batch=batch
        )
        log.info("update round for {patterns}", patterns=sorted(batch))
        images = await self.engine.images()
        running = await self.engine.containers()
        runs_on = await self._container_tags(running)
        local_tags = {t for image in images for t in image.repo_tags}
        candidates = local_tags | set(runs_on.values())
        targets = sorted(t for t in candidates if any(matches(p, t) for p in state.patterns))
        state.local = frozenset(familiar(t) for t in candidates)
        state.tags = frozenset(familiar(t) for t in targets)
        state.waiting = set(state.tags)

        self._round = state
        pulled: dict[str, float] = {}
        failed: dict[str, str] = {}
        try:
            results = await DeferredList(
                [self.semaphore.run(self._pull, tag, state) for tag in targets],
                consumeErrors=True,
            )
        finally:
            self._round = None
        for tag, (ok, result) in zip(targets, results, strict=True):
            if ok:
                pulled[familiar(tag)] = float(result)
                continue
            failure: Failure = result  # type: ignore[assignment]
            failed[familiar(tag)] = _message(failure)
            if failure.check(DockerUnavailable):
                # The engine went away mid-round: nothing is stopped; the round reruns.
                failure.raiseException()

        errors: list[str] = []
        stopped: list[Stopped] = []
        now: dict[str, str] = {}
        if pulled:
            after = await self.engine.images()
            now = {familiar(t): image.id for image in after for t in image.repo_tags}
            for container in running:
                wanted = runs_on.get(container.id)
                if wanted is None or wanted not in pulled:
                    continue
                new = now.get(wanted, "")
                if not new or new == container.image_id:
                    continue
                try:
                    await self.engine.stop(container.id, self.kill_timeout)
                except ContainerNotFound:
                    log.info("container {name} was gone before it could be stopped",
                             name=container.name)
                    continue
                except DockerUnavailable:
                    raise
                except DockerError as e:
                    errors.append(f"stop {container.name}: {e}")
                    log.error("cannot stop {name}: {error}", name=container.name, error=str(e))
                    continue
                log.info(
                    "stopped {name} ({old:.19}) so that it restarts on {tag} ({new:.19})",
                    name=container.name, old=container.image_id, tag=wanted, new=new,
                )
                stopped.append(
                    Stopped(container.name, container.id, wanted, container.image_id, new)
                )

        report = RoundReport(
            patterns=tuple(sorted(state.patterns)),
            updates=tuple(state.updates),
            pulled={t: now.get(t, "") for t in pulled},
            failed=failed,
            pull_seconds=pulled,
            stopped=tuple(stopped),
            errors=tuple(errors),
            started=started,
            finished=self.reactor.seconds(),
        )
        for observer in self.observers:
            try:
                observer(report)
            except Exception:
                log.failure("round observer {observer!r} failed", observer=observer)
        return report

    async def _pull(self, tag: str, state: _Round) -> float:
        state.waiting.discard(familiar(tag))
        started = self.reactor.seconds()
        try:
            await self.engine.pull(tag)
        except DockerUnavailable:
            raise
        except DockerError as e:
            log.error("pull of {tag} failed: {error}; its containers are left running",
                      tag=tag, error=str(e))
            raise
        return self.reactor.seconds() - started

    async def _container_tags(self, running: Sequence[Container]) -> dict[str, str]:
        """The ``repo:tag`` each running container was started from.

        The container list names it, unless the tag has since moved to another image: then the
        list shows the old image's id and the name comes from one inspect of that container,
        remembered for the container's lifetime.
        """
        known = {c.id for c in running}
        for cid in list(self._config_images):
            if cid not in known:
                del self._config_images[cid]
        tags: dict[str, str] = {}
        for container in running:
            name = container.image
            if looks_like_id(name):
                name = self._config_images.get(container.id, "")
                if not name:
                    try:
                        info = await self.engine.inspect_container(container.id)
                    except ContainerNotFound:
                        continue
                    name = str((info.get("Config") or {}).get("Image") or "")
                    self._config_images[container.id] = name
            if not name or looks_like_id(name) or "@" in name:
                continue  # started by id or pinned by digest: nothing to update it to
            tags[container.id] = with_tag(name)
        return tags


def _message(failure: Failure) -> str:
    value = failure.value
    return str(value) if value is not None else repr(failure)
