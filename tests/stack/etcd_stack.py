"""Real etcd for tests: single members and clusters of Debian's ``/usr/bin/etcd``, ``etcdctl``,
and a loopback TCP proxy that can feed a client one byte at a time or cut it off.

Fixtures:

``etcd``
    A session-wide single member (:class:`EtcdMember`). Tests share it, each under its own
    ``etcd_prefix``; a test that stops or restarts etcd starts its own with ``etcd_cluster``.
``etcd_prefix``
    A fresh random key prefix (``/test-<hex>``).
``etcd_cluster``
    A factory: ``etcd_cluster(size=3)`` starts a new cluster (:class:`EtcdCluster`) and waits
    until it serves; every cluster is torn down at the end of the test.
``etcd_gateway``
    The URL of an etcd gateway, once a :class:`~deployer.testing.fake_etcd.FakeEtcd` and once
    (marked ``real``) a real member: one suite runs against both.
``tcp_proxy``
    A factory: ``tcp_proxy(url, byte_by_byte=True)`` starts a :class:`TCPProxy` to ``url``.

``etcd_rig``
    A factory of :class:`Rig`: an :class:`~deployer.etcd.Etcd` over a
    :class:`~deployer.testing.fake_etcd.FakeEtcd` in memory (through :class:`FakeNetwork`, which
    can also refuse connections or leave requests unanswered), on a ``Clock``.

Every process is torn down by its fixture, also when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import pytest
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, fail
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock
from twisted.web.client import URI
from twisted.web.iweb import IAgent
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from deployer.etcd import Etcd, EtcdConfig, WatchService
from deployer.model import Update
from deployer.testing.fake_etcd import FakeEtcd, SyncProducer
from tests.stack.ports import address_in_use, free_ports, on_fresh_ports
from tests.stack.ports import free_port as free_port  # the tests take it from here

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"


def etcdctl(endpoints: str | Sequence[str], *args: str, timeout: float = 15.0) -> str:
    """Run ``etcdctl`` (API v3) against ``endpoints``; its standard output. Raises on failure."""
    if not isinstance(endpoints, str):
        endpoints = ",".join(endpoints)
    done = subprocess.run(
        [ETCDCTL, f"--endpoints={endpoints}", "--dial-timeout=3s", *args],
        env={**os.environ, "ETCDCTL_API": "3"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"etcdctl {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done.stdout


def current_revision(endpoints: str | Sequence[str]) -> int:
    out = json.loads(etcdctl(endpoints, "endpoint", "status", "-w", "json"))
    return max(int(s["Status"]["header"]["revision"]) for s in out)


class EtcdMember:
    """One etcd process; it can be stopped, killed and started again on the same data."""

    def __init__(self, name: str, workdir: Path, initial_cluster: str, token: str,
                 peer_port: int, client_port: int, fast_election: bool,
                 extra_args: Sequence[str] = ()) -> None:
        self.name = name
        self.data_dir = workdir / f"{name}.data"
        self.log_path = workdir / f"{name}.log"
        self.client_port = client_port
        self.peer_port = peer_port
        self.initial_cluster = initial_cluster
        self.token = token
        self.fast_election = fast_election
        self.extra_args = tuple(extra_args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        if self.running:
            return
        args = [
            ETCD,
            "--name", self.name,
            "--data-dir", str(self.data_dir),
            "--listen-client-urls", self.client_url,
            "--advertise-client-urls", self.client_url,
            "--listen-peer-urls", self.peer_url,
            "--initial-advertise-peer-urls", self.peer_url,
            "--initial-cluster", self.initial_cluster,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", self.token,
        ]
        if self.fast_election:
            args += ["--heartbeat-interval", "50", "--election-timeout", "500"]
        args += self.extra_args
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.client_url + "/health", timeout=0.5) as r:
                return bool(json.loads(r.read()).get("health") == "true")
        except (OSError, ValueError, urllib.error.URLError):
            return False

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.running:
                raise RuntimeError(f"etcd {self.name} exited early:\n{self.log_tail()}")
            if self.healthy():
                return
            time.sleep(0.05)
        raise RuntimeError(f"etcd {self.name} not healthy after {timeout}s:\n{self.log_tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Send ``sig`` and wait for the process to end (SIGKILL after ``timeout``)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def freeze(self) -> None:
        """SIGSTOP: the member keeps its port (the kernel still accepts connections) and answers
        nothing, as a hung or swapping host does."""
        assert self.process is not None and self.process.poll() is None, f"{self.name} is down"
        self.process.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """SIGCONT: undo :meth:`freeze`."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    def restart(self) -> None:
        self.stop()
        self.start()
        self.wait_ready()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


