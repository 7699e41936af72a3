"""What it takes to re-create a container on another image: its ``docker run``, read back from
its inspect.

:func:`container_spec` turns ``GET /containers/{id}/json`` of the running container, and
``GET /images/{id}/json`` of the image it runs, into a :class:`ContainerSpec`: the body of
``POST /containers/create`` on the new image, and the extra networks to connect before it starts.
The engine merges an image's defaults into every container it creates, so a container's inspect
mixes what the user gave with what came from the image. What came from the *old* image is left
out, so that the *new* image's defaults apply; what the user gave is kept:

- ``Entrypoint`` and ``Cmd``: kept where they differ from the old image's (the engine takes the
  image's ``Cmd`` only when the entrypoint is the image's too); an entrypoint the user cleared
  (``--entrypoint ""``) stays cleared;
- ``Env``: entries equal to one of the old image's are left out; ``Labels``: likewise, except
  Compose's ``com.docker.compose.*``, which are always kept (``docker compose ps`` lists the
  container by them); ``ExposedPorts``: the old image's are left out, published ports kept;
- ``User``, ``WorkingDir``, ``StopSignal``: left out when equal to the old image's;
  ``Healthcheck``: each field equal to the old image's is left out (``--no-healthcheck`` and
  ``--health-*`` options are kept);
- ``Hostname``: left out when it is the engine's default (the first 12 characters of the
  container id), or when the container uses the host's network or UTS namespace;
- ``Volumes``: left out (the image's ``VOLUME`` s come from the new image); the container's
  *anonymous* volumes (an image's ``VOLUME`` or ``-v /path``) are mounted into the new container
  by name at the same place, as ``docker compose`` does, so their data carries over; named
  volumes and binds come with ``HostConfig``;
- ``HostConfig``: passed on whole (restart policy, port bindings, binds, mounts, resources,
  capabilities, devices, log config, DNS, extra hosts...), without ``ContainerIDFile`` (the CLI's
  own), and legacy ``Links`` back in the form ``docker run --link`` takes;
- networks: the primary one (``HostConfig.NetworkMode``) in ``NetworkingConfig``, the others in
  :attr:`ContainerSpec.connects`, each with its aliases, static addresses, links and driver
  options; the aliases the engine adds by itself (the container's short id and hostname) are left
  out, the engine adds the new container's own.

Some containers cannot be re-created safely; :func:`refusal` says why, and nothing is touched:
one run with ``--rm`` (stopping it removes it, so it could not be put back), one that shares
another container's network namespace (``--network container:X``), and one whose network
namespace others share (they would be cut off, and they name it by id).

Others follow Docker's own rules and are re-created: a container that others mount with
``--volumes-from`` (volumes outlive their container, the followers mounted them by name, and the
new container takes the anonymous ones over, so all of them keep sharing the same data), and one
that uses ``--volumes-from``, ``--ipc container:X`` or ``--pid container:X`` itself (X stays).
Not looked at: containers that join this one's IPC or PID namespace, and legacy ``--link`` s to
it from other containers (the engine keeps both running, as it does for ``docker stop``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

COMPOSE_LABEL_PREFIX = "com.docker.compose."
"""Compose's labels: always kept, so that ``docker compose`` still knows the container."""

_CONFIG_DROPPED = frozenset({
    "Image", "Volumes", "OnBuild", "Shell", "ArgsEscaped",  # the image's own
    "Hostname", "Entrypoint", "Cmd", "Env", "Labels", "ExposedPorts", "User", "WorkingDir",
    "StopSignal", "Healthcheck",  # decided one by one below
})
_HEALTH_FIELDS = ("Test", "Interval", "Timeout", "Retries", "StartPeriod", "StartInterval")
_ENDPOINT_KEPT = ("IPAMConfig", "Links", "DriverOpts")
_SHORT_ID = 12


@attrs.frozen
class ContainerSpec:
    """A container to create: ``name``, the ``body`` of ``POST /containers/create``, and
    ``connects``, ``(network, EndpointConfig)`` to attach before it starts. ``volumes``: the
    anonymous volumes it takes over, by destination."""

    name: str
    body: Mapping[str, Any]
    connects: tuple[tuple[str, Mapping[str, Any]], ...] = ()
    volumes: Mapping[str, str] = attrs.field(factory=dict)

    @property
    def primary_network(self) -> str:
        return str((self.body.get("HostConfig") or {}).get("NetworkMode") or "")


