"""The requests rollouts make (:mod:`deployer.rollout.gateway`), read from etcd's answers: on the
in-memory etcd through the daemon's etcd client. The answers themselves are held to a real
etcd's by the shared suite in tests/test_etcd_gateway.py."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from deployer.errors import EtcdError
from deployer.rollout.gateway import (
    KeyValue,
    as_int,
    delete,
    get_key,
    get_prefix,
    is_lease_not_found,
    prefix_end,
    put,
    unb64,
)
from deployer.rollout.testing import Link
from deployer.testing.fake_etcd import FakeEtcd
from tests.helpers import fired

_T = TypeVar("_T")


def run(work: Coroutine[Any, Any, _T]) -> _T:
    """What ``work`` returns; it must be done at once (the fake answers at once)."""
    result: _T = fired(Deferred.fromCoroutine(work))
    return result


@pytest.fixture
def fake() -> FakeEtcd:
    return FakeEtcd(Clock(), progress_interval=None)


@pytest.fixture
def link(fake: FakeEtcd) -> Link:
    return Link(fake, fake.clock)


def test_put_get_and_get_prefix(fake: FakeEtcd, link: Link) -> None:
    lease = int(fake.grant({"TTL": 30})["ID"])
    first = run(put(link.etcd, "/p/a", {"n": 1}, lease=lease))
    assert first == fake.revision == 2
    run(put(link.etcd, "/p/b", [2]))
    run(put(link.etcd, "/p/a", {"n": 3}, lease=lease))
    kv = run(get_key(link.etcd, "/p/a"))
    assert kv == KeyValue("/p/a", b'{"n":3}', 2, 4, lease) and kv.json() == {"n": 3}
    assert run(get_key(link.etcd, "/p/none")) is None
    revision, kvs = run(get_prefix(link.etcd, "/p/", sort_order="DESCEND", sort_target="MOD"))
    assert revision == 4 and [kv.key for kv in kvs] == ["/p/a", "/p/b"]
    assert run(get_prefix(link.etcd, "/q/")) == (4, [])


def test_delete_says_whether_it_deleted(fake: FakeEtcd, link: Link) -> None:
    written = run(put(link.etcd, "/k", 1))
    assert run(delete(link.etcd, "/missing")) is False
    assert run(delete(link.etcd, "/k", mod_revision=written - 1)) is False, "changed since"
    assert fake.keys() == ["/k"] and fake.revision == written
    assert run(delete(link.etcd, "/k", mod_revision=written)) is True
    assert fake.keys() == []
    run(put(link.etcd, "/k", 2))
    assert run(delete(link.etcd, "/k")) is True


def test_a_lease_etcd_does_not_know_is_told_apart(link: Link) -> None:
    with pytest.raises(EtcdError) as refused:
        run(put(link.etcd, "/k", 1, lease=1234567))
    assert is_lease_not_found(refused.value)
    assert not is_lease_not_found(EtcdError("etcdserver: too many requests"))


def test_integers_of_an_answer() -> None:
    assert (as_int("12"), as_int(12), as_int(None), as_int(None, 5)) == (12, 12, 0, 5)
    for bad in ("x", True, 1.5, ["1"]):
        with pytest.raises(EtcdError, match="not an integer"):
            as_int(bad)


def test_prefix_end() -> None:
    assert unb64(prefix_end("/a/")) == b"/a0"
    assert unb64(prefix_end("a\xff")) == "a\xff".encode()[:-1] + b"\xc0"
    assert unb64(prefix_end("")) == b"\0"
