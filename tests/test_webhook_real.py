"""The front door of the real daemon process (``twist deployer``) on the real stack: a
docker-registry that notifies it, a private dockerd, etcd, and a loopback listener that must
never be called."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.stack.daemon import Daemon
from tests.stack.docker_stack import (
    Dockerd,
    ImageBuilder,
    Registry,
    Supervisor,
    log_tail,
    unique,
    wait_until,
)
from tests.stack.etcd_stack import EtcdMember, etcdctl

pytestmark = pytest.mark.real

MAX_BODY = 1024 * 1024
Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """``daemon_factory(*args)``: a started daemon; stopped after the test, which then checks
    that it shut down cleanly and logged no traceback."""
    started: list[tuple[Daemon, bool]] = []

    def start(*args: str, tracebacks: bool = False, **kw: Any) -> Daemon:
        daemon = Daemon(tmp_path, args, **kw)
        started.append((daemon, tracebacks))
        return daemon.start()

    yield start
    for daemon, tracebacks in started:
        code = daemon.stop()
        log = daemon.log()
        assert tracebacks or "Traceback" not in log, log[-5000:]
        assert code in (0, -signal.SIGTERM), f"deployer exited with {code}:\n{log[-3000:]}"


def metrics(daemon: Daemon) -> Metrics:
    status, body = daemon.get("/metrics")
    assert status == 200
    text = body if isinstance(body, bytes) else json.dumps(body).encode()
    out: Metrics = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def webhook_counts(m: Metrics, endpoint: str) -> dict[str, float]:
    """``{status: count}`` of one endpoint's answers."""
    return {
        dict(labels)["status"]: value
        for (name, labels), value in m.items()
        if name == "deployer_webhooks_total" and dict(labels).get("endpoint") == endpoint
    }