class EtcdCluster:
    """A set of members started together, on free ports: when another process binds one of
    them first, :meth:`start` starts the cluster anew on others."""

    def __init__(self, workdir: Path, size: int, fast_election: bool = True,
                 extra_args: Sequence[str] = ()) -> None:
        self.workdir = workdir
        self.size = size
        self.fast_election = fast_election
        self.extra_args = tuple(extra_args)
        workdir.mkdir(parents=True, exist_ok=True)
        self.members = self._new_members()

    def _new_members(self) -> list[EtcdMember]:
        """Members on fresh ports (a peer and a client port each), in a fresh cluster."""
        ports = free_ports(2 * self.size)
        pairs = list(zip(ports[::2], ports[1::2], strict=True))
        names = [f"e{i}" for i in range(self.size)]
        initial = ",".join(
            f"{name}=http://127.0.0.1:{peer}" for name, (peer, _) in zip(names, pairs, strict=True)
        )
        token = f"test-{uuid.uuid4().hex[:8]}"
        return [
            EtcdMember(name, self.workdir, initial, token, peer, client, self.fast_election,
                       self.extra_args)
            for name, (peer, client) in zip(names, pairs, strict=True)
        ]

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(m.client_url for m in self.members)

    def running_urls(self) -> tuple[str, ...]:
        return tuple(m.client_url for m in self.members if m.running)

    def start(self) -> None:
        def attempt(again: bool) -> None:
            if again:
                for member in self.members:
                    shutil.rmtree(member.data_dir, ignore_errors=True)
                self.members = self._new_members()
            try:
                for member in self.members:
                    member.start()
                self._wait_ready(15.0 * self.size)
            except BaseException:
                self.stop()
                raise

        def taken() -> bool:
            return any(address_in_use(m.log(), (m.peer_port, m.client_port))
                       for m in self.members)

        on_fresh_ports(attempt, taken)

    def _wait_ready(self, timeout: float) -> None:
        """Until every member is healthy; RuntimeError at once when one exits."""
        deadline = time.monotonic() + timeout
        waiting = list(self.members)
        while True:
            for member in self.members:
                if not member.running:
                    raise RuntimeError(f"etcd {member.name} exited early:\n{member.log_tail()}")
            waiting = [member for member in waiting if not member.healthy()]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"etcd {waiting[0].name} not healthy after {timeout}s:\n"
                                   f"{waiting[0].log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        for member in self.members:
            member.thaw()  # a stopped process would not handle SIGTERM
            member.stop()

    @contextlib.contextmanager
    def frozen(self, *members: EtcdMember) -> Iterator[None]:
        """``members`` stopped with SIGSTOP for the block; continued after it, whatever
        happens."""
        try:
            for member in members:
                member.freeze()
            yield
        finally:
            for member in members:
                member.thaw()

    def leader(self, timeout: float = 30.0) -> tuple[int, list[int]]:
        """The index of the leader, and every member's id (0 for one not running), once every
        running member names the same running one (during an election a member names none)."""
        deadline = time.monotonic() + timeout
        while True:
            urls = self.running_urls()
            try:
                status = json.loads(etcdctl(urls, "endpoint", "status", "-w", "json"))
            except (RuntimeError, ValueError) as e:  # a member that does not answer yet
                status, why = [], str(e)
            else:
                why = str(status)
            by_url = {s["Endpoint"]: s["Status"]["header"]["member_id"] for s in status}
            ids = [by_url.get(url, 0) for url in self.urls]
            leaders = {s["Status"].get("leader", 0) for s in status}
            if len(status) == len(urls) and len(leaders) == 1 \
                    and (leader := leaders.pop()) in by_url.values():
                return ids.index(leader), ids
            if time.monotonic() > deadline:
                raise RuntimeError(f"the members name no one leader after {timeout}s: {why}")
            time.sleep(0.1)

    def leader_first_follower(self) -> tuple[int, int]:
        """The indexes of the leader and of the first member that is not the leader."""
        leader, ids = self.leader()
        return leader, next(i for i in range(len(ids)) if i != leader)

    def keep_leader_off(self, index: int, timeout: float = 10.0) -> None:
        """Make sure member ``index`` does not lead: if it does now, hand the leadership to
        another member. A test that stops a follower calls this right before, since on a loaded
        machine a missed heartbeat can move the leadership at any time."""
        deadline = time.monotonic() + timeout
        while True:
            leader, ids = self.leader()
            if leader != index:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.members[index].name} still leads after {timeout}s")
            other = next(i for i in range(len(ids)) if i != index)
            etcdctl(self.urls[leader], "move-leader", f"{ids[other]:x}")


