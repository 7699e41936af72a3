"""The daemon as one service: :class:`DeployerService`, built from a
:class:`deployer.config.Config` by :meth:`DeployerService.from_config`.

Every part is made in :meth:`~DeployerService.from_config` and attached in
:meth:`~DeployerService.__attrs_post_init__`, nowhere else: the round's observers (metrics and the
deploy report to the notifiers), the rollout that replaces stale containers (slots, pauses, the
replacers by ``--replace`` mode, the pause notification, the rollout metrics, what this host
runs), the etcd watch in fleet mode, the listening port, the safety
re-pull on the reactor's clock, and the closers that run when the service stops.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import attrs
from treq.client import HTTPClient
from twisted.application import strports
from twisted.application.internet import TimerService
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, DeferredList, FirstError
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool

from deployer.auth import TokenAuth
from deployer.config import Config
from deployer.docker import DockerClient
from deployer.errors import DockerError
from deployer.etcd import Etcd, EtcdConfig, WatchService
from deployer.events import EngineEvents
from deployer.host_apps import HostApps
from deployer.metrics import Metrics
from deployer.model import EVERY_IMAGE, Update
from deployer.notify import (
    DeployReport,
    DockerHubCallback,
    Notifiers,
    SlackNotifier,
    WebhookNotifier,
)
from deployer.readiness import ReadyRules
from deployer.reconcile import Reconciler, RoundReport
from deployer.recreate import RecreateReplacer
from deployer.replace import ReplaceMode, Replacer
from deployer.replacers import StopReplacer
from deployer.rollout import wiring
from deployer.rollout.lease import LeaseKeeper
from deployer.rollout.wiring import Rollouts
from deployer.rollout_round import Rollout
from deployer.rounds import Outcome, Result
from deployer.site import ConnectionLimit, Drops, WebhookSite, connection_limit
from deployer.webhook import Sink, WebhookApp

log = Logger()

#: Something to close when the daemon stops (a connection pool, the etcd client).
Closer = Callable[[], Awaitable[object]]


@attrs.define
class LocalSink:
    """Standalone mode: an accepted update goes straight to this host's reconciler."""

    reconciler: Reconciler

    async def accept(self, updates: Sequence[Update]) -> str:
        for update in updates:
            self.reconciler.request(update)
        return "Queued " + ", ".join(u.pattern for u in updates)


@attrs.define
class EtcdSink:
    """Fleet mode: an update is accepted once etcd has acknowledged it; every host's watch
    (this one's too) then runs the round."""

    etcd: Etcd

    async def accept(self, updates: Sequence[Update]) -> str:
        try:
            revisions = await DeferredList(
                [self.etcd.record(u) for u in updates], fireOnOneErrback=True, consumeErrors=True
            )
        except FirstError as e:
            # The caller expects the write's own error (EtcdUnavailable answers 503).
            e.subFailure.raiseException()
        for update, (_, revision) in zip(updates, revisions, strict=True):
            log.debug("recorded update {update} at etcd revision {revision}",
                      update=update.describe(), revision=revision)
        return "Triggered etcd " + ", ".join(self.etcd.key_for(u) for u in updates)


@attrs.define
class Health:
    """``/healthz``: the engine answers ``/_ping``, and the etcd watch (fleet mode) is live."""

    docker: DockerClient
    watch: WatchService | None = None
    lease: LeaseKeeper | None = None

    async def __call__(self) -> str | None:
        try:
            await self.docker.ping()
        except DockerError as e:
            return f"docker: {e}"
        if self.watch is not None and not self.watch.live:
            return f"etcd watch: {self.watch.reason}"
        if self.lease is not None and not self.lease.held:
            return f"etcd lease (no rollout slot can be taken): {self.lease.reason}"
        return None


def deploy_report(hostname: str, report: RoundReport) -> DeployReport:
    """What notifications carry: what was deployed where."""
    return DeployReport(
        host=hostname,
        pattern=", ".join(report.patterns),
        stopped=tuple(s.name for s in report.stopped),
        images=dict(report.pulled),
        failures=tuple(f"{tag}: {why}" for tag, why in sorted(report.failed.items()))
        + report.errors,
        source=", ".join(sorted({u.source for u in report.updates})),
    )


