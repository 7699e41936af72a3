"""Small helpers shared by the fast tests."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from deployer.model import Update
from deployer.reference import check_digest, check_tag, parse_name


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path (keys and indexes) into a JSON value, the root first."""
    yield prefix
    if isinstance(value, dict):
        for key, child in value.items():
            yield from paths(child, (*prefix, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from paths(child, (*prefix, index))


def replaced(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    """A copy of ``value`` with the part at ``path`` replaced by ``new``."""
    if not path:
        return new
    value = copy.copy(value)
    value[path[0]] = replaced(value[path[0]], path[1:], new)
    return value


def fired(d: Deferred[Any]) -> Any:
    """The result of a Deferred that must have fired already (a Failure is raised)."""
    results: list[Any] = []
    d.addBoth(results.append)
    assert results, f"{d} has not fired"
    if isinstance(results[0], Failure):
        results[0].raiseException()
    return results[0]


def assert_valid(update: Update) -> None:
    """What every Update that leaves a parser, or reaches a sink, must be."""
    assert isinstance(update, Update)
    for text in (update.name, update.tag or "x", update.digest or "x"):
        assert text.isascii() and text.isprintable() and " " not in text
    assert update.repository != "*"
    assert parse_name(update.name) == (update.registry, update.repository)
    if update.tag is not None:
        assert check_tag(update.tag) == update.tag
    if update.digest is not None:
        assert check_digest(update.digest) == update.digest
