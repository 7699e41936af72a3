"""Networks of the in-memory Docker engine: the predefined ``host`` and ``none`` (the engines of
the test stack run with ``--bridge=none``, so there is no ``bridge``), and named networks a test
adds. A container's endpoint on a network gets its addresses while the container runs, and the
container's short id (and the host name it was given) as aliases on a user-defined network, as
dockerd does."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from deployer.testing.memory_common import ApiError, timestamp
from deployer.testing.memory_containers import RUNTIME_ENDPOINT_KEYS, ContainerState, endpoint
from deployer.testing.memory_events import EventLog

PREDEFINED = {"none": "null", "host": "host"}


@attrs.define(eq=False)
class NetworkState:
    id: str
    name: str
    driver: str
    created: float
    index: int

    @property
    def user_defined(self) -> bool:
        return self.name not in PREDEFINED

    def summary(self, containers: Iterable[ContainerState] = ()) -> dict[str, Any]:
        """As ``GET /networks`` lists it (``containers``: for ``GET /networks/{id}``)."""
        attached = {
            c.id: {"Name": c.name, "EndpointID": ep["EndpointID"], "MacAddress": ep["MacAddress"],
                   "IPv4Address": f"{ep['IPAddress']}/{ep['IPPrefixLen']}", "IPv6Address": ""}
            for c in containers if c.status == "running"
            for name, ep in c.networks.items() if name == self.name and ep["EndpointID"]
        }
        subnet = ([{"Subnet": f"172.{18 + self.index}.0.0/16",
                    "Gateway": f"172.{18 + self.index}.0.1"}] if self.user_defined else [])
        return {
            "Name": self.name, "Id": self.id, "Created": timestamp(self.created),
            "Scope": "local", "Driver": self.driver, "EnableIPv6": False,
            "IPAM": {"Driver": "default", "Options": None if not self.user_defined else {},
                     "Config": subnet},
            "Internal": False, "Attachable": False, "Ingress": False,
            "ConfigFrom": {"Network": ""}, "ConfigOnly": False, "Containers": attached,
            "Options": {}, "Labels": {},
        }

    def attach(self, container: ContainerState, host_index: int, running: bool) -> None:
        """Give ``container``'s endpoint on this network its aliases, and its addresses when
        ``running``."""
        endpoint = container.networks[self.name]
        if self.user_defined:
            aliases = list(endpoint.get("Aliases") or [])
            wanted = [container.id[:12]]
            hostname = container.config.get("Hostname")
            if running and hostname:
                wanted.append(hostname)
            for alias in wanted:
                if alias not in aliases:
                    aliases.append(alias)
            endpoint["Aliases"] = aliases
        if not running:
            return
        endpoint["NetworkID"] = self.id
        if self.user_defined:
            octet = 18 + self.index
            endpoint.update({
                "EndpointID": secrets.token_hex(32), "Gateway": f"172.{octet}.0.1",
                "IPAddress": f"172.{octet}.0.{host_index}", "IPPrefixLen": 16,
                "MacAddress": f"02:42:ac:{octet:02x}:00:{host_index:02x}",
            })

    def detach(self, container: ContainerState) -> None:
        """The container stopped: its endpoint keeps its configuration, not its addresses."""
        endpoint = container.networks.get(self.name)
        if endpoint is not None:
            for key in RUNTIME_ENDPOINT_KEYS:
                endpoint[key] = 0 if key == "IPPrefixLen" else ""


class Networks:
    """The networks of one engine, by id, in the order they were made."""

    def __init__(self, now: float) -> None:
        self._by_id: dict[str, NetworkState] = {}
        for name, driver in PREDEFINED.items():
            self.add(name, driver, now)

    def __iter__(self) -> Any:
        return iter(list(self._by_id.values()))

    def add(self, name: str, driver: str, now: float) -> NetworkState:
        network = NetworkState(secrets.token_hex(32), name, driver, now, len(self._by_id))
        self._by_id[network.id] = network
        return network

    def find(self, ref: str) -> NetworkState | None:
        """By id, name or unique id prefix (dockerd's ``FindNetwork``); :class:`ApiError` 400
        when a name is ambiguous."""
        if ref in self._by_id:
            return self._by_id[ref]
        named = [n for n in self._by_id.values() if n.name == ref]
        if len(named) > 1:
            raise ApiError(400, f"{len(named)} matches found based on name: network {ref} is"
                                " ambiguous")
        if named:
            return named[0]
        prefixed = [n for n in self._by_id.values() if n.id.startswith(ref)]
        return prefixed[0] if len(prefixed) == 1 else None

    def get(self, ref: str) -> NetworkState:
        found = self.find(ref)
        if found is None:
            raise ApiError(404, f"network {ref} not found")
        return found


class NetworkOps:
    """The network operations of an engine (a part of
    :class:`~deployer.testing.memory_state.EngineState`)."""

    networks: Networks
    containers: dict[str, ContainerState]
    events: EventLog

    def _now(self) -> float:
        raise NotImplementedError

    def _get(self, ref: str) -> ContainerState:
        raise NotImplementedError

    # -- networks -------------------------------------------------------------------------------

    def add_network(self, name: str, driver: str = "bridge") -> str:
        """``docker network create NAME``; returns its id."""
        if name in ("host", "none"):
            raise ApiError(403, f"operation is not permitted on predefined {name} network ")
        network = self.networks.add(name, driver, self._now())
        self.events.emit("network", "create", network.id, {"name": name, "type": driver})
        return network.id

    def connect_network(self, network: str, container_ref: str,
                        config: Mapping[str, Any] | None = None) -> None:
        """``POST /networks/{network}/connect`` (``config``: its ``EndpointConfig``)."""
        container = self._get(container_ref)
        found = self.networks.find(network)
        if container.status != "running":
            if found is None:  # dockerd keeps it as given, and fails the next start
                container.networks[network] = endpoint(config)
                return
            new = found.name not in container.networks
            container.networks[found.name] = endpoint(config)
            found.attach(container, 0, running=False)
            if new:
                self._network_event(found.id, "connect", container)
            return
        if found is None:
            raise ApiError(404, f"network {network} not found")
        if found.name in container.networks:
            raise ApiError(403, f"endpoint with name {container.name} already exists in network"
                                f" {found.name}")
        container.networks[found.name] = endpoint(config)
        self._attach(container, found.name)

    def _network_event(self, network_id: str, action: str, container: ContainerState) -> None:
        network = self.networks.get(network_id)
        self.events.emit("network", action, network.id,
                         {"container": container.id, "name": network.name,
                          "type": network.driver})

    def _attach(self, container: ContainerState, name: str) -> None:
        network = self.networks.find(name)
        if network is None or not network.user_defined:
            return
        index = 2 + sum(1 for c in self.containers.values() if c.status == "running"
                        and c is not container and name in c.networks)
        network.attach(container, index, running=True)
        self._network_event(network.id, "connect", container)


__all__ = ["PREDEFINED", "NetworkOps", "NetworkState", "Networks"]