def _rollouts(config: Config, reactor: Any, etcd: Etcd | None) -> Rollouts:
    """Rollout slots, pauses and status: in etcd for a fleet, in memory standalone."""
    if etcd is None:
        return wiring.standalone(reactor, hostname=config.hostname,
                                 max_unavailable=config.max_unavailable)
    return wiring.fleet(etcd, reactor, prefix=config.etcd_prefix, hostname=config.hostname,
                        max_unavailable=config.max_unavailable)


def replacers(
    config: Config, reactor: Any, docker: DockerClient, events: EngineEvents
) -> dict[ReplaceMode, Replacer]:
    """The way to replace a container, for each ``--replace`` mode."""
    rules = ReadyRules(min_ready=config.min_ready, ready_timeout=config.ready_timeout)
    return {
        ReplaceMode.STOP: StopReplacer(reactor, docker, events, rules, config.kill_timeout),
        ReplaceMode.RECREATE: RecreateReplacer(reactor, docker, events, rules,
                                               config.kill_timeout),
    }


def count_replacement(metrics: Metrics, outcome: Outcome) -> None:
    """The rollout counters: replacements by result, rollbacks, pauses, slot waits."""
    metrics.replacements.labels(result=outcome.result.value).inc()
    if outcome.slot:
        metrics.slot_wait.observe(outcome.waited)
    if outcome.result.taken_down:
        metrics.rollout_duration.observe(outcome.seconds)
    if outcome.result is Result.ROLLED_BACK:
        metrics.rollbacks.labels(reason=outcome.reason or "unknown").inc()
        if outcome.paused:
            metrics.rollout_pauses.inc()


def count_round(metrics: Metrics, report: RoundReport) -> None:
    """The round counter: pulls, their durations, containers stopped, rounds."""
    for seconds in report.pull_seconds.values():
        metrics.pulls.labels(result="ok").inc()
        metrics.pull_duration.observe(seconds)
    errors = len(report.failed) - len(report.stalled)
    if errors:
        metrics.pulls.labels(result="error").inc(errors)
    if report.stalled:
        metrics.pulls.labels(result="stalled").inc(len(report.stalled))
    metrics.containers_stopped.inc(len(report.stopped))
    metrics.rounds.labels(result="ok" if report.ok else "error").inc()


