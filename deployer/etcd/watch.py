"""The watch: every update recorded under the prefix, delivered to a callback, once.

A write applied twice (retried on another member after the first one was applied late) puts
the same value again: the watch asks etcd for each key's previous value and does not deliver
such a repeat (:meth:`~deployer.etcd.layout.KeyLayout.repeated`).

:class:`WatchService` reads every key under the prefix when it starts and hands each recorded
pattern to its callback once (the Go original's catch-up), then watches from the revision after
that read. After any interruption it resumes from the last revision it processed plus one, so
nothing is missed and nothing is delivered twice; the processed revision advances with the
events' ``mod_revision`` and with progress notifications (sent by etcd only to watchers that are
up to date), never with the header of a response that carries events or of the ``created``
response, which can be ahead of what was delivered. If etcd has compacted that revision away,
the service reads everything again and delivers every key once more (a full resync).

It watches the member in use, and retries forever after a backoff (``retry_delay`` doubled per
failure, capped at :data:`MAX_BACKOFF`, with jitter, and never shorter than
:data:`MIN_RETRY_DELAY`), on the next member. Reads are serializable (served by the member
itself) unless ``--strong_consistency`` asks for linearizable ones.

:attr:`WatchService.live` is True while a stream is established, and :attr:`~WatchService.reason`
says why not (``/healthz`` answers 503 with it). A member that stops answering while the stream
is established (stopped, swapping, behind a black-holing network) sends nothing, and nothing
fails: the service's :class:`~deployer.etcd.liveness.MemberProbe` checks that member every
couple of seconds (that member, even once a write that timed out there has moved the member in
use on), and when it fails the stream is ended (``live`` turns False, with the
reason) and the watch fails over, within ``2 x dial_timeout`` of the member's last answer. While
no member answers, each attempt fails within ``dial_timeout`` and ``live`` stays False. A stream
silent for :data:`WATCH_IDLE_TIMEOUT` is presumed dead, whatever the check says.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, DeferredList
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from deployer.backoff import backoff
from deployer.errors import Compacted, EtcdUnavailable, TimedOut, WatchCanceled
from deployer.etcd._txaioetcd import Header, KeyValue, Range
from deployer.etcd.client import EXPECTED_FAILURES, Gateway, describe
from deployer.etcd.config import EtcdConfig
from deployer.etcd.layout import InvalidKey, KeyLayout
from deployer.etcd.liveness import MemberProbe
from deployer.lines import JSONLinesReader
from deployer.loops import LoopService
from deployer.model import Update

MAX_BACKOFF = 30.0
"""The cap, in seconds, of the watch's reconnection backoff."""

MIN_RETRY_DELAY = 0.1
"""The shortest wait, in seconds, before the watch retries, and the ``retry_delay`` that a
smaller one counts as: with a delay of 0 a watch on an unreachable etcd would retry in a busy
loop, logging every attempt."""

WATCH_IDLE_TIMEOUT = 11 * 60.0
"""A watch stream silent for this long is presumed dead and reopened. The watch asks for
progress notifications, which etcd sends every 10 minutes by default to an idle watcher, so
this catches connections that died without a FIN or RST (a crashed host, a partition)."""


async def read_all(
    gateway: Gateway, layout: KeyLayout, url: str, serializable: bool
) -> tuple[int, list[KeyValue]]:
    """Every key under the prefix, from one member, and the revision of that read."""
    body = layout.watched()._marshal()
    if serializable:
        body["serializable"] = True
    result = Range._parse(await gateway.call(url, "/v3/kv/range", body))
    if result.header is None or result.header.revision is None:
        raise WatchCanceled(f"{url}: range answer without a revision")
    return int(result.header.revision), list(result.kvs)


