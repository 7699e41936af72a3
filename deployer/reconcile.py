"""The update round: pull what a push changed, then replace the containers it made stale.

One :class:`Reconciler` per host. :meth:`Reconciler.request` takes an :class:`Update` from any
source (webhook, etcd watch, the periodic re-pull) and never blocks.

A round, for the patterns requested together:

1. list images and running containers (two engine calls, whatever the number of containers);
2. pull every local ``repo:tag`` that a pattern matches, at most ``max_pulls`` at once (across
   all rounds);
3. as soon as a tag's pull has finished, inspect the image the tag now points at and replace
   each running container of that tag that runs another image: a tag never waits for the other
   pulls of its round. With a :class:`~deployer.rollout_round.Rollout` (the daemon always has
   one), each replacement waits for its turn in the app's rollout slots (in a fleet, one
   container of an app at a time on a host; standalone, ``--max_unavailable`` at a time; ``0``:
   all at once), waits until the new container is ready, and is rolled back (the app's rollout
   paused) when it is not. Without one (tools, benchmarks of the round alone), the containers
   are stopped one after the other on the host and not waited for. Containers that their labels
   keep out (``deployer.enable``, ``--label_enable``) are never touched.

Rounds run side by side: a slow or hung pull holds up only the requests that want that tag. A
request whose tags are all still waiting for their pull in a running round joins that round; a
request for a tag that is being handled (pulled or stopped) waits until that is done, and all
such requests then become one round; any other request starts a round at once (or joins the
round that is reading the engine's lists at that moment). A burst of webhooks for one
repository during its pull thus costs at most one more pull, a push during a pull is never
lost, and no tag is ever pulled twice at the same time.

Never backwards (:mod:`deployer.freshness`): an update that carries a digest and is older than
the newest build this host knows of its tag (from the same source) is skipped, when it is
requested and again when the pull of its tag starts (with the updates that joined the round
meanwhile), with one log line that names the newer build; a tag whose updates are all older is
not pulled. What is pulled for a tag is decided by
:class:`~deployer.fetch.Fetcher`: by tag, or in a fleet the digest recorded for the rollout of
the update (the same build on every host).

Safety: a tag whose pull failed (or stalled) has none of its containers replaced; a container is
replaced only when its tag now points at an image the engine has; no more of an app's
containers are down at once than its rollout slots allow (apps side by side, each in its own
slots). An engine that cannot be reached puts the round's requests back and retries later
with a capped backoff; no error ends the daemon.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, cast

from twisted.internet.defer import Deferred, DeferredList, DeferredLock, DeferredSemaphore
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from deployer.backoff import backoff
from deployer.docker import Container, Image, looks_like_id
from deployer.errors import (
    ContainerNotFound,
    DockerError,
    DockerUnavailable,
    ImageNotFound,
    PullStalled,
)
from deployer.fetch import FetchEngine, Fetcher
from deployer.freshness import Judged, TagHistory
from deployer.host_apps import digest_for
from deployer.model import Update
from deployer.reference import familiar, matches, with_tag
from deployer.replace import enabled
from deployer.rollout_round import Rollout
from deployer.rounds import Engine, Outcome, Result, Round, RoundReport, Stopped

log = Logger()

#: Requests kept per pattern while they wait for a round; more are folded into the newest.
MAX_QUEUED_PER_PATTERN = 1000


class HostEngine(Engine, FetchEngine, Protocol):
    """What the rounds of a host need of its engine (:class:`deployer.docker.DockerClient`)."""


class Reconciler:
    """The update rounds of one host, over its Docker ``engine``; every timer runs on
    ``reactor``. ``observers`` get each round's :class:`RoundReport`. ``rollout`` replaces the
    stale containers (see the module docstring); ``label_enable`` is ``--label_enable``."""

    def __init__(
        self,
        reactor: IReactorTime,
        engine: HostEngine,
        kill_timeout: int = 10,
        max_pulls: int = 4,
        observers: Iterable[Callable[[RoundReport], object]] = (),
        retry_delay: float = 2.0,
        retry_max: float = 60.0,
        rollout: Rollout | None = None,
        label_enable: bool = False,
    ) -> None:
        self.reactor = reactor
        self.rollout = rollout
        self.label_enable = label_enable
        self.engine = engine
        self.kill_timeout = kill_timeout
        self.semaphore = DeferredSemaphore(max(1, max_pulls))
        self.observers = list(observers)
        self.retry_delay = retry_delay
        self.retry_max = retry_max
        self._retry_policy = backoff(retry_delay, retry_max)
        self._pending: dict[str, list[Update]] = {}
        self._rounds: list[Round] = []
        self._listing: Round | None = None
        #: The tags being handled by a round (pulled, then their containers replaced).
        self._handled: set[str] = set()
        #: Without a rollout: held around each stop, one at a time on the host.
        self._replacing = DeferredLock()
        self._retry: IDelayedCall | None = None
        self._failures = 0
        self._idle: list[Deferred[None]] = []
        self._config_images: dict[str, str] = {}
        self._stopped = False
        #: Requests folded into the newest one of their pattern (see MAX_QUEUED_PER_PATTERN).
        self.merged = 0
        #: The newest build known of each tag (never backwards), and the updates it skipped.
        self.known = TagHistory()
        self.skipped = 0
        self.fetcher = Fetcher(
            reactor, engine,
            builds=rollout.rollouts.builds if rollout is not None else None,
            hostname=rollout.hostname if rollout is not None else "",
            retry=rollout.retry if rollout is not None else None,
        )

    # -- requests ---------------------------------------------------------------------------

    def request(self, update: Update) -> None:
        """Take one update; the round that serves it runs as soon as the tags it wants are not
        being handled by another round."""
        pattern = update.pattern
        if not self.known.requested(update):
            self.skipped += 1
            return
        for current in self._rounds:
            if current.absorbs(pattern):
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
        return bool(self._rounds) or bool(self._pending)

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
        """Start a round for the pending requests whose tags are free."""
        if self._stopped or not self._pending:
            return
        if self._retry is not None and self._retry.active():
            return
        ready = {p: us for p, us in self._pending.items() if not self._handling(p)}
        if not ready:
            return
        for pattern in ready:
            del self._pending[pattern]
        listing = self._listing
        if listing is not None:
            for updates in ready.values():
                for update in updates:
                    listing.join(update)
            return
        state = Round(
            updates=[u for us in ready.values() for u in us],
            patterns=set(ready),
            batch=ready,
            started=self.reactor.seconds(),
        )
        self._rounds.append(state)
        Deferred.fromCoroutine(self._run(state)).addErrback(self._crashed, state)

    def _handling(self, pattern: str) -> bool:
        """Whether a tag the pattern matches is being handled by a round."""
        return any(matches(pattern, tag) for tag in self._handled)

    def _crashed(self, failure: Failure, state: Round) -> None:
        # _run catches every expected error; reaching here is a bug, which must not end
        # the daemon either.
        log.failure("update loop failed unexpectedly", failure)
        self._ended(state)

    def _ended(self, state: Round) -> None:
        if self._listing is state:
            self._listing = None
        if state in self._rounds:
            self._rounds.remove(state)
        self._kick()
        self._notify_idle()

    def _notify_idle(self) -> None:
        if self.busy:
            return
        waiting, self._idle = self._idle, []
        for d in waiting:
            d.callback(None)

    def _requeue(self, batch: dict[str, list[Update]], error: DockerError) -> None:
        for pattern, updates in batch.items():
            self._pending.setdefault(pattern, [])[:0] = updates
        if self._stopped:
            log.info("stopping with {patterns} not deployed ({error})",
                     patterns=sorted(self._pending), error=str(error))
            return
        if self._retry is not None and self._retry.active():
            return  # another round saw the engine go away: one retry serves both
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

    async def _run(self, state: Round) -> None:
        log.info("update round for {patterns}", patterns=sorted(state.patterns))
        self._listing = state
        try:
            images = await self.engine.images()
            running = await self.engine.containers()
            runs_on = await self._container_tags(running)
        except DockerError as e:
            # The engine is away or failed to list what the round needs: keep the requests
            # and try again later.
            self._listing = None
            self._requeue(state.batch, e)
            self._ended(state)
            return
        except Exception:
            log.failure("update round for {patterns} failed", patterns=sorted(state.patterns))
            self._ended(state)
            return
        self._listing = None
        state.listing = False
        if self.rollout is not None:
            self.rollout.apps.listed(running, runs_on, images)
            self.rollout.apps.publish()
        local_tags = {t for image in images for t in image.repo_tags}
        candidates = local_tags | set(runs_on.values())
        targets = sorted(t for t in candidates if any(matches(p, t) for p in state.patterns))
        state.local = frozenset(familiar(t) for t in candidates)
        state.waiting = {familiar(t) for t in targets}
        state.remaining = len(targets)
        containers: dict[str, list[Container]] = {}
        for container in running:
            tag = runs_on.get(container.id)
            if tag is not None:
                containers.setdefault(tag, []).append(container)
        await DeferredList([
            Deferred.fromCoroutine(self._deploy(state, t, containers.get(familiar(t), [])))
            for t in targets
        ])
        self._finished(state)

    def _finished(self, state: Round) -> None:
        error = state.unavailable
        if error is not None:
            # The engine went away mid-round: the round runs again once it is back.
            self._requeue(state.batch, error)
            state.errors.append(f"Docker engine unavailable: {error}; the round is retried")
        else:
            self._failures = 0
        report = state.report(self.reactor.seconds())
        if self.rollout is not None:
            self.rollout.apps.round_ended(report)
            self.rollout.apps.publish()
        if error is None or state.stopped:
            for observer in self.observers:
                try:
                    observer(report)
                except Exception:
                    log.failure("round observer {observer!r} failed", observer=observer)
        self._ended(state)

    async def _deploy(self, state: Round, tag: str, containers: Sequence[Container]) -> None:
        """Handle one tag of a round: pull it, then replace its stale containers. Never raises:
        what happened goes into ``state``.

        No other round handles the tag meanwhile: a round starts (or is joined) only by
        requests whose tags are free, and only one round reads the engine's lists at a time.
        """
        key = familiar(tag)
        self._handled.add(key)
        try:
            new_image = await self._pull(state, tag)
            if new_image:
                await self._replace_stale(state, key, containers, new_image)
        except DockerUnavailable as e:
            state.unavailable = e
        except Exception:
            log.failure("deploying {tag} failed unexpectedly", tag=key)
            state.errors.append(f"{key}: unexpected error")
        finally:
            self._handled.discard(key)
            state.remaining -= 1
            if state.remaining:
                self._kick()  # requests that waited for this tag need not wait for the round

    async def _pull(self, state: Round, tag: str) -> str:
        """Pull ``tag`` (at most ``max_pulls`` at once on the host) and return the image id it
        now points at; "" when the pull failed, the engine does not have it, or every update of
        the tag is older than a build known (nothing is pulled then)."""
        key = familiar(tag)
        pulled: list[tuple[Judged, Image | None]] = []
        try:
            seconds = await self.semaphore.run(self._pull_one, state, tag, pulled)
        except DockerUnavailable:
            raise
        except DockerError as e:
            log.error("pull of {tag} failed: {error}; its containers are left running",
                      tag=tag, error=str(e))
            state.failed[key] = str(e)
            if isinstance(e, PullStalled):
                state.stalled.append(key)
            return ""
        judged, found = pulled[0]
        if seconds is None:
            return ""
        state.pull_seconds[key] = seconds
        try:
            image = found if found is not None else await self.engine.inspect_image(tag)
        except ImageNotFound:
            log.warn("{tag} was pulled but the engine does not have it", tag=tag)
            return ""
        except DockerUnavailable:
            raise
        except DockerError as e:
            state.errors.append(f"inspect {key}: {e}")
            log.error("cannot inspect {tag}: {error}", tag=tag, error=str(e))
            return ""
        state.images[key] = image.id
        digest = state.digests[key] = digest_for(image.repo_digests, key)
        self.known.pulled(key, judged, digest)
        if self.rollout is not None:
            self.rollout.apps.learn_image(image)
        return image.id

    async def _pull_one(self, state: Round, tag: str,
                        pulled: list[tuple[Judged, Image | None]]) -> float | None:
        """The pull's seconds; None when every update of the tag is older than a build known.
        The updates are judged here, once no more can join the round for this tag."""
        key = familiar(tag)
        state.waiting.discard(key)
        judged = self.known.judge(key, [u for u in state.updates if matches(u.pattern, tag)])
        self.skipped += len(judged.older)
        if not judged.fresh:
            pulled.append((judged, None))
            return None
        started = self.reactor.seconds()
        pulled.append((judged, await self.fetcher.fetch(tag, judged.fresh)))
        return max(0.0, self.reactor.seconds() - started)

    async def _replace_stale(
        self, state: Round, tag: str, containers: Sequence[Container], new_image: str
    ) -> None:
        stale = []
        for container in containers:
            if container.image_id == new_image:
                continue
            if not enabled(container, self.label_enable):
                log.info("{name} runs an older image of {tag} but its labels keep it out of"
                         " rounds (deployer.enable{only}); left alone", name=container.name,
                         tag=tag, only=", --label_enable" if self.label_enable else "")
                continue
            stale.append(container)
        # All at once: the rollout slots decide how many go at a time (on a host, one in a
        # fleet; --max_unavailable standalone), in this order.
        results = await DeferredList(
            [Deferred.fromCoroutine(self._replace_container(
                container, tag, new_image, state.digests.get(tag))) for container in stale],
            consumeErrors=True,
        )
        failures: list[Failure] = []
        for ok, result in results:
            if not ok:
                failures.append(cast(Failure, result))  # DeferredList's failures
                continue
            outcome: Outcome = result
            state.outcomes.append(outcome)
            stopped = outcome.stopped
            if stopped is not None:
                state.stopped.append(stopped)
            if outcome.result is Result.ERROR:
                state.errors.append(f"replace {outcome.name}: {outcome.detail}")
            elif outcome.result is Result.ROLLED_BACK:
                state.errors.append(f"{tag}: rollout paused: {outcome.detail}")
        for failure in failures:  # DockerUnavailable first: the round is retried
            if failure.check(DockerUnavailable):
                failure.raiseException()
        for failure in failures:
            failure.raiseException()

    async def _replace_container(
        self, container: Container, tag: str, new_image: str, digest: str | None = None
    ) -> Outcome:
        """Replace one container that runs an older image of ``tag`` (see the module
        docstring); what became of it. Raises only :class:`DockerUnavailable`."""
        if self.rollout is not None:
            return await self.rollout.replace(container, tag, new_image, digest)
        return await self._replacing.run(self._stop, container, tag, new_image)

    async def _stop(self, container: Container, tag: str, new_image: str) -> Outcome:
        """Without a rollout: stop it, so that its supervisor starts it again on
        ``new_image``; not waited for."""
        def outcome(result: Result, detail: str) -> Outcome:
            return Outcome(container.name, container.id, tag, container.image_id, new_image,
                           result, detail)

        try:
            await self.engine.stop(container.id, self.kill_timeout)
        except ContainerNotFound:
            log.info("container {name} was gone before it could be stopped",
                     name=container.name)
            return outcome(Result.GONE, "gone before it was stopped")
        except DockerUnavailable:
            raise
        except DockerError as e:
            log.error("cannot stop {name}: {error}", name=container.name, error=str(e))
            return outcome(Result.ERROR, str(e))
        log.info(
            "stopped {name} ({old:.19}) so that it restarts on {tag} ({new:.19})",
            name=container.name, old=container.image_id, tag=tag, new=new_image,
        )
        return outcome(Result.REPLACED, "stopped; not waited for (no rollout)")

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


__all__ = [
    "MAX_QUEUED_PER_PATTERN", "Engine", "Outcome", "Reconciler", "Result", "RoundReport", "Stopped",
]