class TCPProxy:
    """A loopback TCP proxy in its own threads (independent of the reactor under test).

    Client→server bytes pass as they come; server→client bytes are sent one ``send`` per byte
    when ``byte_by_byte``, with TCP_NODELAY and ``pace`` seconds between bytes, so the client
    sees its response cut at every possible place. :meth:`drop` closes every open connection;
    :meth:`block` also closes each new one at once until :meth:`unblock`.
    """

    def __init__(self, target: str, byte_by_byte: bool = True, pace: float = 0.0) -> None:
        host, _, port = target.removeprefix("http://").rstrip("/").rpartition(":")
        self.target = (host, int(port))
        self.byte_by_byte = byte_by_byte
        self.pace = pace
        self.accepted = 0
        self.bytes_down = 0
        self._lock = threading.Lock()
        self._pairs: set[tuple[socket.socket, socket.socket]] = set()
        self._threads: list[threading.Thread] = []
        self._blocked = False
        self._closed = False
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self._listener.settimeout(0.1)
        self.port = int(self._listener.getsockname()[1])
        self._spawn(self._accept_loop)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            with self._lock:
                blocked = self._blocked or self._closed
            if blocked:
                _hard_close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                _hard_close(client)
                continue
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pair = (client, upstream)
            with self._lock:
                self._pairs.add(pair)
                self.accepted += 1
            self._spawn(self._pump, pair, upstream, client, self.byte_by_byte)
            self._spawn(self._pump, pair, client, upstream, False)

    def _pump(self, pair: tuple[socket.socket, socket.socket], src: socket.socket,
              dst: socket.socket, one_byte: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if one_byte:
                    for i in range(len(data)):
                        dst.sendall(data[i : i + 1])
                        self.bytes_down += 1
                        if self.pace:
                            time.sleep(self.pace)
                else:
                    dst.sendall(data)
        except OSError:
            pass
        finally:
            self._close_pair(pair)

    def _close_pair(self, pair: tuple[socket.socket, socket.socket]) -> None:
        with self._lock:
            self._pairs.discard(pair)
        for s in pair:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()

    def drop(self) -> None:
        """Close every open connection (the client sees its stream end)."""
        with self._lock:
            pairs = list(self._pairs)
        for pair in pairs:
            self._close_pair(pair)

    def block(self) -> None:
        with self._lock:
            self._blocked = True
        self.drop()

    def unblock(self) -> None:
        with self._lock:
            self._blocked = False

    def close(self) -> None:
        self._closed = True
        self.block()
        with contextlib.suppress(OSError):
            self._listener.close()
        for thread in self._threads:
            thread.join(5)


def _hard_close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    with contextlib.suppress(OSError):
        s.close()


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdMember]:
    """A single etcd member for the whole session; use ``etcd_prefix`` to keep tests apart."""
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), 1)
    cluster.start()
    try:
        yield cluster.members[0]
    finally:
        cluster.stop()


