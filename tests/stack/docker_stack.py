"""The real Docker stack as pytest fixtures.

Private ``dockerd`` engines (one shared per session, more on demand), a local ``docker-registry``
(optionally notifying a webhook), a registry that hangs on every manifest request, test images
built without the internet from a busybox rootfs, and a supervisor loop that restarts a
container the way systemd's ``Restart=always`` does.

Every process started here is torn down by its fixture, also when a test fails: dockerd gets
SIGTERM, then SIGKILL for itself, its containerd, its shims and the processes left in its cgroups;
mounts left under its directory are unmounted and the directory is removed.

The helpers block (they run the docker CLI or poll over HTTP). Inside a test that runs code on
the reactor, use the ``a``-prefixed variants (:meth:`Dockerd.acli`,
:meth:`Supervisor.wait_running_image`), which run in the reactor's thread pool.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import http.client
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet import threads
from twisted.internet.defer import Deferred

from tests.stack.ports import address_in_use, free_port, on_fresh_ports

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "sleep", "test", "touch", "cat", "echo")
RUN_SH = 'trap "exit 0" TERM\ntouch /tmp/healthy\nwhile true; do sleep 1 & wait $!; done\n'
MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"

_PACKAGES = {
    "dockerd": "docker.io",
    "docker": "docker.io",
    "docker-registry": "docker-registry",
    "umount": "mount",
}


class StackError(RuntimeError):
    """A process of the test stack did not start, answer or stop as expected."""


# -- small process helpers ----------------------------------------------------------------------


def require_binary(name: str) -> str:
    """The path of ``name``; fails the test with the package to install when it is missing."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/local/sbin")
    if path is None:
        package = _PACKAGES.get(name, name)
        pytest.fail(
            f"{name!r} is not installed; the real-stack tests need it:"
            f" apt-get install -y {package}",
            pytrace=False,
        )
    return path


