"""Containers of the in-memory Docker engine: what ``POST /containers/create`` keeps, and how
inspect and the container list show it, as dockerd 20.10 does.

:func:`container_config` merges the configuration given at create with the image's defaults as
dockerd's ``merge`` does (``Env`` by key, ``Labels`` by key, ``Cmd``/``Entrypoint`` only where the
caller left both out, ``Healthcheck`` field by field, ``User``, ``WorkingDir``...);
:func:`host_config` fills in every ``HostConfig`` field the engine shows; :func:`endpoints` are the
networks a container is created on (``NetworkingConfig``, else its ``NetworkMode``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import attrs

from deployer.testing.memory_common import ZERO_TIME, ApiError, human_duration, timestamp
from deployer.testing.memory_health import STEADY, Behaviour, Healthcheck, HealthState
from deployer.testing.memory_images import ImageState, ordered_config

_MASKED = ["/proc/asound", "/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
           "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
           "/sys/firmware"]
_READONLY = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
#: ``HostConfig`` of a container created with ``{}``, as dockerd 20.10 shows it (``Runtime``
#: comes once it ran).
_HOST_CONFIG: Mapping[str, Any] = {
    "Binds": None, "ContainerIDFile": "", "LogConfig": {"Type": "json-file", "Config": {}},
    "NetworkMode": "default", "PortBindings": None,
    "RestartPolicy": {"Name": "", "MaximumRetryCount": 0}, "AutoRemove": False,
    "VolumeDriver": "", "VolumesFrom": None, "CapAdd": None, "CapDrop": None,
    "CgroupnsMode": "host", "Dns": None, "DnsOptions": None, "DnsSearch": None,
    "ExtraHosts": None, "GroupAdd": None, "IpcMode": "private", "Cgroup": "", "Links": None,
    "OomScoreAdj": 0, "PidMode": "", "Privileged": False, "PublishAllPorts": False,
    "ReadonlyRootfs": False, "SecurityOpt": None, "UTSMode": "", "UsernsMode": "",
    "ShmSize": 67108864, "Runtime": None, "ConsoleSize": [0, 0], "Isolation": "",
    "CpuShares": 0, "Memory": 0, "NanoCpus": 0, "CgroupParent": "", "BlkioWeight": 0,
    "BlkioWeightDevice": None, "BlkioDeviceReadBps": None, "BlkioDeviceWriteBps": None,
    "BlkioDeviceReadIOps": None, "BlkioDeviceWriteIOps": None, "CpuPeriod": 0, "CpuQuota": 0,
    "CpuRealtimePeriod": 0, "CpuRealtimeRuntime": 0, "CpusetCpus": "", "CpusetMems": "",
    "Devices": None, "DeviceCgroupRules": None, "DeviceRequests": None, "KernelMemory": 0,
    "KernelMemoryTCP": 0, "MemoryReservation": 0, "MemorySwap": 0, "MemorySwappiness": None,
    "OomKillDisable": False, "PidsLimit": None, "Ulimits": None, "CpuCount": 0,
    "CpuPercent": 0, "IOMaximumIOps": 0, "IOMaximumBandwidth": 0, "MaskedPaths": _MASKED,
    "ReadonlyPaths": _READONLY,
}
#: An endpoint of ``NetworkSettings.Networks`` before the container ran on it.
ENDPOINT: Mapping[str, Any] = {
    "IPAMConfig": None, "Links": None, "Aliases": None, "NetworkID": "", "EndpointID": "",
    "Gateway": "", "IPAddress": "", "IPPrefixLen": 0, "IPv6Gateway": "",
    "GlobalIPv6Address": "", "GlobalIPv6PrefixLen": 0, "MacAddress": "", "DriverOpts": None,
}
#: What an endpoint holds only while its container runs.
RUNTIME_ENDPOINT_KEYS = ("EndpointID", "Gateway", "IPAddress", "IPPrefixLen", "MacAddress")
#: Networks every engine has (the engines of the test stack run with ``--bridge=none``).
PREDEFINED_NETWORKS = ("host", "none")


def _env_key(item: str) -> str:
    return item.split("=", 1)[0]


def container_config(body: Mapping[str, Any], image: ImageState,
                     container_id: str) -> dict[str, Any]:
    """``Config`` of a container created with ``body`` on ``image`` (dockerd's ``merge``)."""
    user = {k: copy.deepcopy(v) for k, v in body.items()
            if k not in ("HostConfig", "NetworkingConfig")}
    base = image.full_config()
    for key in ("User", "WorkingDir", "StopSignal"):
        if not user.get(key) and base.get(key):
            user[key] = base[key]
    if base.get("ExposedPorts"):
        user["ExposedPorts"] = {**base["ExposedPorts"], **(user.get("ExposedPorts") or {})}
    if base.get("Volumes"):
        user["Volumes"] = {**base["Volumes"], **(user.get("Volumes") or {})}
    if not user.get("Env"):
        user["Env"] = base.get("Env")
    else:
        mine = {_env_key(e) for e in user["Env"]}
        user["Env"] = [*user["Env"], *(e for e in base.get("Env") or () if _env_key(e) not in mine)]
    labels = dict(user.get("Labels") or {})
    for key, value in (base.get("Labels") or {}).items():
        labels.setdefault(key, value)
    user["Labels"] = labels
    if not user.get("Entrypoint"):
        if not user.get("Cmd"):
            user["Cmd"] = base.get("Cmd")
            if base.get("Shell"):
                user["Shell"] = base["Shell"]
        if user.get("Entrypoint") is None:
            user["Entrypoint"] = base.get("Entrypoint")
    if not user.get("Entrypoint") and not user.get("Cmd"):
        raise ApiError(400, "No command specified")
    given = Healthcheck.from_json(user.get("Healthcheck"))
    image_check = Healthcheck.from_json(base.get("Healthcheck"))
    check = given.merged(image_check) if given is not None else image_check
    user.pop("Healthcheck", None)
    if check is not None:
        user["Healthcheck"] = check.to_json()
    user["Hostname"] = user.get("Hostname") or container_id[:12]
    return ordered_config(user)


def host_config(given: Mapping[str, Any] | None) -> dict[str, Any]:
    """``HostConfig`` as the engine shows it: ``given`` over the defaults (``Runtime`` only once
    it ran, unless the create gave a ``HostConfig``)."""
    out = copy.deepcopy(dict(_HOST_CONFIG))
    for key, value in (given or {}).items():
        out[key] = copy.deepcopy(value)
    if given is not None and not out.get("Runtime"):
        out["Runtime"] = "runc"
    out["NetworkMode"] = out.get("NetworkMode") or "default"
    policy = out.get("RestartPolicy") or {}
    out["RestartPolicy"] = {"Name": policy.get("Name", ""),
                            "MaximumRetryCount": policy.get("MaximumRetryCount", 0)}
    if out.get("PortBindings"):
        out["PortBindings"] = {
            port: [{"HostIp": b.get("HostIp", ""), "HostPort": b.get("HostPort", "")}
                   for b in bindings or ()]
            for port, bindings in out["PortBindings"].items()}
    return out


RESTART_POLICIES = ("", "no", "always", "unless-stopped", "on-failure")


def restart_policy(given: Any) -> dict[str, Any]:
    """A ``RestartPolicy`` that ``POST /containers/{id}/update`` accepts, as the engine keeps it;
    :class:`ApiError` 400 with dockerd's message otherwise."""
    policy = given if isinstance(given, Mapping) else {}
    name = str(policy.get("Name") or "")
    most = int(policy.get("MaximumRetryCount") or 0)
    if name not in RESTART_POLICIES:
        raise ApiError(400, f"invalid restart policy '{name}'")
    if most and name != "on-failure":
        raise ApiError(400, f"maximum retry count cannot be used with restart policy '{name}'")
    if most < 0:
        raise ApiError(400, "maximum retry count cannot be negative")
    return {"Name": name, "MaximumRetryCount": most}


def endpoint(given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    return {**copy.deepcopy(dict(ENDPOINT)), **copy.deepcopy(dict(given or {}))}


def endpoints(host: Mapping[str, Any],
              networking: Mapping[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The networks a container is created on (dockerd's ``updateContainerNetworkSettings``)."""
    configs = dict((networking or {}).get("EndpointsConfig") or {})
    if len(configs) > 1:
        raise ApiError(400, "Container cannot be connected to network endpoints: "
                            + ", ".join(sorted(configs)))
    mode = str(host.get("NetworkMode") or "default")
    if mode.startswith("container:"):
        return {}
    if configs:
        return {name: endpoint(config) for name, config in configs.items()}
    return {"bridge" if mode == "default" else mode: endpoint()}


def _mounts(host: Mapping[str, Any], data_root: str) -> list[dict[str, Any]]:
    mounts = []
    for bind in host.get("Binds") or ():
        source, _, rest = str(bind).partition(":")
        destination, _, mode = rest.partition(":")
        if source.startswith("/"):
            mounts.append({"Type": "bind", "Source": source, "Destination": destination,
                           "Mode": mode, "RW": "ro" not in mode.split(","),
                           "Propagation": "rprivate"})
        else:
            mounts.append({"Type": "volume", "Name": source,
                           "Source": f"{data_root}/volumes/{source}/_data",
                           "Destination": destination, "Driver": "local", "Mode": mode or "z",
                           "RW": "ro" not in mode.split(","), "Propagation": ""})
    return mounts


@attrs.define(eq=False)
class ContainerState:
    """A container. ``image_ref`` is what it was created from (``Config.Image``); ``status`` is
    ``created``, ``running``, ``restarting`` or ``exited``."""

    id: str
    name: str
    image_ref: str
    image_id: str
    created: float
    config: dict[str, Any] = attrs.field(factory=dict)
    host_config: dict[str, Any] = attrs.field(factory=lambda: host_config(None))
    networks: dict[str, dict[str, Any]] = attrs.field(factory=dict)
    behaviour: Behaviour = STEADY
    status: str = "created"
    exit_code: int = 0
    error: str = ""
    started: float | None = None
    finished: float | None = None
    restart_count: int = 0
    health: HealthState | None = None
    #: Stopped or killed through the API: its restart policy no longer applies.
    manually_stopped: bool = False
    has_run: bool = False

    @property
    def running(self) -> bool:
        """Running as ``State.Running`` says: also while it waits to be restarted."""
        return self.status in ("running", "restarting")

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.config.get("Labels") or {})

    @property
    def healthcheck(self) -> Healthcheck | None:
        check = Healthcheck.from_json(self.config.get("Healthcheck"))
        return check if check is not None and check.enabled else None

    def command(self) -> list[str]:
        return [*(self.config.get("Entrypoint") or ()), *(self.config.get("Cmd") or ())]

    def state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "Status": self.status, "Running": self.running, "Paused": False,
            "Restarting": self.status == "restarting", "OOMKilled": False, "Dead": False,
            "Pid": (int(self.id[:4], 16) + 1) if self.status == "running" else 0,
            "ExitCode": self.exit_code, "Error": self.error,
            "StartedAt": timestamp(self.started) if self.started is not None else ZERO_TIME,
            "FinishedAt": timestamp(self.finished) if self.finished is not None else ZERO_TIME,
        }
        if self.health is not None:
            state["Health"] = self.health.to_json()
        return state

    def inspect(self, data_root: str = "/var/lib/docker") -> dict[str, Any]:
        command = self.command()
        directory = f"{data_root}/containers/{self.id}"
        ran = self.has_run
        host = copy.deepcopy(self.host_config)
        if host.get("Runtime") is None:
            if ran:
                host["Runtime"] = "runc"
            else:
                del host["Runtime"]
        return {
            "Id": self.id, "Created": timestamp(self.created),
            "Path": command[0] if command else "", "Args": command[1:], "State": self.state(),
            "Image": self.image_id,
            "ResolvConfPath": f"{directory}/resolv.conf" if ran else "",
            "HostnamePath": f"{directory}/hostname" if ran else "",
            "HostsPath": f"{directory}/hosts" if ran else "",
            "LogPath": f"{directory}/{self.id}-json.log" if ran else "",
            "Name": "/" + self.name, "RestartCount": self.restart_count, "Driver": "memory",
            "Platform": "linux", "MountLabel": "", "ProcessLabel": "", "AppArmorProfile": "",
            "ExecIDs": None, "HostConfig": host,
            "GraphDriver": {"Data": None, "Name": "memory"},
            "Mounts": _mounts(self.host_config, data_root), "Config": copy.deepcopy(self.config),
            "NetworkSettings": self._network_settings(),
        }

    def _ports(self) -> dict[str, Any]:
        if self.status != "running":
            return {}
        out: dict[str, Any] = {}
        for port in self.config.get("ExposedPorts") or {}:
            out[port] = None
        for port, bindings in (self.host_config.get("PortBindings") or {}).items():
            out[port] = [{"HostIp": ip, "HostPort": b["HostPort"]} for b in bindings or ()
                         for ip in ((b["HostIp"],) if b["HostIp"] else ("0.0.0.0", "::"))]
        return out

    def _network_settings(self) -> dict[str, Any]:
        running = self.status == "running"
        return {
            "Bridge": "", "SandboxID": self.id[::-1] if running else "", "HairpinMode": False,
            "LinkLocalIPv6Address": "", "LinkLocalIPv6PrefixLen": 0, "Ports": self._ports(),
            "SandboxKey": f"/var/run/docker/netns/{self.id[::-1][:12]}" if running else "",
            "SecondaryIPAddresses": None, "SecondaryIPv6Addresses": None, "EndpointID": "",
            "Gateway": "", "GlobalIPv6Address": "", "GlobalIPv6PrefixLen": 0, "IPAddress": "",
            "IPPrefixLen": 0, "IPv6Gateway": "", "MacAddress": "",
            "Networks": copy.deepcopy(self.networks),
        }

    def summary(self, listed_image: str, now: float) -> dict[str, Any]:
        """The container as ``GET /containers/json`` lists it."""
        ports: list[dict[str, Any]] = []
        for port, bindings in sorted(self._ports().items()):  # only while it runs
            number, _, proto = port.partition("/")
            if bindings:
                ports += [{"IP": b["HostIp"], "PrivatePort": int(number),
                           "PublicPort": int(b["HostPort"]), "Type": proto or "tcp"}
                          for b in bindings]
            else:
                ports.append({"PrivatePort": int(number), "Type": proto or "tcp"})
        networks = {name: {**ep, "Aliases": None} for name, ep in self.networks.items()}
        return {
            "Id": self.id, "Names": ["/" + self.name], "Image": listed_image,
            "ImageID": self.image_id, "Command": " ".join(self.command()),
            "Created": int(self.created), "Ports": ports, "Labels": self.labels,
            "State": self.status, "Status": self._status_line(now),
            "HostConfig": {"NetworkMode": self.host_config.get("NetworkMode", "default")},
            "NetworkSettings": {"Networks": networks},
            "Mounts": _mounts(self.host_config, "/var/lib/docker"),
        }

    def _status_line(self, now: float) -> str:
        if self.status == "created":
            return "Created"
        if self.status == "running":
            health = ""
            if self.health is not None:
                health = (" (health: starting)" if self.health.status == "starting"
                          else f" ({self.health.status})")
            return f"Up {human_duration(now - (self.started or now))}{health}"
        ago = human_duration(now - (self.finished or now))
        word = "Restarting" if self.status == "restarting" else "Exited"
        return f"{word} ({self.exit_code}) {ago} ago"


__all__ = [
    "ENDPOINT", "PREDEFINED_NETWORKS", "RUNTIME_ENDPOINT_KEYS", "ContainerState",
    "container_config", "endpoint", "endpoints", "host_config",
]
