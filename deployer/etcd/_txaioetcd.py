"""The parts of txaioetcd that deployer uses, and nothing else of it.

txaioetcd (pinned to 18.10.2 in ``setup.py``) is the project's etcd library for its value types
and their marshalling: :class:`KeySet` (``_marshal``: a key or a prefix as ``key`` and
``range_end``), ``KeyValue._parse``, ``Header._parse``, ``Range._parse`` and ``Error._parse``
(the gateway's JSON answers). Every other module of :mod:`deployer.etcd` takes them from here.

Why not its ``Client``: txaioetcd 18.10.2 builds every URL under ``/v3alpha/`` (a 404 since etcd
3.4), posts through the module-level ``treq.post`` rather than its own pool, ignores
``serializable`` and most range arguments, talks to a single URL, drops any watch message that
arrives split across two TCP reads, and hides the event type (PUT or DELETE) and compaction
notices from the watch callback. So :mod:`deployer.etcd` does the HTTP itself.

Only txaioetcd's ``_types`` module is loaded, by file path (:func:`load_types`): the package's
``__init__`` also imports its LMDB database layer (zlmdb, which brings numpy), about 15 MB of
resident memory that this daemon never uses. Loading checks that every part used is there
(:data:`USED`), so that an upgrade that moves or removes one fails at start-up, loudly, rather
than at the first watch message.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from types import ModuleType
from typing import TYPE_CHECKING

VERSION = "18.10.2"
"""The txaioetcd release these parts were checked against (the pin in ``setup.py``)."""

USED = ("KeySet._marshal", "KeyValue._parse", "Header._parse", "Range._parse", "Error._parse")
"""Every attribute of ``txaioetcd._types`` that deployer calls."""

_NAME = "deployer.etcd._txaioetcd_types"


def load_types() -> ModuleType:
    """``txaioetcd._types``, without running the package's ``__init__``; the package's own
    module when something else imported it already. :class:`ImportError` if it lacks a part
    that deployer uses."""
    module = sys.modules.get("txaioetcd._types") or sys.modules.get(_NAME)
    if module is None:
        package = importlib.util.find_spec("txaioetcd")
        if package is None or not package.submodule_search_locations:
            raise ImportError(f"txaioetcd is not installed (deployer needs txaioetcd=={VERSION})")
        path = os.path.join(next(iter(package.submodule_search_locations)), "_types.py")
        spec = importlib.util.spec_from_file_location(_NAME, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[_NAME] = module
    for dotted in USED:
        owner: object = module
        for part in dotted.split("."):
            owner = getattr(owner, part, None)
            if owner is None:
                raise ImportError(
                    f"txaioetcd._types has no {dotted}: deployer needs txaioetcd=={VERSION}"
                )
    return module


if TYPE_CHECKING:
    from txaioetcd import Error, Header, KeySet, KeyValue, Range
else:
    _types = load_types()
    Error, Header, KeySet = _types.Error, _types.Header, _types.KeySet
    KeyValue, Range = _types.KeyValue, _types.Range

__all__ = ["Error", "Header", "KeySet", "KeyValue", "Range", "load_types"]
