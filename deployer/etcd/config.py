"""How to reach etcd: one field per command-line flag."""

from __future__ import annotations

import attrs


@attrs.define
class EtcdConfig:
    """``--etcd_nodes``, ``--etcd_prefix``, ``--etcd_dial_timeout``, ``--etcd_retry_delay`` and
    ``--strong_consistency``."""

    nodes: tuple[str, ...]
    prefix: str = "/deployer"
    dial_timeout: float = 5.0
    retry_delay: float = 2.0
    strong_consistency: bool = False
