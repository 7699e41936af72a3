"""The daemon as one ``MultiService``, built from a :class:`deployer.config.Config`."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import attrs
from treq.client import HTTPClient
from twisted.application import strports
from twisted.application.internet import TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, DeferredList, FirstError
from twisted.logger import Logger
from twisted.web.client import Agent, HTTPConnectionPool

from deployer.docker import DockerClient
from deployer.errors import DockerError
from deployer.metrics import Metrics
from deployer.model import Update
from deployer.reconcile import Reconciler, RoundReport

if TYPE_CHECKING:
    from deployer.notify import DeployReport

log = Logger()


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

    etcd: Any

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
    docker: DockerClient
    watch: Any = None

    async def __call__(self) -> str | None:
        try:
            await self.docker.ping()
        except DockerError as e:
            return f"docker: {e}"
        if self.watch is not None and not self.watch.live:
            return f"etcd watch: {self.watch.reason}"
        return None


class _Closing(Service):
    """Closes connection pools and cancels retries when the daemon stops."""

    def __init__(self, reconciler: Reconciler, closers: Sequence[Any]) -> None:
        self.reconciler = reconciler
        self.closers = closers

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        self.reconciler.stop()
        return DeferredList([Deferred.fromCoroutine(_maybe(c())) for c in self.closers])


async def _maybe(result: Any) -> None:
    if isinstance(result, Deferred) or hasattr(result, "__await__"):
        await result


def make_service(config: Any, reactor: Any) -> MultiService:
    from deployer.auth import TokenAuth
    from deployer.notify import DockerHubCallback, Notifiers, SlackNotifier, WebhookNotifier
    from deployer.site import WebhookSite
    from deployer.webhook import WebhookApp

    top = MultiService()
    metrics = Metrics()
    docker = DockerClient.from_url(reactor, config.docker, config.credentials)

    pool = HTTPConnectionPool(reactor, persistent=True)
    pool._factory.noisy = False
    http = HTTPClient(Agent(reactor, pool=pool, connectTimeout=10))
    notifiers = Notifiers(
        slack=SlackNotifier(http, reactor, config.slack_webhook_url, config.slack_username)
        if config.slack_webhook_url else None,
        webhook=WebhookNotifier(http, reactor, config.notify_url) if config.notify_url else None,
    )

    def notify(report: RoundReport) -> None:
        notifiers.deployed(deploy_report(config.hostname, report))

    reconciler = Reconciler(
        reactor,
        docker,
        kill_timeout=config.kill_timeout,
        max_pulls=config.max_threads,
        observers=[partial(count_round, metrics), notify],
    )

    closers: list[Any] = [docker.close, pool.closeCachedConnections]
    watch = None
    if config.standalone:
        sink: Any = LocalSink(reconciler)
        context = f"deployer={config.hostname}"
    else:
        from deployer.etcd import Etcd, EtcdConfig

        etcd = Etcd(
            reactor,
            EtcdConfig(
                nodes=config.etcd_nodes,
                prefix=config.etcd_prefix,
                dial_timeout=config.etcd_dial_timeout,
                retry_delay=config.etcd_retry_delay,
                strong_consistency=config.strong_consistency,
            ),
        )
        sink = EtcdSink(etcd)
        watch = etcd.watch(reconciler.request)
        watch.on_reconnect = metrics.etcd_watch_reconnects.inc
        live = watch
        metrics.watch_live.set_function(lambda: 1.0 if live.live else 0.0)
        watch.setServiceParent(top)
        closers.append(etcd.close)
        context = f"deployer={config.hostname} via etcd"

    app = WebhookApp(
        clock=reactor,
        sink=sink,
        health=Health(docker, watch),
        auth=TokenAuth(config.webhook_tokens) if config.webhook_tokens else None,
        callbacks=DockerHubCallback(http, reactor, config.callback_hosts),
        webhook_path=config.webhook_path,
        public_url=config.public_url,
        context=context,
        metrics=metrics,
        github_secret=config.github_secret.encode() if config.github_secret else None,
    )
    site = WebhookSite(app.resource())
    strports.service(config.listen, site).setServiceParent(top)

    if config.repull_period > 0:
        repull = TimerService(
            config.repull_period,
            lambda: reconciler.request(Update("*", source="repull", received=reactor.seconds())),
        )
        repull.clock = reactor
        repull.setServiceParent(top)

    _Closing(reconciler, closers).setServiceParent(top)
    return top


def deploy_report(hostname: str, report: RoundReport) -> DeployReport:
    """What notifications carry: what was deployed where."""
    from deployer.notify import DeployReport

    return DeployReport(
        host=hostname,
        pattern=", ".join(report.patterns),
        stopped=tuple(s.name for s in report.stopped),
        images=dict(report.pulled),
        failures=tuple(f"{tag}: {why}" for tag, why in sorted(report.failed.items()))
        + report.errors,
        source=", ".join(sorted({u.source for u in report.updates})),
    )


def count_round(metrics: Metrics, report: RoundReport) -> None:
    for seconds in report.pull_seconds.values():
        metrics.pulls.labels(result="ok").inc()
        metrics.pull_duration.observe(seconds)
    if report.failed:
        metrics.pulls.labels(result="error").inc(len(report.failed))
    metrics.containers_stopped.inc(len(report.stopped))
    metrics.rounds.labels(result="ok" if report.ok else "error").inc()
