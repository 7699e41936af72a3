"""The rollout parts on the in-memory etcd, through the daemon's own etcd client.

:class:`Link` is one simulated host's way to a :class:`~deployer.testing.fake_etcd.FakeEtcd`:
the :class:`deployer.etcd.Etcd` client that the daemon gives its rollout parts as their
:class:`~deployer.rollout.gateway.Gateway` (``Etcd.request``), over an agent of its own. A test
of the rollout parts so exercises the client as well: failover across members, a timeout per
request, and etcd's refusals as :class:`~deployer.errors.EtcdHTTPError`. The fake steers the
members (``down``, ``freeze``, ``max_requests``); :attr:`Link.cut` cuts one host off from all
of them (its requests fail with :class:`~deployer.errors.EtcdUnavailable` and its keepalives
stop, so its lease expires).
"""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.interfaces import IReactorTime

from deployer.etcd import Etcd, EtcdConfig
from deployer.testing.fake_etcd import FakeEtcd

MEMBERS = ("10.0.0.1",)
"""The members a :class:`Link` knows by default (hosts of ``http://<member>:2379``)."""


class Link:
    """A simulated host's etcd client (:attr:`etcd`) over its own agent to ``fake``'s
    ``members``, each request within ``dial_timeout`` seconds of ``clock``."""

    def __init__(
        self,
        fake: FakeEtcd,
        clock: IReactorTime,
        members: Sequence[str] = MEMBERS,
        dial_timeout: float = 5.0,
    ) -> None:
        self.fake = fake
        self.agent = fake.agent()
        nodes = tuple(f"http://{member}:2379" for member in members)
        config = EtcdConfig(nodes=nodes, dial_timeout=dial_timeout)
        self.etcd = Etcd(clock, config, http=fake.http_client(self.agent))

    @property
    def cut(self) -> bool:
        """Whether the host is cut off from every member (connections refused)."""
        return self.agent.cut

    @cut.setter
    def cut(self, value: bool) -> None:
        self.agent.cut = value

    def count(self, path: str) -> int:
        """How many requests to ``path`` the host made (answered, refused or unanswered)."""
        return self.agent.count(path)
