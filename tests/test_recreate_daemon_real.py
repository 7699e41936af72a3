"""``--replace recreate`` and the ``deployer.enable`` labels through the daemon process
(``twistd deployer``), standalone, on a real dockerd and registry: a push (``POST
/api/deploy``) re-creates a ``docker run`` container with all of its options on the new build,
and leaves the containers that its labels keep out untouched."""

from __future__ import annotations

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
    Published,
    StackError,
    free_port,
    unique,
    wait_until,
)

pytestmark = pytest.mark.real


@pytest.fixture
def daemons(tmp_path: Path, clean_dockerd: Dockerd) -> Iterator[Callable[..., Daemon]]:
    """``daemons(*args)``: a started standalone daemon on the session's engine, re-creating
    stale containers; stopped after the test, which checks its log (JSON lines, no secret, no
    traceback) and its exit."""
    started: list[Daemon] = []

    def start(*args: str) -> Daemon:
        daemon = Daemon(tmp_path, ["--docker", clean_dockerd.url, "--repull_period", "0",
                                   "--replace", "recreate", "--min_ready", "1s",
                                   "--ready_timeout", "60s", "--hostname", "solo", *args])
        started.append(daemon)
        return daemon.start()

    yield start
    for daemon in started:
        code = daemon.stop()
        log = daemon.log()
        assert "Traceback" not in log, log[-5000:]
        assert code in (0, -signal.SIGTERM), f"deployer exited with {code}:\n{log[-3000:]}"


@pytest.fixture
def cleanups(clean_dockerd: Dockerd) -> Iterator[list[tuple[str, ...]]]:
    """docker commands to run after the test (its containers are removed before them)."""
    commands: list[tuple[str, ...]] = []
    yield commands
    clean_dockerd.remove_all_containers()
    for command in commands:
        try:
            clean_dockerd.cli(*command)
        except StackError:
            pass


def push(daemon: Daemon, ref: str) -> None:
    """What a CI job does after ``docker push``: ``POST /api/deploy``."""
    repository, _, tag = ref.rpartition(":")
    status, body = daemon.post_json("/api/deploy", {"repository": repository, "tag": tag})
    assert status == 202, body


def rounds(daemon: Daemon) -> float:
    """Rounds the daemon finished (``deployer_rounds_total``, any result)."""
    status, body = daemon.get("/metrics")
    assert status == 200
    text = body.decode() if isinstance(body, bytes) else str(body)
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("deployer_rounds_total{"))


def wait_round(daemon: Daemon, before: float, timeout: float = 60.0) -> None:
    wait_until(lambda: rounds(daemon) > before, timeout, "the round to end", 0.2)


def running(engine: Dockerd, name: str) -> dict[str, Any]:
    state = engine.inspect(name)
    assert state is not None, f"no container {name}"
    return state


def wait_image(engine: Dockerd, name: str, image: Published, daemon: Daemon,
               timeout: float = 60.0) -> dict[str, Any]:
    def on_it() -> bool:
        state = engine.inspect(name)
        return state is not None and state["Image"] == image.image_id \
            and state["State"]["Running"]

    try:
        wait_until(on_it, timeout, f"{name} running {image.ref}", 0.2)
    except StackError as e:
        raise StackError(f"{e}\n{daemon.log()[-5000:]}") from None
    return running(engine, name)


