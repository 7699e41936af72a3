"""Never backwards, fast: an update older than the newest build a host knows of its tag is not
deployed (:mod:`deployer.freshness`), on one standalone host with a Clock and the in-memory
engine (:class:`tests.rollout_fakes.SimHost`)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.task import Clock
from twisted.logger import LogEvent, capturedLogs, formatEvent

from deployer.etcd.layout import KeyLayout
from deployer.freshness import Known, TagHistory, judge
from deployer.model import Update
from deployer.reference import parse_reference
from deployer.rollout import wiring
from tests.rollout_fakes import GOOD, SimHost, manifest_digest, run_until

APP = "registry.test:5000/myorg/app:qa"
D1, D2, D3 = ("sha256:" + c * 64 for c in "123")


@pytest.fixture
def logs() -> Iterator[list[LogEvent]]:
    with capturedLogs() as events:
        yield events


def text(events: list[LogEvent]) -> str:
    return "\n".join(formatEvent(e) for e in events)


def update(digest: str | None, sent: float, source: str = "registry", pattern: str = APP,
           event_id: str | None = None) -> Update:
    return Update.from_reference(parse_reference(pattern), source, sent, event_id).evolve(
        digest=digest)


# -- the knowledge ------------------------------------------------------------------------------


def test_an_older_update_with_another_digest_from_the_same_source_is_older() -> None:
    known = TagHistory()
    known.learn(APP, D2, 20.0, "registry")
    assert known.newer(APP, update(D1, 10.0)) == Known(D2, 20.0, "registry")
    assert known.newer(APP, update(D2, 10.0)) is None  # the same build: a retry, harmless
    assert known.newer(APP, update(D1, 30.0)) is None  # a newer push of an old build: wanted
    assert known.newer(APP, update(None, 10.0)) is None  # by tag: the registry's current
    assert known.newer(APP, update(D1, 10.0, source="api")) is None  # another clock
    assert known.newer("registry.test:5000/myorg/app:prod", update(D1, 10.0)) is None


def test_an_older_time_never_replaces_a_newer_one() -> None:
    known = TagHistory()
    known.learn(APP, D2, 20.0, "registry")
    known.learn(APP, D1, 10.0, "registry")
    assert known.get(APP, "registry") == Known(D2, 20.0, "registry")
    known.learn(APP, D3, 30.0, "registry")
    assert known.get(APP, "registry") == Known(D3, 30.0, "registry")


def test_the_knowledge_is_bounded_least_recently_used_first() -> None:
    known = TagHistory(capacity=3)
    for n in range(10):
        known.learn(f"myorg/app{n}:qa", D1, float(n), "registry")
        known.learn("myorg/kept:qa", D2, 1.0, "registry")  # used all the time
    assert len(known) == 3
    assert known.get("myorg/kept:qa", "registry") is not None
    assert known.get("myorg/app9:qa", "registry") is not None
    assert known.get("myorg/app0:qa", "registry") is None
    with pytest.raises(ValueError):
        TagHistory(capacity=0)


def test_judge_finds_older_updates_in_the_same_round() -> None:
    late, new, by_tag = update(D1, 10.0), update(D2, 20.0), update(None, 5.0, source="dockerhub")
    judged = judge(APP, [new, late, by_tag], TagHistory())
    assert judged.fresh == (new, by_tag)
    assert judged.older == ((late, Known(D2, 20.0, "registry")),)
    assert judged.wanted == new


# -- on a host ------------------------------------------------------------------------------------


def host_on_v1(clock: Clock) -> tuple[SimHost, str]:
    host = SimHost(clock, "h1", wiring.standalone(clock, hostname="h1"))
    old = host.local(APP, GOOD)
    host.run("web", APP)
    clock.advance(1.0)
    return host, old


def deploy(host: SimHost, clock: Clock, *updates: Update) -> None:
    for u in updates:
        host.reconciler.request(u)
    run_until(clock, lambda: host.idle)
    clock.advance(2.0)


def test_a_late_notification_for_the_previous_build_changes_nothing(
    logs: list[LogEvent],
) -> None:
    clock = Clock()
    host, v1 = host_on_v1(clock)
    v2 = host.publish(APP, GOOD)
    new = update(manifest_digest(v2), 2000.0, event_id="e2")
    deploy(host, clock, new)
    web = host.named("web")
    assert web is not None and web.image_id == v2
    pulls = host.pulls

    late = update(manifest_digest(v1), 1000.0, event_id="e1-retried")
    deploy(host, clock, late)

    assert host.named("web") is web and web.running and web.image_id == v2
    assert host.pulls == pulls  # not even pulled
    assert host.reconciler.skipped == 1
    [line] = [formatEvent(e) for e in logs if "skipping" in formatEvent(e)]
    assert APP in line and manifest_digest(v1) in line and manifest_digest(v2) in line
    assert "older than" in line


def test_a_late_notification_during_the_rollout_of_the_newer_one_is_skipped(
    logs: list[LogEvent],
) -> None:
    clock = Clock()
    host, v1 = host_on_v1(clock)
    v2 = host.publish(APP, GOOD)
    host.reconciler.request(update(manifest_digest(v2), 2000.0))
    assert host.reconciler.busy  # the replacement waits for its health check
    host.reconciler.request(update(manifest_digest(v1), 1000.0))  # the registry's retry
    run_until(clock, lambda: host.idle)

    web = host.named("web")
    assert web is not None and web.image_id == v2
    assert host.pulls == 1
    assert host.reconciler.skipped == 1
    assert "skipping the update of" in text(logs)


def test_updates_that_join_the_round_while_their_tag_waits_for_its_pull_are_judged(
    logs: list[LogEvent],
) -> None:
    clock = Clock()
    host, v1 = host_on_v1(clock)
    first = "registry.test:5000/myorg/aaa:qa"  # pulled first, and held up
    host.local(first, GOOD)
    host.publish(first, GOOD)
    v2 = host.publish(APP, GOOD)
    host.reconciler.semaphore = DeferredSemaphore(1)  # one pull at a time
    gate: Deferred[None] = Deferred()
    host.mem.slow_pull(first, gate)  # the registry holds the pull of the first tag

    host.reconciler.request(Update("*", source="repull", received=clock.seconds()))
    # While APP waits for its turn to pull, a late notification and the newer one join.
    host.reconciler.request(update(manifest_digest(v1), 1000.0))
    host.reconciler.request(update(manifest_digest(v2), 2000.0))
    assert len(host.reconciler._rounds) == 1
    assert (host.pulls_of(first), host.pulls_of(APP)) == (1, 0)  # APP waits for its turn
    gate.callback(None)
    run_until(clock, lambda: host.idle)

    web = host.named("web")
    assert web is not None and web.image_id == v2
    assert host.reconciler.skipped == 1
    assert f"skipping the update of {APP} to {manifest_digest(v1)}" in text(logs)
    assert "not deploying" not in text(logs)


def test_without_knowledge_a_late_notification_finds_the_registry_moved_on(
    logs: list[LogEvent],
) -> None:
    # The host never heard of the newer push (it started after it): the pull by tag finds the
    # registry's current build, which it runs already; the log says the late one is not it.
    clock = Clock()
    host = SimHost(clock, "h1", wiring.standalone(clock, hostname="h1"))
    v1 = host.publish(APP, GOOD)
    v2 = host.publish(APP, GOOD)
    host.local(APP, GOOD, image_id=v2)
    host.run("web", APP)
    clock.advance(1.0)
    web = host.named("web")

    deploy(host, clock, update(manifest_digest(v1), 1000.0))

    assert host.named("web") is web and web is not None and web.image_id == v2
    assert host.stops == 0
    line = text(logs)
    assert f"not deploying {APP} at {manifest_digest(v1)}" in line
    assert f"now points at {manifest_digest(v2)}" in line


def test_a_newer_push_of_an_old_build_is_deployed() -> None:
    # A user rolls back by pushing the previous build again: a newer event, an old digest.
    clock = Clock()
    host, v1 = host_on_v1(clock)
    v2 = host.publish(APP, GOOD)
    deploy(host, clock, update(manifest_digest(v2), 2000.0))
    host.publish(APP, GOOD, image_id=v1)
    deploy(host, clock, update(manifest_digest(v1), 3000.0))
    web = host.named("web")
    assert web is not None and web.image_id == v1
    assert host.reconciler.skipped == 0


def test_older_updates_without_a_digest_or_from_another_source_are_pulled_by_tag() -> None:
    clock = Clock()
    host, v1 = host_on_v1(clock)
    v2 = host.publish(APP, GOOD)
    deploy(host, clock, update(manifest_digest(v2), 2000.0))
    pulls = host.pulls
    deploy(host, clock, update(None, 1000.0, source="registry"),
           update(manifest_digest(v1), 1000.0, source="api"))
    assert host.pulls > pulls  # asked for, pulled by tag: the current build
    web = host.named("web")
    assert web is not None and web.image_id == v2  # never backwards
    assert host.reconciler.skipped == 0


def test_an_etcd_value_written_before_the_one_applied_is_skipped(
    logs: list[LogEvent],
) -> None:
    # What a resync of the watch (or a second trigger key of the repository) delivers again.
    clock = Clock()
    host, v1 = host_on_v1(clock)
    v2 = host.publish(APP, GOOD)
    layout = KeyLayout("/deployer")
    key = b"/deployer/" + APP.encode()

    def value(digest: str, sent: float) -> bytes:
        return json.dumps({"repository": "myorg/app", "registry": "registry.test:5000",
                           "tag": "qa", "digest": digest, "source": "registry",
                           "received": sent, "event_id": None}).encode()

    new = layout.decode(key, value(manifest_digest(v2), 2000.0), clock.seconds())
    old = layout.decode(key, value(manifest_digest(v1), 1000.0), clock.seconds())
    assert new is not None and old is not None
    deploy(host, clock, new, old)
    web = host.named("web")
    assert web is not None and web.image_id == v2
    assert host.reconciler.skipped == 1


def test_a_repository_update_older_than_a_tag_is_skipped_for_that_tag() -> None:
    # A repository-wide update with a digest (Harbor by digest) is judged tag by tag.
    clock = Clock()
    host, v1 = host_on_v1(clock)
    v2 = host.publish(APP, GOOD)
    deploy(host, clock, update(manifest_digest(v2), 2000.0, source="harbor"))
    pulls = host.pulls
    deploy(host, clock, update(manifest_digest(v1), 1000.0, source="harbor",
                               pattern="registry.test:5000/myorg/app"))
    assert host.pulls == pulls
    assert host.reconciler.skipped == 1
