"""``--replace recreate`` against a real private dockerd: :class:`RecreateReplacer` re-creates
containers run with ``docker run`` options (and Compose's labels) on a new build, keeps all of
them, puts the previous container back when the new build is not ready, and touches nothing it
cannot re-create."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs

from deployer.backoff import backoff
from deployer.docker import Container, DockerClient
from deployer.engine_address import engine_agent, engine_pool
from deployer.events import EngineEvents, since_param
from deployer.readiness import NotReady, NotReadyReason, Ready, ReadyRules
from deployer.recreate import RecreateReplacer
from deployer.replace import Replacement
from tests.stack.docker_stack import Dockerd, StackError, build_image, free_port, unique, wait_until
from tests.stack.health_images import FAILING_TEST, build_dying_image, build_health_image

pytestmark = pytest.mark.real

RULES = ReadyRules(min_ready=1.0, ready_timeout=60.0)


class Host:
    """One engine, its client, its events and a replacer."""

    def __init__(self, dockerd: Dockerd) -> None:
        self.dockerd = dockerd
        pool = engine_pool(reactor)
        self.client = DockerClient(reactor, engine_agent(reactor, dockerd.url, pool), pool=pool)
        self.events = EngineEvents(reactor, self.client, retry=backoff(0.2, 1.0))
        self.replacer = RecreateReplacer(reactor, self.client, self.events, RULES,
                                         kill_timeout=5)
        self.cleanups: list[tuple[str, ...]] = []

    def cli(self, *args: str) -> Any:
        return self.dockerd.acli(*args)

    async def build(self, build: Any, ref: str, version: str, **kw: Any) -> str:
        image_id: str = await threads.deferToThread(build, self.dockerd, ref, version, **kw)
        return image_id

    async def container(self, name: str) -> Container:
        for c in await self.client.containers():
            if c.name == name:
                return c
        raise AssertionError(f"no running container {name}")

    async def replacement(self, name: str, app: str, new_image: str) -> Replacement:
        c = await self.container(name)
        return Replacement(c, app, c.image_id, new_image)

    def inspect(self, name: str) -> dict[str, Any]:
        found = self.dockerd.inspect(name)
        assert found is not None, f"no container {name}"
        return found

    def names(self) -> list[str]:
        out = self.dockerd.cli("ps", "-a", "--format", "{{.Names}}")
        return sorted(out.split())


@pytest_twisted.async_yield_fixture
async def host(clean_dockerd: Dockerd) -> AsyncIterator[Host]:
    h = Host(clean_dockerd)
    h.events.startService()
    try:
        yield h
    finally:
        await h.events.stopService()
        await h.client.close()
        clean_dockerd.remove_all_containers()
        for args in h.cleanups:
            try:
                clean_dockerd.cli(*args)
            except StackError:
                pass


def _exec(dockerd: Dockerd, name: str, script: str) -> str:
    return dockerd.cli("exec", name, "sh", "-c", script)


@pytest_twisted.ensureDeferred
async def test_a_docker_run_container_is_recreated_with_all_its_options(host: Host) -> None:
    app, name = f"{unique('app')}:qa", unique("web")
    front, back, volume = unique("front"), unique("back"), unique("vol")
    port = free_port()
    await host.build(build_image, app, "v1", changes=["ENV A=1 PATH=/bin", "VOLUME /data"])
    for args in (("network", "create", front), ("network", "create", back),
                 ("volume", "create", volume)):
        await host.cli(*args)
    host.cleanups += [("network", "rm", front, back), ("volume", "rm", volume)]
    await host.cli(
        "run", "-d", "--name", name, "--restart", "unless-stopped", "-e", "B=2", "-l", "mine=1",
        "-v", f"{volume}:/v1", "-v", "/anon", "-p", f"127.0.0.1:{port}:80",
        "--hostname", "webhost", "--network", front, "--network-alias", "www",
        "--stop-timeout", "3", app)
    await host.cli("network", "connect", "--alias", "wb", back, name)
    await threads.deferToThread(_exec, host.dockerd, name,
                                "echo named > /v1/f; echo anon > /anon/f; echo image > /data/f")
    old = host.inspect(name)
    v2 = await host.build(build_image, app, "v2", changes=["ENV A=2 PATH=/bin", "VOLUME /data"])

    result = await host.replacer.replace(await host.replacement(name, app, v2))

    assert isinstance(result, Ready), result
    new = host.inspect(name)
    assert new["Id"] == result.container_id != old["Id"]
    assert new["Image"] == v2 and new["State"]["Running"]
    assert new["Config"]["Image"] == app  # the name, so that later rounds find it
    assert host.dockerd.inspect(old["Id"]) is None  # the old container is gone
    assert host.names() == [name]
    config, hc = new["Config"], new["HostConfig"]
    assert sorted(config["Env"]) == ["A=2", "B=2", "PATH=/bin"]  # A from the new image
    assert config["Labels"]["mine"] == "1"
    assert config["Labels"]["version"] == "v2"  # the new image's, not the old one's
    assert config["Hostname"] == "webhost"
    assert config["Cmd"] == ["/bin/sh", "/app/run.sh"]
    assert config["StopTimeout"] == 3
    assert hc["RestartPolicy"]["Name"] == "unless-stopped"
    assert hc["PortBindings"] == {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(port)}]}
    assert hc["Binds"] == [f"{volume}:/v1"]
    assert hc["NetworkMode"] == front
    networks = new["NetworkSettings"]["Networks"]
    assert set(networks) == {front, back}
    assert "www" in networks[front]["Aliases"] and "wb" in networks[back]["Aliases"]
    for aliases in (networks[front]["Aliases"], networks[back]["Aliases"]):
        assert old["Id"][:12] not in aliases
    # every volume kept its data, the anonymous ones included
    out = await threads.deferToThread(_exec, host.dockerd, name,
                                      "cat /v1/f /anon/f /data/f")
    assert out.split() == ["named", "anon", "image"]
    # the port answers on the new container (docker-proxy listens again)
    ports = json.loads(await host.cli("inspect", "--format", "{{json .NetworkSettings.Ports}}",
                                      name))
    assert ports["80/tcp"][0]["HostPort"] == str(port)


@pytest_twisted.ensureDeferred
async def test_commands_set_by_the_user_stay_and_image_defaults_follow_the_new_image(
    host: Host,
) -> None:
    app = f"{unique('app')}:qa"
    image = ['ENTRYPOINT ["/bin/sh"]', "WORKDIR /app", "ENV MODE=one"]
    await host.build(build_image, app, "v1", changes=[*image, 'CMD ["/app/run.sh"]'])
    defaults, cleared, command = unique("defaults"), unique("cleared"), unique("command")
    await host.cli("run", "-d", "--name", defaults, app)
    await host.cli("run", "-d", "--name", cleared, "--entrypoint", "", "-w", "/tmp", app,
                   "/bin/sh", "/app/run.sh")
    await host.cli("run", "-d", "--name", command, "-e", "MODE=mine", app,
                   "-c", "exec /app/run.sh")
    v2 = await host.build(build_image, app, "v2", changes=[
        'ENTRYPOINT ["/bin/sh"]', "WORKDIR /", "ENV MODE=two",
        'CMD ["-c", "sleep 0; exec /app/run.sh"]'])

    for name in (defaults, cleared, command):
        result = await host.replacer.replace(await host.replacement(name, app, v2))
        assert isinstance(result, Ready), result

    config = host.inspect(defaults)["Config"]
    assert (config["Entrypoint"], config["Cmd"]) == (["/bin/sh"],
                                                     ["-c", "sleep 0; exec /app/run.sh"])
    assert config["WorkingDir"] == "/" and "MODE=two" in config["Env"]
    config = host.inspect(cleared)["Config"]
    assert (config["Entrypoint"], config["Cmd"]) == (None, ["/bin/sh", "/app/run.sh"])
    assert config["WorkingDir"] == "/tmp"
    config = host.inspect(command)["Config"]
    assert (config["Entrypoint"], config["Cmd"]) == (["/bin/sh"], ["-c", "exec /app/run.sh"])
    assert "MODE=mine" in config["Env"] and "MODE=two" not in config["Env"]


@pytest_twisted.ensureDeferred
async def test_a_compose_container_keeps_its_labels(host: Host) -> None:
    app, name, project = f"{unique('app')}:qa", unique("demo-web"), unique("demo")
    network = unique("net")
    await host.build(build_image, app, "v1")
    await host.cli("network", "create", network)
    host.cleanups.append(("network", "rm", network))
    labels = {
        "com.docker.compose.project": project, "com.docker.compose.service": "web",
        "com.docker.compose.container-number": "1", "com.docker.compose.oneoff": "False",
        "com.docker.compose.config-hash": "0" * 64, "com.docker.compose.version": "2.20.0",
    }
    options = [x for k, v in labels.items() for x in ("-l", f"{k}={v}")]
    await host.cli("run", "-d", "--name", name, "--restart", "always", "--network", network,
                   "--network-alias", "web", *options, app)
    v2 = await host.build(build_image, app, "v2")

    result = await host.replacer.replace(await host.replacement(name, app, v2))

    assert isinstance(result, Ready), result
    new = host.inspect(name)
    assert new["Image"] == v2
    assert {k: new["Config"]["Labels"].get(k) for k in labels} == labels
    assert "web" in new["NetworkSettings"]["Networks"][network]["Aliases"]
    # what `docker compose ps` asks the engine for
    listed = await host.cli("ps", "--filter", f"label=com.docker.compose.project={project}",
                            "--filter", "label=com.docker.compose.service=web",
                            "--filter", "label=com.docker.compose.oneoff=False",
                            "--format", "{{.Names}} {{.ID}}")
    assert listed.split() == [name, new["Id"][:12]]


@pytest_twisted.ensureDeferred
async def test_an_unhealthy_build_puts_the_previous_container_back(host: Host) -> None:
    app, name = f"{unique('app')}:qa", unique("web")
    v1 = await host.build(build_health_image, app, "v1")
    await host.cli("run", "-d", "--name", name, "--restart", "unless-stopped", "-e", "B=2", app)
    await threads.deferToThread(
        wait_until, lambda: _health(host, name) == "healthy", 30, f"{name} healthy")
    old = host.inspect(name)
    v2 = await host.build(build_health_image, app, "v2", test=FAILING_TEST)
    replacement = await host.replacement(name, app, v2)

    result = await host.replacer.replace(replacement)

    assert isinstance(result, NotReady), result
    assert result.reason is NotReadyReason.UNHEALTHY
    back = host.inspect(name)
    assert back["Id"] == old["Id"] and back["Image"] == v1
    assert back["State"]["Running"]
    assert host.names() == [name]  # the new one is gone, nothing left under other names
    await threads.deferToThread(
        wait_until, lambda: _health(host, name) == "healthy", 30, f"{name} healthy again")
    # the restart policy still holds: it was started again, not left "manually stopped"
    assert host.inspect(name)["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"

    assert host.dockerd.image_id(app) == v2
    await host.replacer.roll_back(replacement, result)
    assert host.dockerd.image_id(app) == v1


@pytest_twisted.ensureDeferred
async def test_a_build_that_exits_puts_the_previous_container_back(host: Host) -> None:
    app, name = f"{unique('app')}:qa", unique("web")
    v1 = await host.build(build_image, app, "v1")
    await host.cli("run", "-d", "--name", name, "--restart", "unless-stopped", app)
    old = host.inspect(name)
    v2 = await host.build(build_dying_image, app, "v2", after=0.2, code=3)

    result = await host.replacer.replace(await host.replacement(name, app, v2))

    assert isinstance(result, NotReady), result
    assert result.reason is NotReadyReason.EXITED
    back = host.inspect(name)
    assert (back["Id"], back["Image"], back["State"]["Running"]) == (old["Id"], v1, True)
    assert host.names() == [name]


@pytest_twisted.ensureDeferred
async def test_a_missing_network_leaves_the_old_container_untouched(host: Host) -> None:
    app, name, network = f"{unique('app')}:qa", unique("web"), unique("net")
    await host.build(build_image, app, "v1")
    await host.cli("network", "create", network)
    await host.cli("run", "-d", "--name", name, "--network", network, app)
    await host.cli("network", "disconnect", network, name)
    await host.cli("network", "rm", network)
    old = host.inspect(name)
    v2 = await host.build(build_image, app, "v2")

    result = await host.replacer.replace(await host.replacement(name, app, v2))

    assert isinstance(result, NotReady), result
    assert result.reason is NotReadyReason.NO_REPLACEMENT
    assert result.detail.startswith("not re-created: its network")
    assert network in result.detail
    now = host.inspect(name)
    assert now["Id"] == old["Id"] and now["State"]["Running"]
    assert now["State"]["StartedAt"] == old["State"]["StartedAt"]  # never stopped
    assert host.names() == [name]


@pytest_twisted.ensureDeferred
async def test_containers_sharing_a_network_namespace_are_refused(host: Host) -> None:
    app, first, follower = f"{unique('app')}:qa", unique("web"), unique("side")
    await host.build(build_image, app, "v1")
    await host.cli("run", "-d", "--name", first, app)
    await host.cli("run", "-d", "--name", follower, "--network", f"container:{first}", app)
    before = {n: host.inspect(n) for n in (first, follower)}
    v2 = await host.build(build_image, app, "v2")

    for name, words in ((follower, "network namespace of another container"),
                        (first, f"{follower} share its network namespace")):
        result = await host.replacer.replace(await host.replacement(name, app, v2))
        assert isinstance(result, NotReady), result
        assert "not re-created" in result.detail and words in result.detail

    for n, old in before.items():
        now = host.inspect(n)
        assert (now["Id"], now["State"]["StartedAt"]) == (old["Id"], old["State"]["StartedAt"])
        assert now["State"]["Running"]
    assert host.names() == sorted([first, follower])


@pytest_twisted.ensureDeferred
async def test_volumes_from_followers_keep_sharing_the_volumes(host: Host) -> None:
    """Docker's rule: a container's volumes outlive it, and ``--volumes-from`` mounted them by
    name; the new container takes the anonymous ones over, so both still share them."""
    app, name, follower = f"{unique('app')}:qa", unique("web"), unique("side")
    await host.build(build_image, app, "v1")
    await host.cli("run", "-d", "--name", name, "-v", "/shared", app)
    await host.cli("run", "-d", "--name", follower, "--volumes-from", name, app)
    await threads.deferToThread(_exec, host.dockerd, follower, "echo before > /shared/f")
    v2 = await host.build(build_image, app, "v2")

    result = await host.replacer.replace(await host.replacement(name, app, v2))

    assert isinstance(result, Ready), result
    await threads.deferToThread(_exec, host.dockerd, follower, "echo after >> /shared/f")
    out = await threads.deferToThread(_exec, host.dockerd, name, "cat /shared/f")
    assert out.split() == ["before", "after"]
    assert host.inspect(follower)["State"]["Running"]
    assert host.names() == sorted([name, follower])


def _health(host: Host, name: str) -> str | None:
    state = host.dockerd.inspect(name)
    if state is None:
        return None
    return str((state["State"].get("Health") or {}).get("Status"))



@pytest_twisted.ensureDeferred
async def test_a_dockerd_restart_mid_swap_does_not_start_the_old_container_again(
    dockerd_factory: Callable[..., Dockerd],
) -> None:
    """dockerd starts a ``--restart always`` container when it starts, even one stopped by hand:
    while the old container waits, stopped, for its replacement to be ready, its policy is set
    aside, so a dockerd that restarts in the middle of the swap leaves it stopped (never two
    builds of the app running side by side), and the swap ends with one container running, with
    the policy it had."""
    engine: Dockerd = await threads.deferToThread(dockerd_factory)
    host = Host(engine)
    # The restart must come while the new container waits to be ready: between the test
    # seeing it run and the restart, a loaded machine may stall for seconds.
    host.replacer.rules = ReadyRules(min_ready=10.0, ready_timeout=30.0)
    host.events.startService()
    try:
        app, name = f"{unique('app')}:qa", unique("web")
        await host.build(build_image, app, "v1")
        await host.cli("run", "-d", "--name", name, "--restart", "always", app)
        old_id = host.inspect(name)["Id"]
        old_name = f"{name}-deployer-old-{old_id[:12]}"
        v2 = await host.build(build_image, app, "v2")
        swap = Deferred.fromCoroutine(
            host.replacer.replace(await host.replacement(name, app, v2)))

        def swapping() -> bool:
            new = engine.inspect(name)
            return new is not None and new["Image"] == v2 and new["State"]["Running"]

        await threads.deferToThread(wait_until, swapping, 20, f"{name} on the new build")
        assert not swap.called
        waiting = host.inspect(old_name)
        assert not waiting["State"]["Running"]
        assert waiting["HostConfig"]["RestartPolicy"]["Name"] == "no"

        restarted = time.time_ns()
        # The reactor is held while dockerd restarts (as if this host were busy): the replacer
        # learns of the new container's end only once dockerd has started what it restarts.
        engine.restart()
        with capturedLogs():
            await swap
        status, body = engine.api("GET", f"/v1.41/events?since={since_param(restarted)}&until="
                                         f"{since_param(time.time_ns())}")
        assert status == 200
        events = [json.loads(line) for line in body.splitlines()]
        starts = [e["Actor"]["Attributes"]["name"] for e in events
                  if e["Action"] == "start" and e["Actor"]["ID"] == old_id]
        assert old_name not in starts, "dockerd started the old container next to its successor"

        def alone() -> bool:
            found = engine.inspect(name)
            return found is not None and engine.container_ids() == [found["Id"]]

        await threads.deferToThread(wait_until, alone, 20, f"{name} alone running")
        assert host.inspect(name)["HostConfig"]["RestartPolicy"]["Name"] == "always"
    finally:
        await host.events.stopService()
        await host.client.close()
