"""The daemon as users run it (``twist deployer``), standalone, on a real dockerd and registry."""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.stack.daemon import Daemon
from tests.stack.docker_stack import (
    Dockerd,
    ImageBuilder,
    Supervisor,
    run_container,
    unique,
    wait_until,
)

pytestmark = pytest.mark.real


def dockerhub_payload(repo_name: str, tag: str, callback_url: str | None = None) -> dict[str, Any]:
    sample = json.loads(
        (Path(__file__).parent / "samples" / "dockerhub-webhook.json").read_text()
    )
    sample["repository"]["repo_name"] = repo_name
    sample["push_data"]["tag"] = tag
    if callback_url is None:
        sample.pop("callback_url", None)
    else:
        sample["callback_url"] = callback_url
    return sample


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(*args: str, healthy: bool = True, **kw: Any) -> Daemon:
        d = Daemon(tmp_path, args, **kw)
        started.append(d)
        return d.start(healthy=healthy)

    yield start
    for d in started:
        code = d.stop()
        log = d.log()
        assert "Traceback" not in log, log
        # twist re-raises SIGTERM on itself after a clean shutdown
        assert code in (0, -signal.SIGTERM), f"deployer exited with {code}:\n{log[-3000:]}"
        assert "Main loop terminated" in log


def test_webhook_deploys_the_new_image_to_the_supervised_container(
    clean_dockerd: Dockerd, image_builder: ImageBuilder,
    supervisor_factory: Callable[..., Any], daemon_factory: Callable[..., Daemon],
) -> None:
    repo = unique("app")
    ref = image_builder.ref(repo, "qa")
    v1 = image_builder.publish(ref, "v1")
    clean_dockerd.cli("pull", ref)
    supervisor = supervisor_factory(unique("c"), ref)
    supervisor.wait_running_image_blocking(v1.image_id)
    daemon = daemon_factory("--docker", clean_dockerd.url, "--repull_period", "0")

    v2 = image_builder.publish(ref, "v2")
    status, body = daemon.post_json(
        "/api/dockerhub/webhook",
        dockerhub_payload(f"{image_builder.registry.host}/{repo}", "qa"),
    )
    assert status == 202, body
    assert body["status"] == "accepted"
    supervisor.wait_running_image_blocking(v2.image_id, timeout=60)
    assert clean_dockerd.image_id(ref) == v2.image_id
    # logged once the engine answered the stop, which may come after the supervisor's restart
    wait_until(lambda: f"stopped {supervisor.name} (" in daemon.log(), 30, "the stop logged",
               0.2)


def test_refused_webhooks_change_nothing(
    clean_dockerd: Dockerd, image_builder: ImageBuilder, daemon_factory: Callable[..., Daemon],
) -> None:
    repo = unique("app")
    ref = image_builder.ref(repo, "qa")
    v1 = image_builder.publish(ref, "v1")
    clean_dockerd.cli("pull", ref)
    container = run_container(clean_dockerd, ref, unique("c"))
    daemon = daemon_factory("--docker", clean_dockerd.url, "--repull_period", "0")
    image_builder.publish(ref, "v2")
    payload = dockerhub_payload(f"{image_builder.registry.host}/{repo}", "qa")

    status, body = daemon.post_json("/api/dockerhub/webhook", payload, auth=False)
    assert status == 401 and "error" in body
    status, body = daemon.post_json("/api/dockerhub/webhook", payload,
                                    headers={"Authorization": "Bearer wrong"})
    assert status == 401 and "error" in body
    status, body = daemon.request("POST", "/api/dockerhub/webhook", b"{not json")
    assert status == 400 and "JSON" in body["error"]
    status, body = daemon.post_json("/api/dockerhub/webhook", {"repository": {}})
    assert status == 400 and "repo_name" in body["error"]

    time.sleep(1.0)  # a round, had one been started, would have pulled by now
    assert clean_dockerd.image_id(ref) == v1.image_id
    state = clean_dockerd.inspect(container)
    assert state is not None and state["State"]["Running"]
    assert daemon.get("/healthz")[0] == 200


