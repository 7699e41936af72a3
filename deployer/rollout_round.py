"""Replacing one stale container inside the rollout: pull early, replace late.

The round (:mod:`deployer.reconcile`) pulls every tag as soon as it learns of an update; only
the replacement of each stale container waits, in :meth:`Rollout.replace`, for its turn. For a
container of app ``A`` (its ``repo:tag``, familiar form) that runs an older image than the one
``A`` now points at:

1. ``A`` paused for this very build (another host's replacement failed)? Then it is not
   replaced, and ``A`` is put back on the image the container runs, so that an unrelated
   restart never starts the bad build.
2. ``A`` paused for another build: a new push ends that pause (``pauses.supersede``).
3. Take a rollout slot of ``A`` (``slots.acquire``): at most ``--max_unavailable`` instances of
   ``A`` are being replaced at once across the fleet, one at a time on a host; waiters are
   served in the order they asked. Nothing is taken down before. While it waits, the host reads
   ``A``'s pause every :data:`PAUSE_CHECK` seconds: paused for this very build (another host's
   replacement failed meanwhile), it does as in 1 at once, rather than at its turn (its place
   in the line gives the slot back as soon as it comes).
4. Paused meanwhile (between the last check and the turn)? As in 1.
5. Replace it with the container's :class:`~deployer.replace.Replacer` (``--replace``, or its
   ``deployer.replace`` label), which waits until the replacement is ready.
6. Not ready: pause ``A`` for this build (``<prefix>/_/paused/<A>`` in a fleet: no other host
   replaces its instance), roll back (the replacer puts the previous build back under the name)
   at the same time, then notify (Slack, ``--notify_url``) and log one line.
7. Release the slot, and publish what the host runs.

A slot whose lease was lost meanwhile (etcd out of reach) does not stop the replacement: it is
finished and the log says so; the next ``acquire`` waits for a lease by itself. Reads and writes
of pauses are retried with a capped backoff while etcd does not answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar, cast

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from deployer.backoff import RetryPolicy, backoff, retrying
from deployer.docker import Container
from deployer.errors import ContainerNotFound, DeployerError, DockerUnavailable
from deployer.host_apps import HostApps
from deployer.notify import PauseNotice
from deployer.readiness import NotReady, Ready
from deployer.reference import InvalidReference
from deployer.replace import Replacement, ReplaceMode, Replacer, wanted_mode
from deployer.replacers import RefusingReplacer, Tagger, tag_back
from deployer.rollout.keys import app_name
from deployer.rollout.lease import NoLease
from deployer.rollout.pause import PauseRecord
from deployer.rollout.slots import Slot
from deployer.rollout.wiring import Rollouts
from deployer.rounds import Outcome, Result

log = Logger()

_T = TypeVar("_T")

PAUSE_CHECK = 1.0
"""How often, in seconds, a host waiting for a rollout slot reads its app's pause."""


async def retry_logged(clock: IReactorTime, policy: RetryPolicy, what: str,
                       call: Callable[[], Deferred[_T]]) -> _T:
    """``call()`` until it succeeds (:func:`deployer.backoff.retrying`, waiting ``policy``'s
    backoff between attempts: etcd away), each failure logged as ``what``; cancellation and
    :class:`~deployer.reference.InvalidReference` are not retried."""

    def failed(error: Exception, failures: int, delay: float) -> None:
        if isinstance(error, InvalidReference):
            raise error
        log.warn("{what} failed: {error}; trying again in {delay:.1f}s", what=what,
                 error=str(error) or type(error).__name__, delay=delay)

    return await retrying(policy, clock, call, failed)


def _short(image_id: str) -> str:
    return image_id.removeprefix("sha256:")[:12]