def container_spec(
    container: Mapping[str, Any],
    image: Mapping[str, Any],
    *,
    image_ref: str | None = None,
    inherited: Iterable[str] = (),
) -> ContainerSpec:
    """The spec that re-creates ``container`` (its inspect) on the image named ``image_ref``
    (by default the same ``Config.Image``, which then resolves to whatever it points at now).

    ``image`` is the inspect of the image ``container`` runs; ``inherited`` the destinations
    its ``--volumes-from`` containers give it, which come again through ``VolumesFrom``."""
    config: Mapping[str, Any] = container.get("Config") or {}
    host: Mapping[str, Any] = container.get("HostConfig") or {}
    defaults: Mapping[str, Any] = image.get("Config") or image.get("ContainerConfig") or {}
    name = str(container.get("Name") or "").lstrip("/")

    body: dict[str, Any] = {k: v for k, v in config.items() if k not in _CONFIG_DROPPED}
    body["Image"] = image_ref or str(config.get("Image") or "")
    body.update(_user_set(config, defaults))
    body.update(_command(config, defaults))
    hostname = str(config.get("Hostname") or "")
    if hostname and not _default_hostname(hostname, container, host):
        body["Hostname"] = hostname
    ports = _exposed_ports(config, defaults, host)
    if ports:
        body["ExposedPorts"] = ports

    host_config = {k: v for k, v in host.items() if k != "ContainerIDFile"}
    if host.get("Links"):
        host_config["Links"] = [_link(link) for link in host["Links"]]
    volumes = _anonymous_volumes(container, host, inherited)
    if volumes:
        host_config["Mounts"] = [*(host.get("Mounts") or ()), *(
            {"Type": "volume", "Source": volume, "Target": target, "ReadOnly": read_only}
            for target, (volume, read_only) in volumes.items()
        )]
    body["HostConfig"] = host_config

    primary, endpoints = _networks(container, host)
    connects: list[tuple[str, Mapping[str, Any]]] = []
    for network, endpoint in endpoints.items():
        if network == primary:
            body["NetworkingConfig"] = {"EndpointsConfig": {network: endpoint}}
        else:
            connects.append((network, endpoint))
    return ContainerSpec(name, body, tuple(connects),
                         {target: volume for target, (volume, _) in volumes.items()})


def refusal(container: Mapping[str, Any], others: Sequence[Mapping[str, Any]]) -> str | None:
    """Why ``container`` (its inspect) must not be re-created, or None. ``others``: every
    container of the engine, as ``GET /containers/json?all=1`` lists them."""
    host: Mapping[str, Any] = container.get("HostConfig") or {}
    if host.get("AutoRemove"):
        return ("it runs with --rm (AutoRemove): stopping it would remove it, so it could not"
                " be put back if its replacement failed")
    mode = str(host.get("NetworkMode") or "")
    if mode.startswith("container:"):
        return (f"it shares the network namespace of another container ({mode}); re-create"
                " that one and its followers together instead (e.g. with docker compose)")
    cid = str(container.get("Id") or "")
    name = str(container.get("Name") or "").lstrip("/")
    followers = sorted(
        _list_name(other) for other in others
        if other.get("Id") != cid and _joins(other, cid, name)
    )
    if followers:
        return (f"the containers {', '.join(followers)} share its network namespace"
                " (--network container:...); re-creating it would cut them off")
    return None


# -- the parts ----------------------------------------------------------------------------------


def _same(a: Any, b: Any) -> bool:
    """Equal, counting None, empty lists and empty strings alike."""
    return (a or None) == (b or None)


