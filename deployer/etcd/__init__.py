"""The fleet's shared log of updates, kept in etcd (v3, through its JSON gateway).

What the rest of the daemon uses is re-exported here: :class:`Etcd` (``record``, ``key_for``,
``watch``, ``request``, ``close``), :class:`EtcdConfig` and :class:`WatchService` (``live``,
``reason``, ``on_reconnect``). The package has one job a module, and no two of them import each
other:

:mod:`~deployer.etcd._txaioetcd`
    The parts of txaioetcd (pinned) that are used: value types and their JSON marshalling.
:mod:`~deployer.etcd.layout`
    The keys under ``--etcd_prefix`` (triggers and the reserved ``<prefix>/_/`` state) and the
    codec of trigger values (:meth:`deployer.model.Update.to_json`).
:mod:`~deployer.etcd.config`
    :class:`EtcdConfig`, one field per ``--etcd_*`` flag.
:mod:`~deployer.etcd.members`
    The members in ``--etcd_nodes`` order, the one in use, and how to connect to each.
:mod:`~deployer.etcd.client`
    Requests to the gateway: one member within ``--etcd_dial_timeout``, or the member in use
    with failover (:meth:`Etcd.request`, for the daemon's state keys, leases and transactions).
:mod:`~deployer.etcd.commit`
    Group commit of :meth:`Etcd.record`, each write answered within its own deadline.
:mod:`~deployer.etcd.liveness`
    The check of the member in use, which notices a member that stopped answering.
:mod:`~deployer.etcd.watch`
    The catch-up read and the watch, with resume, resync and backoff.
:mod:`~deployer.etcd.updates`
    :class:`Etcd`, which ties them together for one prefix.

Liveness, in short: a member that accepts connections and never answers (stopped, swapping,
behind a black-holing network) is noticed within about ``2 x --etcd_dial_timeout`` by a cheap
check every couple of seconds while the watch is established; the watch (``live`` False, with
the reason, until it runs on another member) and writes then move to the next member. Every
:meth:`Etcd.record` is answered within ``members x --etcd_dial_timeout`` of its arrival: written,
or :class:`~deployer.errors.EtcdUnavailable` (a webhook's 503), never after another write's
timeouts. Rollout state (leases, slots, host status under ``<prefix>/_/``) goes through
:meth:`Etcd.request`.

The in-memory etcd that tests use is :class:`deployer.testing.fake_etcd.FakeEtcd`.
"""

from deployer.etcd.config import EtcdConfig
from deployer.etcd.layout import InvalidKey, KeyLayout
from deployer.etcd.updates import Etcd
from deployer.etcd.watch import WatchService

__all__ = ["Etcd", "EtcdConfig", "InvalidKey", "KeyLayout", "WatchService"]
