"""Zero-downtime rollouts: rollout slots, the lease that binds them, paused rollouts, and
host status.

The modules, one job each:

:mod:`~deployer.rollout.keys`
    The etcd key layout under ``<prefix>/_/`` and the name of an app (``repo:tag``).
:mod:`~deployer.rollout.gateway`
    The :class:`~deployer.rollout.gateway.Gateway` the rest is written against (one POST to
    etcd's v3 JSON gateway, with failover), and the JSON encoding of keys and values.
:mod:`~deployer.rollout.lease`
    :class:`~deployer.rollout.lease.LeaseKeeper`: the host's etcd lease, kept alive.
:mod:`~deployer.rollout.slots`
    :class:`~deployer.rollout.slots.Slot`, the :class:`~deployer.rollout.slots.Slots`
    interface and :class:`~deployer.rollout.slots.LocalSlots` (in-process).
:mod:`~deployer.rollout.fleet`
    :class:`~deployer.rollout.fleet.FleetSlots`: slots shared by the fleet through etcd.
:mod:`~deployer.rollout.pause`
    Paused rollouts, in etcd or in memory.
:mod:`~deployer.rollout.status`
    What each host runs, published to etcd, and the ``/status`` document.
:mod:`~deployer.rollout.builds`
    The build each app's rollout deploys (same build everywhere).
:mod:`~deployer.rollout.wiring`
    The parts put together for fleet or standalone mode.
:mod:`~deployer.rollout.testing`
    A simulated host's link to the in-memory etcd (:mod:`deployer.testing.fake_etcd`) through
    the daemon's own etcd client, for tests.

Keys (``<prefix>`` is ``--etcd_prefix`` without a trailing slash; ``<app>`` is ``repo:tag`` in
its familiar form, e.g. ``myorg/app:qa`` or ``127.0.0.1:5000/myorg/app:qa``)::

    <prefix>/_/rollout/<app>/<lease id hex>   lease-bound; a host's place in the app's queue
                                              {"host", "container", "since"}
    <prefix>/_/paused/<app>                   not lease-bound; a paused rollout
                                              {"app", "image_id", "digest", "host", "reason",
                                               "time"}
    <prefix>/_/hosts/<hostname>               lease-bound; what the host runs (see status)
    <prefix>/_/builds/<app>                   not lease-bound; the build of the newest update
                                              {"app", "digest", "image_id", "time", "source",
                                               "event_id", "host", "recorded"}

Nothing under ``<prefix>/_/`` ever triggers a deploy.

A round reads ``builds`` before it pulls a tag, and records what it pulled when no record
stands for its update (:mod:`deployer.fetch`). How it uses the rest, per stale container of an
app, after the pull::

    if await pauses.get(app) is paused for the pulled build: put repo:tag back, skip
    await pauses.supersede(app, pulled_image_id, digest)    # a new build ends an old pause
    slot = await slots.acquire(app, container)              # slot.waited: the metric
    try:
        stop the container; wait until its replacement is ready
        (if it is not: pauses.pause(PauseRecord(...)), roll back, notify)
        if slot.lost: log that the replacement finished without the slot
    finally:
        await slot.release()
    publish({app: AppState(...), ...})                       # after each round

``slots.acquire`` waits while the host holds no lease; cancel it to give up the wait.
"""
