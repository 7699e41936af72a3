"""The fleet's shared log of updates in etcd: :class:`Etcd`, what the daemon holds in fleet mode.

It ties the parts of :mod:`deployer.etcd` together for one ``--etcd_prefix``: the key layout
(:mod:`~deployer.etcd.layout`), the gateway client with member failover
(:mod:`~deployer.etcd.client`), group commit (:mod:`~deployer.etcd.commit`), and the watch
(:mod:`~deployer.etcd.watch`) with the liveness check of the member in use
(:mod:`~deployer.etcd.liveness`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from deployer.etcd._txaioetcd import KeyValue
from deployer.etcd.client import Gateway
from deployer.etcd.commit import MAX_TXN_OPS, GroupCommit
from deployer.etcd.config import EtcdConfig
from deployer.etcd.layout import KeyLayout
from deployer.etcd.liveness import MemberProbe
from deployer.etcd.members import Members
from deployer.etcd.watch import MAX_BACKOFF, WatchService, read_all
from deployer.model import Update


class Etcd:
    """The fleet's log of updates: group-committed writes and watches, and plain requests for
    the daemon's other state in etcd. One per daemon. It owns its connection pool unless
    ``http`` is given (tests)."""

    def __init__(
        self,
        reactor: IReactorTime,
        config: EtcdConfig,
        *,
        http: HTTPClient | None = None,
        rng: random.Random | None = None,
        max_txn_ops: int = MAX_TXN_OPS,
        max_backoff: float = MAX_BACKOFF,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.layout = KeyLayout(config.prefix)
        self.members = Members(config.nodes)
        self.rng = rng if rng is not None else random.Random()
        self.max_backoff = max_backoff
        self.gateway = Gateway(reactor, self.members, config.dial_timeout, http=http)
        self.commits = GroupCommit(reactor, self.gateway, max_txn_ops)

    @property
    def transactions(self) -> int:
        """Group-commit transactions that etcd acknowledged."""
        return self.commits.transactions

    def key_for(self, update: Update) -> str:
        """The key that :meth:`record` writes ``update`` to."""
        return self.layout.key(update).decode()

    def record(self, update: Update) -> Deferred[int]:
        """Write ``update``; fires with the etcd revision once etcd acknowledged the write, or
        fails with :class:`~deployer.errors.EtcdUnavailable` (see :mod:`deployer.etcd.commit`)."""
        return self.commits.put(self.layout.key(update), self.layout.value(update))

    def request(self, path: str, body: dict[str, Any]) -> Deferred[dict[str, Any]]:
        """POST ``body`` to ``path`` of etcd's JSON gateway (``/v3/kv/txn``,
        ``/v3/lease/grant``...) on the member in use, failing over to the next ones, each within
        ``dial_timeout``; the JSON answer. Fails with :class:`~deployer.errors.EtcdUnavailable`
        when no member answers, with :class:`~deployer.errors.EtcdHTTPError` when etcd refuses
        the request itself (see :meth:`deployer.etcd.client.Gateway.request`)."""
        return self.gateway.request(path, body)

    async def read_all(self, url: str) -> tuple[int, list[KeyValue]]:
        """Every key under the prefix, from one member, and the revision of that read."""
        return await read_all(self.gateway, self.layout, url,
                              not self.config.strong_consistency)

    def watch(self, on_update: Callable[[Update], object]) -> WatchService:
        """A service that delivers every recorded update to ``on_update`` (see
        :class:`~deployer.etcd.watch.WatchService`)."""
        probe = MemberProbe(self.reactor, self.gateway, self.layout.root)
        return WatchService(self.reactor, self.gateway, self.layout, self.config, on_update,
                            rng=self.rng, max_backoff=self.max_backoff, probe=probe)

    async def close(self) -> None:
        """Wait for the writes in progress, then close the pool's connections."""
        await self.commits.close()
        await self.gateway.close()
