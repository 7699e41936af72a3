"""Prometheus metrics of one daemon, in a registry of its own (never the process-wide default).
``GET /metrics`` (:mod:`deployer.webhook`) serves them."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.process_collector import ProcessCollector

PULL_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
ROLLOUT_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


class Metrics:
    """Every metric that deployer exports. Label values are small fixed sets (endpoint names,
    HTTP statuses, update sources, ``ok``/``error``), never repository names."""

    def __init__(
        self, registry: CollectorRegistry | None = None, process: bool = True
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True) if registry is None else registry
        if process:
            ProcessCollector(namespace="deployer", registry=self.registry)
        r = self.registry
        self.webhooks = Counter(
            "deployer_webhooks",
            "Webhook requests answered, by endpoint and HTTP status.",
            ["endpoint", "status"],
            registry=r,
        )
        self.webhook_auth_failures = Counter(
            "deployer_webhook_auth_failures",
            "Webhook requests refused for missing or invalid credentials.",
            ["endpoint"],
            registry=r,
        )
        self.updates_accepted = Counter(
            "deployer_updates_accepted",
            "Updates accepted from webhooks, by source (dockerhub, registry, api, ...).",
            ["source"],
            registry=r,
        )
        self.pulls = Counter(
            "deployer_pulls", "Image pulls, by result (ok, error, stalled).", ["result"], registry=r
        )
        self.pull_duration = Histogram(
            "deployer_pull_duration_seconds",
            "Time taken by one image pull.",
            buckets=PULL_BUCKETS,
            registry=r,
        )
        self.containers_stopped = Counter(
            "deployer_containers_stopped",
            "Containers stopped because their image was outdated.",
            registry=r,
        )
        self.rounds = Counter(
            "deployer_rounds",
            "Deployment rounds (pull then stop), by result (ok, error).",
            ["result"],
            registry=r,
        )
        self.etcd_watch_reconnects = Counter(
            "deployer_etcd_watch_reconnects",
            "Times the etcd watch had to be set up again.",
            registry=r,
        )
        self.watch_live = Gauge(
            "deployer_watch_live",
            "1 while the etcd watch is established, else 0.",
            registry=r,
        )
        self.http_connections = Gauge(
            "deployer_http_connections",
            "Client connections open.",
            registry=r,
        )
        self.http_connections_dropped = Counter(
            "deployer_http_connections_dropped",
            "Client connections dropped, by reason: timeout (no whole request within"
            " --request_timeout), evicted (the one that waited longest for its request, to make"
            " room at the connection limit), refused (closed at once at the limit).",
            ["reason"],
            registry=r,
        )

        self.rollout_duration = Histogram(
            "deployer_rollout_duration_seconds",
            "Time one replacement held its rollout slot: from taking the container down until"
            " its replacement was ready, or rolled back.",
            buckets=ROLLOUT_BUCKETS,
            registry=r,
        )
        self.replacements = Counter(
            "deployer_replacements",
            "Stale containers handled by the rollout, by result (replaced, rolled_back, paused:"
            " left running because the app's rollout is paused for that build, gone, error).",
            ["result"],
            registry=r,
        )
        self.rollbacks = Counter(
            "deployer_rollbacks",
            "Replacements rolled back, by reason (unhealthy, exited, no_replacement, timeout).",
            ["reason"],
            registry=r,
        )
        self.rollout_pauses = Counter(
            "deployer_rollout_pauses",
            "App rollouts that this host paused (it was the first to find the build not ready).",
            registry=r,
        )
        self.slot_wait = Histogram(
            "deployer_rollout_slot_wait_seconds",
            "Time waiting for a rollout slot before replacing a container.",
            buckets=ROLLOUT_BUCKETS,
            registry=r,
        )

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