@pytest.fixture
def etcd_prefix() -> str:
    return f"/test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def etcd_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., EtcdCluster]]:
    """``etcd_cluster(size=3, fast_election=True, extra_args=())``: a new cluster, running and
    healthy; torn down after the test. ``extra_args`` go to every member's command line."""
    clusters: list[EtcdCluster] = []

    def make(size: int = 3, fast_election: bool = True,
             extra_args: Sequence[str] = ()) -> EtcdCluster:
        cluster = EtcdCluster(tmp_path_factory.mktemp("etcd-cluster"), size, fast_election,
                              extra_args)
        clusters.append(cluster)
        cluster.start()
        return cluster

    try:
        yield make
    finally:
        for cluster in clusters:
            cluster.stop()


PROGRESS_INTERVAL = 0.5
"""Seconds between progress notifications of the gateway suite's etcd, fake or real."""


@pytest.fixture(scope="session")
def etcd_progress_member(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdMember]:
    """A single member of its own that sends watch progress notifications every
    :data:`PROGRESS_INTERVAL` seconds (etcd's default is 10 minutes)."""
    interval = ["--experimental-watch-progress-notify-interval", f"{PROGRESS_INTERVAL * 1000:g}ms"]
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd-progress"), 1, extra_args=interval)
    cluster.start()
    try:
        yield cluster.members[0]
    finally:
        cluster.stop()


@pytest.fixture(params=["fake", pytest.param("real", marks=pytest.mark.real)])
def etcd_gateway(request: pytest.FixtureRequest) -> Iterator[str]:
    """The client URL of an etcd gateway: a :class:`~deployer.testing.fake_etcd.FakeEtcd` on a
    loopback port, or (marked ``real``) :func:`etcd_progress_member`. Both send progress
    notifications every :data:`PROGRESS_INTERVAL` seconds."""
    if request.param == "real":
        yield request.getfixturevalue("etcd_progress_member").client_url
        return
    from twisted.internet import reactor

    fake = FakeEtcd(reactor, progress_interval=PROGRESS_INTERVAL)
    port = reactor.listenTCP(0, Site(fake), interface="127.0.0.1")
    try:
        yield f"http://127.0.0.1:{port.getHost().port}"
    finally:
        port.stopListening()


async def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Poll ``predicate`` on the running reactor until it holds; AssertionError after
    ``timeout`` seconds."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    waited = 0.0
    while not predicate():
        if waited >= timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await deferLater(reactor, 0.02)
        waited += 0.02


@pytest.fixture
def tcp_proxy() -> Iterator[Callable[..., TCPProxy]]:
    """``tcp_proxy(url, byte_by_byte=True, pace=0.0)``: a proxy to ``url``; closed after."""
    proxies: list[TCPProxy] = []

    def make(target: str, byte_by_byte: bool = True, pace: float = 0.0) -> TCPProxy:
        proxy = TCPProxy(target, byte_by_byte, pace)
        proxies.append(proxy)
        return proxy

    try:
        yield make
    finally:
        for proxy in proxies:
            proxy.close()


# -- the in-memory etcd -----------------------------------------------------------------------


