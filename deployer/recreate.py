"""``--replace recreate``: the host re-creates a stale container itself, on the new image.

For hosts where nothing supervises containers (``docker run --restart unless-stopped``, Docker
Compose), :class:`RecreateReplacer` does what a user would do by hand, in an order that can always
be undone:

1. read the old container back (:mod:`deployer.container_spec`): refuse, touching nothing, when it
   cannot be re-created safely;
2. create the new container under a temporary name (``<name>-deployer-new-<old short id>``) and
   connect it to the old one's other networks; any error here leaves the old one as it was;
3. set the old one's restart policy to ``no`` if it is ``always`` or ``on-failure`` (a dockerd
   restarting meanwhile would start it again, next to its replacement), stop it (its own
   ``--stop-timeout``, else ``--kill_timeout``) and rename it
   ``<name>-deployer-old-<short id>``: it is kept until its replacement is ready;
4. rename the new one to ``<name>`` and start it;
5. wait until it is ready (:func:`deployer.readiness.wait_ready`: healthy if it has a health
   check, else running for ``--min_ready``, within ``--ready_timeout``);
6. remove the old one (its volumes stay: the new one uses them).

When any step fails, or the new container is not ready: the new one is removed, the old one gets
its name and its restart policy back and is started again, and
:meth:`RecreateReplacer.replace` answers :class:`~deployer.readiness.NotReady`. A container that
was not replaced successfully is never removed. :meth:`RecreateReplacer.roll_back` then points
the app's tag back at the previous image.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Protocol

import attrs
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from deployer.backoff import backoff, retrying
from deployer.container_spec import ContainerSpec, container_spec, refusal
from deployer.docker import Image
from deployer.errors import (
    ContainerNotFound,
    DeployerError,
    DockerError,
    DockerUnavailable,
    ImageNotFound,
    NotFound,
)
from deployer.events import EventSource
from deployer.readiness import (
    NotReady,
    NotReadyReason,
    Readiness,
    ReadyRules,
    wait_ready,
)
from deployer.reference import split
from deployer.replace import Replacement

log = Logger()

_BUILTIN_MODES = frozenset({"", "default", "bridge", "host", "none"})
NO_RESTART = {"Name": "no", "MaximumRetryCount": 0}
RESTARTED_WHEN_STOPPED = frozenset({"always", "on-failure"})
UNDO_RETRY = backoff(0.5, 10.0)
"""The delays between two tries of a step of the undo while the engine is away."""
NEW_SUFFIX = "-deployer-new-"
OLD_SUFFIX = "-deployer-old-"


class NotRecreatable(DeployerError):
    """A container that is not re-created; the message says why. Nothing was changed."""


class RecreateEngine(Protocol):
    """What re-creation needs of the engine: a :class:`DockerClient`,
    or a fake in tests."""

    def inspect_container(self, container_id: str) -> Awaitable[dict[str, Any]]: ...
    def image_json(self, image: str) -> Awaitable[dict[str, Any]]: ...
    def all_containers(self) -> Awaitable[list[dict[str, Any]]]: ...
    def network_json(self, network: str) -> Awaitable[dict[str, Any]]: ...
    def inspect_image(self, name: str) -> Awaitable[Image]: ...
    def create(self, name: str, config: Mapping[str, Any]) -> Awaitable[str]: ...
    def connect(self, network: str, container_id: str,
                endpoint: Mapping[str, Any] | None = None) -> Awaitable[None]: ...
    def stop(self, container_id: str, timeout: int) -> Awaitable[None]: ...
    def rename(self, container_id: str, name: str) -> Awaitable[None]: ...
    def start(self, container_id: str) -> Awaitable[None]: ...
    def remove(self, container_id: str, force: bool = False) -> Awaitable[None]: ...
    def set_restart_policy(self, container_id: str,
                           policy: Mapping[str, Any]) -> Awaitable[None]: ...
    def tag(self, image: str, repository: str, tag: str) -> Awaitable[None]: ...


@attrs.frozen
class Plan:
    """One re-creation: the old container's ``old_id``, ``stop_timeout`` and
    ``restart_policy``, the ``spec`` of the new one, and the temporary names."""

    replacement: Replacement
    old_id: str
    stop_timeout: int
    spec: ContainerSpec
    restart_policy: Mapping[str, Any] = attrs.Factory(dict)

    @property
    def restarts(self) -> bool:
        """Whether dockerd, were it to restart, would start the old container again although it
        was stopped by hand (``always``; ``on-failure`` after a non-zero exit): its policy is
        set aside while it is stopped. ``unless-stopped`` is not."""
        return self.restart_policy.get("Name") in RESTARTED_WHEN_STOPPED

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def new_name(self) -> str:
        return f"{self.name}{NEW_SUFFIX}{self.old_id[:12]}"

    @property
    def old_name(self) -> str:
        return f"{self.name}{OLD_SUFFIX}{self.old_id[:12]}"


@attrs.define
class _Done:
    """How far a re-creation got: what there is to undo. A step counts from the moment it is
    asked of the engine: a request that failed or was cancelled may have been carried out."""

    created: bool = False
    new_id: str | None = None
    policy_cleared: bool = False
    stopped: bool = False
    renamed: bool = False
    step: str = "create"


class _StepFailed(DeployerError):
    def __init__(self, step: str, detail: str, reason: NotReadyReason) -> None:
        super().__init__(f"{step}: {detail}")
        self.reason = reason


class RecreateReplacer:
    """A :class:`~deployer.replace.Replacer` that re-creates the container (see the module).

    ``engine``: a :class:`DockerClient` (or any :class:`RecreateEngine`); ``events``: the
    engine's events (:class:`~deployer.events.EngineEvents`, started); ``rules``: when the new
    container is ready; ``kill_timeout``: seconds the old one has to stop, unless it has its own
    ``--stop-timeout``."""

    def __init__(self, clock: IReactorTime, engine: RecreateEngine,
                 events: EventSource, rules: ReadyRules | None = None,
                 kill_timeout: int = 10) -> None:
        self.clock = clock
        self.engine = engine
        self.events = events
        self.rules = rules or ReadyRules()
        self.kill_timeout = kill_timeout

    # -- the Replacer -------------------------------------------------------------------------

    async def replace(self, replacement: Replacement) -> Readiness:
        started = self.clock.seconds()
        try:
            plan = await self.plan(replacement)
        except DeployerError as e:
            log.error("not re-creating {name} ({app}): {why}; it keeps running as it is",
                      name=replacement.name, app=replacement.app, why=e)
            return NotReady(replacement.name, replacement.new_image,
                            NotReadyReason.NO_REPLACEMENT, f"not re-created: {e}",
                            self.clock.seconds() - started)
        log.info("re-creating {name} ({old}) on {image}: {new_name} first",
                 name=plan.name, old=plan.old_id[:12], image=_short(replacement.new_image),
                 new_name=plan.new_name)
        done = _Done()
        try:
            result = await self._recreate(plan, done)
        except _StepFailed as e:
            result = NotReady(plan.name, replacement.new_image, e.reason, str(e),
                              self.clock.seconds() - started, done.new_id)
        except CancelledError:
            log.warn("re-creating {name} was cancelled at {step}; putting the previous"
                     " container back", name=plan.name, step=done.step)
            await self._undo(plan, done)
            raise
        except Exception:
            log.failure("re-creating {name} failed at {step}; putting the previous container"
                        " back", name=plan.name, step=done.step)
            await self._undo(plan, done)
            raise
        if result.ready:
            await self._remove_old(plan)
            log.info("re-created {name} on {image}: {ready}", name=plan.name,
                     image=_short(replacement.new_image), ready=result.describe())
            return result
        log.error("re-creating {name} failed: {why}; putting the previous container back",
                  name=plan.name, why=result.describe())
        await self._undo(plan, done)
        return result

    async def roll_back(self, replacement: Replacement, outcome: NotReady) -> None:
        """Point ``app`` back at ``old_image`` (unless it moved on to a build other than the one
        that failed), and check that the container runs it again (:meth:`replace` put it back)."""
        repository, tag, _ = split(replacement.app)
        try:
            current: str | None = (await self.engine.inspect_image(replacement.app)).id
        except ImageNotFound:
            current = None
        if current == replacement.old_image:
            pass
        elif current not in (None, replacement.new_image):
            log.warn("{app} points at {current} by now, neither the build that failed nor the"
                     " previous one; leaving it", app=replacement.app,
                     current=_short(current or ""))
        elif tag is not None:
            await self.engine.tag(replacement.old_image, repository, tag)
            log.info("{app} points at {image} again ({why})", app=replacement.app,
                     image=_short(replacement.old_image), why=outcome.reason.value)
        try:
            state = await self.engine.inspect_container(replacement.name)
        except DockerError as e:
            log.error("after rolling {app} back, {name} cannot be inspected: {why}",
                      app=replacement.app, name=replacement.name, why=e)
            return
        running = bool((state.get("State") or {}).get("Running"))
        if state.get("Image") != replacement.old_image or not running:
            log.error("after rolling {app} back, {name} is {what} on {image}, not running the"
                      " previous build {old}", app=replacement.app, name=replacement.name,
                      what="running" if running else "stopped",
                      image=_short(str(state.get("Image") or "")),
                      old=_short(replacement.old_image))

    # -- the steps ----------------------------------------------------------------------------

    async def plan(self, replacement: Replacement) -> Plan:
        """Read the old container back; :class:`NotRecreatable` (or a :class:`DockerError`)
        when it cannot be re-created. Changes nothing."""
        old = await self.engine.inspect_container(replacement.container.id)
        name = str(old.get("Name") or "").lstrip("/")
        if name != replacement.name:
            raise NotRecreatable(f"the container {replacement.container.id[:12]} is now named"
                                 f" {name!r}")
        if not (old.get("State") or {}).get("Running"):
            raise NotRecreatable("it is not running")
        why = refusal(old, await self.engine.all_containers())
        if why is not None:
            raise NotRecreatable(why)
        image_id = str(old.get("Image") or replacement.old_image)
        try:
            image = await self.engine.image_json(image_id)
        except ImageNotFound as e:
            raise NotRecreatable(f"its image {_short(image_id)} is gone, so what the user set"
                                 " cannot be told from the image's defaults") from e
        inherited: set[str] = set()
        for source in (old.get("HostConfig") or {}).get("VolumesFrom") or ():
            ref = str(source).split(":")[0]
            try:
                other = await self.engine.inspect_container(ref)
            except DockerError as e:
                raise NotRecreatable(f"its --volumes-from container {ref} cannot be inspected:"
                                     f" {e}") from e
            inherited |= {str(m.get("Destination") or "") for m in other.get("Mounts") or ()}
        spec = container_spec(old, image, inherited=inherited)
        await self._check_networks(spec)
        timeout = (old.get("Config") or {}).get("StopTimeout")
        policy = (old.get("HostConfig") or {}).get("RestartPolicy")
        return Plan(
            replacement=replacement,
            old_id=str(old.get("Id") or replacement.container.id),
            stop_timeout=int(timeout) if isinstance(timeout, int) and timeout >= 0
            else self.kill_timeout,
            spec=spec,
            restart_policy=dict(policy) if isinstance(policy, Mapping) else {},
        )

    async def _check_networks(self, spec: ContainerSpec) -> None:
        """The engine creates a container on a network that does not exist, and fails only when
        it starts: by then the old one would be stopped. So every network is looked up first."""
        networks = [network for network, _ in spec.connects]
        if spec.primary_network not in _BUILTIN_MODES:
            networks.insert(0, spec.primary_network)
        for network in networks:
            try:
                await self.engine.network_json(network)
            except NotFound as e:
                raise NotRecreatable(f"its network {network} does not exist ({e})") from e

    async def _recreate(self, plan: Plan, done: _Done) -> Readiness:
        engine, spec, new_image = self.engine, plan.spec, plan.replacement.new_image
        no_replacement = NotReadyReason.NO_REPLACEMENT
        done.created = True
        try:
            new_id = await self._step(done, "create", no_replacement,
                                      engine.create(plan.new_name, spec.body))
        except _StepFailed as e:
            if isinstance(e.__cause__, DockerError) and e.__cause__.status:
                done.created = False  # the engine answered: nothing was created
            raise
        done.new_id = new_id
        created = await self._step(done, "inspect the new container", no_replacement,
                                   engine.inspect_container(new_id))
        if created.get("Image") != new_image:
            raise _StepFailed("create", f"{spec.body.get('Image')} is"
                              f" {_short(str(created.get('Image')))} by now, not"
                              f" {_short(new_image)}", no_replacement)
        for network, endpoint in spec.connects:
            await self._step(done, f"connect to network {network}", no_replacement,
                             engine.connect(network, new_id, endpoint))
        if plan.restarts:
            done.policy_cleared = True
            await self._step(done, "set the old container's restart policy to no",
                             no_replacement, engine.set_restart_policy(plan.old_id, NO_RESTART))
        done.stopped = True
        await self._step(done, "stop the old container", no_replacement,
                         engine.stop(plan.old_id, plan.stop_timeout))
        done.renamed = True
        await self._step(done, f"rename the old container to {plan.old_name}", no_replacement,
                         engine.rename(plan.old_id, plan.old_name))
        waiting = wait_ready(self.clock, engine, self.events, plan.name, new_image, self.rules)
        try:
            await self._step(done, f"rename the new container to {plan.name}", no_replacement,
                             engine.rename(new_id, plan.name))
            await self._step(done, "start", NotReadyReason.EXITED, engine.start(new_id))
        except BaseException:
            waiting.cancel()
            waiting.addErrback(lambda f: f.trap(CancelledError))
            raise
        done.step = "wait until ready"
        return await waiting

    async def _step(self, done: _Done, step: str, reason: NotReadyReason,
                    call: Awaitable[Any]) -> Any:
        done.step = step
        try:
            return await call
        except DockerError as e:
            raise _StepFailed(step, str(e), reason) from e

    async def _remove_old(self, plan: Plan) -> None:
        try:
            await self.engine.remove(plan.old_id)
        except DockerError as e:
            log.warn("{name}: the previous container {old_name} ({old}) could not be removed"
                     " ({why}); it stays, stopped{policy}", name=plan.name,
                     old_name=plan.old_name, old=plan.old_id[:12], why=e,
                     policy=", with restart policy no" if plan.restarts else "")

    async def _undo(self, plan: Plan, done: _Done) -> None:
        """Remove the new container, give the old one its name (and its restart policy) back and
        start it; each step is tried even when one before it failed, and tried again while the
        engine is away (a dockerd restarting), for up to ``ready_timeout``: with its policy set
        aside, nothing else would start the old one again."""
        engine = self.engine
        problems: list[str] = []
        deadline = self.clock.seconds() + self.rules.ready_timeout
        if done.created:
            problems += await self._attempt("remove the new container",
                                            lambda: self._remove_new(plan, done),
                                            deadline, missing_ok=True)
        if done.renamed:
            problems += await self._attempt(f"rename {plan.old_name} back to {plan.name}",
                                            lambda: self._name_back(plan), deadline)
        if done.policy_cleared:
            problems += await self._attempt(
                f"give {plan.name} its restart policy {plan.restart_policy.get('Name')} back",
                lambda: engine.set_restart_policy(plan.old_id, plan.restart_policy), deadline)
        if done.stopped:
            problems += await self._attempt(f"start {plan.name} again",
                                            lambda: engine.start(plan.old_id), deadline)
        if problems:
            policy = (f" docker update --restart {plan.restart_policy.get('Name')} {plan.name};"
                      if done.policy_cleared else "")
            log.critical(
                "{name}: could not put the previous container {old} back: {problems}. By hand:"
                " docker rm -f {new}; docker rename {old} {name};{policy} docker start {name}",
                name=plan.name, old=plan.old_id[:12], problems="; ".join(problems),
                new=(done.new_id or plan.new_name)[:12], policy=policy)
        elif done.stopped:
            log.info("{name}: the previous container {old} runs again", name=plan.name,
                     old=plan.old_id[:12])

    async def _attempt(self, what: str, call: Callable[[], Awaitable[None]], deadline: float,
                       missing_ok: bool = False) -> list[str]:
        """``call()``, tried again while the engine is away, until ``deadline`` (on the clock);
        what went wrong, if anything."""

        def failed(error: Exception, failures: int, delay: float) -> None:
            if not isinstance(error, DockerUnavailable) \
                    or self.clock.seconds() + delay > deadline:
                raise error
            log.warn("could not {what}: {why}; trying again in {delay:.1f}s", what=what,
                     why=error, delay=delay)

        try:
            await retrying(UNDO_RETRY, self.clock, call, failed)
        except ContainerNotFound:
            return [] if missing_ok else [f"{what}: the container is gone"]
        except DockerError as e:
            return [f"{what}: {e}"]
        return []

    async def _remove_new(self, plan: Plan, done: _Done) -> None:
        if done.new_id is not None:
            await self.engine.remove(done.new_id, force=True)
            return
        # a create cut short may or may not have happened: remove what it would have made only
        found = await self.engine.inspect_container(plan.new_name)
        state = found.get("State") or {}
        if state.get("Status") == "created" and found.get("Image") == plan.replacement.new_image:
            await self.engine.remove(str(found.get("Id") or plan.new_name), force=True)

    async def _name_back(self, plan: Plan) -> None:
        old = await self.engine.inspect_container(plan.old_id)
        if str(old.get("Name") or "").lstrip("/") != plan.name:
            await self.engine.rename(plan.old_id, plan.name)


def _short(id_: str) -> str:
    prefix, _, rest = id_.rpartition(":")
    return f"{prefix}:{rest[:12]}" if prefix else rest[:12]
