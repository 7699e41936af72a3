"""A fleet on one machine: two Docker hosts, one etcd, a registry that notifies deployer.

Run it with ``bash demo/run`` (as root: it starts private Docker engines). It shows, step by
step, that a ``docker push`` alone replaces the running container on every host:

1. starts etcd, a local registry, two private dockerd ("host A" and "host B") and a builder
   engine;
2. builds ``myorg/web:qa`` v1, pushes it, and runs it on both hosts under a supervisor loop
   (like systemd ``Restart=always``);
3. starts a deployer on each host (``twist deployer --etcd_nodes ...``), the registry
   configured to send its push notifications to host A's deployer;
4. builds v2 and pushes it; host A's deployer records the push in etcd, both deployers see it,
   pull v2 and stop the old container; the supervisors start it again on v2.

Everything it starts is stopped at the end (or on Ctrl-C).
"""

from __future__ import annotations

import secrets
import sys
import tempfile
import time
from pathlib import Path

from tests.stack.daemon import Daemon
from tests.stack.docker_stack import Dockerd, Registry, Rootfs, Supervisor, build_image, push_image
from tests.stack.etcd_stack import EtcdCluster


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def version_of(engine: Dockerd, container: str) -> str:
    try:
        return engine.cli("exec", container, "cat", "/app/version").strip()
    except Exception:
        return "(restarting)"


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="deployer-demo-"))
    token = secrets.token_hex(16)
    stack: list[object] = []
    try:
        say("etcd, a registry, and two Docker hosts")
        etcd = EtcdCluster(work / "etcd", 1)
        etcd.start()
        stack.append(etcd)
        a_port = _free()
        registry = Registry(
            base=work / "registry",
            notify_url=f"http://127.0.0.1:{a_port}/api/registry/events",
            notify_headers={"Authorization": f"Bearer {token}"},
        )
        registry.start()
        stack.append(registry)
        hosts = {name: Dockerd.create([registry.host]).start() for name in ("A", "B")}
        builder = Dockerd.create([registry.host]).start()
        stack.extend([*hosts.values(), builder])
        print(f"etcd {etcd.urls[0]}, registry {registry.host}")
        for name, engine in hosts.items():
            print(f"host {name}: dockerd at {engine.url}")

        ref = f"{registry.host}/myorg/web:qa"
        rootfs = Rootfs()
        say(f"v1 of {ref}, pushed and running on both hosts")
        v1 = build_image(builder, ref, "v1", rootfs)
        push_image(builder, ref)
        supervisors = []
        for engine in hosts.values():
            engine.cli("pull", ref)
            supervisors.append(Supervisor(engine, "web", ref).start())
            stack.append(supervisors[-1])
        for s in supervisors:
            s.wait_running_image_blocking(v1)
        for name, engine in hosts.items():
            print(f"host {name}: web runs {version_of(engine, 'web')}")

        say("a deployer on each host, watching etcd")
        daemons = {}
        for name, engine in hosts.items():
            daemon = Daemon(
                work, ["--docker", engine.url, "--etcd_nodes", etcd.urls[0],
                       "--etcd_prefix", "/demo/deployer", "--repull_period", "0",
                       "--hostname", f"host-{name}"],
                token=token, port=a_port if name == "A" else None,
            )
            daemons[name] = daemon.start()
            stack.append(daemon)
            print(f"host {name}: deployer on {daemon.url} (log {daemon.log_path})")

        say("docker push of v2 — nothing else")
        v2 = build_image(builder, ref, "v2", rootfs)
        started = time.monotonic()
        push_image(builder, ref)
        pushed = time.monotonic()
        for s in supervisors:
            s.wait_running_image_blocking(v2, timeout=60)
        done = time.monotonic()
        for name, engine in hosts.items():
            print(f"host {name}: web runs {version_of(engine, 'web')}")
        print(f"push took {pushed - started:.2f} s; both hosts ran v2"
              f" {done - pushed:.2f} s after the push finished")
        say("what host B's deployer logged")
        for line in daemons["B"].log().splitlines():
            if "deployer." in line:
                print("  " + line.split(" ", 1)[1])
        return 0
    finally:
        say("cleaning up")
        for thing in reversed(stack):
            end = getattr(thing, "cleanup", None) or thing.stop
            try:
                end()
            except Exception as e:  # keep cleaning up the rest
                print(f"  could not stop {thing!r}: {e}", file=sys.stderr)
        print(f"logs kept in {work}")


def _free() -> int:
    from tests.stack.docker_stack import free_port

    return free_port()


if __name__ == "__main__":
    sys.exit(main())
