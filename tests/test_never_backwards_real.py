"""Never backwards on the real stack: a registry's notification for the previous build, delivered
after the notification of the newer one (as a registry that retries does), changes nothing.

The notifications are the registry's own: ``docker-registry`` posts them to a recorder, and the
test hands them to the daemon (``twistd deployer``, standalone, ``--replace recreate``) in the
order of a late retry: the newer push first, then the older one with a new event id.
"""

from __future__ import annotations

import copy
import http.server
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.stack.daemon import Daemon
from tests.stack.docker_stack import (
    Dockerd,
    ImageBuilder,
    Registry,
    StackError,
    unique,
    wait_until,
)

pytestmark = pytest.mark.real

EVENTS_TYPE = "application/vnd.docker.distribution.events.v2+json"


class Recorder:
    """An HTTP endpoint on 127.0.0.1 that keeps every notification envelope posted to it."""

    def __init__(self) -> None:
        self.envelopes: list[dict[str, Any]] = []
        recorder = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                recorder.envelopes.append(json.loads(body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/events"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def manifest_push(self, digest: str, timeout: float = 30.0) -> dict[str, Any]:
        """The envelope of the manifest push of ``digest`` (with that event alone)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for envelope in list(self.envelopes):
                for event in envelope.get("events", []):
                    target = event.get("target", {})
                    if (event.get("action") == "push" and target.get("digest") == digest
                            and target.get("tag")
                            and "manifest" in target.get("mediaType", "")):
                        return {**envelope, "events": [event]}
            time.sleep(0.1)
        raise AssertionError(f"no manifest push of {digest} in {self.envelopes}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    r = Recorder()
    yield r
    r.close()


def test_a_late_notification_for_the_previous_build_changes_nothing(
    tmp_path: Path, clean_dockerd: Dockerd, image_builder: ImageBuilder,
    registry_factory: Callable[..., Registry], recorder: Recorder,
) -> None:
    engine = clean_dockerd
    registry = registry_factory(notify_url=recorder.url)
    builder = image_builder.builder()
    ref = f"{registry.host}/{unique('late')}:qa"
    v1_id = image_builder.build(builder, ref, "v1")
    v1_digest = image_builder.push(builder, ref)
    engine.cli("pull", ref)
    name = unique("web")
    engine.cli("run", "-d", "--name", name, "--restart", "unless-stopped", ref)
    v2_id = image_builder.build(builder, ref, "v2")
    v2_digest = image_builder.push(builder, ref)
    v1_event, v2_event = recorder.manifest_push(v1_digest), recorder.manifest_push(v2_digest)
    assert v1_event["events"][0]["timestamp"] < v2_event["events"][0]["timestamp"]

    daemon = Daemon(tmp_path, ["--docker", engine.url, "--repull_period", "0",
                               "--replace", "recreate", "--min_ready", "1s",
                               "--hostname", "solo"]).start()
    try:
        status, body = daemon.request("POST", "/api/registry/events",
                                      json.dumps(v2_event).encode(),
                                      headers={"Content-Type": EVENTS_TYPE})
        assert status == 200, body
        wait_until(lambda: (engine.inspect(name) or {}).get("Image") == v2_id, 60,
                   f"{name} on v2", 0.2)
        wait_until(lambda: f"re-created {name} on" in daemon.log(), 30, "the replacement", 0.2)
        before = engine.inspect(name)
        assert before is not None

        late = copy.deepcopy(v1_event)  # what a registry's retry looks like: its first time,
        late["events"][0]["id"] = unique("retry")  # a new delivery of the old push
        status, body = daemon.request("POST", "/api/registry/events",
                                      json.dumps(late).encode(),
                                      headers={"Content-Type": EVENTS_TYPE})
        assert status == 200, body
        assert [u["digest"] for u in body["updates"]] == [v1_digest]  # accepted, then judged
        wait_until(lambda: "skipping the update of" in daemon.log(), 30, "the skip", 0.1)
        time.sleep(2.0)  # and nothing happens afterwards

        after = engine.inspect(name)
        assert after is not None
        assert after["Id"] == before["Id"] and after["State"]["Running"]
        assert after["Image"] == v2_id != v1_id
        assert after["State"]["StartedAt"] == before["State"]["StartedAt"]
        assert engine.image_id(ref) == v2_id  # the tag never moved back
        [line] = [line for line in daemon.log().splitlines() if "skipping the update of" in line]
        assert ref in line and v1_digest in line and v2_digest in line and "older than" in line
        assert daemon.log().count(f"pulled {ref}") == 1  # the late one was not even pulled
    except (AssertionError, StackError):
        print(daemon.log()[-5000:])
        raise
    finally:
        code = daemon.stop()
    assert "Traceback" not in daemon.log()
    assert code in (0, -signal.SIGTERM)

    # A daemon that knows nothing yet (it just started) finds the registry's tag moved on.
    fresh = Daemon(tmp_path, ["--docker", engine.url, "--repull_period", "0",
                              "--replace", "recreate", "--min_ready", "1s",
                              "--hostname", "solo"]).start()
    try:
        late["events"][0]["id"] = unique("retry")
        status, body = fresh.request("POST", "/api/registry/events", json.dumps(late).encode(),
                                     headers={"Content-Type": EVENTS_TYPE})
        assert status == 200, body
        wait_until(lambda: "now points at" in fresh.log(), 30, "the pull by tag", 0.1)
        [line] = [line for line in fresh.log().splitlines() if "now points at" in line]
        assert f"not deploying {ref} at {v1_digest}" in line and v2_digest in line
        time.sleep(1.0)
        again = engine.inspect(name)
        assert again is not None and again["Id"] == before["Id"] and again["Image"] == v2_id
        assert engine.image_id(ref) == v2_id
    finally:
        code = fresh.stop()
    assert "Traceback" not in fresh.log()
    assert code in (0, -signal.SIGTERM)