def test_token_in_query_string(
    clean_dockerd: Dockerd, image_builder: ImageBuilder, daemon_factory: Callable[..., Daemon],
) -> None:
    repo = unique("app")
    ref = image_builder.ref(repo, "qa")
    image_builder.publish(ref, "v1")
    clean_dockerd.cli("pull", ref)
    daemon = daemon_factory("--docker", clean_dockerd.url, "--repull_period", "0")
    v2 = image_builder.publish(ref, "v2")
    status, _ = daemon.post_json(
        f"/api/dockerhub/webhook?token={daemon.token}",
        dockerhub_payload(f"{image_builder.registry.host}/{repo}", "qa"), auth=False,
    )
    assert status == 202
    deadline = time.monotonic() + 60
    while clean_dockerd.image_id(ref) != v2.image_id and time.monotonic() < deadline:
        time.sleep(0.1)
    assert clean_dockerd.image_id(ref) == v2.image_id


def test_healthz_reports_an_unreachable_engine(
    tmp_path: Path, daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory("--docker", f"unix://{tmp_path}/missing.sock", "--repull_period",
                            "0", healthy=False)
    status, body = daemon.get("/healthz")
    assert status == 503
    assert "docker" in body["error"]


def test_repull_at_start_updates_everything(
    clean_dockerd: Dockerd, image_builder: ImageBuilder, daemon_factory: Callable[..., Daemon],
) -> None:
    repo = unique("app")
    ref = image_builder.ref(repo, "qa")
    image_builder.publish(ref, "v1")
    clean_dockerd.cli("pull", ref)
    container = run_container(clean_dockerd, ref, unique("c"))
    v2 = image_builder.publish(ref, "v2")
    daemon_factory("--docker", clean_dockerd.url, "--repull_period", "1h")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = clean_dockerd.inspect(container)
        if state is not None and not state["State"]["Running"]:
            break
        time.sleep(0.1)
    assert clean_dockerd.image_id(ref) == v2.image_id
    state = clean_dockerd.inspect(container)
    assert state is not None and not state["State"]["Running"]


def test_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "twisted", "deployer", "--listen", "127.0.0.1:0"],
        capture_output=True, timeout=60, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
        check=False,
    )
    assert done.returncode != 0
    assert b"DEPLOYER_WEBHOOK_TOKEN" in done.stdout + done.stderr


class _Recorder:
    """A loopback HTTP server that records POSTs: Slack's ``/slack`` answers ``ok``."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.posts: list[tuple[str, dict[str, Any]]] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                recorder.posts.append((self.path, json.loads(body)))
                answer = b"ok" if self.path == "/slack" else b""
                self.send_response(200 if answer else 204)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, path: str, timeout: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p, body in self.posts:
                if p == path:
                    return body
            time.sleep(0.05)
        raise AssertionError(f"nothing was posted to {path}: {self.posts}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_slack_and_the_report_hear_what_was_deployed(
    clean_dockerd: Dockerd, image_builder: ImageBuilder, daemon_factory: Callable[..., Daemon],
    supervisor_factory: Callable[..., Supervisor],
) -> None:
    recorder = _Recorder()
    try:
        repo = unique("app")
        ref = image_builder.ref(repo, "qa")
        image_builder.publish(ref, "v1")
        clean_dockerd.cli("pull", ref)
        name = unique("c")
        supervisor_factory(name, ref)  # the supervisor starts it again on the new build
        daemon = daemon_factory(
            "--docker", clean_dockerd.url, "--repull_period", "0", "--hostname", "host-a",
            "--slack_webhook_url", f"{recorder.url}/slack", "--slack_username", "qa deploy",
            "--notify_url", f"{recorder.url}/hook", "--min_ready", "1s",
        )
        v2 = image_builder.publish(ref, "v2")
        status, _ = daemon.post_json("/api/deploy", {"repository": ref.rsplit(":", 1)[0],
                                                      "tag": "qa"})
        assert status == 202
        slack = recorder.wait("/slack")
        assert slack == {"text": f"Deploying {name}", "username": "qa deploy"}
        report = recorder.wait("/hook")
        assert report["host"] == "host-a"
        assert report["containers_stopped"] == [name]
        assert report["images"] == {ref: v2.image_id}
        assert report["failures"] == []
    finally:
        recorder.close()


def test_sigterm_ends_the_daemon_while_etcd_never_answers(
    clean_dockerd: Dockerd, tmp_path: Path,
) -> None:
    """A member that accepts connections and never answers must not keep the daemon alive."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        port = silent.getsockname()[1]
        daemon = Daemon(tmp_path, ["--docker", clean_dockerd.url, "--repull_period", "0",
                                   "--etcd_nodes", f"http://127.0.0.1:{port}",
                                   "--etcd_dial_timeout", "120s"])
        daemon.start(healthy=False)
        status, body = daemon.get("/healthz")
        assert status == 503 and "etcd" in body["error"]
        started = time.monotonic()
        # well before the dial timeout, which a daemon waiting for etcd would wait out
        code = daemon.stop(timeout=30)
        assert code in (0, -signal.SIGTERM), daemon.log()[-2000:]
        assert time.monotonic() - started < 30
        assert "Traceback" not in daemon.log()
    finally:
        silent.close()


