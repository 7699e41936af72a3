"""The rollout parts put together (:mod:`deployer.rollout.wiring`), fleet and standalone: one
round's use of them shows in the ``/status`` document."""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from deployer.rollout import wiring
from deployer.rollout.pause import PauseRecord
from deployer.rollout.status import AppState
from deployer.rollout.testing import Link
from deployer.testing.fake_etcd import FakeEtcd
from tests.helpers import fired

APP = "myorg/app:qa"
OLD, NEW = "sha256:" + "0" * 64, "sha256:" + "1" * 64


@pytest.mark.parametrize("mode", ["fleet", "standalone"])
def test_a_round_seen_in_the_status_document(mode: str) -> None:
    clock = Clock()
    fake = FakeEtcd(clock, progress_interval=None)
    if mode == "fleet":
        etcd = Link(fake, clock).etcd
        parts = wiring.fleet(etcd, clock, prefix="/d", hostname="h1", max_unavailable=1, ttl=6)
        assert parts.keeper is not None
        parts.keeper.startService()
        assert parts.keeper.held
    else:
        parts = wiring.standalone(clock, hostname="h1", max_unavailable=1)
        assert parts.keeper is None
    fired(parts.publish({APP: AppState(OLD, None, ("web",), "healthy")}))
    slot = fired(parts.slots.acquire(APP, "web"))
    doc = fired(parts.status.document())
    assert doc["apps"][APP]["replacing"] == [{"host": "h1", "container": "web", "since": 0.0}]
    assert doc["hosts"]["h1"]["apps"][APP]["image_id"] == OLD
    fired(parts.pauses.pause(PauseRecord(APP, NEW, None, "h1", "unhealthy", 1.0)))
    fired(slot.release())
    doc = fired(parts.status.document())
    assert doc["apps"][APP]["paused"]["reason"] == "unhealthy"
    assert doc["apps"][APP]["replacing"] == []
    if parts.keeper is not None:
        fired(parts.keeper.stopService())
        assert fake.keys("/d/_/") == ["/d/_/paused/myorg/app:qa"]  # a pause outlives the host
