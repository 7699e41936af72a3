""":class:`RecreateReplacer` on a Clock, over an in-memory engine that keeps containers, names
and images and emits the events dockerd emits: the order of the steps, the undo after a failure at
every step, refusals that touch nothing, cancellation, the roll-back of the tag; and the raw reads
of the client's raw reads over a scripted engine."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import attrs
import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.logger import LogLevel, capturedLogs
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from deployer.docker import Container, DockerClient, Image
from deployer.errors import (
    ContainerNotFound,
    DockerError,
    DockerUnavailable,
    ImageNotFound,
    NotFound,
)
from deployer.events import ContainerEvent
from deployer.readiness import NotReady, NotReadyReason, Readiness, Ready, ReadyRules
from deployer.recreate import RecreateReplacer
from deployer.replace import Replacement
from tests.fake_events import FakeEventSource
from tests.helpers import fired

SAMPLE = json.loads((Path(__file__).parent / "samples" / "recreate-inspect.json").read_text())
OLD_IMAGE = "sha256:" + "1" * 64
NEW_IMAGE = "sha256:" + "2" * 64
OLDER_IMAGE = "sha256:" + "0" * 64
APP = "127.0.0.1:5000/app:qa"
RULES = ReadyRules(min_ready=5.0, ready_timeout=60.0)
MUTATING = ("create", "connect", "set_restart_policy", "stop", "rename", "start", "remove",
            "tag")


class Events(FakeEventSource):
    def emit(self, action: str, c: dict[str, Any], **attributes: str) -> None:
        name = c["Name"].lstrip("/")
        code = attributes.get("exitCode")
        self.publish(ContainerEvent(action, c["Id"], name, c["Config"]["Image"], self.tick(),
                                    int(code) if code is not None else None,
                                    {"name": name, **attributes}))


class Engine:
    """Containers by id, image tags, networks; every call recorded as ``(method, *args)``.

    ``failing[method]`` fails the next call of ``method`` (once) with that error; ``down``
    fails every call."""

    def __init__(self, events: Events) -> None:
        self.events = events
        self.containers: dict[str, dict[str, Any]] = {}
        self.tags: dict[str, str] = {}
        self.images: dict[str, dict[str, Any]] = {}
        self.networks = {"front", "back"}
        self.calls: list[tuple[Any, ...]] = []
        self.failing: dict[str, DockerError] = {}
        self.down = False
        self.serial = 0

    # -- scripting ----------------------------------------------------------------------------

    def _call(self, method: str, *args: Any) -> None:
        self.calls.append((method, *args))
        if self.down:
            raise DockerUnavailable("cannot reach the Docker engine")
        if method in self.failing:
            raise self.failing.pop(method)

    def mutations(self) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] in MUTATING]

    def find(self, ref: str) -> dict[str, Any]:
        for c in self.containers.values():
            if ref == c["Name"].lstrip("/") or (len(ref) >= 12 and c["Id"].startswith(ref)):
                return c
        raise ContainerNotFound(f"No such container: {ref}", 404)

    def named(self) -> dict[str, tuple[str, str, bool]]:
        """name -> (id, image, running)"""
        return {c["Name"].lstrip("/"): (c["Id"], c["Image"], c["State"]["Running"])
                for c in self.containers.values()}

    def run(self, inspect: dict[str, Any], image: str) -> dict[str, Any]:
        c = copy.deepcopy(inspect)
        c["Image"] = image
        c["State"] = {"Status": "running", "Running": True, "ExitCode": 0}
        self.containers[c["Id"]] = c
        return c

    # -- the engine -----------------------------------------------------------------------------

    async def inspect_container(self, ref: str) -> dict[str, Any]:
        self._call("inspect_container", ref)
        return copy.deepcopy(self.find(ref))

    async def image_json(self, image: str) -> dict[str, Any]:
        self._call("image_json", image)
        image = self.tags.get(image, image)
        if image not in self.images:
            raise ImageNotFound(f"No such image: {image}", 404)
        return copy.deepcopy(self.images[image])

    async def inspect_image(self, name: str) -> Image:
        self._call("inspect_image", name)
        if name not in self.tags:
            raise ImageNotFound(f"No such image: {name}", 404)
        return Image(self.tags[name])

    async def all_containers(self) -> list[dict[str, Any]]:
        self._call("all_containers")
        return [{"Id": c["Id"], "Names": [c["Name"]],
                 "HostConfig": {"NetworkMode": c["HostConfig"]["NetworkMode"]}}
                for c in self.containers.values()]

    async def network_json(self, network: str) -> dict[str, Any]:
        self._call("network_json", network)
        if network not in self.networks:
            raise NotFound(f"network {network} not found", 404)
        return {"Name": network}

    async def create(self, name: str, config: Mapping[str, Any]) -> str:
        self._call("create", name, config)
        if any(c["Name"] == "/" + name for c in self.containers.values()):
            raise DockerError(f'Conflict. The container name "/{name}" is already in use', 409)
        self.serial += 1
        cid = f"{self.serial:x}".rjust(64, "c")
        image = self.tags.get(config["Image"], "?")
        body = {k: v for k, v in config.items() if k not in ("HostConfig", "NetworkingConfig")}
        defaults = (self.images.get(image) or {}).get("Config") or {}
        if "Healthcheck" in defaults:  # as the engine merges the image's
            body.setdefault("Healthcheck", defaults["Healthcheck"])
        c = {"Id": cid, "Name": "/" + name, "Image": image,
             "Config": {**body, "Hostname": cid[:12]}, "HostConfig": config["HostConfig"],
             "State": {"Status": "created", "Running": False, "ExitCode": 0}}
        self.containers[cid] = c
        self.events.emit("create", c)
        return cid

    async def connect(self, network: str, container_id: str,
                      endpoint: Mapping[str, Any] | None = None) -> None:
        self._call("connect", network, container_id, endpoint)
        if network not in self.networks:
            raise NotFound(f"network {network} not found", 404)

    async def stop(self, container_id: str, timeout: int) -> None:
        self._call("stop", container_id, timeout)
        c = self.find(container_id)
        if c["State"]["Running"]:
            c["State"] = {"Status": "exited", "Running": False, "ExitCode": 0}
            self.events.emit("die", c, exitCode="0")
        self.events.emit("stop", c)

    async def rename(self, container_id: str, name: str) -> None:
        self._call("rename", container_id, name)
        c = self.find(container_id)
        if any(o["Name"] == "/" + name for o in self.containers.values() if o is not c):
            raise DockerError(f'Conflict. The container name "/{name}" is already in use', 409)
        old, c["Name"] = c["Name"], "/" + name
        self.events.emit("rename", c, oldName=old)

    async def start(self, container_id: str) -> None:
        self._call("start", container_id)
        c = self.find(container_id)
        if not c["State"]["Running"]:
            c["State"] = {"Status": "running", "Running": True, "ExitCode": 0}
            self.events.emit("start", c)

    async def remove(self, container_id: str, force: bool = False) -> None:
        self._call("remove", container_id, force)
        c = self.find(container_id)
        if c["State"]["Running"] and not force:
            raise DockerError("You cannot remove a running container", 409)
        if c["State"]["Running"]:
            self.events.emit("die", c, exitCode="137")
        del self.containers[c["Id"]]
        self.events.emit("destroy", c)

    async def set_restart_policy(self, container_id: str, policy: Mapping[str, Any]) -> None:
        self._call("set_restart_policy", container_id, dict(policy))
        self.find(container_id)["HostConfig"]["RestartPolicy"] = dict(policy)

    async def tag(self, image: str, repository: str, tag: str) -> None:
        self._call("tag", image, repository, tag)
        self.tags[f"{repository}:{tag}"] = image


@attrs.define
class Host:
    clock: Clock = attrs.field(factory=Clock)
    events: Events = attrs.field(factory=Events)
    engine: Engine = attrs.field(init=False)
    replacer: RecreateReplacer = attrs.field(init=False)
    old: dict[str, Any] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.engine = Engine(self.events)
        self.replacer = RecreateReplacer(self.clock, self.engine, self.events, RULES,
                                         kill_timeout=7)
        image = copy.deepcopy(SAMPLE["images"]["app:plain"])
        self.engine.images[OLD_IMAGE] = {**image, "Id": OLD_IMAGE}
        self.engine.images[NEW_IMAGE] = {**image, "Id": NEW_IMAGE}
        self.engine.tags[APP] = NEW_IMAGE
        web = copy.deepcopy(SAMPLE["containers"]["web"])
        web["Config"]["Image"] = APP
        self.old = self.engine.run(web, OLD_IMAGE)

    @property
    def old_id(self) -> str:
        return str(self.old["Id"])

    def replacement(self) -> Replacement:
        c = Container(self.old_id, "web", APP, OLD_IMAGE, self.old["Config"]["Labels"])
        return Replacement(c, APP, OLD_IMAGE, NEW_IMAGE)

    def replace(self) -> Deferred[Readiness]:
        return Deferred.fromCoroutine(self.replacer.replace(self.replacement()))

    def new_id(self) -> str:
        created = [c for c in self.engine.calls if c[0] == "start" and c[1] != self.old_id]
        assert created, self.engine.calls
        return str(created[0][1])

    def put_back(self) -> None:
        """The old container is web again, running, and nothing else exists."""
        assert self.engine.named() == {"web": (self.old_id, OLD_IMAGE, True)}
        assert ("remove", self.old_id, False) not in self.engine.calls
        assert ("remove", self.old_id, True) not in self.engine.calls
        assert self.events.subscribers == []
        assert self.clock.getDelayedCalls() == []


@pytest.fixture
def h() -> Host:
    return Host()


def outcome(d: Deferred[Readiness]) -> Readiness:
    result: Readiness = fired(d)
    return result


def settle(h: Host, d: Deferred[Readiness], limit: float = 2 * RULES.ready_timeout) -> float:
    """Advance the clock (half a second at a time) until ``d`` fires; the time it took."""
    began = h.clock.seconds()
    while not d.called:
        assert h.clock.seconds() - began < limit, "not done"
        h.clock.advance(0.5)
    return h.clock.seconds() - began


def failure_of(d: Deferred[Any]) -> Failure:
    failures: list[Failure] = []
    d.addErrback(failures.append)
    assert failures, f"{d} has not failed"
    return failures[0]


# -- the way through ------------------------------------------------------------------------------


def test_the_steps_in_order(h: Host) -> None:
    d = h.replace()
    assert not d.called  # running for min_ready first
    short = h.old_id[:12]
    new = h.new_id()
    kinds = [c[0] for c in h.engine.calls]
    assert kinds[:4] == ["inspect_container", "all_containers", "image_json", "network_json"]
    assert h.engine.mutations() == [
        ("create", f"web-deployer-new-{short}", h.engine.mutations()[0][2]),
        ("connect", "back", new, {"Aliases": ["wb"]}),
        ("stop", h.old_id, 7),
        ("rename", h.old_id, f"web-deployer-old-{short}"),
        ("rename", new, "web"),
        ("start", new),
    ]
    body = h.engine.mutations()[0][2]
    assert body["Image"] == APP and body["Env"] == ["B=2"]
    h.clock.advance(RULES.min_ready)
    result = outcome(d)
    assert isinstance(result, Ready), result
    assert result.container_id == new
    assert h.engine.calls[-1] == ("remove", h.old_id, False)
    assert h.engine.named() == {"web": (new, NEW_IMAGE, True)}
    assert h.events.subscribers == []


def test_the_containers_own_stop_timeout(h: Host) -> None:
    h.old["Config"]["StopTimeout"] = 30
    h.replace()
    assert ("stop", h.old_id, 30) in h.engine.calls


def test_the_old_one_is_kept_when_it_cannot_be_removed(h: Host) -> None:
    h.engine.failing["remove"] = DockerError("removal of container is already in progress", 409)
    d = h.replace()
    with capturedLogs() as events:
        h.clock.advance(RULES.min_ready)
    assert isinstance(outcome(d), Ready)
    assert f"web-deployer-old-{h.old_id[:12]}" in h.engine.named()
    assert any("could not be removed" in str(e.get("log_format")) for e in events)


@pytest.mark.parametrize("policy", [{"Name": "always", "MaximumRetryCount": 0},
                                    {"Name": "on-failure", "MaximumRetryCount": 3}])
def test_a_policy_that_restarts_stopped_containers_is_set_aside_while_replaced(
    h: Host, policy: dict[str, Any],
) -> None:
    h.old["HostConfig"]["RestartPolicy"] = policy
    d = h.replace()
    new = h.new_id()
    assert [_describe(h, c) for c in h.engine.mutations()] == [
        "create new", "connect new", "set_restart_policy old", "stop old", "rename old",
        "rename new", "start new"]
    assert ("set_restart_policy", h.old_id, {"Name": "no", "MaximumRetryCount": 0}) in \
        h.engine.calls
    assert h.old["HostConfig"]["RestartPolicy"]["Name"] == "no", "while it waits, stopped"
    assert h.engine.find(new)["HostConfig"]["RestartPolicy"] == policy, "the new one keeps it"
    h.clock.advance(RULES.min_ready)
    assert isinstance(outcome(d), Ready)
    assert h.engine.calls[-1] == ("remove", h.old_id, False)


def test_unless_stopped_is_left_as_it_is(h: Host) -> None:
    assert h.old["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    h.replace()
    assert [c for c in h.engine.calls if c[0] == "set_restart_policy"] == []


@pytest.mark.parametrize("method", ["set_restart_policy", "stop", "start"])
def test_the_policy_set_aside_is_given_back_when_the_old_one_is_put_back(
    h: Host, method: str,
) -> None:
    always = {"Name": "always", "MaximumRetryCount": 0}
    h.old["HostConfig"]["RestartPolicy"] = dict(always)
    h.engine.failing[method] = DockerError(f"{method} went wrong", 500)
    with capturedLogs():
        result = outcome(h.replace())
    assert isinstance(result, NotReady) and f"{method} went wrong" in result.detail
    h.put_back()
    assert h.old["HostConfig"]["RestartPolicy"] == always
    assert ("set_restart_policy", h.old_id, always) in h.engine.calls


def test_the_old_one_kept_after_a_failed_removal_keeps_no_restart_policy(h: Host) -> None:
    h.old["HostConfig"]["RestartPolicy"] = {"Name": "always", "MaximumRetryCount": 0}
    h.engine.failing["remove"] = DockerError("removal of container is already in progress", 409)
    d = h.replace()
    with capturedLogs() as events:
        h.clock.advance(RULES.min_ready)
    assert isinstance(outcome(d), Ready)
    assert h.old["HostConfig"]["RestartPolicy"]["Name"] == "no"
    assert not h.old["State"]["Running"]
    (warning,) = [e for e in events if "could not be removed" in str(e.get("log_format"))]
    assert warning["policy"] == ", with restart policy no"


def test_an_engine_that_comes_back_during_the_undo_gets_the_old_one_back(h: Host) -> None:
    always = {"Name": "always", "MaximumRetryCount": 0}
    h.old["HostConfig"]["RestartPolicy"] = dict(always)
    d = h.replace()
    h.engine.down = True  # dockerd restarting: the new one ended, nothing answers
    with capturedLogs() as events:
        h.events.emit("die", h.engine.find(h.new_id()), exitCode="137")
        h.clock.advance(5.0)
        assert not d.called
        h.engine.down = False
        settle(h, d)
    assert isinstance(outcome(d), NotReady)
    h.put_back()
    assert h.old["HostConfig"]["RestartPolicy"] == always
    assert not [e for e in events if e["log_level"] is LogLevel.critical]
    assert any("trying again" in str(e.get("log_format")) for e in events)


def test_the_instructions_by_hand_give_the_policy_back(h: Host) -> None:
    h.old["HostConfig"]["RestartPolicy"] = {"Name": "always", "MaximumRetryCount": 0}
    d = h.replace()
    h.engine.down = True
    with capturedLogs() as events:
        h.events.emit("die", h.engine.find(h.new_id()), exitCode="1")
        settle(h, d)
    (critical,) = [e for e in events if e["log_level"] is LogLevel.critical]
    assert critical["policy"] == " docker update --restart always web;"


# -- failures at each step: the old container is put back -----------------------------------------


@pytest.mark.parametrize(("method", "nth", "reason", "undo"), [
    ("create", 0, NotReadyReason.NO_REPLACEMENT, []),
    ("connect", 0, NotReadyReason.NO_REPLACEMENT, ["remove new"]),
    ("stop", 0, NotReadyReason.NO_REPLACEMENT, ["remove new", "start old"]),
    ("rename", 0, NotReadyReason.NO_REPLACEMENT, ["remove new", "start old"]),
    ("rename", 1, NotReadyReason.NO_REPLACEMENT, ["remove new", "rename old", "start old"]),
    ("start", 0, NotReadyReason.EXITED, ["remove new", "rename old", "start old"]),
])
def test_a_failing_step(h: Host, method: str, nth: int, reason: NotReadyReason,
                        undo: list[str]) -> None:
    error = DockerError(f"{method} went wrong", 500)
    if nth == 0:
        h.engine.failing[method] = error
    else:  # let the first call through
        original = getattr(h.engine, method)

        async def second(*args: Any) -> Any:
            if sum(1 for c in h.engine.calls if c[0] == method) == nth:
                h.engine.failing[method] = error
            return await original(*args)

        setattr(h.engine, method, second)
    with capturedLogs() as events:
        result = outcome(h.replace())
    assert isinstance(result, NotReady), result
    assert result.reason is reason
    assert f"{method} went wrong" in result.detail
    h.put_back()
    failed = [i for i, c in enumerate(h.engine.calls) if c[0] == method][nth]
    tail = [_describe(h, c) for c in h.engine.calls[failed + 1:] if c[0] in MUTATING]
    assert tail == undo
    assert any(e["log_level"] is LogLevel.error and "re-creating" in str(e["log_format"])
               for e in events)


def _describe(h: Host, call: tuple[Any, ...]) -> str:
    who = "old" if call[1] == h.old_id else "new"
    return f"{call[0]} {who}"


def _lost_answer(h: Host, method: str) -> None:
    """``method`` is carried out, but its answer never arrives."""
    original = getattr(h.engine, method)

    async def carried_out(*args: Any) -> Any:
        await original(*args)
        raise DockerUnavailable(f"the engine did not answer: {method}")

    setattr(h.engine, method, carried_out)


@pytest.mark.parametrize("method", ["create", "stop", "rename"])
def test_a_step_carried_out_without_an_answer_is_undone_too(h: Host, method: str) -> None:
    _lost_answer(h, method)
    with capturedLogs():
        d = h.replace()
        settle(h, d)  # a step the engine did not answer is tried again
        result = outcome(d)
    assert isinstance(result, NotReady) and "did not answer" in result.detail
    h.put_back()


def test_a_container_in_the_way_of_the_temporary_name_is_never_removed(h: Host) -> None:
    other = h.engine.run(copy.deepcopy(SAMPLE["containers"]["plain"]), NEW_IMAGE)
    other["Name"] = f"/web-deployer-new-{h.old_id[:12]}"
    h.engine.failing["create"] = DockerUnavailable("the engine did not answer")
    with capturedLogs():
        result = outcome(h.replace())
    assert isinstance(result, NotReady)
    assert other["Id"] in h.engine.containers
    assert [c for c in h.engine.calls if c[0] == "remove"] == []
    assert h.engine.named()["web"] == (h.old_id, OLD_IMAGE, True)


@pytest.mark.parametrize("health", [True, False])
def test_a_new_container_that_dies_is_undone(h: Host, health: bool) -> None:
    if health:
        h.engine.images[NEW_IMAGE]["Config"]["Healthcheck"] = {"Test": ["CMD", "true"]}
    d = h.replace()
    new = h.engine.find(h.new_id())
    new["State"] = {"Status": "exited", "Running": False, "ExitCode": 3}
    h.events.emit("die", new, exitCode="3")
    result = outcome(d)
    assert isinstance(result, NotReady) and result.reason is NotReadyReason.EXITED
    assert result.exit_code == 3
    h.put_back()


def test_an_unhealthy_new_container_is_undone(h: Host) -> None:
    h.engine.images[NEW_IMAGE]["Config"]["Healthcheck"] = {"Test": ["CMD", "false"]}
    d = h.replace()
    new = h.engine.find(h.new_id())
    new["State"]["Health"] = {"Status": "unhealthy",
                              "Log": [{"ExitCode": 1, "Output": "it said no"}]}
    h.events.emit("health_status: unhealthy", new)
    result = outcome(d)
    assert isinstance(result, NotReady) and result.reason is NotReadyReason.UNHEALTHY
    assert "it said no" in result.detail
    h.put_back()


def test_not_ready_in_time_is_undone(h: Host) -> None:
    h.engine.images[NEW_IMAGE]["Config"]["Healthcheck"] = {"Test": ["CMD", "true"]}
    d = h.replace()
    h.clock.advance(RULES.ready_timeout - 1)
    assert not d.called
    h.clock.advance(1)
    result = outcome(d)
    assert isinstance(result, NotReady) and result.reason is NotReadyReason.TIMEOUT
    h.put_back()


def test_a_tag_that_moved_before_create_leaves_the_old_one_running(h: Host) -> None:
    h.engine.images["sha256:" + "3" * 64] = h.engine.images[NEW_IMAGE]
    h.engine.tags[APP] = "sha256:" + "3" * 64
    result = outcome(h.replace())
    assert isinstance(result, NotReady) and result.reason is NotReadyReason.NO_REPLACEMENT
    assert "by now" in result.detail
    h.put_back()
    assert [c[0] for c in h.engine.mutations()] == ["create", "remove"]


def test_cancelled_while_waiting_puts_the_old_one_back(h: Host) -> None:
    d = h.replace()
    d.cancel()
    assert failure_of(d).check(CancelledError)
    h.put_back()


def test_an_unexpected_error_is_logged_undone_and_raised(h: Host) -> None:
    h.engine.failing["rename"] = ValueError("a bug")  # type: ignore[assignment]
    with capturedLogs() as events:
        failure = failure_of(h.replace())
    assert failure.check(ValueError)
    h.put_back()
    assert any(e.get("log_failure") is not None and "a bug" in str(e["log_failure"].value)
               for e in events)


def test_when_the_engine_goes_away_nothing_is_removed_and_the_log_says_what_to_do(
    h: Host,
) -> None:
    d = h.replace()
    h.engine.down = True
    with capturedLogs() as events:
        h.events.emit("die", h.engine.find(h.new_id()), exitCode="1")
        took = settle(h, d)
        result = outcome(d)
    # the undo was tried again for ready_timeout before it was given up
    assert RULES.ready_timeout - 10.0 <= took <= RULES.ready_timeout + 4 * 10.0
    assert isinstance(result, NotReady)
    critical = [e for e in events if e["log_level"] is LogLevel.critical]
    assert len(critical) == 1
    assert "By hand: docker rm -f" in critical[0]["log_format"]
    assert all(not (c[0] == "remove" and c[1] == h.old_id) for c in h.engine.calls)


# -- refusals: nothing is touched ------------------------------------------------------------------


def _refused(h: Host, words: str) -> None:
    with capturedLogs() as events:
        result = outcome(h.replace())
    assert isinstance(result, NotReady), result
    assert result.reason is NotReadyReason.NO_REPLACEMENT
    assert result.detail.startswith("not re-created: ")
    assert words in result.detail
    assert h.engine.mutations() == []
    assert h.engine.named()["web"] == (h.old_id, OLD_IMAGE, True)
    assert any(e["log_level"] is LogLevel.error and words in e["why"].args[0]
               for e in events if "why" in e)


def test_refused_with_rm(h: Host) -> None:
    h.old["HostConfig"]["AutoRemove"] = True
    _refused(h, "--rm")


def test_refused_in_another_containers_network(h: Host) -> None:
    h.old["HostConfig"]["NetworkMode"] = "container:" + "e" * 64
    _refused(h, "network namespace of another container")


def test_refused_with_followers(h: Host) -> None:
    side = copy.deepcopy(SAMPLE["containers"]["side"])
    side["HostConfig"]["NetworkMode"] = "container:" + h.old_id
    h.engine.run(side, OLD_IMAGE)
    _refused(h, "side share its network namespace")


def test_refused_with_a_missing_network(h: Host) -> None:
    h.engine.networks.discard("back")
    _refused(h, "its network back does not exist")


def test_refused_when_not_running(h: Host) -> None:
    h.old["State"]["Running"] = False
    with capturedLogs():
        result = outcome(h.replace())
    assert isinstance(result, NotReady) and "not running" in result.detail
    assert h.engine.mutations() == []


def test_refused_when_renamed(h: Host) -> None:
    h.old["Name"] = "/other"
    with capturedLogs():
        result = outcome(h.replace())
    assert isinstance(result, NotReady) and "now named 'other'" in result.detail
    assert h.engine.mutations() == []


def test_refused_without_the_old_image(h: Host) -> None:
    del h.engine.images[OLD_IMAGE]
    _refused(h, "cannot be told from the image's defaults")


def test_refused_without_its_volumes_from_container(h: Host) -> None:
    h.old["HostConfig"]["VolumesFrom"] = ["data:ro"]
    _refused(h, "--volumes-from container data")


def test_volumes_from_are_left_to_volumes_from(h: Host) -> None:
    data = copy.deepcopy(SAMPLE["containers"]["plain"])
    h.engine.run(data, OLD_IMAGE)
    h.old["HostConfig"]["VolumesFrom"] = ["plain:ro"]
    h.old["Mounts"].append({"Type": "volume", "Name": "f" * 64, "Destination": "/data-of-plain",
                            "RW": False})
    data["Mounts"] = [{"Type": "volume", "Name": "f" * 64, "Destination": "/data-of-plain"}]
    h.engine.containers[data["Id"]]["Mounts"] = data["Mounts"]
    h.replace()
    body = h.engine.mutations()[0][2]
    targets = [m["Target"] for m in body["HostConfig"]["Mounts"]]
    assert "/data-of-plain" not in targets and "/anon" in targets


# -- roll back ----------------------------------------------------------------------------------


def _roll_back(h: Host) -> list[dict[str, Any]]:
    failed = NotReady("web", NEW_IMAGE, NotReadyReason.UNHEALTHY, "no", 1.0)
    with capturedLogs() as events:
        fired(Deferred.fromCoroutine(h.replacer.roll_back(h.replacement(), failed)))
    return list(events)


def test_roll_back_points_the_tag_at_the_previous_image(h: Host) -> None:
    events = _roll_back(h)
    assert ("tag", OLD_IMAGE, "127.0.0.1:5000/app", "qa") in h.engine.calls
    assert h.engine.tags[APP] == OLD_IMAGE
    assert not [e for e in events if e["log_level"] >= LogLevel.warn]


def test_roll_back_leaves_a_tag_that_moved_on(h: Host) -> None:
    h.engine.tags[APP] = OLDER_IMAGE
    events = _roll_back(h)
    assert [c for c in h.engine.calls if c[0] == "tag"] == []
    assert any("leaving it" in e["log_format"] for e in events)


def test_roll_back_of_a_tag_already_back(h: Host) -> None:
    h.engine.tags[APP] = OLD_IMAGE
    _roll_back(h)
    assert [c for c in h.engine.calls if c[0] == "tag"] == []


def test_roll_back_says_when_the_container_is_not_back(h: Host) -> None:
    h.old["State"]["Running"] = False
    events = _roll_back(h)
    assert any(e["log_level"] is LogLevel.error and "not running the previous build"
               in e["log_format"] for e in events)


# -- the client's raw reads for re-creation ----------------------------------------------------


class Scripted(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.answers: dict[str, tuple[int, Any]] = {
            "/version": (200, {"ApiVersion": "1.41", "Version": "20.10.24"}),
        }
        self.requests: list[tuple[str, str, dict[str, list[str]]]] = []

    def render(self, request: Request) -> bytes:
        path = (request.path or b"").decode()
        self.requests.append((request.method.decode(), path,
                              parse_qs((request.uri or b"").decode().partition("?")[2])))
        status, body = self.answers.get(path.removeprefix("/v1.41"),
                                        (404, {"message": "no such thing"}))
        request.setResponseCode(status)
        return json.dumps(body).encode()


def test_docker_calls_reads() -> None:
    engine = Scripted()
    client = DockerClient(Clock(), RequestTraversalAgent(engine))
    calls = client
    engine.answers["/images/app:qa/json"] = (200, {"Id": OLD_IMAGE, "Config": {"Env": ["A=1"]}})
    engine.answers["/containers/json"] = (200, [{"Id": "a" * 64}])
    engine.answers["/networks/front"] = (200, {"Name": "front"})
    assert fired(Deferred.fromCoroutine(calls.image_json("app:qa")))["Config"] == {"Env": ["A=1"]}
    assert fired(Deferred.fromCoroutine(calls.all_containers())) == [{"Id": "a" * 64}]
    assert fired(Deferred.fromCoroutine(calls.network_json("front"))) == {"Name": "front"}
    assert ("GET", "/v1.41/containers/json", {"all": ["1"]}) in engine.requests
    for call, error in ((calls.image_json("gone"), ImageNotFound),
                        (calls.network_json("gone"), NotFound)):
        assert failure_of(Deferred.fromCoroutine(call)).check(error)


def test_a_docker_client_is_a_recreate_engine() -> None:
    client = DockerClient(Clock(), RequestTraversalAgent(Scripted()))
    replacer = RecreateReplacer(Clock(), client, Events())
    assert replacer.engine is client
    assert replacer.rules == ReadyRules()