def raw_http(port: int, request: bytes, timeout: float = 5.0) -> bytes:
    """Send ``request`` as is and read the answer until the daemon closes or pauses."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                chunks.append(data)
                if b"\r\n\r\n" in b"".join(chunks) and b"Connection: close" not in chunks[0]:
                    break
        except TimeoutError:
            pass
        return b"".join(chunks)


# -- a docker push alone deploys ------------------------------------------------------------------


def test_a_docker_push_alone_deploys(
    clean_dockerd: Dockerd, image_builder: ImageBuilder,
    registry_factory: Callable[..., Registry], supervisor_factory: Callable[..., Supervisor],
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory("--docker", clean_dockerd.url, "--repull_period", "0")
    registry = registry_factory(
        notify_url=f"{daemon.url}/api/registry/events",
        notify_headers={"Authorization": f"Bearer {daemon.token}"},
    )
    builder = image_builder.builder()
    repo = unique("app")
    ref = f"{registry.host}/{repo}:qa"
    v1_id = image_builder.build(builder, ref, "v1")
    v1_digest = image_builder.push(builder, ref)
    clean_dockerd.cli("pull", ref)
    assert clean_dockerd.image_id(ref) == v1_id
    supervisor = supervisor_factory(unique("c"), ref)
    supervisor.wait_running_image_blocking(v1_id)

    v2_id = image_builder.build(builder, ref, "v2")
    v2_digest = image_builder.push(builder, ref)  # and nothing else
    supervisor.wait_running_image_blocking(v2_id, timeout=60)
    assert clean_dockerd.image_id(ref) == v2_id

    # Each manifest push was acted on once; blob pushes were acknowledged and ignored.
    log = daemon.log()

    def accepted(digest: str) -> list[str]:
        return re.findall(
            rf"accepted update source=registry repository={re.escape(registry.host)}/{repo}"
            rf" tag=qa digest={digest}", log
        )

    assert len(accepted(v1_digest)) == 1, log[-3000:]
    assert len(accepted(v2_digest)) == 1, log[-3000:]
    # The round is counted once the replacement is ready (running for --min_ready).
    deadline = time.monotonic() + 60
    while metrics(daemon).get(("deployer_containers_stopped_total", ())) != 1:
        assert time.monotonic() < deadline, daemon.log()[-3000:]
        time.sleep(0.2)
    m = metrics(daemon)
    counts = webhook_counts(m, "registry")
    assert set(counts) == {"200"}, counts  # every delivery acknowledged, none refused
    assert counts["200"] >= 4  # at least a blob and the manifest, per push
    assert m[("deployer_updates_accepted_total", (("source", "registry"),))] == 2
    assert m[("deployer_containers_stopped_total", ())] == 1
    # The registry had no reason to retry: no failed delivery in its log.
    registry_log = registry.log_path.read_text(errors="replace")
    failures = [line for line in registry_log.splitlines()
                if re.search(r"retryingsink|httpSink|backing off|unaccepted", line)]
    assert failures == [], "\n".join(failures[-10:])


# -- etcd mode: a refused request writes nothing --------------------------------------------------


def etcd_keys(etcd: EtcdMember, prefix: str) -> list[str]:
    """The trigger keys under ``prefix`` (not the daemon's own state under ``<prefix>/_/``,
    such as the host status it publishes)."""
    out = etcdctl(etcd.client_url, "get", "--prefix", prefix + "/", "--keys-only")
    return [line for line in out.splitlines()
            if line.strip() and not line.startswith(prefix + "/_/")]


REFUSED: list[tuple[str, str, bytes, dict[str, str], bool, int]] = [
    # (label, path, body, headers, with the token, expected status)
    ("no token", "/api/deploy", b'{"repository": "myorg/foo"}', {}, False, 401),
    ("wrong token", "/api/deploy", b'{"repository": "myorg/foo"}',
     {"Authorization": "Bearer wrong"}, False, 401),
    ("wrong ?token", "/api/deploy?token=wrong", b'{"repository": "myorg/foo"}', {}, False, 401),
    ("token without a GitHub signature", "/api/github/events",
     b'{"action": "published"}', {"X-GitHub-Event": "registry_package"}, True, 401),
    ("not JSON", "/api/deploy", b"{not json", {}, True, 400),
    ("wrong shape", "/api/deploy", b'["myorg/foo"]', {}, True, 400),
    ("wrong type", "/api/deploy", b'{"repository": 5}', {}, True, 400),
    ("empty repository", "/api/deploy", b'{"repository": ""}', {}, True, 400),
    ("missing repository", "/api/deploy", b'{"tag": "qa"}', {}, True, 400),
    ("uppercase", "/api/deploy", b'{"repository": "MyOrg/foo"}', {}, True, 400),
    ("dot-dot", "/api/deploy", b'{"repository": "myorg/../foo"}', {}, True, 400),
    ("leading slash", "/api/deploy", b'{"repository": "/myorg/foo"}', {}, True, 400),
    ("every image", "/api/deploy", b'{"repository": "*"}', {}, True, 400),
    ("a pattern", "/api/deploy", b'{"repository": "myorg/*"}', {}, True, 400),
    ("control character", "/api/deploy", b'{"repository": "myorg/foo\\u0000"}', {}, True, 400),
    ("newline", "/api/deploy", b'{"repository": "myorg/foo\\n"}', {}, True, 400),
    ("too long", "/api/deploy", json.dumps({"repository": "a" * 256}).encode(), {}, True, 400),
    ("bad tag", "/api/deploy", b'{"repository": "myorg/foo", "tag": "-qa"}', {}, True, 400),
    ("too deep", "/api/deploy", b'{"repository": "myorg/foo", "x": ' + b"[" * 40 + b"]" * 40
     + b"}", {}, True, 400),
    ("bad Docker Hub name", "/api/dockerhub/webhook",
     b'{"repository": {"repo_name": "Bad/Name"}}', {}, True, 400),
    ("bad envelope", "/api/registry/events", b'{"events": {}}', {}, True, 400),
    ("text/plain", "/api/deploy", b'{"repository": "myorg/foo"}',
     {"Content-Type": "text/plain"}, True, 415),
    ("form", "/api/deploy", b"repository=myorg/foo",
     {"Content-Type": "application/x-www-form-urlencoded"}, True, 415),
    ("GET", "/api/deploy", b"", {}, True, 405),
    ("unknown path", "/api/nothing-here", b'{"repository": "myorg/foo"}', {}, True, 404),
    ("double slash", "/api//deploy", b'{"repository": "myorg/foo"}', {}, True, 404),
]


def test_etcd_mode_refused_requests_write_nothing(
    etcd: EtcdMember, etcd_prefix: str, clean_dockerd: Dockerd,
    daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory("--docker", clean_dockerd.url, "--repull_period", "0",
                            "--etcd_nodes", etcd.client_url, "--etcd_prefix", etcd_prefix,
                            "--github_secret", "gh-secret")
    for label, path, body, headers, auth, expected in REFUSED:
        method = "GET" if label == "GET" else "POST"
        status, answer = daemon.request(method, path, body or None, headers=headers, auth=auth)
        assert status == expected, (label, status, answer)
        assert isinstance(answer, dict) and answer.get("error"), (label, answer)

    # Over 1 MiB: announced by Content-Length, refused before a byte of the body is sent.
    head = (f"POST /api/deploy HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
            f"\r\nAuthorization: Bearer {daemon.token}\r\nContent-Length: {MAX_BODY + 1}"
            "\r\n\r\n").encode()
    answer = raw_http(daemon.port, head)
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {
        "error": f"body larger than {MAX_BODY} bytes"}
    # Chunked, growing over 1 MiB: refused once it has.
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as s:
        s.sendall(head.replace(f"Content-Length: {MAX_BODY + 1}".encode(),
                               b"Transfer-Encoding: chunked"))
        piece = b"1" * 65536
        chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
        received = b""
        # The daemon answers and resets the connection (its body unread) as soon as it has
        # more than 1 MiB: when that comes between a wait for its answer and the next chunk,
        # sending fails, and the answer is read after all.
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            for _ in range(32):
                s.sendall(chunk)
                s.settimeout(0.02)
                try:
                    received += s.recv(4096)
                except TimeoutError:
                    continue
                if received:
                    break
        s.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            while data := s.recv(4096):
                received += data
    assert received.startswith(b"HTTP/1.1 413 "), received

    assert etcd_keys(etcd, etcd_prefix) == []
    assert daemon.get("/healthz")[0] == 200

    status, answer = daemon.post_json("/api/deploy", {"repository": "myorg/app-x", "tag": "qa"})
    assert status == 202, answer
    assert etcd_keys(etcd, etcd_prefix) == [f"{etcd_prefix}/myorg/app-x:qa"]
    value = json.loads(etcdctl(etcd.client_url, "get", f"{etcd_prefix}/myorg/app-x:qa",
                               "--print-value-only"))
    assert (value["repository"], value["tag"], value["source"]) == ("myorg/app-x", "qa", "api")

    assert daemon.get("/healthz")[0] == 200
    m = metrics(daemon)
    deploy = webhook_counts(m, "deploy")
    expected_deploy = {"401": 3, "400": 15, "415": 2, "202": 1}
    assert deploy == {k: float(v) for k, v in expected_deploy.items()}, deploy
    assert webhook_counts(m, "github") == {"401": 1.0}
    assert webhook_counts(m, "dockerhub") == {"400": 1.0}
    assert webhook_counts(m, "registry") == {"400": 1.0}
    assert m[("deployer_webhook_auth_failures_total", (("endpoint", "deploy"),))] == 3
    assert m[("deployer_webhook_auth_failures_total", (("endpoint", "github"),))] == 1
    assert m[("deployer_updates_accepted_total", (("source", "api"),))] == 1
    log = daemon.log()
    assert "wrong" not in log  # the offered tokens
    assert daemon.token is not None and daemon.token not in log


# -- a Docker Hub callback_url on 127.0.0.1 is never called ---------------------------------------


class Listener:
    """A loopback TCP listener that counts the connections it gets (and answers none)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self.connections = 0
        self._closed = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._closed = True
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    listening = Listener()
    yield listening
    listening.close()


