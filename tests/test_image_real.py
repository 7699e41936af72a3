"""The container image: built here from the Dockerfile, with no network, and run.

The base is Debian's python3 (debootstrap, see tests/stack/debian_stack.py) imported into a
private engine; the build context is the checkout plus a wheelhouse (``pip wheel . -w
wheels``), so the build fetches nothing. The image then runs on that engine with another
engine's socket mounted, and a webhook deploys there.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from typing import Any

import attrs
import pytest

from tests.stack.daemon import log_line_problem
from tests.stack.debian_stack import build_wheels, copy_project, debian_rootfs
from tests.stack.docker_stack import (
    Dockerd,
    ImageBuilder,
    StackError,
    Supervisor,
    free_port,
    require_binary,
    unique,
    wait_until,
)

pytestmark = [pytest.mark.real, pytest.mark.slow]

BASE = "local/debian-python3:bookworm"
IMAGE = "local/deployer:test"
TOKEN = "image-test-token-0123456789"
MB = 1e6


@attrs.frozen
class Built:
    engine: Dockerd
    size: int
    base_size: int
    debootstrap_seconds: float | None
    import_seconds: float
    wheel_seconds: float
    build_seconds: float


def docker(engine: Dockerd, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """The docker CLI against ``engine``, whatever its exit status (the classic builder: the
    Dockerfile must build with it, and BuildKit's CLI plugin may not be installed)."""
    env = {**os.environ, "DOCKER_CONFIG": str(engine.base / "cli"), "DOCKER_BUILDKIT": "0"}
    return subprocess.run([require_binary("docker"), "-H", engine.url, *args], env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory,
          dockerd_factory: Callable[..., Dockerd]) -> Built:
    rootfs, debootstrap_seconds = debian_rootfs()
    engine = dockerd_factory()
    started = time.monotonic()
    engine.cli("import", str(rootfs), BASE, timeout=600)
    import_seconds = time.monotonic() - started

    context = copy_project(tmp_path_factory.mktemp("context"))
    started = time.monotonic()
    build_wheels(["."], context / "wheels")
    wheel_seconds = time.monotonic() - started

    started = time.monotonic()
    done = docker(engine, "build", "--build-arg", f"BASE={BASE}", "-t", IMAGE, str(context),
                  timeout=900)
    build_seconds = time.monotonic() - started
    if done.returncode != 0:
        raise StackError(f"docker build failed:\n{done.stdout[-4000:]}\n{done.stderr[-3000:]}")

    def size(ref: str) -> int:
        return int(engine.cli("image", "inspect", "--format", "{{.Size}}", ref).strip())

    built = Built(engine, size(IMAGE), size(BASE), debootstrap_seconds, import_seconds,
                  wheel_seconds, build_seconds)
    print(
        f"\nimage {IMAGE}: {built.size / MB:.1f} MB, of which the base {built.base_size / MB:.1f}"
        f" MB and deployer {(built.size - built.base_size) / MB:.1f} MB; debootstrap"
        f" {'cached' if debootstrap_seconds is None else f'{debootstrap_seconds:.0f} s'},"
        f" import {import_seconds:.1f} s, pip wheel {wheel_seconds:.1f} s,"
        f" docker build {build_seconds:.1f} s"
    )
    for line in done.stdout.splitlines():
        if "prune_venv: dropping" in line:
            print(line.strip())
    return built


# What txaioetcd's package brings and deployer never loads (it takes only txaioetcd/_types.py,
# which needs six): scripts/prune_venv.py leaves these out of the image.
DROPPED = ("zlmdb", "numpy", "aiohttp", "yarl", "multidict", "frozenlist", "aiosignal", "cbor2",
           "pynacl", "pyyaml", "click", "txaio")
# What deployer needs through its requirements' extras and markers (twisted[tls] from treq:
# pyOpenSSL, then cryptography, cffi and pycparser), and six for txaioetcd/_types.py.
KEPT = ("twisted", "klein", "treq", "attrs", "txaioetcd", "prometheus-client", "six",
        "pyopenssl", "service-identity", "cryptography", "cffi", "pycparser", "idna")
IMAGE_CHECK = """
import importlib, importlib.metadata, importlib.util, json, os, pkgutil, re, sys
assert not os.path.exists('/src'), 'the build context is in the image'
assert importlib.util.find_spec('pip') is None, 'pip is in the venv'
assert importlib.util.find_spec('twisted.test') is None, 'test suites are in the image'
assert sys.prefix == '/opt/deployer', sys.prefix
import deployer, deployer.service
modules = [m.name for m in pkgutil.walk_packages(deployer.__path__, 'deployer.',
                                                 onerror=sys.exit)]
failed = {}
for name in modules:
    try:
        importlib.import_module(name)
    except ImportError as e:
        failed[name] = repr(e)
installed = sorted(re.sub(r'[-_.]+', '-', d.metadata['Name']).lower()
                   for d in importlib.metadata.distributions())
print(json.dumps({'modules': modules, 'failed': failed, 'installed': installed,
                  'importable': [m for m in ('numpy', 'zlmdb', 'aiohttp', 'lmdb', 'nacl', 'yaml')
                                 if importlib.util.find_spec(m) is not None]}))
"""


def test_the_image_is_small_and_holds_no_build_tools(image: Built) -> None:
    added = image.size - image.base_size
    # Measured: 41.5 MB over the 169.2 MB base, mostly Twisted and cryptography (127.0 MB
    # before the virtualenv was pruned of what txaioetcd brings: zlmdb, numpy, aiohttp...).
    assert added < 50 * MB, f"deployer adds {added / MB:.1f} MB to its base"
    done = docker(image.engine, "run", "--rm", "--entrypoint", "python3", IMAGE, "-c",
                  IMAGE_CHECK)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    # Every deployer module imports in the image, with only what was kept; but the test doubles,
    # whose treq.testing needs Twisted's test suite (left out of the image).
    assert "deployer.service" in found["modules"] and "deployer.etcd.client" in found["modules"]
    assert len(found["modules"]) > 50, found["modules"]
    doubles = {name for name in found["modules"] if "testing" in name.split(".")}
    assert "deployer.testing.fake_etcd" in doubles
    assert set(found["failed"]) <= doubles, found["failed"]
    assert all("twisted.test" in why for why in found["failed"].values()), found["failed"]
    assert found["importable"] == []
    assert set(KEPT) <= set(found["installed"]), found["installed"]
    assert not set(DROPPED) & set(found["installed"]), found["installed"]
    assert not {"pip", "setuptools", "wheel"} & set(found["installed"]), found["installed"]
    config = json.loads(image.engine.cli("image", "inspect", IMAGE))[0]["Config"]
    assert config["Entrypoint"][:3] == ["twistd", "--nodaemon", "--pidfile="]
    assert config["Entrypoint"][-1] == "deployer"
    assert "/healthz" in " ".join(config["Healthcheck"]["Test"])


def test_the_entrypoint_help_and_usage_errors(image: Built) -> None:
    done = docker(image.engine, "run", "--rm", IMAGE, "--help")
    assert done.returncode == 0, done.stderr
    assert "--etcd_nodes=" in done.stdout and "--webhook_token=" in done.stdout

    for args, words in (
        (["--bogus"], "option --bogus not recognized"),
        (["--etcd_nodes=http://127.0.0.1:2379"], "DEPLOYER_WEBHOOK_TOKEN"),
        (["--webhook_token", "t" * 20, "--kill_timeout", "soon"], "kill_timeout"),
    ):
        done = docker(image.engine, "run", "--rm", IMAGE, *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stderr.count("\n") == 1 and words in done.stderr, done.stderr
        assert done.stderr.startswith("twistd deployer: ")
        assert "Traceback" not in done.stderr + done.stdout
        assert done.stdout == ""


@pytest.fixture
def container(image: Built) -> Iterator[str]:
    name = unique("deployer")
    try:
        yield name
    finally:
        docker(image.engine, "rm", "-f", name)


def health(engine: Dockerd, name: str) -> str:
    state = engine.inspect(name)
    if state is None:
        return "gone"
    if not state["State"]["Running"]:
        return f"exited {state['State']['ExitCode']}"
    return str(state["State"].get("Health", {}).get("Status"))


def test_the_image_deploys_on_the_engine_whose_socket_it_has(
    image: Built, container: str, clean_dockerd: Dockerd, image_builder: ImageBuilder,
    supervisor_factory: Callable[..., Supervisor],
) -> None:
    repo = unique("app")
    ref = image_builder.ref(repo, "qa")
    v1 = image_builder.publish(ref, "v1")
    clean_dockerd.cli("pull", ref)
    supervisor = supervisor_factory(unique("c"), ref, clean_dockerd)
    supervisor.wait_running_image_blocking(v1.image_id)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    done = docker(
        image.engine, "run", "-d", "--name", container, "--network", "host",
        "-v", f"{clean_dockerd.socket}:/var/run/docker.sock",
        "-e", f"DEPLOYER_WEBHOOK_TOKEN={TOKEN}", "-e", "DEPLOYER_LOG_FORMAT=json",
        "-e", f"DEPLOYER_HEALTHZ_URL={url}/healthz", "--health-interval", "1s",
        IMAGE, "--listen", f"127.0.0.1:{port}", "--repull_period", "0",
    )
    assert done.returncode == 0, done.stderr

    def logs() -> str:
        return docker(image.engine, "logs", container).stdout

    try:
        wait_until(lambda: health(image.engine, container) == "healthy", 60,
                   "the deployer container's HEALTHCHECK to pass", 0.2,
                   lambda: None if health(image.engine, container) in ("starting", "healthy")
                   else health(image.engine, container))
    except StackError as e:
        raise StackError(f"{e}\n{logs()[-3000:]}") from None

    v2 = image_builder.publish(ref, "v2")
    status = post(url + "/api/deploy", {"repository": f"{image_builder.registry.host}/{repo}",
                                        "tag": "qa"})
    assert status == 202
    supervisor.wait_running_image_blocking(v2.image_id, timeout=60)

    started = time.monotonic()
    image.engine.cli("stop", "--time", "10", container)
    stopped_in = time.monotonic() - started
    state = image.engine.inspect(container)
    assert state is not None
    # 0, not 137: it ended on SIGTERM, before docker stop's 10 s grace ran out; and at once
    # (~0.4 s idle, with the CLI's start and dockerd's own work): within half the grace
    assert state["State"]["ExitCode"] == 0, logs()[-3000:]
    assert stopped_in < 5.0, f"docker stop took {stopped_in:.2f} s"
    print(f"\ndocker stop of the deployer container: {stopped_in:.2f} s")

    out = logs()
    problems = [(line, why) for line in out.splitlines() if (why := log_line_problem(line))]
    assert problems == [], problems[:5]
    assert TOKEN not in out
    events = [json.loads(line) for line in out.splitlines()]
    assert any(e.get("repository") == f"{image_builder.registry.host}/{repo}"
               and "accepted update" in e["message"] for e in events), out[-3000:]
    assert any("Received SIGTERM" in e["message"] for e in events)
    assert "Traceback" not in out


def post(url: str, payload: Any) -> int:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json",
                                              "Authorization": f"Bearer {TOKEN}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