def _user_set(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in ("User", "WorkingDir", "StopSignal"):
        if config.get(key) and not _same(config.get(key), defaults.get(key)):
            out[key] = config[key]
    image_env = set(defaults.get("Env") or ())
    env = [e for e in config.get("Env") or () if e not in image_env]
    if env:
        out["Env"] = env
    image_labels: Mapping[str, str] = defaults.get("Labels") or {}
    labels = {
        k: v for k, v in (config.get("Labels") or {}).items()
        if k.startswith(COMPOSE_LABEL_PREFIX) or k not in image_labels or image_labels[k] != v
    }
    if labels:
        out["Labels"] = labels
    health = _healthcheck(config.get("Healthcheck"), defaults.get("Healthcheck"))
    if health:
        out["Healthcheck"] = health
    return out


def _command(config: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The engine takes the image's ``Cmd`` only for a container whose entrypoint is the
    image's; so a ``Cmd`` is the user's if it differs from the image's or if the entrypoint
    is the user's."""
    entrypoint, cmd = config.get("Entrypoint"), config.get("Cmd")
    if _same(entrypoint, defaults.get("Entrypoint")):
        return {} if _same(cmd, defaults.get("Cmd")) else {"Cmd": cmd}
    out: dict[str, Any] = {"Entrypoint": entrypoint or [""]}  # [""]: cleared, as the CLI says it
    if cmd:
        out["Cmd"] = cmd
    return out


def _healthcheck(health: Any, default: Any) -> dict[str, Any] | None:
    if not isinstance(health, Mapping):
        return None
    default = default if isinstance(default, Mapping) else {}
    kept = {k: health[k] for k in _HEALTH_FIELDS
            if health.get(k) and not _same(health.get(k), default.get(k))}
    return kept or None


def _default_hostname(hostname: str, container: Mapping[str, Any],
                      host: Mapping[str, Any]) -> bool:
    """The engine's own choice: the container id's first 12 characters, or the host's name for
    a container in the host's network or UTS namespace."""
    if hostname == str(container.get("Id") or "")[:_SHORT_ID]:
        return True
    return host.get("NetworkMode") == "host" or host.get("UTSMode") == "host"


def _exposed_ports(config: Mapping[str, Any], defaults: Mapping[str, Any],
                   host: Mapping[str, Any]) -> dict[str, Any]:
    image_ports = defaults.get("ExposedPorts") or {}
    exposed = config.get("ExposedPorts") or {}
    ports: dict[str, Any] = {p: {} for p in exposed if p not in image_ports}
    ports.update({p: {} for p in host.get("PortBindings") or {}})
    return ports


def _link(link: str) -> str:
    """``/db:/web/alias`` as the engine shows it, back to ``db:alias`` as it takes it."""
    target, _, alias = link.partition(":")
    target = target.lstrip("/")
    alias = alias.rsplit("/", 1)[-1] if alias else target
    return f"{target}:{alias}"


def _bind_target(bind: str) -> str:
    parts = bind.split(":")
    return parts[1] if len(parts) > 1 else parts[0]


def _anonymous_volumes(container: Mapping[str, Any], host: Mapping[str, Any],
                       inherited: Iterable[str]) -> dict[str, tuple[str, bool]]:
    """Destination -> (volume name, read-only) of the volumes that no ``Binds``, ``Mounts`` or
    ``VolumesFrom`` gives: the anonymous ones."""
    given = {_bind_target(b) for b in host.get("Binds") or ()}
    given |= {str(m.get("Target") or "") for m in host.get("Mounts") or ()}
    given |= set(inherited)
    given |= set(host.get("Tmpfs") or {})
    out: dict[str, tuple[str, bool]] = {}
    for mount in container.get("Mounts") or ():
        target = str(mount.get("Destination") or "")
        if mount.get("Type") == "volume" and mount.get("Name") and target not in given:
            out[target] = (str(mount["Name"]), not mount.get("RW", True))
    return out


def _networks(container: Mapping[str, Any],
              host: Mapping[str, Any]) -> tuple[str, dict[str, dict[str, Any]]]:
    """The primary network's name, and each network's ``EndpointConfig`` to create with."""
    mode = str(host.get("NetworkMode") or "")
    attached: Mapping[str, Any] = (container.get("NetworkSettings") or {}).get("Networks") or {}
    primary = mode
    if mode == "default":
        primary = "bridge"
    elif mode not in attached:
        for network, settings in attached.items():
            if mode and str((settings or {}).get("NetworkID") or "").startswith(mode):
                primary = network
    drop = {str(container.get("Id") or "")[:_SHORT_ID],
            str((container.get("Config") or {}).get("Hostname") or "")}
    endpoints: dict[str, dict[str, Any]] = {}
    for network, settings in attached.items():
        settings = settings or {}
        endpoint = {k: settings[k] for k in _ENDPOINT_KEPT if settings.get(k)}
        aliases = [a for a in settings.get("Aliases") or () if a not in drop]
        if aliases:
            endpoint["Aliases"] = aliases
        if network in ("host", "none") or (network == primary and not endpoint):
            continue  # nothing to say beyond NetworkMode
        endpoints[network] = endpoint
    return primary, endpoints


def _joins(other: Mapping[str, Any], cid: str, name: str) -> bool:
    mode = str((other.get("HostConfig") or {}).get("NetworkMode") or "")
    if not mode.startswith("container:"):
        return False
    ref = mode.partition(":")[2]
    return ref == name or (len(ref) >= _SHORT_ID and cid.startswith(ref))


def _list_name(entry: Mapping[str, Any]) -> str:
    names = entry.get("Names") or ()
    return str(names[0]).lstrip("/") if names else str(entry.get("Id") or "")[:_SHORT_ID]
