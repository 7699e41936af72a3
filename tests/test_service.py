"""deployer.service: the daemon as :meth:`DeployerService.from_config` wires it, on a
``MemoryReactorClock``, with no network.

Every connection the daemon opens on the memory reactor is served in memory
(:class:`Network`): the engine's unix socket by :class:`MemoryDocker` (its ``/events`` stream
too; ``web`` runs under its supervisor), etcd's members by an in-memory gateway, the
notification URLs by a recorder; requests to the daemon go to the factory it listens with. Each
test fails when one part of the wiring is left out: the round counter, the deploy report, the
re-pull timer, the etcd watch, the listening port, the closers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import attrs
import pytest
from twisted.internet import task
from twisted.internet.address import IPv4Address, UNIXAddress
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorTime
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import capturedLogs
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, IOPump, connect
from twisted.web.resource import IResource, Resource
from twisted.web.server import Site

from deployer.config import Config
from deployer.service import DeployerService
from deployer.site import connection_limit
from deployer.testing.fake_etcd import FakeEtcd
from deployer.testing.memory_docker import MemoryDocker, MemorySupervisor
from tests.helpers import fired

TOKEN = "tok-service"
ENGINE = "/run/engine.sock"
FOO = "registry.test:5000/myorg/foo:qa"
ETCD = ("127.0.0.1", 2379)
RECORDER = ("127.0.0.1", 9000)


def etcd_gateway(clock: IReactorTime) -> IResource:
    """An in-memory etcd JSON gateway (every member of one cluster)."""
    return FakeEtcd(clock)


class Recorder(Resource):
    """Slack (``/slack`` answers ``ok``) and the JSON report (``/hook``): records each POST."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.posts: list[tuple[str, Any]] = []

    def render_POST(self, request: Any) -> bytes:
        path = request.path.decode()
        self.posts.append((path, json.loads(request.content.read())))
        if path == "/slack":
            return b"ok"
        request.setResponseCode(204)
        return b""

    def bodies(self, path: str) -> list[Any]:
        return [body for p, body in self.posts if p == path]


@attrs.define
class Network:
    """Serves the connections that the daemon opens on ``reactor`` with in-memory sites.

    A connection to an address that nothing serves stays pending, as one to a host that never
    answers."""

    reactor: MemoryReactorClock
    tcp: dict[tuple[str, int], Site] = attrs.field(factory=dict)
    unix: dict[str, Site] = attrs.field(factory=dict)
    pumps: list[IOPump] = attrs.field(factory=list)
    _tcp_seen: int = 0
    _unix_seen: int = 0

    def serve_tcp(self, address: tuple[str, int], resource: IResource) -> None:
        self.tcp[address] = Site(resource, reactor=self.reactor)

    def serve_unix(self, path: str, resource: IResource) -> None:
        self.unix[path] = Site(resource, reactor=self.reactor)

    def _connect(self, factory: Any, site: Site, address: Any) -> None:
        client = factory.buildProtocol(address)
        server = site.buildProtocol(address)
        self.pumps.append(connect(
            server, FakeTransport(server, isServer=True, hostAddress=address),
            client, FakeTransport(client, isServer=False, peerAddress=address),
            greet=False, clock=self.reactor,
        ))

    def _accept(self) -> bool:
        accepted = False
        for host, port, factory, _timeout, _bind in self.reactor.tcpClients[self._tcp_seen:]:
            self._tcp_seen += 1
            site = self.tcp.get((host, port))
            if site is not None:
                self._connect(factory, site, IPv4Address("TCP", host, port))
                accepted = True
        for path, factory, _timeout, _pid in self.reactor.unixClients[self._unix_seen:]:
            self._unix_seen += 1
            site = self.unix.get(path)
            if site is not None:
                self._connect(factory, site, UNIXAddress(path))
                accepted = True
        return accepted

    def flush(self) -> None:
        for _ in range(200):
            moved = self._accept()
            for pump in self.pumps:
                moved = pump.flush() or moved
            self.reactor.advance(0)
            if not moved:
                return
        raise AssertionError("the network does not settle")

    def open_clients(self, address: Any) -> list[FakeTransport]:
        """The daemon's connections to ``address`` that are still open."""
        return [p.clientIO for p in self.pumps
                if p.clientIO.peerAddress == address and not p.clientIO.disconnected]


def dechunked(raw: bytes) -> bytes:
    body = b""
    while True:
        size, _, rest = raw.partition(b"\r\n")
        length = int(size, 16)
        if not length:
            return body
        body, raw = body + rest[:length], rest[length + 2:]


