"""The rollout parts of one daemon, put together for its mode.

:func:`fleet` (with etcd) and :func:`standalone` (without) give the same :class:`Rollouts`; the
round and the web layer use only that. In fleet mode :attr:`Rollouts.keeper` is a service to
start with the daemon (and stop: that revokes the lease, so the host's slots and status go at
once), and so is :attr:`Rollouts.sweeper` (the sweeps of slot keys nothing uses); standalone
has neither.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import attrs
from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime

from deployer.rollout.builds import Builds, EtcdBuilds
from deployer.rollout.fleet import FleetSlots, SlotSweeper
from deployer.rollout.gateway import Gateway
from deployer.rollout.keys import RolloutKeys
from deployer.rollout.lease import DEFAULT_TTL, LeaseKeeper
from deployer.rollout.pause import EtcdPauses, MemoryPauses, Pauses
from deployer.rollout.slots import LocalSlots, Slots
from deployer.rollout.status import (
    AppState,
    EtcdStatus,
    LocalStatus,
    StatusPublisher,
    StatusReader,
)


@attrs.frozen
class Rollouts:
    """``slots`` to take before a replacement; ``pauses``; ``publish`` what this host runs;
    ``status`` answers ``GET /status``; ``keeper`` (fleet only) says whether the host holds its
    lease (``held``, ``reason``: for ``/healthz``); ``sweeper`` (fleet only) deletes slot keys
    of this host that nothing uses; ``builds`` (fleet only) the build each app's rollout
    deploys, so that every host deploys the same one."""

    slots: Slots
    pauses: Pauses
    publish: Callable[[Mapping[str, AppState]], Deferred[None]]
    status: StatusReader
    keeper: LeaseKeeper | None = None
    builds: Builds | None = None
    sweeper: IService | None = None


def fleet(
    gateway: Gateway,
    clock: IReactorTime,
    *,
    prefix: str,
    hostname: str,
    max_unavailable: int = 1,
    ttl: int = DEFAULT_TTL,
) -> Rollouts:
    keys = RolloutKeys(prefix)
    keeper = LeaseKeeper(gateway, clock, ttl=ttl)
    slots = FleetSlots(gateway, keeper, keys, clock, hostname=hostname, limit=max_unavailable)
    publisher = StatusPublisher(gateway, keeper, keys, clock, hostname)
    return Rollouts(
        slots=slots,
        pauses=EtcdPauses(gateway, keys),
        publish=publisher.publish,
        status=EtcdStatus(gateway, keys, clock, limit=max_unavailable),
        keeper=keeper,
        builds=EtcdBuilds(gateway, keys),
        sweeper=SlotSweeper(slots),
    )


def standalone(clock: IReactorTime, *, hostname: str, max_unavailable: int = 1) -> Rollouts:
    slots = LocalSlots(clock, max_unavailable)
    pauses = MemoryPauses()
    status = LocalStatus(hostname, clock, pauses, slots)
    return Rollouts(slots=slots, pauses=pauses, publish=status.publish, status=status)