class Rollout:
    """The rollout parts of one host, used by its rounds (see the module docstring).

    ``replacers`` maps each :class:`ReplaceMode` to the :class:`Replacer` that does it (a mode
    missing from it is refused: nothing is taken down); ``mode`` is ``--replace``. ``notify``
    gets a :class:`PauseNotice` when this host pauses an app; ``observers`` every
    :class:`Outcome`; ``apps`` is what this host runs, published after each replacement.
    """

    def __init__(
        self,
        clock: IReactorTime,
        engine: Tagger,
        rollouts: Rollouts,
        replacers: Mapping[ReplaceMode, Replacer],
        *,
        hostname: str,
        mode: ReplaceMode = ReplaceMode.STOP,
        notify: Callable[[PauseNotice], object] | None = None,
        observers: Iterable[Callable[[Outcome], object]] = (),
        apps: HostApps | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.clock = clock
        self.engine = engine
        self.rollouts = rollouts
        self.replacers = dict(replacers)
        self.hostname = hostname
        self.mode = mode
        self.notify = notify
        self.observers = list(observers)
        self.apps = apps if apps is not None else HostApps(rollouts.publish)
        self.retry = retry or backoff(0.5, 10.0, floor=0.1)

    def replacer(self, container: Container) -> tuple[ReplaceMode, Replacer]:
        mode = wanted_mode(container, self.mode)
        found = self.replacers.get(mode)
        if found is None:
            found = RefusingReplacer(mode, "is not available in this daemon")
        return mode, found

    # -- one container --------------------------------------------------------------------------

    async def replace(self, container: Container, app: str, new_image: str,
                      digest: str | None = None) -> Outcome:
        """Replace ``container`` of ``app`` with one on ``new_image`` (``digest``: its manifest
        digest, when known), inside a rollout slot. Never raises but
        :class:`~deployer.errors.DockerUnavailable` (the engine is away: nothing was taken
        down, the round is retried) and cancellation."""
        replacement = Replacement(container, app, container.image_id, new_image)
        try:
            app_name(app)
        except InvalidReference as e:  # no rollout state can be kept for it
            log.error("not replacing {name}: {app} cannot name an app: {error}",
                      name=container.name, app=app, error=str(e))
            refused = self._outcome(replacement, Result.ERROR, str(e))
            self._tell(refused)
            return refused
        record = await self._paused(app)
        if record is not None:
            if record.is_build(new_image, digest):
                kept = await self._keep_previous(replacement, record, 0.0)
                self._tell(kept)
                return kept
            if await self._retrying(f"ending the pause of {app}",
                                    lambda: self.rollouts.pauses.supersede(app, new_image, digest)):
                log.info("a new build of {app} ({new}) ends its paused rollout (paused for {old}"
                         " on {host}: {reason})", app=app, new=_short(new_image),
                         old=_short(record.image_id), host=record.host, reason=record.reason)
        asked = self.clock.seconds()
        turn = await self._turn(app, container.name, new_image, digest)
        if isinstance(turn, PauseRecord):
            kept = await self._keep_previous(replacement, turn, self.clock.seconds() - asked)
            self._tell(kept)
            return kept
        slot = turn
        taken = self.clock.seconds()
        self.apps.replacing(container.name)
        try:
            outcome = await self._in_slot(replacement, digest, slot)
        except BaseException:  # the engine went away, or the round was cancelled
            self.apps.replaced(container.name, app, container.id, container.image_id,
                               "unknown")
            await slot.release()
            raise
        outcome = attrs.evolve(outcome, waited=slot.waited, slot=True,
                               seconds=self.clock.seconds() - taken)
        self._tell(outcome)
        self.apps.publish()
        await slot.release()
        return outcome

    async def _in_slot(self, replacement: Replacement, digest: str | None,
                       slot: Slot) -> Outcome:
        app, container = replacement.app, replacement.container
        record = await self._paused(app)
        if record is not None and record.is_build(replacement.new_image, digest):
            outcome = await self._keep_previous(replacement, record, slot.waited)
            self.apps.replaced(container.name, app, container.id, container.image_id,
                               "unknown")
            return outcome
        mode, replacer = self.replacer(container)
        log.info("replacing {name} ({mode}): {app} {old} -> {new}", name=container.name,
                 mode=mode.value, app=app, old=_short(replacement.old_image),
                 new=_short(replacement.new_image))
        try:
            readiness = await replacer.replace(replacement)
        except ContainerNotFound:
            log.info("container {name} was gone before it could be replaced",
                     name=container.name)
            self.apps.replaced(container.name, app, container.id, container.image_id, "unknown")
            return self._outcome(replacement, Result.GONE, "gone before it was replaced")
        except DockerUnavailable:
            raise
        except DeployerError as e:
            log.error("cannot replace {name}: {error}; it keeps running {old}",
                      name=container.name, error=str(e), old=_short(replacement.old_image))
            self.apps.replaced(container.name, app, container.id, container.image_id, "unknown")
            return self._outcome(replacement, Result.ERROR, str(e))
        self._lost(slot, replacement)
        if isinstance(readiness, Ready):
            self.apps.replaced(container.name, app, readiness.container_id,
                               replacement.new_image,
                               "healthy" if readiness.health_checked else "running")
            return self._outcome(replacement, Result.REPLACED, readiness.describe())
        paused = await self._fail(replacement, readiness, digest, replacer)
        self.apps.replaced(container.name, app, "", replacement.old_image, "unknown")
        return attrs.evolve(
            self._outcome(replacement, Result.ROLLED_BACK, readiness.describe(),
                          reason=readiness.reason.value),
            paused=paused,
        )

    async def _fail(self, replacement: Replacement, outcome: NotReady, digest: str | None,
                    replacer: Replacer) -> bool:
        """Pause the app and roll back (side by side: the pause keeps the other hosts away,
        the rollback brings this one back), then notify. Whether this host paused it (False:
        it was paused for this build already)."""
        app = replacement.app
        record = PauseRecord(app, replacement.new_image, digest, self.hostname,
                             f"{outcome.reason.value}: {outcome.detail}", self.clock.seconds())
        pausing = Deferred.fromCoroutine(self._retrying(
            f"pausing the rollout of {app}", lambda: self.rollouts.pauses.pause(record)))
        try:
            await replacer.roll_back(replacement, outcome)
        except CancelledError:
            raise
        except Exception:
            log.failure("rolling back {name} failed", name=replacement.name)
        first = await pausing
        notice = PauseNotice(
            host=self.hostname, app=app, container=replacement.name,
            image_id=replacement.new_image, digest=digest, reason=outcome.reason.value,
            detail=outcome.detail, previous_image=replacement.old_image,
        )
        log.error("{text}", text=notice.text())
        if first is True and self.notify is not None:
            try:
                self.notify(notice)
            except Exception:
                log.failure("the pause notification failed")
        return first is True

    async def _keep_previous(self, replacement: Replacement, record: PauseRecord,
                             waited: float) -> Outcome:
        log.warn(
            "not replacing {name}: the rollout of {app} is paused for this build ({new}) since"
            " {host} reported: {reason}; putting {app} back on {old}, which {name} runs",
            name=replacement.name, app=replacement.app, new=_short(replacement.new_image),
            host=record.host, reason=record.reason, old=_short(replacement.old_image),
        )
        await tag_back(self.engine, replacement)
        return self._outcome(replacement, Result.PAUSED,
                             f"paused since {record.host} reported: {record.reason}",
                             waited=waited)

    def _lost(self, slot: Slot, replacement: Replacement) -> None:
        if slot.lost:
            log.warn(
                "the etcd lease of the rollout slot for {name} was lost during its replacement"
                " ({why}): the replacement was finished anyway; no new slot is taken until this"
                " host holds a lease again",
                name=replacement.name, why=slot.lost_reason or "unknown reason",
            )

    # -- waiting for a slot ---------------------------------------------------------------------

    def _turn(self, app: str, container: str, new_image: str,
              digest: str | None) -> Deferred[Slot | PauseRecord]:
        """A slot of ``app`` for ``container``, or the pause for this build if it comes first.
        The place in the line is then kept, and the slot given back as soon as it comes: a
        request to etcd cut short could still be carried out after a delete, and leave a key
        that holds the line up. Cancelling gives up both."""
        acquiring = self.rollouts.slots.acquire(app, container)
        if acquiring.called:
            return cast("Deferred[Slot | PauseRecord]", acquiring)
        paused = self._paused_while_waiting(app, new_image, digest)

        def give_up(_: Deferred[Slot | PauseRecord]) -> None:
            acquiring.cancel()
            paused.cancel()

        turn: Deferred[Slot | PauseRecord] = Deferred(give_up)

        def taken(slot: Slot) -> None:
            if not turn.called:
                turn.callback(slot)
                paused.cancel()
                return
            log.info("the rollout slot of {app} for {name} came after the pause: given back",
                     app=app, name=container)
            slot.release()  # never fails

        def found(record: PauseRecord) -> None:
            if not turn.called:
                turn.callback(record)

        def failed(failure: Failure) -> None:
            if not turn.called:
                turn.errback(failure)
                paused.cancel()
            elif not failure.check(CancelledError, NoLease):  # NoLease: the daemon stops
                log.failure("waiting for a slot of {app} for {name}", failure, app=app,
                            name=container)

        acquiring.addCallbacks(taken, failed)
        paused.addCallbacks(found, lambda f: None if f.check(CancelledError) else failed(f))
        return turn

    def _paused_while_waiting(self, app: str, new_image: str,
                              digest: str | None) -> Deferred[PauseRecord]:
        """Fires with ``app``'s pause once a read (every :data:`PAUSE_CHECK` seconds) finds it
        paused for this build; a read that fails is logged (once in a row) and tried again."""
        failing = False

        def check() -> Deferred[None]:
            def read(record: PauseRecord | None) -> None:
                nonlocal failing
                failing = False
                if record is not None and record.is_build(new_image, digest) \
                        and not found.called:
                    loop.stop()
                    found.callback(record)

            def failed(failure: Failure) -> None:
                nonlocal failing
                if not failing:
                    log.warn("reading the pause of {app} while it waits for a slot failed:"
                             " {error}; reading it again every {every:g}s", app=app,
                             error=failure.getErrorMessage(), every=PAUSE_CHECK)
                failing = True

            return self.rollouts.pauses.get(app).addCallbacks(read, failed)

        def stop(_: Deferred[PauseRecord]) -> None:
            if loop.running:
                loop.stop()

        found: Deferred[PauseRecord] = Deferred(stop)
        loop = LoopingCall(check)
        loop.clock = self.clock
        loop.start(PAUSE_CHECK, now=False).addErrback(
            lambda f: log.failure("the pause checks of {app} stopped", f, app=app))
        return found

    # -- helpers --------------------------------------------------------------------------------

    async def _paused(self, app: str) -> PauseRecord | None:
        return await self._retrying(f"reading the pause of {app}",
                                    lambda: self.rollouts.pauses.get(app))

    async def _retrying(self, what: str, call: Callable[[], Deferred[_T]]) -> _T:
        return await retry_logged(self.clock, self.retry, what, call)

    def _outcome(self, replacement: Replacement, result: Result, detail: str,
                 waited: float = 0.0, reason: str | None = None) -> Outcome:
        container = replacement.container
        return Outcome(container.name, container.id, replacement.app, replacement.old_image,
                       replacement.new_image, result, detail, waited=waited, reason=reason)

    def _tell(self, outcome: Outcome) -> None:
        for observer in self.observers:
            try:
                observer(outcome)
            except Exception:
                log.failure("replacement observer {observer!r} failed", observer=observer)