class WatchService(LoopService):
    """Delivers every update recorded under the prefix to ``on_update``, for as long as it runs.

    Starts with a catch-up read of every key, then watches (see the module docstring). Any
    failure moves to the next member after a capped, jittered backoff; it never raises out and
    runs until :meth:`stopService`, whose Deferred fires as soon as the request in flight or the
    backoff is cancelled. :attr:`live` is True while a watch stream is established;
    :attr:`reason` says why not; :attr:`reconnects` counts reconnection attempts.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        gateway: Gateway,
        layout: KeyLayout,
        config: EtcdConfig,
        on_update: Callable[[Update], object],
        *,
        rng: random.Random,
        max_backoff: float = MAX_BACKOFF,
        probe: MemberProbe | None = None,
    ) -> None:
        self._reactor = reactor
        self._gateway = gateway
        self._layout = layout
        self._config = config
        self._on_update = on_update
        self._retry_delay = backoff(config.retry_delay, max_backoff, floor=MIN_RETRY_DELAY,
                                    rng=rng)
        self._failures = 0
        self._url = ""
        self._index = 0  # of the member of the stream, which writes may have moved on from
        self._quiet: IDelayedCall | None = None
        self._reader: JSONLinesReader | None = None
        self.probe = probe
        if probe is not None:
            probe.listeners.append(self._member_failed)
            probe.target = lambda: self._index if self.live else None
        self.revision = 0  # the last revision processed; the watch resumes after it
        self.live = False
        self.reason = "not started"
        self.reconnects = 0
        self.resyncs = 0
        self.on_reconnect: Callable[[], object] = lambda: None

    def startService(self) -> None:
        if self.probe is not None:  # first: the loop may stop the service before it returns
            self.probe.startService()
        super().startService()

    def stopService(self) -> Deferred[None]:
        self.live = False
        self.reason = "stopped"
        if self.probe is None:
            return super().stopService()
        stopped = [self.probe.stopService(), super().stopService()]
        return DeferredList(stopped, consumeErrors=True).addCallback(lambda _: None)

    def _member_failed(self, url: str, why: str) -> None:
        """The liveness check found ``url`` not answering: end the stream on it, if any."""
        reader = self._reader
        if reader is not None and self._url == url and not reader.done.called:
            reader.fail(EtcdUnavailable(f"no answer to the liveness check: {why}"))

    def _crashed(self, failure: Failure) -> None:
        self.log.failure("the etcd watch of {prefix} ended", failure, prefix=self._layout.prefix)

    async def _run(self) -> None:
        # stopService cancels what the loop awaits. A cancelled HTTP request fails with what the
        # agent makes of it (ResponseNeverReceived, ConnectingCancelledError), not with
        # CancelledError, and a callback may call stopService while the loop is not waiting on
        # anything: so the loop also checks ``running`` after every step, before it retries.
        members = self._gateway.members
        resync = True
        while self.running:
            index = self._index = members.current
            url = members.nodes[index]
            try:
                if resync:
                    self.reason = f"reading {self._layout.prefix}/ from {url}"
                    await self._read_all(url)
                    resync = False
                    if not self.running:
                        return
                await self._watch(url)
                why = "the watch stream ended"
            except CancelledError:
                raise
            except Exception as e:
                if not self.running:
                    return
                if isinstance(e, Compacted):
                    self.log.warn(
                        "etcd {url} compacted the watch's revision {revision} ({why}):"
                        " reading everything again",
                        url=url,
                        revision=self.revision + 1,
                        why=e,
                    )
                    self.live = False
                    self.reason = f"{url}: {e}; resyncing"
                    resync = True
                    self.resyncs += 1
                    continue
                why = describe(e)
                if not isinstance(e, EXPECTED_FAILURES):
                    self.log.failure("unexpected error in the etcd watch on {url}", url=url)
            if not self.running:
                return
            self.live = False
            self.reason = f"{url}: {why}"
            members.failed(index)
            delay = self._retry_delay(self._failures)
            self._failures += 1
            self.log.warn(
                "etcd watch of {prefix}/ on {url} failed after revision {revision}: {why};"
                " retrying on {next} in {delay:.1f}s",
                prefix=self._layout.prefix,
                url=url,
                revision=self.revision,
                why=why,
                next=members.in_use,
                delay=delay,
            )
            await deferLater(self._reactor, delay)  # a cancel raises CancelledError
            self.reconnects += 1
            self.on_reconnect()

    async def _read_all(self, url: str) -> None:
        revision, kvs = await read_all(
            self._gateway, self._layout, url, not self._config.strong_consistency
        )
        self.log.info(
            "read {count} key(s) under {prefix}/ from {url} at revision {revision}",
            count=len(kvs),
            prefix=self._layout.prefix,
            url=url,
            revision=revision,
        )
        for kv in kvs:
            self._deliver(kv)
        self.revision = revision

    async def _watch(self, url: str) -> None:
        reader = JSONLinesReader(self._handle, strict=True, what=f"etcd watch on {url}")
        self._quiet = self._reactor.callLater(
            self._config.dial_timeout, self._too_quiet, reader
        )
        self._url = url
        self._reader = reader
        create = self._layout.watched()._marshal()
        create["start_revision"] = self.revision + 1
        create["progress_notify"] = True
        create["prev_kv"] = True  # to tell a write applied twice (KeyLayout.repeated)
        try:
            await self._gateway.open_stream(url, "/v3/watch", {"create_request": create}, reader)
            await reader.done
        finally:
            self._reader = None
            if self._quiet.active():
                self._quiet.cancel()
            self._quiet = None
            if not reader.done.called:
                reader.done.cancel()  # the stream never started: make sure it never does
            # Its failure, if any, is the one propagating now or was superseded by it.
            reader.done.addErrback(lambda _: None)

    def _too_quiet(self, reader: JSONLinesReader) -> None:
        if self.live:
            why = f"no message from etcd for {WATCH_IDLE_TIMEOUT:g}s"
        else:
            why = f"timed out after {self._config.dial_timeout:g}s waiting for the watch"
        reader.fail(TimedOut(why))

    def _heard(self) -> None:
        """A message arrived: the stream is alive for another WATCH_IDLE_TIMEOUT."""
        if self._quiet is not None and self._quiet.active():
            self._quiet.reset(WATCH_IDLE_TIMEOUT)

    def _handle(self, message: dict[str, Any]) -> None:
        """One message of the watch stream."""
        self._heard()
        if "error" in message:
            error = message["error"]
            if isinstance(error, dict):
                error = error.get("message", error)
            raise WatchCanceled(f"etcd error on the watch stream: {error}")
        result = message.get("result", {})
        compact = int(result.get("compact_revision", 0) or 0)
        if compact:
            raise Compacted(compact)
        if result.get("canceled"):
            raise WatchCanceled(f"etcd canceled the watch: {result.get('cancel_reason', '')}")
        events = result.get("events", [])
        if result.get("created"):
            self.live = True
            self.reason = ""
            self._failures = 0
            self.log.info(
                "watching {prefix}/ on {url} from revision {revision}",
                prefix=self._layout.prefix,
                url=self._url,
                revision=self.revision + 1,
            )
        elif events:
            # A revision's events always come in one response, so whole responses are the unit
            # of progress: skip what was processed before, then move past this response.
            floor = self.revision
            newest = floor
            for event in events:
                kv = KeyValue._parse(event.get("kv", {}))
                revision = kv.mod_revision or 0
                if revision <= floor:
                    continue
                newest = max(newest, revision)
                if event.get("type", "PUT") != "PUT":
                    continue
                previous = event.get("prev_kv")
                if previous is not None and self._layout.repeated(
                    kv.key, kv.value or b"", KeyValue._parse(previous).value or b""
                ):
                    self.log.info(
                        "{key} at revision {revision} holds the update it held already"
                        " (a write applied twice): not delivered again",
                        key=kv.key.decode("utf-8", "replace"), revision=revision,
                    )
                    continue
                self._deliver(kv)
            self.revision = newest
        else:
            # A progress notification: etcd sends it only to a watcher that has been sent every
            # event up to the header's revision.
            header = Header._parse(result.get("header", {}))
            if header.revision is not None:
                self.revision = max(self.revision, int(header.revision))

    def _deliver(self, kv: KeyValue) -> None:
        try:
            update = self._layout.decode(kv.key, kv.value or b"", self._reactor.seconds())
        except InvalidKey as e:
            self.log.warn("ignoring etcd key at revision {revision}: {why}",
                          revision=kv.mod_revision, why=e)
            return
        except Exception:
            # Never let one odd entry stop the watch: it would fail again at every resume.
            self.log.failure("ignoring etcd key {key!r} at revision {revision}",
                             key=kv.key, revision=kv.mod_revision)
            return
        if update is None:
            return
        try:
            result = self._on_update(update)
        except Exception:
            self.log.failure("handling {update} failed", update=update.describe())
            return
        if isinstance(result, Deferred):
            result.addErrback(
                lambda f: self.log.failure(
                    "handling {update} failed", f, update=update.describe()
                )
            )
