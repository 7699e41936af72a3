"""The state of the in-memory Docker engine: local images, containers and networks, the events
they make, and the pretend registry they are pulled from.
:class:`deployer.testing.memory_docker.MemoryDocker` serves it over the Engine API; a test reads
and steers it directly (publish, run, supervise, fail a pull, stop the engine...).

Each operation behaves as on dockerd 20.10: the same answers (an :class:`ApiError` with dockerd's
status and message) and the same events in the same order (``docker stop``: ``kill``, ``die``,
``stop``; ``docker rm -f``: ``kill``, ``die``, ``destroy``...). Anything a container does by
itself (health probes, exits, restarts by policy) runs on the engine's ``clock``.
"""

from __future__ import annotations

import itertools
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from deployer.reference import InvalidReference, check_tag, parse_reference
from deployer.testing.memory_common import (
    ENGINE_VERSION,
    IMAGE_SIZE,
    ApiError,
    check_container_name,
    digest_of,
    name_conflict,
    normalize,
    shown_name,
)
from deployer.testing.memory_containers import (
    ContainerState,
    container_config,
    endpoints,
    host_config,
    restart_policy,
)
from deployer.testing.memory_events import EventLog
from deployer.testing.memory_health import Behaviour, Healthcheck, HealthState
from deployer.testing.memory_images import ImageState, RemoteImage
from deployer.testing.memory_lifecycle import Lifecycle, MemorySupervisor
from deployer.testing.memory_networks import NetworkOps, Networks
from deployer.testing.memory_registry import Gate, PullRecord, RegistryState

log = Logger()

_FULL_ID = re.compile(r"^(?:sha256:)?([0-9a-f]{64})$")
_HEX = re.compile(r"^[0-9a-f]+$")
_SIGNALS = {"KILL": 9, "SIGKILL": 9, "TERM": 15, "SIGTERM": 15, "INT": 2, "SIGINT": 2,
            "HUP": 1, "SIGHUP": 1, "QUIT": 3, "SIGQUIT": 3, "USR1": 10, "USR2": 12}