@attrs.define
class Daemon:
    """A started :class:`DeployerService` on a memory reactor, with its network."""

    service: DeployerService
    reactor: MemoryReactorClock
    net: Network
    mem: MemoryDocker
    recorder: Recorder
    #: What runs ``web`` again whenever it stops (``Restart=always``), on what ``FOO`` is then.
    supervisor: MemorySupervisor
    #: The names of the containers stopped through the API, in order.
    stopped: list[str]

    def request(self, method: str, path: str, body: bytes = b"",
                token: str = TOKEN) -> tuple[int, Any]:
        """One request to the port the daemon listens on; its status and JSON answer."""
        _port, factory, _backlog, _interface = self.reactor.tcpServers[-1]
        channel = factory.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
        transport = StringTransport(peerAddress=IPv4Address("TCP", "127.0.0.1", 50000))
        channel.makeConnection(transport)
        lines = [f"{method} {path} HTTP/1.1", "Host: deployer.test",
                 f"Authorization: Bearer {token}", "Content-Type: application/json",
                 f"Content-Length: {len(body)}"]
        channel.dataReceived("\r\n".join(lines).encode() + b"\r\n\r\n" + body)
        self.net.flush()
        raw = transport.value()
        channel.connectionLost(Failure(ConnectionDone()))
        assert raw.startswith(b"HTTP/1.1 "), raw
        head, _, payload = raw.partition(b"\r\n\r\n")
        code = int(head.split(b" ", 2)[1])
        if b"transfer-encoding: chunked" in head.lower():
            payload = dechunked(payload)
        try:
            return code, json.loads(payload)
        except ValueError:
            return code, payload

    def connect(self) -> tuple[Any, StringTransport] | None:
        """A client connection to the daemon that sends nothing yet; None if closed at once."""
        _port, factory, _backlog, _interface = self.reactor.tcpServers[-1]
        address = IPv4Address("TCP", "127.0.0.1", 50001 + len(self.net.pumps))
        protocol = factory.buildProtocol(address)
        if protocol is None:
            return None
        transport = StringTransport(peerAddress=address)
        protocol.makeConnection(transport)
        return protocol, transport

    def deploy(self, repository: str, tag: str) -> tuple[int, Any]:
        body = json.dumps({"repository": repository, "tag": tag}).encode()
        return self.request("POST", "/api/deploy", body)

    def wait(self, d: Deferred[Any]) -> Any:
        """The result of ``d``, once the network has carried what it waits for."""
        self.net.flush()
        return fired(d)

    def sample(self, name: str, **labels: str) -> float | None:
        value: float | None = self.service.metrics.registry.get_sample_value(name, labels)
        return value

    def stop(self) -> None:
        d = self.service.stopService()
        self.net.flush()
        fired(d)