# -- a connection flood locks nobody out ---------------------------------------------------------


class Tricklers:
    """``count`` connections to ``port``, opened 64 at a time, that send a request one byte a
    second, forever; records when each was asked for and opened (as its thread saw it, which
    may be after the daemon accepted it), and when the daemon closed it."""

    def __init__(self, port: int, count: int) -> None:
        import queue
        import selectors
        import threading
        from concurrent.futures import ThreadPoolExecutor

        self.count = count
        self.asked: dict[int, float] = {}
        self.opened: dict[int, float] = {}
        self.closed: dict[int, float] = {}
        self._sockets: dict[int, socket.socket] = {}
        self._new: queue.Queue[tuple[int, socket.socket]] = queue.Queue()
        self._selector = selectors.DefaultSelector()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

        def open_one(index: int) -> None:
            self.asked[index] = time.monotonic()
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.setblocking(False)
            self.opened[index] = time.monotonic()
            self._new.put((index, s))

        with ThreadPoolExecutor(64) as pool:
            list(pool.map(open_one, range(count)))

    def _close(self, index: int) -> None:
        if index not in self.closed:
            self.closed[index] = time.monotonic()
            self._selector.unregister(self._sockets[index])

    def _run(self) -> None:
        import queue

        request = b"POST /api/deploy HTTP/1.1\r\nHost: deployer\r\nX-Slow: " + b"a" * 10_000
        sent: dict[int, int] = {}
        next_byte = time.monotonic()
        while not self._stop.is_set():
            while True:
                try:
                    index, s = self._new.get_nowait()
                except queue.Empty:
                    break
                self._sockets[index] = s
                sent[index] = 0
                self._selector.register(s, 1, index)  # EVENT_READ
            for key, _ in self._selector.select(timeout=0.02):
                try:
                    data = self._sockets[key.data].recv(4096)
                except OSError:
                    data = b""
                if not data:
                    self._close(key.data)
            if time.monotonic() >= next_byte:
                next_byte += 1.0
                for index, s in list(self._sockets.items()):
                    if index in self.closed:
                        continue
                    try:
                        s.send(request[sent[index]:sent[index] + 1])
                        sent[index] += 1
                    except OSError:
                        self._close(index)

    def wait_all_closed(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.closed) < self.count and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in self._sockets.values():
            s.close()
        self._selector.close()