def dockerhub(repo_name: str, callback_url: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(
        (Path(__file__).parent / "samples" / "dockerhub-webhook.json").read_text())
    body["repository"]["repo_name"] = repo_name
    body["callback_url"] = callback_url
    return body


def test_callback_url_on_loopback_is_never_called(
    clean_dockerd: Dockerd, daemon_factory: Callable[..., Daemon], listener: Listener,
) -> None:
    daemon = daemon_factory("--docker", clean_dockerd.url, "--repull_period", "0",
                            "--public_url", "https://deployer.example.com/")
    port = listener.port
    urls = [
        f"https://127.0.0.1:{port}/hook",
        f"http://127.0.0.1:{port}/hook",
        f"https://localhost:{port}/hook",
        f"https://registry.hub.docker.com@127.0.0.1:{port}/hook",
        f"https://127.0.0.1:{port}/registry.hub.docker.com/",
        f"https://[::ffff:127.0.0.1]:{port}/hook",
    ]
    for url in urls:
        status, answer = daemon.post_json("/api/dockerhub/webhook", dockerhub("myorg/foo", url))
        assert status == 202, (url, answer)
    # The daemon calls back after it answers: give it the time it would need.
    time.sleep(1.0)
    assert listener.connections == 0
    assert daemon.log().count("Not calling the Docker Hub callback") == len(urls)

    # The same listener does see a daemon that is allowed to call it (which then logs the
    # failed TLS handshake with its traceback).
    allowed = daemon_factory("--docker", clean_dockerd.url, "--repull_period", "0",
                             "--callback_hosts", f"127.0.0.1:{port}", tracebacks=True)
    status, _ = allowed.post_json("/api/dockerhub/webhook",
                                  dockerhub("myorg/foo", f"https://127.0.0.1:{port}/hook"))
    assert status == 202
    try:
        wait_until(lambda: listener.connections > 0, 30, "a callback to the allowed host")
    except Exception as e:
        raise AssertionError(f"{e}\n{log_tail(allowed.log_path)}") from None