def run(
    args: Sequence[str], *, timeout: float = 60.0, input: bytes | None = None,
    env: Mapping[str, str] | None = None,
) -> str:
    """Run a command; its stdout, or :class:`StackError` with its stderr."""
    try:
        done = subprocess.run(
            list(args), input=input, capture_output=True, timeout=timeout,
            env=dict(env) if env is not None else None, check=False,
        )
    except subprocess.TimeoutExpired as e:
        raise StackError(f"{' '.join(args)!r} did not finish within {timeout} s") from e
    if done.returncode != 0:
        raise StackError(
            f"{' '.join(args)!r} exited with {done.returncode}:"
            f" {done.stderr.decode(errors='replace').strip()}"
        )
    return done.stdout.decode(errors="replace")


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(no log at {path}: {e})"
    return "\n".join(text.splitlines()[-lines:])


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, interval: float = 0.05,
    alive: Callable[[], str | None] = lambda: None,
) -> None:
    """Poll ``check`` until it is true. ``alive`` returns a reason when waiting is pointless
    (the process died); either way a :class:`StackError` says what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        dead = alive()
        if dead is not None:
            raise StackError(f"gave up waiting for {what}: {dead}")
        if time.monotonic() > deadline:
            raise StackError(f"{what} did not happen within {timeout} s")
        time.sleep(interval)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies, so a killed
    test run does not leave engines behind (they stop their containers on SIGTERM)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, wait, SIGKILL the whole process group (it was started in its own session)."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def _http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("docker", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


# -- the registry ---------------------------------------------------------------------------------


@attrs.define(eq=False)
class Registry:
    """Debian's ``docker-registry`` on 127.0.0.1:<free port>, storage in ``base``, delete enabled.

    With ``notify_url`` it POSTs its events there (``notify_headers``: header -> value or list
    of values, e.g. ``{"Authorization": "Bearer TOKEN"}``).
    """

    base: Path
    notify_url: str | None = None
    notify_headers: Mapping[str, str | Sequence[str]] = attrs.field(factory=dict)
    ignored_media_types: Sequence[str] = ()
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    @property
    def storage(self) -> Path:
        return self.base / "storage"

    @property
    def log_path(self) -> Path:
        return self.base / "registry.log"

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": True}},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
            },
            "http": {"addr": self.host},
        }
        if self.notify_url is not None:
            headers = {
                k: [v] if isinstance(v, str) else list(v) for k, v in self.notify_headers.items()
            }
            endpoint: dict[str, Any] = {
                "name": "webhook", "url": self.notify_url, "headers": headers,
                "timeout": "10s", "threshold": 3, "backoff": "1s",
            }
            if self.ignored_media_types:
                endpoint["ignoredmediatypes"] = list(self.ignored_media_types)
            config["notifications"] = {"endpoints": [endpoint]}
        return config

    def start(self, timeout: float = 20.0) -> Registry:
        binary = require_binary("docker-registry")
        if self.process is not None and self.process.poll() is None:
            raise StackError(f"registry {self.host} is already running")
        self.storage.mkdir(parents=True, exist_ok=True)
        keep_port = self.port != 0

        def attempt(again: bool) -> Registry:
            if not keep_port:
                self.port = free_port()
            config_path = self.base / "config.json"
            config_path.write_text(json.dumps(self.config(), indent=2))
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    [binary, "serve", str(config_path)], stdin=subprocess.DEVNULL,
                    stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            try:
                wait_until(self.answers, timeout, f"registry {self.url}/v2/", alive=self._dead)
            except StackError:
                self.stop()
                raise StackError(
                    f"registry on {self.host} did not start; its log:\n" + log_tail(self.log_path)
                ) from None
            return self

        return on_fresh_ports(attempt, lambda: not keep_port and address_in_use(
            log_tail(self.log_path, 5), [self.port]))

    def _dead(self) -> str | None:
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            return f"docker-registry exited ({code}); log:\n{log_tail(self.log_path)}"
        return None

    def answers(self) -> bool:
        try:
            return _http_get(self.url + "/v2/", 1.0)[0] == 200
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is not None:
            _stop_process(self.process, timeout)

    def restart(self) -> None:
        """Stop and start again on the same port and storage."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)

    # registry API look-ups, for checks in tests

    def tags(self, repository: str) -> list[str]:
        status, body = _http_get(f"{self.url}/v2/{repository}/tags/list")
        if status == 404:
            return []
        return list(json.loads(body).get("tags") or [])

    def manifest(self, repository: str, tag: str) -> tuple[str, dict[str, Any]]:
        """``(digest, manifest)`` of ``repository:tag``."""
        request = urllib.request.Request(
            f"{self.url}/v2/{repository}/manifests/{tag}", headers={"Accept": MANIFEST_V2}
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.headers["Docker-Content-Digest"], json.loads(response.read())

    def delete_blob(self, repository: str, digest: str) -> None:
        request = urllib.request.Request(
            f"{self.url}/v2/{repository}/blobs/{digest}", method="DELETE"
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            if response.status != 202:
                raise StackError(f"delete of blob {digest}: HTTP {response.status}")

    def break_layers(self, repository: str, tag: str) -> None:
        """Delete the layer blobs of ``repository:tag`` but keep its manifest: a pull of it then
        fails in the middle of the engine's 200 stream ("unknown blob")."""
        _, manifest = self.manifest(repository, tag)
        for layer in manifest["layers"]:
            self.delete_blob(repository, layer["digest"])


# -- dockerd --------------------------------------------------------------------------------------


def _unescape_mount(path: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def mounts_under(base: Path) -> list[str]:
    """Mount points at or below ``base``, deepest first."""
    prefix = str(base)
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = _unescape_mount(line.split()[4])
            if point == prefix or point.startswith(prefix + "/"):
                points.append(point)
    return sorted(set(points), key=len, reverse=True)


def pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (a directory only we use)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


@attrs.define(eq=False)
class Dockerd:
    """A private Docker engine with its own data-root, exec-root, socket and cgroup parent, all
    under ``base`` (keep it short: the socket path must stay under ~108 bytes)."""

    base: Path
    insecure_registries: Sequence[str] = ()
    start_timeout: float = 60.0
    process: subprocess.Popen[bytes] | None = None
    _starts: int = 0

    @classmethod
    def create(cls, insecure_registries: Sequence[str] = ()) -> Dockerd:
        base = Path(tempfile.mkdtemp(prefix="dk-", dir="/tmp"))
        return cls(base=base, insecure_registries=tuple(insecure_registries))

    @property
    def socket(self) -> str:
        return str(self.base / "docker.sock")

    @property
    def url(self) -> str:
        return "unix://" + self.socket

    @property
    def log_path(self) -> Path:
        return self.base / "dockerd.log"

    @property
    def cgroup_parent(self) -> str:
        return self.base.name

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def args(self) -> list[str]:
        config = self.base / "daemon.json"
        if not config.exists():
            config.write_text("{}\n")
        args = [
            require_binary("dockerd"),
            "--host", self.url,
            "--data-root", str(self.base / "root"),
            "--exec-root", str(self.base / "exec"),
            "--pidfile", str(self.base / "docker.pid"),
            "--config-file", str(config),
            "--cgroup-parent", "/" + self.cgroup_parent,
            "--iptables=false", "--ip6tables=false", "--bridge=none",
        ]
        for host in self.insecure_registries:
            args += ["--insecure-registry", host]
        return args

    def start(self) -> Dockerd:
        if self.running:
            raise StackError(f"dockerd {self.base} is already running")
        args = self.args()
        require_binary("docker")
        self._starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"---- start {self._starts}: {' '.join(args)}\n".encode())
            log.flush()
            self.process = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        try:
            wait_until(self.ping, self.start_timeout, f"dockerd {self.url} /_ping",
                       interval=0.1, alive=self._dead)
        except StackError as e:
            tail = log_tail(self.log_path)
            self.stop()
            raise StackError(f"{e}\ndockerd log ({self.log_path}):\n{tail}") from None
        return self

    def _dead(self) -> str | None:
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            return f"dockerd exited with {code}"
        return None

    def api(
        self, method: str, path: str, body: bytes | None = None, timeout: float = 10.0
    ) -> tuple[int, bytes]:
        """A raw Engine API request over the socket: ``(status, body)``."""
        conn = _UnixHTTPConnection(self.socket, timeout)
        try:
            conn.request(method, path, body=body)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def ping(self) -> bool:
        try:
            return self.api("GET", "/_ping", timeout=2.0) == (200, b"OK")
        except OSError:
            return False

    def cli(self, *args: str, timeout: float = 60.0, input: bytes | None = None) -> str:
        """``docker -H unix://… ARGS``; stdout, or :class:`StackError` with stderr."""
        env = {**os.environ, "DOCKER_CONFIG": str(self.base / "cli")}
        return run([require_binary("docker"), "-H", self.url, *args],
                   timeout=timeout, input=input, env=env)

    def acli(self, *args: str, timeout: float = 60.0, input: bytes | None = None) -> Deferred[str]:
        """:meth:`cli` in the reactor's thread pool, for tests with code running on the reactor."""
        return threads.deferToThread(self.cli, *args, timeout=timeout, input=input)

    def image_id(self, ref: str) -> str | None:
        """The id ``ref`` points at here, or None."""
        try:
            return self.cli("image", "inspect", "--format", "{{.Id}}", ref).strip()
        except StackError as e:
            if "No such image" in str(e):
                return None
            raise

    def container_ids(self, all: bool = False) -> list[str]:
        out = self.cli("ps", "-q", "--no-trunc", *(["-a"] if all else []))
        return out.split()

    def inspect(self, name: str) -> dict[str, Any] | None:
        status, body = self.api("GET", f"/containers/{name}/json")
        if status == 404:
            return None
        if status != 200:
            raise StackError(f"inspect {name}: HTTP {status} {body!r}")
        result: dict[str, Any] = json.loads(body)
        return result

    def remove_all_containers(self) -> None:
        ids = self.container_ids(all=True)
        if ids:
            self.cli("rm", "-f", *ids)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (dockerd stops its containers and containerd), then SIGKILL for everything
        still running from this engine."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._kill_strays()

    def restart(self) -> None:
        """Stop and start again on the same directories (containers end up stopped)."""
        self.stop()
        self.start()

    def _cgroup_dirs(self) -> list[Path]:
        root = Path("/sys/fs/cgroup")
        dirs = [root / self.cgroup_parent] + [d / self.cgroup_parent for d in root.glob("*")]
        return [d for d in dirs if d.is_dir()]

    def _kill_strays(self) -> None:
        """containerd, its shims (their command lines name our directory) and the processes in
        our containers' cgroups."""
        for _ in range(3):
            pids = set(pids_mentioning(str(self.base) + "/"))
            for cgroup in self._cgroup_dirs():
                for procs in cgroup.rglob("cgroup.procs"):
                    with contextlib.suppress(OSError, ValueError):
                        pids.update(int(p) for p in procs.read_text().split())
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)

    def _remove_cgroups(self) -> None:
        for cgroup in self._cgroup_dirs():
            children = [p for p in cgroup.rglob("*") if p.is_dir()]
            for d in [*sorted(children, key=lambda p: len(p.parts), reverse=True), cgroup]:
                with contextlib.suppress(OSError):
                    d.rmdir()

    def cleanup(self) -> None:
        """Remove containers, stop, unmount what is left, delete the directory. Idempotent."""
        if self.running:
            try:
                self.remove_all_containers()
            except StackError:
                pass  # stop() below ends them anyway; dockerd's log keeps the reason
        self.stop()
        umount = shutil.which("umount") or "/bin/umount"
        for point in mounts_under(self.base):
            with contextlib.suppress(StackError):
                run([umount, "-l", point], timeout=20)
        self._remove_cgroups()
        if self.base.exists() and not mounts_under(self.base):
            shutil.rmtree(self.base, ignore_errors=True)


# -- images ---------------------------------------------------------------------------------------


@attrs.define(eq=False)
class Rootfs:
    """The test image's root filesystem: /bin/busybox with a few applets, /app/run.sh that exits
    on SIGTERM, and /app/version holding the version (each version gives a new image)."""

    busybox: Path = BUSYBOX
    _busybox_bytes: bytes | None = None

    def _binary(self) -> bytes:
        if self._busybox_bytes is None:
            if not self.busybox.exists():
                pytest.fail(f"{self.busybox} is missing: apt-get install -y busybox-static",
                            pytrace=False)
            self._busybox_bytes = self.busybox.read_bytes()
        return self._busybox_bytes

    def tar(self, version: str) -> bytes:
        out = io.BytesIO()
        mtime = int(time.time())

        def add(name: str, data: bytes | None = None, mode: int = 0o644,
                kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.mtime, info.mode, info.type, info.linkname = mtime, mode, kind, link
            info.size = len(data) if data is not None else 0
            tar.addfile(info, io.BytesIO(data) if data is not None else None)

        with tarfile.open(fileobj=out, mode="w") as tar:
            for d in ("bin", "app", "tmp", "etc"):
                add(d, mode=0o1777 if d == "tmp" else 0o755, kind=tarfile.DIRTYPE)
            add("bin/busybox", self._binary(), mode=0o755)
            for applet in APPLETS:
                add(f"bin/{applet}", kind=tarfile.SYMTYPE, link="busybox")
            add("app/run.sh", RUN_SH.encode(), mode=0o755)
            add("app/version", version.encode() + b"\n")
        return out.getvalue()


def build_image(
    dockerd: Dockerd, ref: str, version: str, rootfs: Rootfs | None = None,
    changes: Sequence[str] = (),
) -> str:
    """``docker import`` a rootfs of ``version`` as ``ref``; returns the image id (sha256:…)."""
    tarball = (rootfs or Rootfs()).tar(version)
    args = ["import", "--change", 'CMD ["/bin/sh","/app/run.sh"]',
            "--change", f"LABEL version={version}"]
    for change in changes:
        args += ["--change", change]
    return dockerd.cli(*args, "-", ref, input=tarball).strip()


def push_image(dockerd: Dockerd, ref: str) -> str:
    """``docker push``; returns the manifest digest."""
    out = dockerd.cli("push", ref, timeout=120)
    found = re.search(r"digest: (sha256:[0-9a-f]{64})", out)
    if found is None:
        raise StackError(f"no digest in the output of docker push {ref}:\n{out}")
    return found.group(1)


def run_container(
    dockerd: Dockerd, image_ref: str, name: str | None = None, args: Sequence[str] = ()
) -> str:
    """``docker run -d``; returns the container id."""
    options = ["--name", name] if name else []
    return dockerd.cli("run", "-d", *options, image_ref, *args).strip()


def unique(prefix: str = "t") -> str:
    """A fresh lower-case name for a repository or container."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@attrs.frozen
class Published:
    ref: str
    image_id: str
    digest: str


@attrs.define(eq=False)
class ImageBuilder:
    """Builds test images and publishes them to ``registry``.

    :meth:`publish` builds on a separate engine (as CI would), so the engines under test only
    see an image once they pull it. :meth:`build` / :meth:`push` work on a given engine.
    """

    registry: Registry
    builder: Callable[[], Dockerd]
    rootfs: Rootfs = attrs.field(factory=Rootfs)

    def ref(self, repository: str, tag: str) -> str:
        return f"{self.registry.host}/{repository}:{tag}"

    def build(self, dockerd: Dockerd, ref: str, version: str,
              changes: Sequence[str] = ()) -> str:
        return build_image(dockerd, ref, version, self.rootfs, changes)

    def push(self, dockerd: Dockerd, ref: str) -> str:
        return push_image(dockerd, ref)

    def publish(self, ref: str, version: str, changes: Sequence[str] = ()) -> Published:
        """Build ``version`` as ``ref`` on the builder engine and push it."""
        engine = self.builder()
        image_id = self.build(engine, ref, version, changes)
        digest = self.push(engine, ref)
        return Published(ref=ref, image_id=image_id, digest=digest)


# -- a registry that hangs -------------------------------------------------------------------------


class HangingRegistry(ThreadingHTTPServer):
    """A registry on 127.0.0.1 that answers ``GET /v2/`` and never answers anything else: the
    manifest request hangs (until :meth:`close`). A plain-HTTP server that refuses dockerd's
    TLS attempt at once, so that dockerd goes on over HTTP."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _HangingHandler)
        self.seen: list[str] = []
        self.asked = threading.Event()
        self.released = threading.Event()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.released.set()
        self.shutdown()
        self.server_close()


class _HangingHandler(BaseHTTPRequestHandler):
    server: HangingRegistry

    def do_GET(self) -> None:
        self.server.seen.append(f"{self.command} {self.path}")
        if self.path == "/v2/":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Docker-Distribution-Api-Version", "registry/2.0")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
            return
        if "/manifests/" in self.path:
            self.server.asked.set()
        self.server.released.wait()

    do_HEAD = do_GET

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def hanging_registry() -> Iterator[HangingRegistry]:
    """A :class:`HangingRegistry`, closed after the test."""
    registry = HangingRegistry()
    try:
        yield registry
    finally:
        registry.close()


# -- the supervisor -------------------------------------------------------------------------------


class Supervisor:
    """``Restart=always`` for one container: ``docker rm -f NAME; docker run --name NAME IMAGE``
    in the foreground, again ~``delay`` seconds after each exit. The image is run by its
    repo:tag, so each restart uses whatever the tag points at by then."""

    def __init__(self, dockerd: Dockerd, name: str, image_ref: str, delay: float = 0.2) -> None:
        self.dockerd = dockerd
        self.name = name
        self.image_ref = image_ref
        self.delay = delay
        self.runs = 0
        self.log_path = dockerd.base / f"supervisor-{name}.log"
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._current: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> Supervisor:
        if self._thread is not None:
            raise StackError(f"supervisor {self.name} already started")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name=f"supervisor-{self.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def _docker(self, *args: str) -> list[str]:
        return [require_binary("docker"), "-H", self.dockerd.url, *args]

    def _loop(self) -> None:
        env = {**os.environ, "DOCKER_CONFIG": str(self.dockerd.base / "cli")}
        with self.log_path.open("ab") as log:
            while not self._stopping.is_set():
                subprocess.run(self._docker("rm", "-f", self.name), stdout=subprocess.DEVNULL,
                               stderr=log, timeout=60, env=env, check=False)
                with self._lock:
                    if self._stopping.is_set():
                        break
                    self.runs += 1
                    log.write(f"---- run {self.runs} of {self.image_ref}\n".encode())
                    log.flush()
                    self._current = subprocess.Popen(
                        self._docker("run", "--name", self.name, self.image_ref),
                        stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                    )
                code = self._current.wait()
                log.write(f"---- exited with {code}\n".encode())
                log.flush()
                self._stopping.wait(self.delay)

    def stop(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        with self._lock:
            current = self._current
        if current is not None and current.poll() is None:
            current.terminate()  # docker run forwards SIGTERM to the container
            try:
                current.wait(timeout)
            except subprocess.TimeoutExpired:
                current.kill()
                current.wait(10)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self.dockerd.running:
            with contextlib.suppress(StackError):
                self.dockerd.cli("rm", "-f", self.name)

    def running_image(self) -> tuple[str, str] | None:
        """``(container id, image id)`` of the running container NAME, or None."""
        try:
            state = self.dockerd.inspect(self.name)
        except OSError:
            return None
        if state is None or not state["State"]["Running"]:
            return None
        return state["Id"], state["Image"]

    def wait_running_image_blocking(self, image_id: str, timeout: float = 30.0) -> str:
        """Block until a running container NAME has ``image_id``; returns its id."""
        found: list[str] = []

        def check() -> bool:
            current = self.running_image()
            if current is not None and current[1] == image_id:
                found.append(current[0])
                return True
            return False

        try:
            wait_until(check, timeout, f"container {self.name} running {image_id}", 0.1)
        except StackError as e:
            raise StackError(
                f"{e}; now: {self.running_image()}; supervisor log:\n{log_tail(self.log_path, 15)}"
            ) from None
        return found[0]

    def wait_running_image(self, image_id: str, timeout: float = 30.0) -> Deferred[str]:
        """:meth:`wait_running_image_blocking` in the reactor's thread pool: await it."""
        return threads.deferToThread(self.wait_running_image_blocking, image_id, timeout)


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def registry_factory(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., Registry]]:
    """``registry_factory(notify_url=None, notify_headers=None, ignored_media_types=())``
    starts another registry; all are stopped at the end of the session."""
    started: list[Registry] = []

    def start(notify_url: str | None = None,
              notify_headers: Mapping[str, str | Sequence[str]] | None = None,
              ignored_media_types: Sequence[str] = ()) -> Registry:
        registry = Registry(base=tmp_path_factory.mktemp("registry"), notify_url=notify_url,
                            notify_headers=dict(notify_headers or {}),
                            ignored_media_types=tuple(ignored_media_types))
        started.append(registry)
        atexit.register(registry.cleanup)
        return registry.start()

    try:
        yield start
    finally:
        for registry in reversed(started):
            registry.cleanup()
            atexit.unregister(registry.cleanup)


@pytest.fixture(scope="session")
def registry(registry_factory: Callable[..., Registry]) -> Registry:
    """The session's registry, without notifications."""
    return registry_factory()


@pytest.fixture(scope="session")
def dockerd_factory(registry: Registry) -> Iterator[Callable[..., Dockerd]]:
    """``dockerd_factory(insecure_registries=())`` starts another engine (the session registry
    is always trusted; 127.0.0.0/8 is anyway); all are torn down at the end of the session."""
    started: list[Dockerd] = []

    def start(insecure_registries: Sequence[str] = ()) -> Dockerd:
        engine = Dockerd.create([registry.host, *insecure_registries])
        started.append(engine)
        atexit.register(engine.cleanup)
        return engine.start()

    try:
        yield start
    finally:
        errors = []
        for engine in reversed(started):
            try:
                engine.cleanup()
                atexit.unregister(engine.cleanup)
            except Exception as e:  # every engine gets its turn
                errors.append(f"{engine.base}: {e!r}")
        if errors:
            raise StackError("dockerd teardown failed: " + "; ".join(errors))


@pytest.fixture(scope="session")
def dockerd(dockerd_factory: Callable[..., Dockerd]) -> Dockerd:
    """The session's shared engine. Tests must not leave it stopped; use ``dockerd_factory`` for
    an engine to restart or break."""
    return dockerd_factory()


@pytest.fixture
def clean_dockerd(dockerd: Dockerd) -> Iterator[Dockerd]:
    """The shared engine, with every container removed after the test."""
    try:
        yield dockerd
    finally:
        if dockerd.running:
            dockerd.remove_all_containers()


@pytest.fixture(scope="session")
def image_builder(
    registry: Registry, dockerd_factory: Callable[..., Dockerd]
) -> ImageBuilder:
    """Builds and pushes test images; :meth:`ImageBuilder.publish` uses its own engine, started
    on first use."""
    engines: list[Dockerd] = []

    def builder() -> Dockerd:
        if not engines:
            engines.append(dockerd_factory())
        return engines[0]

    return ImageBuilder(registry=registry, builder=builder)


@pytest.fixture
def supervisor_factory(dockerd: Dockerd) -> Iterator[Callable[..., Supervisor]]:
    """``supervisor_factory(name, image_ref, dockerd=None)``: a started :class:`Supervisor`,
    stopped (and its container removed) after the test."""
    started: list[Supervisor] = []

    def start(name: str, image_ref: str, engine: Dockerd | None = None) -> Supervisor:
        supervisor = Supervisor(engine or dockerd, name, image_ref)
        started.append(supervisor)
        return supervisor.start()

    try:
        yield start
    finally:
        for supervisor in started:
            supervisor.stop()


__all__ = [
    "Dockerd", "HangingRegistry", "ImageBuilder", "Published", "Registry", "Rootfs", "StackError",
    "Supervisor",
    "build_image", "free_port", "push_image", "run", "run_container", "unique",
]
