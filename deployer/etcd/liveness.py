"""The liveness check of the watch's member: a hung member is noticed within ``2 x dial_timeout``.

A member stopped with SIGSTOP, swapping, or behind a network that drops packets still has its
connections accepted (by the kernel, or by nobody at all), so nothing fails: requests simply
never get an answer and a watch stream stays open and silent. :class:`MemberProbe` asks the
member that :attr:`~MemberProbe.target` names (the one the watch's stream is on) for something
cheap, a serializable count of one key (with ``Grpc-Metadata-hasleader``, so a member cut off
from its leader fails it too), every :data:`PROBE_INTERVAL` seconds (at most ``dial_timeout``),
each within ``dial_timeout``. A member that fails it (no answer in time, a refused connection, a
5xx such as ``etcdserver: no leader``) is marked failed, so that the member in use moves to the
next one if it was still in use, and every listener is told
(the watch then ends its stream on that member and fails over; writes already go to the next
member). So a member that stops answering is noticed at most ``interval + dial_timeout <= 2 x
dial_timeout`` after its last answer.

The check runs only while :attr:`MemberProbe.target` names a member: the watch starts and stops
the probe with itself and names its member while its stream is established; while it is not,
its own attempts, each within ``dial_timeout``, find the members that answer. The check goes to
the watch's member even when it is no longer the member in use: a write that timed out there
(sent before the member hung, so that the checks after it still passed) moves the member in use
on, and a check of the new one would leave the watch on the hung member.
"""

from __future__ import annotations

from base64 import b64encode
from collections.abc import Callable

from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from deployer.errors import EtcdHTTPError
from deployer.etcd.client import EXPECTED_FAILURES, Gateway, describe
from deployer.loops import LoopService

PROBE_INTERVAL = 2.0
"""Seconds between two checks of the member in use (at most ``dial_timeout``)."""


class MemberProbe(LoopService):
    """Checks member :attr:`target` every :attr:`interval` seconds while it names one (an index
    in the members, or None), for as long as the service runs (see the module docstring);
    :attr:`listeners` are called with ``(url, why)`` when it fails."""

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        gateway: Gateway,
        key: bytes,
        interval: float = PROBE_INTERVAL,
    ) -> None:
        self.reactor = reactor
        self.gateway = gateway
        self.interval = min(interval, gateway.dial_timeout)
        self.body = {"key": b64encode(key).decode(), "serializable": True, "count_only": True}
        self.target: Callable[[], int | None] = lambda: gateway.members.current
        self.listeners: list[Callable[[str, str], object]] = []
        self.checks = 0
        self.failures = 0

    def _crashed(self, failure: Failure) -> None:
        self.log.failure("the etcd liveness check ended", failure)

    async def _run(self) -> None:
        members = self.gateway.members
        while self.running:
            await deferLater(self.reactor, self.interval)  # a cancel raises CancelledError
            index = self.target()
            if index is None:
                continue
            url = members.nodes[index]
            self.checks += 1
            try:
                await self.gateway.call(url, "/v3/kv/range", self.body)
            except CancelledError:
                raise
            except Exception as e:
                if not self.running:
                    return  # stopped: the cancelled request is no failure of the member
                self._failed(index, url, e)

    def _failed(self, index: int, url: str, e: Exception) -> None:
        why = describe(e)
        if isinstance(e, EtcdHTTPError) and not e.member_failed:
            self.log.warn("etcd member {url} refused the liveness check: {why}", url=url, why=why)
            return
        if not isinstance(e, EXPECTED_FAILURES):
            self.log.failure("unexpected error in the liveness check of {url}", Failure(e),
                             url=url)
        self.failures += 1
        self.gateway.members.failed(index)
        self.log.warn("etcd member {url} failed its liveness check: {why}; moving to {next}",
                      url=url, why=why, next=self.gateway.members.in_use)
        for listener in list(self.listeners):
            try:
                listener(url, why)
            except Exception:
                self.log.failure("a listener of the etcd liveness check failed")