def test_a_push_recreates_a_docker_run_container_with_everything_kept(
    clean_dockerd: Dockerd, image_builder: ImageBuilder, daemons: Callable[..., Daemon],
    cleanups: list[tuple[str, ...]],
) -> None:
    engine = clean_dockerd
    ref = image_builder.ref(unique("web"), "qa")
    v1 = image_builder.publish(ref, "v1", ["EXPOSE 80"])
    engine.cli("pull", ref)
    name, network, volume = unique("web"), unique("net"), unique("vol")
    port = free_port()
    engine.cli("network", "create", network)
    engine.cli("volume", "create", volume)
    cleanups += [("network", "rm", network), ("volume", "rm", volume)]
    old_id = engine.cli(
        "run", "-d", "--name", name, "--restart", "unless-stopped", "-e", "GREETING=hello",
        "-l", "team=web", "-v", f"{volume}:/data", "-p", f"127.0.0.1:{port}:80",
        "--hostname", "webhost", "--network", network, "--network-alias", "www",
        ref, "sh", "-c", "echo kept > /data/f; exec sh /app/run.sh").strip()
    daemon = daemons()
    v2 = image_builder.publish(ref, "v2", ["EXPOSE 80"])

    push(daemon, ref)

    new = wait_image(engine, name, v2, daemon)
    assert new["Id"] != old_id
    wait_until(lambda: engine.inspect(old_id) is None, 30, "the old container removed", 0.2)
    names = engine.cli("ps", "-a", "--format", "{{.Names}}").split()
    assert names == [name]  # no temporary or previous container left
    config, host = new["Config"], new["HostConfig"]
    assert config["Image"] == ref  # by name, so that the next round finds it
    assert "GREETING=hello" in config["Env"]
    assert config["Labels"]["team"] == "web"
    assert config["Labels"]["version"] == "v2"  # the new build's own label
    assert config["Hostname"] == "webhost"
    assert config["Cmd"] == ["sh", "-c", "echo kept > /data/f; exec sh /app/run.sh"]
    assert host["RestartPolicy"]["Name"] == "unless-stopped"
    assert host["PortBindings"] == {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}
    [mount] = [m for m in new["Mounts"] if m["Destination"] == "/data"]
    assert (mount["Type"], mount["Name"]) == ("volume", volume)
    assert engine.cli("exec", name, "cat", "/data/f").strip() == "kept"
    endpoint = new["NetworkSettings"]["Networks"][network]
    assert "www" in (endpoint.get("Aliases") or [])
    assert engine.cli("exec", name, "cat", "/app/version").strip() == "v2"
    # The port is published for the new container: the engine's proxy listens on it.
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    # The restart policy holds: when its process ends, the engine starts it again.
    # Detached: the exec's own shell dies with the container (exit 137) when PID 1 ends.
    engine.cli("exec", "-d", name, "sh", "-c", "kill -TERM 1")
    wait_until(lambda: running(engine, name)["State"]["Running"]
               and running(engine, name)["RestartCount"] >= 1, 30, "restarted by dockerd", 0.2)
    assert running(engine, name)["Image"] == v2.image_id
    # The daemon logs it once the old container's removal is answered, which may come after
    # the test saw the old one gone.
    wait_until(lambda: f"re-created {name} on" in daemon.log(), 30, "the re-creation logged",
               0.2)
    assert v1.image_id != v2.image_id


def test_deployer_enable_false_keeps_a_container_out(
    clean_dockerd: Dockerd, image_builder: ImageBuilder, daemons: Callable[..., Daemon],
    cleanups: list[tuple[str, ...]],
) -> None:
    engine = clean_dockerd
    ref = image_builder.ref(unique("pair"), "qa")
    v1 = image_builder.publish(ref, "v1")
    engine.cli("pull", ref)
    web, pinned = unique("web"), unique("pinned")
    engine.cli("run", "-d", "--name", web, "--restart", "unless-stopped", ref)
    pinned_id = engine.cli("run", "-d", "--name", pinned, "--restart", "unless-stopped",
                           "-l", "deployer.enable=false", ref).strip()
    daemon = daemons()
    v2 = image_builder.publish(ref, "v2")
    before = rounds(daemon)

    push(daemon, ref)

    wait_image(engine, web, v2, daemon)
    wait_round(daemon, before)
    state = running(engine, pinned)
    assert state["Id"] == pinned_id and state["State"]["Running"]
    assert state["Image"] == v1.image_id and state["RestartCount"] == 0
    assert state["State"]["StartedAt"] < running(engine, web)["State"]["StartedAt"]
    assert f"{pinned} runs an older image of {ref} but its labels keep it out" in daemon.log()


def test_label_enable_touches_only_the_labelled_container(
    clean_dockerd: Dockerd, image_builder: ImageBuilder, daemons: Callable[..., Daemon],
    cleanups: list[tuple[str, ...]],
) -> None:
    engine = clean_dockerd
    ref = image_builder.ref(unique("opt"), "qa")
    v1 = image_builder.publish(ref, "v1")
    engine.cli("pull", ref)
    opted, plain = unique("opted"), unique("plain")
    opted_id = engine.cli("run", "-d", "--name", opted, "--restart", "unless-stopped",
                          "-l", "deployer.enable=true", ref).strip()
    plain_id = engine.cli("run", "-d", "--name", plain, "--restart", "unless-stopped",
                          ref).strip()
    daemon = daemons("--label_enable")
    v2 = image_builder.publish(ref, "v2")
    before = rounds(daemon)

    push(daemon, ref)

    new = wait_image(engine, opted, v2, daemon)
    assert new["Id"] != opted_id and new["Config"]["Labels"]["deployer.enable"] == "true"
    wait_round(daemon, before)
    time.sleep(1.0)  # nothing comes after the round either
    state = running(engine, plain)
    assert state["Id"] == plain_id and state["State"]["Running"]
    assert state["Image"] == v1.image_id and state["RestartCount"] == 0
    assert f"{plain} runs an older image of {ref} but its labels keep it out" in daemon.log()
