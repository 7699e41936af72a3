"""Paused rollouts (:mod:`deployer.rollout.pause`): the in-memory kind and the etcd kind (on
the in-memory etcd, through the daemon's etcd client) held to the same tests;
tests/test_rollout_real.py runs the etcd kind on a real member."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from twisted.internet.task import Clock

from deployer.reference import InvalidReference
from deployer.rollout.keys import RolloutKeys
from deployer.rollout.pause import EtcdPauses, MemoryPauses, PauseRecord, Pauses
from deployer.rollout.testing import Link
from deployer.testing.fake_etcd import FakeEtcd
from tests.helpers import fired

APP = "myorg/app:qa"
BAD = PauseRecord(APP, "sha256:" + "b" * 64, "sha256:" + "d" * 64, "h1", "unhealthy", 1.5e9)
KEYS = RolloutKeys("/deployer/")


class Store:
    """A Pauses and a way to count what was written to it."""

    def __init__(self, pauses: Pauses, writes: Callable[[], int], etcd: FakeEtcd | None) -> None:
        self.pauses = pauses
        self.writes = writes
        self.etcd = etcd


def memory() -> Store:
    pauses = MemoryPauses()
    return Store(pauses, lambda: pauses.writes, None)


def in_etcd() -> Store:
    clock = Clock()
    fake = FakeEtcd(clock, progress_interval=None)
    return Store(EtcdPauses(Link(fake, clock).etcd, KEYS), lambda: fake.revision, fake)


@pytest.fixture(params=[memory, in_etcd], ids=["memory", "etcd"])
def store(request: pytest.FixtureRequest) -> Store:
    make: Callable[[], Store] = request.param
    return make()


def test_pause_get_all_resume_round_trip(store: Store) -> None:
    pauses = store.pauses
    assert fired(pauses.get(APP)) is None
    assert fired(pauses.pause(BAD)) is True
    assert fired(pauses.get(APP)) == BAD
    assert fired(pauses.get("docker.io/myorg/app:qa")) == BAD  # any form of the name
    other = PauseRecord("127.0.0.1:5000/x:1", "sha256:" + "e" * 64, None, "h2", "exited", 2.0)
    assert fired(pauses.pause(other)) is True
    assert fired(pauses.all()) == {APP: BAD, other.app: other}
    assert fired(pauses.resume(APP)) is True
    assert fired(pauses.get(APP)) is None
    assert fired(pauses.all()) == {other.app: other}


def test_resume_of_an_app_not_paused_says_so_and_writes_nothing(store: Store) -> None:
    fired(store.pauses.pause(BAD))
    before = store.writes()
    assert fired(store.pauses.resume("myorg/other:qa")) is False
    assert store.writes() == before
    assert fired(store.pauses.get(APP)) == BAD


@pytest.mark.parametrize("bad", ["myorg/app", "myorg/App:qa", "x:y@sha256:" + "a" * 64, ""])
def test_a_malformed_app_fails_and_writes_nothing(store: Store, bad: str) -> None:
    before = store.writes()
    with pytest.raises(InvalidReference):
        fired(store.pauses.resume(bad))
    with pytest.raises(InvalidReference):
        fired(store.pauses.get(bad))
    assert store.writes() == before


def test_the_first_pause_of_a_build_stands(store: Store) -> None:
    fired(store.pauses.pause(BAD))
    again = PauseRecord(APP, BAD.image_id, BAD.digest, "h2", "exited", 1.6e9)
    assert fired(store.pauses.pause(again)) is False
    assert fired(store.pauses.get(APP)) == BAD


def test_a_pause_of_another_build_replaces_the_old_one(store: Store) -> None:
    fired(store.pauses.pause(BAD))
    worse = PauseRecord(APP, "sha256:" + "f" * 64, None, "h2", "exited", 1.6e9)
    assert fired(store.pauses.pause(worse)) is True
    assert fired(store.pauses.get(APP)) == worse


def test_a_new_build_supersedes_the_pause_and_the_bad_one_does_not(store: Store) -> None:
    fired(store.pauses.pause(BAD))
    assert fired(store.pauses.supersede(APP, BAD.image_id)) is False
    assert fired(store.pauses.supersede(APP, "sha256:" + "9" * 64, BAD.digest)) is False
    assert fired(store.pauses.get(APP)) == BAD
    assert fired(store.pauses.supersede(APP, "sha256:" + "9" * 64, "sha256:" + "8" * 64))
    assert fired(store.pauses.get(APP)) is None
    assert fired(store.pauses.supersede(APP, "sha256:" + "9" * 64)) is False


def test_record_json_round_trip_and_refusals() -> None:
    assert PauseRecord.from_json(BAD.to_json()) == BAD
    for broken in ([], {**BAD.to_json(), "time": "now"}, {**BAD.to_json(), "digest": 5},
                   {**BAD.to_json(), "host": None}, {**BAD.to_json(), "time": float("nan")}):
        with pytest.raises(ValueError):
            PauseRecord.from_json(broken)


def test_an_unreadable_pause_key_still_pauses() -> None:
    store = in_etcd()
    assert store.etcd is not None
    store.etcd.put(KEYS.paused(APP).encode(), b"stop")
    record = fired(store.pauses.get(APP))
    assert record is not None and "unreadable" in record.reason and "stop" in record.reason
    assert APP in fired(store.pauses.all())
    assert fired(store.pauses.supersede(APP, "sha256:" + "9" * 64)) is True
    assert fired(store.pauses.get(APP)) is None


def test_pause_keys_are_not_lease_bound_and_hold_the_record() -> None:
    store = in_etcd()
    assert store.etcd is not None
    fired(store.pauses.pause(BAD))
    kv = store.etcd.kvs[b"/deployer/_/paused/myorg/app:qa"]
    assert kv.lease == 0
    assert store.etcd.value("/deployer/_/paused/myorg/app:qa") == BAD.to_json()