def test_a_flood_of_trickling_connections_locks_nobody_out(
    clean_dockerd: Dockerd, daemon_factory: Callable[..., Daemon],
) -> None:
    """1,100 connections that send one byte a second, to a daemon limited to 1,024 file
    descriptors (systemd's default): new clients are answered at once, the trickling ones are
    dropped after --request_timeout, and the listener never runs out of descriptors."""
    # Well beyond opening them all: when the listen queue overflows, a connection costs a SYN
    # retransmission (1 s, then 2 s more) before it is open, or is accepted ~1 s after its
    # client saw it open; more than 896 must still be open at once.
    request_timeout = 10.0
    daemon = daemon_factory("--docker", clean_dockerd.url, "--repull_period", "0",
                            "--request_timeout", f"{request_timeout:g}s",
                            wrapper=["prlimit", "--nofile=1024", "--"])
    assert daemon.process is not None
    limits = Path(f"/proc/{daemon.process.pid}/limits").read_text()
    assert re.search(r"Max open files\s+1024\s+1024", limits), limits

    tricklers = Tricklers(daemon.port, 1100)
    try:
        flood_open = max(tricklers.opened.values())
        opening_took = flood_open - min(tricklers.opened.values())
        # While they trickle, new clients are answered at once.
        answers = []
        while time.monotonic() < flood_open + request_timeout - 1:
            asked = time.monotonic()
            status, _ = daemon.get("/healthz", timeout=5)
            answers.append((status, time.monotonic() - asked))
            time.sleep(0.1)
        status, body = daemon.post_json("/api/deploy", {"repository": "myorg/flood"}, timeout=2)
        assert status == 202, body
        assert answers and all(status == 200 for status, _ in answers), answers
        # locked out, a client would wait for a trickler's deadline (seconds); one SYN
        # retransmission (1 s) while the listen queue still holds the flood is allowed
        assert max(seconds for _, seconds in answers) < 2.0, answers
        # And every trickling one is dropped, at its deadline at the latest.
        tricklers.wait_all_closed(request_timeout + 5)
        assert len(tricklers.closed) == 1100, f"{1100 - len(tricklers.closed)} still open"
        lived = sorted(tricklers.closed[i] - tricklers.opened[i] for i in range(1100))
        # Its deadline runs from its accept, which comes after the connection was asked for
        # but may come before its thread (one of 64, on a loaded machine) saw it open.
        at_least = sorted(tricklers.closed[i] - tricklers.asked[i] for i in range(1100))
    finally:
        tricklers.stop()
    assert lived[-1] < request_timeout + 3, lived[-10:]

    m = metrics_of(daemon)
    dropped = {reason: m.get(("deployer_http_connections_dropped_total",
                              (("reason", reason),)), 0.0)
               for reason in ("timeout", "evicted", "refused")}
    assert sum(dropped.values()) >= 1100, dropped
    # More than the limit (1024 - 128 descriptors kept free) trickled at once: beyond it, the
    # ones that waited longest made room (or, while too many were still closing, the newcomer
    # was refused); the others lived until their deadline, not less.
    assert opening_took < request_timeout, opening_took
    assert dropped["evicted"] > 0, dropped
    assert dropped["evicted"] + dropped["refused"] >= 1100 - 896, dropped
    assert dropped["timeout"] >= 500, dropped
    assert at_least[-int(dropped["timeout"])] >= request_timeout - 0.5, at_least[:10]
    assert m[("deployer_http_connections", ())] <= 2
    assert m[("deployer_process_max_fds", ())] == 1024
    log = daemon.log()
    assert "EMFILE" not in log
    assert "dropping client connections" in log


def metrics_of(daemon: Daemon) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    status, body = daemon.get("/metrics")
    assert status == 200
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# -- nothing secret in the log --------------------------------------------------------------------


def test_bare_queries_and_referers_never_reach_the_log(
    clean_dockerd: Dockerd, daemon_factory: Callable[..., Daemon],
) -> None:
    daemon = daemon_factory("--docker", clean_dockerd.url, "--repull_period", "0")
    referer = {"Referer": "https://ci:REFSECRET1@ci.example.com:8443/job/7?token=REFSECRET2"}
    asked = [
        ("POST", "/api/deploy?BARESECRET", False, 401),
        ("POST", "/api/deploy?token=WRONGSECRET&x", False, 401),
        ("GET", "/nothing?VALUESECRET", True, 404),
        ("POST", "/api/deploy?a=VALUESECRET2&BARESECRET2", True, 400),
    ]
    for method, path, auth, expected in asked:
        status, _ = daemon.request(method, path, b"{}", headers=referer, auth=auth)
        assert status == expected, path
    expected_lines = [
        '"POST /api/deploy?*** HTTP/1.1" 401',
        '"POST /api/deploy?token=***&*** HTTP/1.1" 401',
        '"GET /nothing?*** HTTP/1.1" 404',
        '"POST /api/deploy?a=***&*** HTTP/1.1" 400',
    ]
    deadline = time.monotonic() + 30
    while not all(line in daemon.log() for line in expected_lines):
        assert time.monotonic() < deadline, daemon.log()[-3000:]
        time.sleep(0.1)
    log = daemon.log()
    assert log.count('"https://ci.example.com:8443"') == len(asked)
    for secret in ("BARESECRET", "WRONGSECRET", "VALUESECRET", "REFSECRET", "/job/7"):
        assert secret not in log, secret
