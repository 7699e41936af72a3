"""How a stale container is replaced, and how a failed replacement is undone.

Two ways, chosen per container (``--replace``, overridden by its ``deployer.replace`` label):

- ``stop`` (:class:`StopReplacer` in :mod:`deployer.replacers`): stop it; its supervisor
  (systemd ``Restart=always``, fleet) starts it again on the new image;
- ``recreate`` (:mod:`deployer.recreate`): the host re-creates it from its inspected
  configuration on the new image, for hosts where nothing supervises containers.

Both are :class:`Replacer`\\ s. The rollout (:mod:`deployer.rollout_round`) calls one inside a
rollout slot: :meth:`Replacer.replace` takes the old container down and waits until a container of
the same name runs the new image and is ready (:mod:`deployer.readiness`); when it is not,
:meth:`Replacer.roll_back` brings the previous build back under that name. Neither ever leaves a
host with fewer instances than before without saying so.
"""

from __future__ import annotations

import enum
from typing import Protocol

import attrs

from deployer.docker import Container
from deployer.readiness import NotReady, Readiness

REPLACE_LABEL = "deployer.replace"
"""A container's label that chooses its :class:`ReplaceMode`, whatever ``--replace`` says."""
ENABLE_LABEL = "deployer.enable"
"""``false`` keeps a container out of every round; with ``--label_enable`` only ``true`` ones
are touched."""


class ReplaceMode(enum.Enum):
    STOP = "stop"
    RECREATE = "recreate"


@attrs.frozen
class Replacement:
    """One stale container, and what it is to run next.

    ``app`` is its ``repo:tag`` (familiar form); ``old_image`` the image id it runs;
    ``new_image`` the image id ``app`` points at now.
    """

    container: Container
    app: str
    old_image: str
    new_image: str

    @property
    def name(self) -> str:
        return self.container.name


class Replacer(Protocol):
    async def replace(self, replacement: Replacement) -> Readiness:
        """Take the old container down and wait until its replacement is ready (or not)."""
        ...

    async def roll_back(self, replacement: Replacement, outcome: NotReady) -> None:
        """After ``outcome``: put ``app`` back on ``old_image`` and a container of the same name
        running it, as it was before :meth:`replace`."""
        ...


def wanted_mode(container: Container, default: ReplaceMode) -> ReplaceMode:
    """The container's ``deployer.replace`` label, else ``default``; an unknown value counts
    as ``default``."""
    label = container.labels.get(REPLACE_LABEL, "").strip().lower()
    for mode in ReplaceMode:
        if label == mode.value:
            return mode
    return default


def enabled(container: Container, label_enable: bool) -> bool:
    """Whether a round may touch ``container`` (``deployer.enable``, ``--label_enable``)."""
    value = container.labels.get(ENABLE_LABEL, "").strip().lower()
    if label_enable:
        return value == "true"
    return value != "false"
