"""``twistd deployer``: the command-line options and the service they build.

The flags, their defaults and their help are :data:`deployer.config.FLAGS`. Every flag of the
Go original keeps its name and default (``--etcd_nodes``); the dashed spelling
(``--etcd-nodes``) and the Go style with one dash (``-etcd_nodes=...``) work too.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from twisted.application.service import IService
from twisted.python import usage

from deployer.config import FLAGS, Config, build_config
from deployer.errors import ConfigError


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Continuous deployment for plain Docker hosts: takes registry webhooks, records them in"
        " etcd (or, without --etcd_nodes, acts on this host alone), pulls the new images and"
        " stops the containers they make outdated so that their supervisor restarts them."
    )

    optParameters: list[list[Any]] = [
        [flag.name, None, flag.option_default, flag.help_text] for flag in FLAGS if not flag.switch
    ]
    optFlags: list[list[Any]] = [[flag.name, None, flag.help_text] for flag in FLAGS if flag.switch]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.environ = dict(os.environ if environ is None else environ)
        self.config: Config | None = None

    def parseOptions(self, options: Sequence[str] | None = None) -> None:
        args = list(sys.argv[1:] if options is None else options)
        super().parseOptions(self.normalize(args))

    def normalize(self, args: Sequence[str]) -> list[str]:
        """Accept ``-name``, ``-name=value``, ``--name-with-dashes``; leave values alone."""
        params = {p[0] for p in self.optParameters}
        flags = {f[0] for f in self.optFlags} | {"help", "version"}
        out: list[str] = []
        it = iter(args)
        for arg in it:
            if arg == "--":
                out.append(arg)
                out.extend(it)
                break
            if not arg.startswith("-") or arg == "-":
                out.append(arg)
                continue
            name, eq, value = arg.lstrip("-").partition("=")
            key = name.replace("-", "_")
            if key in params:
                out.append(f"--{key}={value}" if eq else f"--{key}")
                if not eq:
                    nxt = next(it, None)
                    if nxt is not None:
                        out.append(nxt)
            elif key in flags and not eq:
                out.append(f"--{key}")
            elif key in flags and eq:
                if value.lower() in ("true", "1", "t"):
                    out.append(f"--{key}")
                elif value.lower() not in ("false", "0", "f"):
                    raise usage.UsageError(f"--{key} takes no value, or true/false: {arg!r}")
            else:
                out.append(arg)
        return out

    def postOptions(self) -> None:
        try:
            self.config = build_config(self, self.environ)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from e


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    from deployer.service import DeployerService

    assert options.config is not None
    return DeployerService.from_config(options.config, reactor)