@pytest.fixture
def start(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``start(**config)``: a started daemon on a memory reactor; its engine holds a container
    that runs ``FOO`` while the registry holds a newer image of it."""
    started: list[Daemon] = []
    reactor = MemoryReactorClock()
    reactor.advance(1_700_000_000)
    # treq sends request bodies through Twisted's global cooperator, which runs on the global
    # reactor: here it runs on the memory one.
    monkeypatch.setattr(task, "_theCooperator",
                        task.Cooperator(scheduler=lambda work: reactor.callLater(0, work)))

    def start(serve_etcd: bool = True, max_connections: int | None = None,
              **changes: Any) -> Daemon:
        assert not started, "one daemon a test"
        net = Network(reactor)
        mem = MemoryDocker(clock=reactor)
        mem.add_image([FOO])
        supervisor = mem.supervise("web", FOO)
        mem.publish(FOO)
        stopped: list[str] = []
        mem.on_stop(lambda container: stopped.append(container.name))
        net.serve_unix(ENGINE, mem.resource())
        recorder = Recorder()
        net.serve_tcp(RECORDER, recorder)
        if serve_etcd:
            net.serve_tcp(ETCD, etcd_gateway(reactor))
        changes.setdefault("repull_period", 0.0)
        changes.setdefault("min_ready", 0.0)  # ready on the reactor's next turn
        config = Config(docker=f"unix://{ENGINE}", webhook_tokens=(TOKEN,), hostname="host-a",
                        **changes)
        service = DeployerService.from_config(config, reactor, max_connections=max_connections)
        service.startService()
        net.flush()
        daemon = Daemon(service, reactor, net, mem, recorder, supervisor, stopped)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.service.running:
            daemon.stop()


def stopped(daemon: Daemon) -> list[str]:
    return list(daemon.stopped)


# -- the round's observers -------------------------------------------------------------------------


def test_a_webhook_round_is_counted(start: Any) -> None:
    daemon = start()
    assert daemon.deploy("registry.test:5000/myorg/foo", "qa")[0] == 202
    assert stopped(daemon) == ["web"]
    assert daemon.sample("deployer_rounds_total", result="ok") == 1
    assert daemon.sample("deployer_pulls_total", result="ok") == 1
    assert daemon.sample("deployer_pull_duration_seconds_count") == 1
    assert daemon.sample("deployer_containers_stopped_total") == 1
    assert daemon.sample("deployer_updates_accepted_total", source="api") == 1


def test_the_deploy_report_reaches_every_notifier(start: Any) -> None:
    daemon = start(notify_url=f"http://{RECORDER[0]}:{RECORDER[1]}/hook",
                   slack_webhook_url=f"http://{RECORDER[0]}:{RECORDER[1]}/slack",
                   slack_username="qa deploy")
    daemon.deploy("registry.test:5000/myorg/foo", "qa")
    [slack] = daemon.recorder.bodies("/slack")
    assert slack == {"text": "Deploying web", "username": "qa deploy"}
    [report] = daemon.recorder.bodies("/hook")
    assert report["host"] == "host-a"
    assert report["pattern"] == FOO
    assert report["containers_stopped"] == ["web"]
    assert report["images"] == {FOO: daemon.mem.image_id(FOO)}
    assert report["source"] == "api"


# -- the safety re-pull ------------------------------------------------------------------------


def test_repull_at_start_and_every_period_on_the_given_reactor(start: Any) -> None:
    daemon = start(repull_period=600.0)
    assert [p.repotag for p in daemon.mem.pulls] == [FOO]
    assert stopped(daemon) == ["web"]
    daemon.reactor.advance(599)
    daemon.net.flush()
    assert len(daemon.mem.pulls) == 1
    daemon.reactor.advance(1)
    daemon.net.flush()
    assert len(daemon.mem.pulls) == 2
    assert daemon.sample("deployer_rounds_total", result="ok") == 2


def test_no_repull_when_the_period_is_zero(start: Any) -> None:
    daemon = start(repull_period=0.0)
    daemon.reactor.advance(86400 * 2)
    daemon.net.flush()
    assert daemon.mem.pulls == []


# -- fleet mode ------------------------------------------------------------------------------------


def test_fleet_mode_writes_to_etcd_and_the_watch_deploys(start: Any) -> None:
    daemon = start(etcd_nodes=(f"http://{ETCD[0]}:{ETCD[1]}",))
    assert daemon.request("GET", "/healthz") == (200, {"status": "ok"})
    assert daemon.sample("deployer_watch_live") == 1
    code, answer = daemon.deploy("registry.test:5000/myorg/foo", "qa")
    assert code == 202, answer
    assert stopped(daemon) == ["web"]  # through etcd and the watch: no local shortcut
    assert daemon.sample("deployer_rounds_total", result="ok") == 1


def test_fleet_mode_health_follows_the_watch(start: Any) -> None:
    daemon = start(serve_etcd=False, etcd_nodes=(f"http://{ETCD[0]}:{ETCD[1]}",))
    code, answer = daemon.request("GET", "/healthz")
    assert code == 503
    assert answer["error"].startswith("etcd watch")
    assert daemon.sample("deployer_watch_live") == 0
    assert daemon.sample("deployer_etcd_watch_reconnects_total") == 0
    # The member never answers: the watch gives up on it after the dial timeout, and tries
    # again after its backoff.
    for _ in range(30):
        daemon.reactor.advance(1)
        daemon.net.flush()
    assert daemon.sample("deployer_etcd_watch_reconnects_total") >= 1
    assert daemon.service.watch is not None
    assert daemon.sample("deployer_etcd_watch_reconnects_total") == daemon.service.watch.reconnects


def test_standalone_has_no_watch(start: Any) -> None:
    daemon = start(serve_etcd=False)
    assert daemon.request("GET", "/healthz") == (200, {"status": "ok"})
    assert daemon.reactor.tcpClients == []
    assert daemon.service.watch is None and daemon.service.etcd is None


# -- the listening port and stopping ---------------------------------------------------------------


def test_listens_where_the_config_says(start: Any) -> None:
    daemon = start(listen="tcp:4567:interface=127.0.0.1")
    [(port, _factory, _backlog, interface)] = daemon.reactor.tcpServers
    assert (port, interface) == (4567, "127.0.0.1")
    assert daemon.request("GET", "/healthz")[0] == 200
    assert daemon.request("POST", "/api/deploy", b"{}", token="x")[0] == 401


def test_stop_closes_every_connection(start: Any) -> None:
    daemon = start(etcd_nodes=(f"http://{ETCD[0]}:{ETCD[1]}",),
                   notify_url=f"http://{RECORDER[0]}:{RECORDER[1]}/hook")
    daemon.deploy("registry.test:5000/myorg/foo", "qa")
    etcd, recorder = IPv4Address("TCP", *ETCD), IPv4Address("TCP", *RECORDER)
    engine = UNIXAddress(ENGINE)
    for address in (etcd, recorder, engine):
        assert daemon.net.open_clients(address), address
    daemon.stop()
    for address in (etcd, recorder, engine):
        assert daemon.net.open_clients(address) == [], address
    assert not daemon.service.running
    # No more rounds, and no timer left behind.
    daemon.reactor.advance(86400)
    assert daemon.reactor.getDelayedCalls() == []


def test_a_closer_that_fails_is_logged_and_the_others_run(start: Any) -> None:
    daemon = start()
    closed: list[str] = []

    async def broken() -> None:
        raise RuntimeError("cannot close")

    async def fine() -> None:
        closed.append("fine")

    daemon.service.closers = (broken, fine)
    with capturedLogs() as events:
        daemon.stop()
    assert closed == ["fine"]
    [failure] = [e["log_failure"] for e in events if "log_failure" in e]
    assert failure.check(RuntimeError)


# -- bounds: the request deadline, the connection limit, the pull stall timeout -------------------


def test_a_client_that_trickles_its_request_is_dropped_after_request_timeout(start: Any) -> None:
    daemon = start(request_timeout=3.0)
    client = daemon.connect()
    assert client is not None
    protocol, transport = client
    for byte in b"POST /api/deploy HTTP/1.1\r\n"[:2]:
        daemon.reactor.advance(1)
        protocol.dataReceived(bytes([byte]))
    assert not transport.disconnecting
    daemon.reactor.advance(1)
    assert transport.disconnecting
    assert daemon.sample("deployer_http_connections_dropped_total", reason="timeout") == 1


def test_connections_are_limited(start: Any) -> None:
    daemon = start(max_connections=2)
    assert daemon.service.connections.limit == 2
    first, second = daemon.connect(), daemon.connect()
    assert first is not None and second is not None
    assert daemon.sample("deployer_http_connections") == 2
    assert daemon.request("GET", "/healthz")[0] == 200  # the oldest waiting one made room
    assert first[1].disconnected and not second[1].disconnected
    assert daemon.sample("deployer_http_connections_dropped_total", reason="evicted") == 1


def test_the_connection_limit_follows_rlimit_nofile(start: Any) -> None:
    daemon = start()
    assert daemon.service.connections.limit == connection_limit()


def test_a_pull_that_stalls_fails_after_pull_stall_timeout(start: Any) -> None:
    daemon = start(pull_stall_timeout=30.0)
    daemon.mem.slow_pull(FOO, Deferred())  # never ends
    assert daemon.deploy("registry.test:5000/myorg/foo", "qa")[0] == 202
    daemon.reactor.advance(29)
    daemon.net.flush()
    assert daemon.sample("deployer_rounds_total", result="error") is None
    daemon.reactor.advance(1)
    daemon.net.flush()
    assert daemon.sample("deployer_pulls_total", result="stalled") == 1
    assert daemon.sample("deployer_pulls_total", result="error") is None
    assert daemon.sample("deployer_rounds_total", result="error") == 1
    assert daemon.mem.stops == []


def test_stalled_pulls_are_counted_apart_from_other_failures() -> None:
    from deployer.metrics import Metrics
    from deployer.rounds import RoundReport
    from deployer.service import count_round

    metrics = Metrics(process=False)
    count_round(metrics, RoundReport(
        patterns=("a", "b", "c"), updates=(), pulled={"c:qa": "sha256:1"},
        failed={"a:qa": "pull a:qa: no progress", "b:qa": "manifest unknown"},
        pull_seconds={"c:qa": 1.0}, stopped=(), errors=(), started=0.0, finished=1.0,
        stalled=("a:qa",),
    ))
    text = metrics.render()[0].decode()
    assert 'deployer_pulls_total{result="stalled"} 1.0' in text
    assert 'deployer_pulls_total{result="error"} 1.0' in text
    assert 'deployer_pulls_total{result="ok"} 1.0' in text


def test_fleet_mode_keeps_a_rollout_lease_and_follows_the_engine_events(start: Any) -> None:
    daemon = start(etcd_nodes=("http://127.0.0.1:2379",))
    keeper = daemon.service.rollouts.keeper
    assert keeper is not None and keeper.running
    assert keeper.held, keeper.reason
    sweeper = daemon.service.rollouts.sweeper
    assert sweeper is not None and sweeper.running
    assert daemon.service.events.running
    assert daemon.request("GET", "/healthz", b"")[0] == 200


def test_standalone_rollouts_need_no_lease(start: Any) -> None:
    daemon = start()
    assert daemon.service.rollouts.keeper is None
    assert daemon.service.rollouts.sweeper is None
    assert daemon.service.events.running


# -- the rollout -----------------------------------------------------------------------------------


def test_a_replacement_goes_through_the_rollout_and_is_counted(start: Any) -> None:
    daemon = start()
    old_web = daemon.mem.find_container("web")
    assert old_web is not None
    daemon.deploy("registry.test:5000/myorg/foo", "qa")
    web = daemon.mem.find_container("web")
    assert web is not None and web.running and web.id != old_web.id
    assert web.image_id == daemon.mem.image_id(FOO)
    assert daemon.sample("deployer_replacements_total", result="replaced") == 1
    assert daemon.sample("deployer_rollout_slot_wait_seconds_count") == 1
    assert daemon.sample("deployer_rollout_duration_seconds_count") == 1
    assert daemon.sample("deployer_rollbacks_total", reason="no_replacement") is None
    doc = daemon.wait(daemon.service.rollouts.status.document())
    state = doc["hosts"]["host-a"]["apps"][FOO]
    assert state["image_id"] == web.image_id and state["containers"] == ["web"]
    assert state["last_round"]["result"] == "replaced"


@pytest.mark.parametrize("fleet", [False, True], ids=["standalone", "fleet"])
def test_without_a_supervisor_the_container_is_started_again_the_app_paused_and_told(
    start: Any, fleet: bool,
) -> None:
    etcd = {"etcd_nodes": (f"http://{ETCD[0]}:{ETCD[1]}",)} if fleet else {}
    daemon = start(ready_timeout=10.0, notify_url=f"http://{RECORDER[0]}:{RECORDER[1]}/hook",
                   slack_webhook_url=f"http://{RECORDER[0]}:{RECORDER[1]}/slack", **etcd)
    daemon.supervisor.stop()  # nothing runs web again
    web = daemon.mem.find_container("web")
    assert web is not None
    old = web.image_id
    daemon.deploy("registry.test:5000/myorg/foo", "qa")
    assert not web.running
    new = daemon.mem.image_id(FOO)
    assert new != old
    for _ in range(11):
        daemon.reactor.advance(1)
        daemon.net.flush()

    assert web.running and daemon.mem.find_container("web") is web  # started again
    assert daemon.mem.image_id(FOO) == old  # the tag is back on the previous build
    assert daemon.sample("deployer_rollbacks_total", reason="no_replacement") == 1
    assert daemon.sample("deployer_rollout_pauses_total") == 1
    assert daemon.sample("deployer_replacements_total", result="rolled_back") == 1
    record = daemon.wait(daemon.service.rollouts.pauses.get(FOO))
    assert record is not None and (record.image_id, record.host) == (new, "host-a")
    [slack] = [b for b in daemon.recorder.bodies("/slack") if "paused" in b["text"]]
    assert slack["text"].startswith(f"Rollout of {FOO} paused on host-a: no_replacement: ")
    [hook] = [b for b in daemon.recorder.bodies("/hook") if b.get("event") == "rollout_paused"]
    assert (hook["app"], hook["image_id"], hook["previous_image"]) == (FOO, new, old)
    doc = daemon.wait(daemon.service.rollouts.status.document())
    assert doc["apps"][FOO]["paused"]["reason"].startswith("no_replacement")


def test_each_replace_mode_has_its_replacer(start: Any) -> None:
    from deployer.recreate import RecreateReplacer
    from deployer.replace import ReplaceMode
    from deployer.replacers import StopReplacer

    daemon = start(replace=ReplaceMode.RECREATE)
    rollout = daemon.service.reconciler.rollout
    assert rollout is not None and rollout.mode is ReplaceMode.RECREATE
    assert isinstance(rollout.replacers[ReplaceMode.RECREATE], RecreateReplacer)
    assert isinstance(rollout.replacers[ReplaceMode.STOP], StopReplacer)


def test_label_enable_leaves_containers_without_the_label_alone(start: Any) -> None:
    daemon = start(label_enable=True)
    daemon.deploy("registry.test:5000/myorg/foo", "qa")
    assert [p.repotag for p in daemon.mem.pulls] == [FOO]  # pulled all the same
    assert daemon.mem.stops == []
    assert daemon.sample("deployer_replacements_total", result="replaced") is None