@implementer(IAgent)
class FakeNetwork:
    """Routes requests to the gateway in memory, except to members that are :attr:`down`
    (refused) and requests to a path in :attr:`hang`, which never answer: cancelling one fails
    it with the error that ``hang[path](host)`` makes, as an ``Agent`` does (it reports a
    cancelled request as ResponseNeverReceived, or ConnectingCancelledError while it
    connects). :meth:`flush` moves the bytes in flight."""

    def __init__(self, resource: Resource, clock: IReactorTime) -> None:
        self.inner = RequestTraversalAgent(resource)
        self.clock = clock
        self.down: set[str] = set()
        self.hang: dict[str, Callable[[str], Exception]] = {}
        self.log: list[tuple[float, str, str]] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None,
                bodyProducer: Any = None) -> Deferred[Any]:
        parsed = URI.fromBytes(uri)
        host, path = parsed.host.decode(), parsed.path.decode()
        self.log.append((self.clock.seconds(), host, path))
        if host in self.down:
            return fail(ConnectionRefusedError(f"{host} is down"))
        error = self.hang.get(path)
        if error is not None:
            return Deferred(lambda d: d.errback(error(host)))
        return self.inner.request(method, uri, headers, bodyProducer)

    def flush(self) -> None:
        for _ in range(3):
            self.inner.flush()

    def hosts(self, path: str) -> list[str]:
        """The members that requests to ``path`` went to, in order."""
        return [host for _, host, p in self.log if p == path]

    def http_client(self) -> HTTPClient:
        return HTTPClient(self, data_to_body_producer=SyncProducer)


@attrs.define
class Rig:
    """An :class:`Etcd` over a :class:`FakeEtcd` in memory, on a ``Clock``."""

    clock: Clock
    fake: FakeEtcd
    net: FakeNetwork
    etcd: Etcd
    started: list[WatchService] = attrs.Factory(list)

    def flush(self) -> None:
        self.net.flush()

    def advance(self, seconds: float, step: float = 0.1) -> None:
        """Move the clock by ``seconds`` in steps, flushing the network after each."""
        end = self.clock.seconds() + seconds
        while self.clock.seconds() < end - 1e-9:
            self.clock.advance(min(step, end - self.clock.seconds()))
            self.flush()

    def watch(
        self, on_update: Callable[[Update], object] | None = None
    ) -> tuple[WatchService, list[Update]]:
        got: list[Update] = []
        service = self.etcd.watch(on_update or got.append)
        service.startService()
        self.started.append(service)
        self.flush()
        return service, got

    def stop(self) -> None:
        """Stop every watch this rig started."""
        while self.started:
            service = self.started.pop()
            if service.running:
                service.stopService()


FAKE_HOSTS = ("10.0.0.1", "10.0.0.2", "10.0.0.3")


def make_rig(hosts: tuple[str, ...] = FAKE_HOSTS[:1], dial_timeout: float = 5.0,
             **kw: Any) -> Rig:
    """An :class:`Etcd` of members ``http://<host>:2379`` over one :class:`FakeEtcd` (without
    progress notifications), on a ``Clock`` at 1000 s."""
    clock = Clock()
    clock.advance(1000)
    fake = FakeEtcd(clock, progress_interval=None)
    net = FakeNetwork(fake, clock)
    config = EtcdConfig(nodes=tuple(f"http://{h}:2379" for h in hosts), prefix="/deployer",
                        dial_timeout=dial_timeout, retry_delay=1.0)
    etcd = Etcd(clock, config, http=net.http_client(), rng=random.Random(7), **kw)
    return Rig(clock, fake, net, etcd)


@pytest.fixture
def etcd_rig() -> Iterator[Callable[..., Rig]]:
    """``etcd_rig(hosts=..., dial_timeout=5.0, **Etcd keywords)``: a :class:`Rig`; its watches
    are stopped after the test."""
    rigs: list[Rig] = []

    def make(*args: Any, **kw: Any) -> Rig:
        rig = make_rig(*args, **kw)
        rigs.append(rig)
        return rig

    try:
        yield make
    finally:
        for rig in rigs:
            rig.stop()
