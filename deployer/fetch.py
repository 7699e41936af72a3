"""Pulling the build that a round deploys for one tag.

Standalone, and for a round with no update to go by, a tag is pulled by its name: the
registry's current build. In a fleet (:mod:`deployer.rollout.builds`), the round's newest
update of the tag decides:

1. read the build recorded for the app (``<prefix>/_/builds/<app>``); when it stands for this
   update (the same one, or a newer one of the same source), pull exactly that digest
   (``repo@digest``) and tag it ``repo:tag``: the same build as every other host, whatever was
   pushed since;
2. otherwise pull by tag, and record the digest found (the first writer wins: an etcd
   transaction on the key's revision). When another host recorded a build for this update
   first, pull that one by digest and tag it.

The periodic re-pull (source ``repull``) is this host's alone: no other host handles it, so
nothing is read or recorded for it, and it pulls by tag. In a round that serves it together with
updates from elsewhere, the newest of those decides.

Reads and writes of the record are retried with a capped backoff while etcd does not answer (the
round waits, as it waits for a rollout slot).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from deployer.backoff import RetryPolicy, backoff
from deployer.docker import Image
from deployer.freshness import when
from deployer.host_apps import digest_for
from deployer.model import Update
from deployer.reference import InvalidReference, familiar, split
from deployer.rollout.builds import BuildRecord, Builds
from deployer.rollout.keys import app_name
from deployer.rollout_round import retry_logged

log = Logger()

#: The sources of updates that only this host handles (see the module docstring).
LOCAL_SOURCES = frozenset({"repull"})


class FetchEngine(Protocol):
    """What :class:`Fetcher` needs of the engine (:class:`deployer.docker.DockerClient`)."""

    async def pull(self, repotag: str) -> None: ...

    async def tag(self, image: str, repository: str, tag: str) -> None: ...

    async def inspect_image(self, name: str) -> Image: ...


class Fetcher:
    """Pulls the build a round deploys for a tag (see the module docstring). ``builds`` is
    None standalone; ``hostname`` names this host in the records it writes."""

    def __init__(self, clock: IReactorTime, engine: FetchEngine, builds: Builds | None = None,
                 hostname: str = "", retry: RetryPolicy | None = None) -> None:
        self.clock = clock
        self.engine = engine
        self.builds = builds
        self.hostname = hostname
        self.retry = retry or backoff(0.5, 10.0, floor=0.1)

    async def fetch(self, tag: str, updates: Iterable[Update]) -> Image | None:
        """Pull ``tag`` (as the engine lists it) for the round's ``updates`` of it; the image
        the tag now points at when it was inspected on the way (None: the caller inspects the
        tag)."""
        builds = self.builds
        update = newest_shared(updates)
        if builds is None or update is None:
            await self.engine.pull(tag)
            return None
        try:
            app = app_name(familiar(tag))
        except InvalidReference:
            await self.engine.pull(tag)
            return None
        seen = await retry_logged(self.clock, self.retry, f"reading the build recorded for {app}",
                              lambda: builds.get(app))
        if seen is not None and seen.record is not None and seen.record.stands_for(update):
            await self._pull_recorded(tag, seen.record, update)
            return None
        await self.engine.pull(tag)
        image = await self.engine.inspect_image(tag)
        digest = digest_for(image.repo_digests, app)
        if digest is None:
            log.warn("{tag} was pulled but the engine names no digest of it: no build is"
                     " recorded for the rollout of {app}", tag=tag, app=app)
            return image
        mine = BuildRecord.of(app, digest, image.id, update, self.hostname, self.clock.seconds())
        standing = await retry_logged(self.clock, self.retry, f"recording the build of {app}",
                                  lambda: builds.claim(mine, seen))
        if standing.digest == digest:
            if standing == mine:
                log.info("recorded {digest} as the build of {app} for its {source} update sent"
                         " {sent}", digest=digest, app=app, source=update.source,
                         sent=when(update.received))
            return image
        await self._pull_recorded(tag, standing, update)
        return None

    async def _pull_recorded(self, tag: str, record: BuildRecord, update: Update) -> None:
        name, tag_name, _ = split(tag)
        ref = f"{name}@{record.digest}"
        log.info(
            "pulling {ref} for {tag}: the build that {host} recorded for the rollout of {app}"
            " ({source} update sent {sent}), for the {update_source} update sent"
            " {update_sent}", ref=ref, tag=tag, host=record.host, app=record.app,
            source=record.source, sent=when(record.time), update_source=update.source,
            update_sent=when(update.received), digest=record.digest,
        )
        await self.engine.pull(ref)
        await self.engine.tag(ref, name, tag_name or "latest")


def newest_shared(updates: Iterable[Update]) -> Update | None:
    """The update with the latest time among those that other hosts handle too, if any."""
    best: Update | None = None
    for update in updates:
        if update.source not in LOCAL_SOURCES and (best is None
                                                   or update.received > best.received):
            best = update
    return best