def _outgoing_http(reactor: Any) -> tuple[HTTPClient, Closer]:
    """The client for notifications and callbacks, and what closes its pool."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory.noisy = False
    return HTTPClient(Agent(reactor, pool=pool, connectTimeout=10)), pool.closeCachedConnections


@attrs.define(eq=False, slots=False)
class DeployerService(MultiService):
    """One daemon: the webhook front door, the update rounds on this host's engine, and, in
    fleet mode, the etcd watch that feeds them.

    ``reactor`` provides ``IReactorTime``, ``IReactorTCP`` and ``IReactorUNIX``. The parts are
    public so that tests and tools can look at them; build it with :meth:`from_config`.
    """

    config: Config
    reactor: Any
    metrics: Metrics
    docker: DockerClient
    notifiers: Notifiers
    reconciler: Reconciler
    sink: Sink
    app: WebhookApp
    site: WebhookSite
    connections: ConnectionLimit
    rollouts: Rollouts
    events: EngineEvents
    etcd: Etcd | None = None
    watch: WatchService | None = None
    closers: Sequence[Closer] = ()
    listener: IService = attrs.field(init=False)
    repull: TimerService | None = attrs.field(init=False, default=None)

    def __attrs_post_init__(self) -> None:
        MultiService.__init__(self)
        self.reconciler.observers.append(partial(count_round, self.metrics))
        self.reconciler.observers.append(self._report)
        if self.watch is not None:
            watch = self.watch
            watch.on_reconnect = self.metrics.etcd_watch_reconnects.inc
            self.metrics.watch_live.set_function(lambda: 1.0 if watch.live else 0.0)
            watch.setServiceParent(self)
        self.events.setServiceParent(self)
        if self.rollouts.keeper is not None:
            self.rollouts.keeper.setServiceParent(self)
        if self.rollouts.sweeper is not None:
            self.rollouts.sweeper.setServiceParent(self)
        connections = self.connections
        self.metrics.http_connections.set_function(lambda: float(connections.open))
        self.listener = strports.service(self.config.listen, connections, reactor=self.reactor)
        self.listener.setServiceParent(self)
        if self.config.repull_period > 0:
            self.repull = TimerService(self.config.repull_period, self._repull)
            self.repull.clock = self.reactor
            self.repull.setServiceParent(self)

    @classmethod
    def from_config(
        cls,
        config: Config,
        reactor: Any,
        *,
        docker: DockerClient | None = None,
        http: HTTPClient | None = None,
        etcd_http: HTTPClient | None = None,
        max_connections: int | None = None,
    ) -> DeployerService:
        """Every part of the daemon that ``config`` asks for, on ``reactor``.

        ``docker`` (the engine client), ``http`` (for notifications and Docker Hub callbacks)
        and ``etcd_http`` (for etcd) replace the ones made from ``config``, for tests; whoever
        passes them closes them. ``max_connections`` replaces the limit of client connections
        that ``RLIMIT_NOFILE`` gives (:func:`deployer.site.connection_limit`).
        """
        closers: list[Closer] = []
        metrics = Metrics()
        if docker is None:
            docker = DockerClient.from_url(reactor, config.docker, config.credentials,
                                           pull_stall_timeout=config.pull_stall_timeout)
            closers.append(docker.close)
        if http is None:
            http, close_http = _outgoing_http(reactor)
            closers.append(close_http)
        notifiers = Notifiers(
            slack=SlackNotifier(http, reactor, config.slack_webhook_url, config.slack_username)
            if config.slack_webhook_url else None,
            webhook=WebhookNotifier(http, reactor, config.notify_url)
            if config.notify_url else None,
        )
        events = EngineEvents(reactor, docker)

        etcd = None
        if not config.standalone:
            etcd = Etcd(
                reactor,
                EtcdConfig(
                    nodes=config.etcd_nodes,
                    prefix=config.etcd_prefix,
                    dial_timeout=config.etcd_dial_timeout,
                    retry_delay=config.etcd_retry_delay,
                    strong_consistency=config.strong_consistency,
                ),
                http=etcd_http,
            )
            closers.append(etcd.close)
        rollouts = _rollouts(config, reactor, etcd)
        rollout = Rollout(
            reactor, docker, rollouts, replacers(config, reactor, docker, events),
            hostname=config.hostname, mode=config.replace, notify=notifiers.paused,
            observers=[partial(count_replacement, metrics)],
            apps=HostApps(rollouts.publish, events),
        )
        reconciler = Reconciler(
            reactor, docker, kill_timeout=config.kill_timeout, max_pulls=config.max_threads,
            rollout=rollout, label_enable=config.label_enable,
        )

        sink: Sink
        watch = None
        if etcd is None:
            sink = LocalSink(reconciler)
            context = f"deployer={config.hostname}"
        else:
            sink = EtcdSink(etcd)
            watch = etcd.watch(reconciler.request)
            context = f"deployer={config.hostname} via etcd"

        app = WebhookApp(
            clock=reactor,
            sink=sink,
            health=Health(docker, watch, rollouts.keeper),
            auth=TokenAuth(config.webhook_tokens) if config.webhook_tokens else None,
            callbacks=DockerHubCallback(http, reactor, config.callback_hosts),
            webhook_path=config.webhook_path,
            public_url=config.public_url,
            context=context,
            metrics=metrics,
            github_secret=config.github_secret.encode() if config.github_secret else None,
            rollouts=rollouts,
        )
        limit = connection_limit() if max_connections is None else max_connections
        drops = Drops(reactor, metrics, limit, config.request_timeout)
        site = WebhookSite(app.resource(), reactor=reactor, request_timeout=config.request_timeout,
                           drops=drops)
        return cls(
            config=config,
            reactor=reactor,
            metrics=metrics,
            docker=docker,
            notifiers=notifiers,
            reconciler=reconciler,
            sink=sink,
            app=app,
            site=site,
            connections=ConnectionLimit(site, limit, drops),
            rollouts=rollouts,
            events=events,
            etcd=etcd,
            watch=watch,
            closers=tuple(closers),
        )

    def _report(self, report: RoundReport) -> None:
        self.notifiers.deployed(deploy_report(self.config.hostname, report))

    def _repull(self) -> None:
        self.reconciler.request(
            Update(EVERY_IMAGE, source="repull", received=self.reactor.seconds())
        )

    def stopService(self) -> Deferred[None]:
        """Stop the listener, the watch and the re-pull, start no more rounds, then run the
        closers; a closer that fails is logged and the others still run."""
        self.reconciler.stop()
        stopped = super().stopService()

        async def close() -> None:
            await stopped
            for closer in self.closers:
                try:
                    await closer()
                except Exception:
                    log.failure("closing {closer} failed while stopping", closer=closer)

        return Deferred.fromCoroutine(close())