class EngineState(RegistryState, NetworkOps):
    """Local images, containers and networks, their events, the pretend registry and the test
    knobs. ``clock`` (optional) gives times and runs what containers do by themselves; without
    it a counter gives times (so that the newest object always sorts first) and containers
    that would need time to pass (health checks, exits) cannot be started."""

    def __init__(self, clock: IReactorTime | None = None) -> None:
        RegistryState.__init__(self)
        self.clock = clock
        self._ticks = itertools.count(1_700_000_000)
        self.images: dict[str, ImageState] = {}
        self.containers: dict[str, ContainerState] = {}
        self.networks = Networks(self._now())
        #: (container id, the ``t`` parameter or None) of every stop asked for.
        self.stops: list[tuple[str, int | None]] = []
        #: While true, the engine is away: agents refuse connections, supervisors wait.
        self.down = False
        self.events = EventLog(self._now, self._deliver, clock)
        self.lifecycle = Lifecycle(self)
        self.supervisors: list[MemorySupervisor] = []
        self._on_stop: list[Callable[[ContainerState], object]] = []
        self._on_exit: list[Callable[[ContainerState], object]] = []

    def _now(self) -> float:
        return self.clock.seconds() if self.clock is not None else float(next(self._ticks))

    def _deliver(self) -> None:
        """Event lines were written to open streams (the API pushes them to its clients)."""

    # -- images ---------------------------------------------------------------------------------

    def add_image(
        self, repotags: Iterable[str] = (), image_id: str | None = None,
        labels: Mapping[str, str] | None = None, digests: Iterable[str] = (), *,
        healthcheck: Healthcheck | None = None, behaviour: Behaviour | None = None,
        config: Mapping[str, Any] | None = None,
    ) -> str:
        """A local image (tags move to it from any other image); returns its id. For a new
        image: ``healthcheck``, ``behaviour`` of its containers, and ``config`` (image
        ``Config`` fields: ``Env``, ``Entrypoint``, ``WorkingDir``...)."""
        image_id = image_id or "sha256:" + secrets.token_hex(32)
        image = self.images.get(image_id)
        if image is None:
            image = self.images[image_id] = ImageState(
                id=image_id, created=self._now(), labels=dict(labels or {}),
                healthcheck=healthcheck, behaviour=behaviour or Behaviour(),
                config=dict(config or {}),
            )
        for repotag in repotags:
            self._tag(image, normalize(repotag))
        for digest in digests:
            if digest not in image.digests:
                image.digests.append(digest)
        return image_id

    def pulled(self, remote: RemoteImage, repotag: str, name: str) -> None:
        """A pull of ``repotag`` brought ``remote`` (tagging it, and its digest, here); a pull
        by digest (``repo@sha256:…``) tags nothing."""
        tags = [] if "@" in repotag else [repotag]
        self.add_image(tags, remote.image_id, remote.labels,
                       [f"{name}@{remote.digest}"], healthcheck=remote.healthcheck,
                       behaviour=remote.behaviour, config=remote.config)
        self.events.emit("image", "pull", repotag, {**remote.labels, "name": name})

    def _tag(self, image: ImageState, repotag: str) -> None:
        for other in self.images.values():
            if other is not image and repotag in other.tags:
                other.tags.remove(repotag)
        if repotag not in image.tags:
            image.tags.append(repotag)

    def tag_image(self, name: str, repository: str, tag: str = "") -> None:
        """``POST /images/{name}/tag?repo=&tag=``: the tag moves to this image."""
        image = self.find_image(name)
        if image is None:
            raise ApiError(404, f"No such image: {name}")
        try:
            if not repository or "@" in repository:
                raise InvalidReference(repository)
            repo = parse_reference(repository)
        except InvalidReference as e:
            lower = repository.lower() == repository
            raise ApiError(500, "invalid reference format" + (
                "" if lower else ": repository name must be lowercase")) from e
        try:
            if tag:
                check_tag(tag)
        except InvalidReference as e:
            raise ApiError(500, "invalid tag format") from e
        self._tag(image, f"{repo.name}:{tag or repo.tag or 'latest'}")
        shown = f"{repo.name}:{tag}" if tag else repository
        self.events.emit("image", "tag", image.id, {**image.labels, "name": shown})

    def image_id(self, ref: str) -> str | None:
        """The local image ``ref`` (a repo:tag or an id) resolves to, or None."""
        image = self.find_image(ref)
        return image.id if image is not None else None

    def find_image(self, ref: str) -> ImageState | None:
        full = _FULL_ID.match(ref)
        if full is not None:
            return self.images.get("sha256:" + full.group(1))
        try:
            parsed = parse_reference(ref)
        except InvalidReference:
            parsed = None
        if parsed is not None:
            if parsed.digest is not None:
                wanted = f"{parsed.name}@{parsed.digest}"
                return next((i for i in self.images.values() if wanted in i.digests), None)
            wanted = f"{parsed.name}:{parsed.tag or 'latest'}"
            for image in self.images.values():
                if wanted in image.tags:
                    return image
        prefix = ref.removeprefix("sha256:")
        if _HEX.match(prefix):
            found = [i for i in self.images.values() if i.id[len("sha256:"):].startswith(prefix)]
            if len(found) == 1:
                return found[0]
        return None

    # -- containers -----------------------------------------------------------------------------

    def find_container(self, name_or_id: str) -> ContainerState | None:
        if name_or_id in self.containers:
            return self.containers[name_or_id]
        name = name_or_id.removeprefix("/")
        for container in self.containers.values():
            if container.name == name:
                return container
        if _HEX.match(name_or_id):
            found = [c for c in self.containers.values() if c.id.startswith(name_or_id)]
            if len(found) == 1:
                return found[0]
        return None

    def _get(self, ref: str) -> ContainerState:
        container = self.find_container(ref)
        if container is None:
            raise ApiError(404, f"No such container: {ref}")
        return container

    def container_event(self, container: ContainerState, action: str, **extra: str) -> None:
        self.events.emit("container", action, container.id, {
            **extra, **container.labels, "image": container.image_ref, "name": container.name})

    def create_container(self, name: str | None, body: Mapping[str, Any], *,
                         check_name: bool = True) -> ContainerState:
        """``POST /containers/create?name=``: a new container in the ``created`` state."""
        if not body:
            raise ApiError(400, "Config cannot be empty in order to create a container")
        container_id = secrets.token_hex(32)
        if name:
            name = check_container_name(name) if check_name else name.removeprefix("/")
        else:
            name = f"memory_{container_id[:8]}"
        holder = self._by_name(name)
        if holder is not None:
            raise name_conflict(name, holder.id)
        image_ref = str(body.get("Image") or "")
        image = self.find_image(image_ref) if image_ref else None
        if image is None:
            raise ApiError(404, f"No such image: {shown_name(image_ref)}")
        host = host_config(body.get("HostConfig"))
        container = ContainerState(
            id=container_id, name=name, image_ref=image_ref, image_id=image.id,
            created=self._now(), config=container_config(body, image, container_id),
            host_config=host, networks=endpoints(host, body.get("NetworkingConfig")),
            behaviour=image.behaviour,
        )
        self.containers[container_id] = container
        self.container_event(container, "create")
        return container

    def _by_name(self, name: str) -> ContainerState | None:
        return next((c for c in self.containers.values() if c.name == name), None)

    def start_container(self, ref: str) -> bool:
        """``POST /containers/{id}/start``; False when it runs already (304)."""
        container = self._get(ref)
        if container.running:
            return False
        for name in container.networks:
            if name != "bridge" and self.networks.find(name) is None:
                container.error = f"network {name} not found"
                container.exit_code = container.exit_code or 128
                raise ApiError(404, container.error)
        self.lifecycle.check(container)
        container.manually_stopped = False
        self._resume(container)
        return True

    def _resume(self, container: ContainerState) -> None:
        """Run ``container`` (started, or restarted by its policy)."""
        container.status, container.exit_code, container.error = "running", 0, ""
        container.started, container.has_run = self._now(), True
        for name in list(container.networks):
            self._attach(container, name)
        if container.healthcheck is not None:
            container.health = container.health or HealthState()
            container.health.restart()
        self.container_event(container, "start")
        self.lifecycle.started(container)

    def _exit(self, container: ContainerState, code: int) -> None:
        """``container`` stopped running with ``code``: ``die`` (then its networks let go)."""
        self.lifecycle.stopped(container)
        container.status, container.exit_code, container.finished = "exited", code, self._now()
        if container.health is not None:
            container.health.stopped()
        self.container_event(container, "die", exitCode=str(code))
        for name in container.networks:
            network = self.networks.find(name)
            if network is not None and network.user_defined:
                network.detach(container)
                self._network_event(network.id, "disconnect", container)

    def _exited(self, container: ContainerState) -> None:
        """Tell whoever watches exits (supervisors, :meth:`on_exit`)."""
        for hook in list(self._on_exit):
            hook(container)
        for supervisor in list(self.supervisors):
            supervisor.exited(container)

    def stop_container(self, name_or_id: str, timeout: int | None = None) -> bool:
        """``POST /containers/{id}/stop``; False when it was not running (304). The
        :meth:`on_stop` hooks run after the stop, then the supervisors."""
        container = self.find_container(name_or_id)
        if container is None:
            raise LookupError(f"MemoryDocker: no container {name_or_id!r}")
        self.stops.append((container.id, timeout))
        if container.status == "restarting":
            self.lifecycle.stopped(container)
            container.status, container.manually_stopped = "exited", True
            self.container_event(container, "stop")
            return True
        if container.status != "running":
            return False
        container.manually_stopped = True
        signal = str(container.config.get("StopSignal") or "TERM").upper()
        self.container_event(container, "kill", signal=str(_SIGNALS.get(signal, 15)))
        self._exit(container, container.behaviour.stop_code)
        self.container_event(container, "stop")
        for hook in list(self._on_stop):
            hook(container)
        self._exited(container)
        return True

    def kill_container(self, ref: str, signal: str = "KILL") -> None:
        """``POST /containers/{id}/kill?signal=``."""
        container = self._get(ref)
        if not container.running:
            raise ApiError(409, f"Cannot kill container: {ref}: Container {container.id} is not"
                                " running")
        container.manually_stopped = True
        if container.status == "restarting":
            self.lifecycle.stopped(container)
            container.status = "exited"
            return
        number = int(signal) if signal.isdigit() else _SIGNALS.get(signal.upper(), 9)
        self.container_event(container, "kill", signal=str(number))
        code = container.behaviour.stop_code if number == 15 else 128 + number
        self._exit(container, code)
        self._exited(container)

    def restart_container(self, ref: str, timeout: int | None = None) -> None:
        """``POST /containers/{id}/restart``: stop if running, start, then ``restart``."""
        container = self._get(ref)
        if container.running:
            self.stop_container(container.id, timeout)
        try:
            self.start_container(container.id)
        except ApiError as e:
            raise ApiError(500, f"Cannot restart container {ref}: {e.message}") from e
        self.container_event(container, "restart")

    def remove_container(self, ref: str, force: bool = False) -> None:
        """``DELETE /containers/{id}?force=``."""
        container = self._get(ref)
        if container.running and not force:
            what = "restarting" if container.status == "restarting" else "running"
            raise ApiError(409, f"You cannot remove a {what} container {container.id}. Stop the"
                                " container before attempting removal or force remove")
        killed = container.status == "running"
        if killed:
            self.container_event(container, "kill", signal="9")
            self._exit(container, 137)
        self.lifecycle.stopped(container)
        del self.containers[container.id]
        self.container_event(container, "destroy")
        if killed:
            self._exited(container)

    def rename_container(self, ref: str, new_name: str) -> None:
        """``POST /containers/{id}/rename?name=``."""
        if not new_name:
            raise ApiError(400, "Neither old nor new names may be empty")
        container = self._get(ref)
        shown = new_name if new_name.startswith("/") else "/" + new_name
        if shown.removeprefix("/") == container.name:
            raise ApiError(400, "Renaming a container with the same name as its current name")
        prefix = "Error when allocating new name: "
        name = check_container_name(shown, prefix)
        holder = self._by_name(name)
        if holder is not None:
            raise name_conflict(name, holder.id, prefix)
        old, container.name = container.name, name
        self.container_event(container, "rename", oldName="/" + old)

    def update_container(self, ref: str, body: Mapping[str, Any]) -> None:
        """``POST /containers/{id}/update``: only its ``RestartPolicy`` (the double keeps no
        resource limits, so it refuses any other field rather than ignore it)."""
        container = self._get(ref)
        others = sorted(set(body) - {"RestartPolicy"})
        if others:
            raise ApiError(400, f"MemoryDocker updates only RestartPolicy, not {others}")
        if "RestartPolicy" in body:
            policy = restart_policy(body["RestartPolicy"])
            if container.host_config.get("AutoRemove") and policy["Name"] not in ("", "no"):
                raise ApiError(409, f"Cannot update container {container.id}: Restart policy"
                                    " cannot be updated because AutoRemove is enabled for the"
                                    " container")
            container.host_config["RestartPolicy"] = policy
        self.container_event(container, "update")

    # -- test helpers ---------------------------------------------------------------------------

    def run(self, name: str | None, image_ref: str, labels: Mapping[str, str] | None = None,
            **body: Any) -> str:
        """``docker run -d --name NAME IMAGE``: create and start a container of a local image
        (by repo:tag or id); returns its id. ``labels`` and ``body`` (fields of the create
        body: ``Env``, ``HostConfig``, ``NetworkingConfig``...) as ``docker run`` sends them.
        Raises LookupError for a missing image, ValueError for a name in use (any name goes,
        where the API would check it)."""
        if self.find_image(image_ref) is None:
            raise LookupError(f"MemoryDocker: no local image {image_ref!r}; pull or add it first")
        if name and self._by_name(name.removeprefix("/")) is not None:
            raise ValueError(f"MemoryDocker: the container name {name!r} is already in use")
        if labels:
            body["Labels"] = {**body.get("Labels", {}), **labels}
        container = self.create_container(name, {**body, "Image": image_ref}, check_name=False)
        self.start_container(container.id)
        return container.id

    def remove(self, name_or_id: str) -> None:
        """``docker rm -f``; LookupError when there is no such container."""
        if self.find_container(name_or_id) is None:
            raise LookupError(f"MemoryDocker: no container {name_or_id!r}")
        self.remove_container(name_or_id, force=True)

    def containers_running(self) -> list[ContainerState]:
        return [c for c in self._newest_first(self.containers.values()) if c.running]

    def on_stop(self, callback: Callable[[ContainerState], object]) -> None:
        """Call ``callback(container)`` after each stop through the API (``docker stop``);
        e.g. :meth:`restart_like_supervisor`."""
        self._on_stop.append(callback)

    def on_exit(self, callback: Callable[[ContainerState], object]) -> None:
        """Call ``callback(container)`` whenever a running container stops for good (stopped,
        killed, removed, or exited by itself without a restart policy to restart it)."""
        self._on_exit.append(callback)

    def restart_like_supervisor(self, container: ContainerState) -> str:
        """What ``Restart=always`` with ``docker rm -f NAME; docker run --name NAME REPO:TAG``
        does: a new container of the same name on whatever the ref points at now."""
        self.remove(container.id)
        return self.run(container.name, container.image_ref)

    def supervise(self, name: str, image_ref: str, delay: float = 0.0) -> MemorySupervisor:
        """Run ``name`` from ``image_ref`` now, and again whenever it stops (see
        :class:`MemorySupervisor`)."""
        supervisor = MemorySupervisor(self, name, image_ref, delay)
        self.supervisors.append(supervisor)
        return supervisor.start()

    def stop_engine(self) -> None:
        """dockerd going down: its running containers stop (their events still go out), then
        its event streams close and it refuses connections (:attr:`down`)."""
        self.down = True
        for container in list(self.containers.values()):
            if container.status == "restarting":
                self.lifecycle.stopped(container)
                container.status = "exited"
            elif container.status == "running":
                self.container_event(container, "kill", signal="15")
                self._exit(container, container.behaviour.stop_code)
                self.container_event(container, "stop")
        self.events.drop()

    def start_engine(self) -> None:
        """dockerd back: it remembers no event from before, starts the containers whose
        restart policy says so, and answers again; supervisors run their containers again."""
        self.events.forget()
        self.down = False
        for container in list(self.containers.values()):
            policy = (container.host_config.get("RestartPolicy") or {}).get("Name")
            if container.status == "exited" and container.has_run and (
                    policy == "always" or (policy == "unless-stopped"
                                           and not container.manually_stopped)):
                self.start_container(container.id)
        for supervisor in list(self.supervisors):
            supervisor.engine_back()

    @staticmethod
    def _newest_first(items: Iterable[Any]) -> list[Any]:
        return sorted(items, key=lambda x: x.created, reverse=True)

    def _listed_image(self, container: ContainerState) -> str:
        """``Image`` in the container list: the name it was run with while that name still
        points at its image, else its image id."""
        if container.image_ref != container.image_id:
            image = self.find_image(container.image_ref)
            if image is None or image.id != container.image_id:
                return container.image_id
        return container.image_ref


__all__ = [
    "ENGINE_VERSION", "IMAGE_SIZE", "ApiError", "ContainerState", "EngineState", "Gate",
    "ImageState", "PullRecord", "RemoteImage", "digest_of", "normalize",
]
