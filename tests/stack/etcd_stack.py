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
``tcp_proxy``
    A factory: ``tcp_proxy(url, byte_by_byte=True)`` starts a :class:`TCPProxy` to ``url``.

Every process is torn down by its fixture, also when the test fails.
"""

from __future__ import annotations

import contextlib
import json
import os
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

import pytest

ETCD = shutil.which("etcd") or "/usr/bin/etcd"
ETCDCTL = shutil.which("etcdctl") or "/usr/bin/etcdctl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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

    def restart(self) -> None:
        self.stop()
        self.start()
        self.wait_ready()

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class EtcdCluster:
    """A set of members started together."""

    def __init__(self, workdir: Path, size: int, fast_election: bool = True,
                 extra_args: Sequence[str] = ()) -> None:
        ports = [(free_port(), free_port()) for _ in range(size)]
        names = [f"e{i}" for i in range(size)]
        initial = ",".join(
            f"{name}=http://127.0.0.1:{peer}" for name, (peer, _) in zip(names, ports, strict=True)
        )
        workdir.mkdir(parents=True, exist_ok=True)
        token = f"test-{uuid.uuid4().hex[:8]}"
        self.members = [
            EtcdMember(name, workdir, initial, token, peer, client, fast_election, extra_args)
            for name, (peer, client) in zip(names, ports, strict=True)
        ]

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(m.client_url for m in self.members)

    def running_urls(self) -> tuple[str, ...]:
        return tuple(m.client_url for m in self.members if m.running)

    def start(self) -> None:
        try:
            for member in self.members:
                member.start()
            for member in self.members:
                member.wait_ready()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for member in self.members:
            member.stop()


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
