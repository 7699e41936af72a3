"""The daemon as users run it (``twist deployer``), standalone, on a real dockerd and registry."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.stack.daemon import Daemon
from tests.stack.docker_stack import Dockerd, ImageBuilder, run_container, unique

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
    supervisor.wait_running_image_blocking(v2.image_id, timeout=30)
    assert clean_dockerd.image_id(ref) == v2.image_id
    assert "stopped" in daemon.log()


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
    deadline = time.monotonic() + 20
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
    deadline = time.monotonic() + 20
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

    def wait(self, path: str, timeout: float = 20.0) -> dict[str, Any]:
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
) -> None:
    recorder = _Recorder()
    try:
        repo = unique("app")
        ref = image_builder.ref(repo, "qa")
        image_builder.publish(ref, "v1")
        clean_dockerd.cli("pull", ref)
        name = unique("c")
        run_container(clean_dockerd, ref, name)
        daemon = daemon_factory(
            "--docker", clean_dockerd.url, "--repull_period", "0", "--hostname", "host-a",
            "--slack_webhook_url", f"{recorder.url}/slack", "--slack_username", "qa deploy",
            "--notify_url", f"{recorder.url}/hook",
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
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    try:
        port = silent.getsockname()[1]
        daemon = Daemon(tmp_path, ["--docker", clean_dockerd.url, "--repull_period", "0",
                                   "--etcd_nodes", f"http://127.0.0.1:{port}",
                                   "--etcd_dial_timeout", "30s"])
        daemon.start(healthy=False)
        status, body = daemon.get("/healthz")
        assert status == 503 and "etcd" in body["error"]
        started = time.monotonic()
        code = daemon.stop(timeout=10)
        assert code in (0, -signal.SIGTERM), daemon.log()[-2000:]
        assert time.monotonic() - started < 10
        assert "Traceback" not in daemon.log()
    finally:
        silent.close()


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
    deadline = time.monotonic() + 10
    while not all(line in daemon.log() for line in expected_lines):
        assert time.monotonic() < deadline, daemon.log()[-3000:]
        time.sleep(0.1)
    log = daemon.log()
    assert log.count('"https://ci.example.com:8443"') == len(asked)
    for secret in ("BARESECRET", "WRONGSECRET", "VALUESECRET", "REFSECRET", "/job/7"):
        assert secret not in log, secret
