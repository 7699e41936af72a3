"""deployer.metrics: names, labels, a registry per daemon, and /metrics over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest
import pytest_twisted
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool

from deployer.metrics import Metrics
from deployer.model import Update
from deployer.site import WebhookSite
from deployer.webhook import WebhookApp


def samples(body: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def exercise(metrics: Metrics) -> None:
    metrics.webhooks.labels(endpoint="registry", status="200").inc()
    metrics.webhooks.labels(endpoint="registry", status="200").inc()
    metrics.webhooks.labels(endpoint="dockerhub", status="401").inc()
    metrics.webhook_auth_failures.labels(endpoint="dockerhub").inc()
    metrics.updates_accepted.labels(source="registry").inc(3)
    metrics.pulls.labels(result="ok").inc()
    metrics.pulls.labels(result="error").inc()
    metrics.pull_duration.observe(0.3)
    metrics.pull_duration.observe(42)
    metrics.containers_stopped.inc(2)
    metrics.rounds.labels(result="ok").inc()
    metrics.etcd_watch_reconnects.inc()
    metrics.watch_live.set(1)


EXPECTED = {
    ("deployer_webhooks_total", (("endpoint", "registry"), ("status", "200"))): 2,
    ("deployer_webhooks_total", (("endpoint", "dockerhub"), ("status", "401"))): 1,
    ("deployer_webhook_auth_failures_total", (("endpoint", "dockerhub"),)): 1,
    ("deployer_updates_accepted_total", (("source", "registry"),)): 3,
    ("deployer_pulls_total", (("result", "ok"),)): 1,
    ("deployer_pulls_total", (("result", "error"),)): 1,
    ("deployer_pull_duration_seconds_count", ()): 2,
    ("deployer_pull_duration_seconds_sum", ()): 42.3,
    ("deployer_pull_duration_seconds_bucket", (("le", "0.5"),)): 1,
    ("deployer_pull_duration_seconds_bucket", (("le", "30.0"),)): 1,
    ("deployer_pull_duration_seconds_bucket", (("le", "60.0"),)): 2,
    ("deployer_containers_stopped_total", ()): 2,
    ("deployer_rounds_total", (("result", "ok"),)): 1,
    ("deployer_etcd_watch_reconnects_total", ()): 1,
    ("deployer_watch_live", ()): 1,
}


def test_render() -> None:
    metrics = Metrics()
    exercise(metrics)
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    got = samples(body)
    for key, value in EXPECTED.items():
        assert got[key] == pytest.approx(value), key
    assert got[("deployer_process_open_fds", ())] > 0


def test_starts_at_zero() -> None:
    got = samples(Metrics(process=False).render()[0])
    assert got[("deployer_containers_stopped_total", ())] == 0
    assert got[("deployer_watch_live", ())] == 0
    assert not any(name.startswith("process_") or name.startswith("deployer_process")
                   for name, _ in got)


def test_own_registry_never_the_global_one() -> None:
    before = samples(_global())
    a, b = Metrics(), Metrics()
    a.containers_stopped.inc(5)
    assert samples(b.render()[0])[("deployer_containers_stopped_total", ())] == 0
    assert samples(_global()).keys() == before.keys()
    assert not any(name.startswith("deployer_") for name, _ in samples(_global()))


def _global() -> bytes:
    from prometheus_client import generate_latest

    return generate_latest(REGISTRY)


def test_given_registry() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, process=False)
    assert metrics.registry is registry
    metrics.rounds.labels(result="error").inc()
    assert registry.get_sample_value("deployer_rounds_total", {"result": "error"}) == 1


async def healthy() -> None:
    return None


class NoSink:
    async def accept(self, updates: Sequence[Update]) -> str:
        raise AssertionError("no webhook is sent here")


@pytest.fixture
def served_metrics() -> Iterator[tuple[str, Metrics]]:
    """``GET /metrics`` as the daemon serves it: its app, in its site, on a real port."""
    metrics = Metrics()
    app = WebhookApp(clock=reactor, sink=NoSink(), health=healthy, auth=None, metrics=metrics)
    port = reactor.listenTCP(0, WebhookSite(app.resource()), interface="127.0.0.1")
    yield f"http://127.0.0.1:{port.getHost().port}/metrics", metrics
    pytest_twisted.blockon(port.stopListening())


@pytest_twisted.ensureDeferred
async def test_real_scrape(served_metrics: tuple[str, Metrics]) -> None:
    url, metrics = served_metrics
    pool = HTTPConnectionPool(reactor, persistent=False)
    http = HTTPClient(Agent(reactor, pool=pool))
    try:
        first = samples(await (await http.get(url)).content())
        exercise(metrics)
        response = await http.get(url)
        second = samples(await response.content())
        head = await http.head(url)
        post = await http.post(url, data=b"")
        await post.content()
    finally:
        await pool.closeCachedConnections()
    assert first[("deployer_containers_stopped_total", ())] == 0
    for key, value in EXPECTED.items():
        assert second[key] == pytest.approx(value), key
    assert response.headers.getRawHeaders(b"cache-control") == [b"no-store"]
    assert response.headers.getRawHeaders(b"content-type")[0].startswith(b"text/plain")
    assert head.code == 200
    assert post.code == 405
