"""Credential helpers: which one is asked (the docker CLI's rules), and running them — fake
helper scripts on PATH, on the real reactor, timed out on a Clock."""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from twisted.logger import LogLevel, capturedLogs, formatEvent

from deployer.credhelpers import NOT_FOUND, RegistryCredentials, run_helper
from deployer.dockercfg import DOCKER_HUB_KEY, Credentials, Lookup, RegistryAuth, load_credentials
from deployer.errors import ConfigError, CredentialHelperError, TimedOut

LOCAL = "127.0.0.1:5000"
IMAGE = f"{LOCAL}/team/app:qa"
SECRET = "s3cret-pass-word"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def creds(config: dict[str, Any], hub_key: str = DOCKER_HUB_KEY) -> Credentials:
    return Credentials.parse(json.dumps(config), "config.json", hub_key)


# -- which helper is asked ------------------------------------------------------------------------


def test_cred_helper_for_the_host_wins_over_creds_store_and_auths() -> None:
    c = creds({
        "auths": {LOCAL: {"auth": _b64("u:p")}},
        "credsStore": "desktop",
        "credHelpers": {LOCAL: "ecr-login"},
    })
    found = c.lookup(IMAGE)
    assert found.helper == "ecr-login"
    assert found.server == LOCAL
    assert found.static == RegistryAuth(username="u", password="p", serveraddress=LOCAL)
    assert c.lookup("quay.io/x/y:1") == Lookup(server="quay.io", helper="desktop")


def test_creds_store_answers_for_every_registry() -> None:
    c = creds({"auths": {LOCAL: {}, "https://index.docker.io/v1/": {}}, "credsStore": "pass"})
    assert c.lookup(IMAGE) == Lookup(server=LOCAL, helper="pass")
    assert c.lookup("busybox:latest") == Lookup(server=DOCKER_HUB_KEY, helper="pass")
    assert c.by_host == {}  # the {} entries that docker login leaves hold nothing
    assert len(c) == 1 and c  # still not "no credentials": DockerClient's `or` must keep it


def test_without_helpers_the_auths_entry_answers() -> None:
    c = creds({"auths": {LOCAL: {"username": "u", "password": "p"}},
               "credHelpers": {"quay.io": "quay"}})
    found = c.lookup(IMAGE)
    assert found.helper is None and found.static is not None
    assert c.lookup("ghcr.io/o/r:1") == Lookup(server="ghcr.io")


def test_docker_hub_is_asked_about_by_its_index_address() -> None:
    c = creds({"credHelpers": {"https://index.docker.io/v1/": "hub"}})
    assert c.lookup("myorg/foo:qa") == Lookup(server=DOCKER_HUB_KEY, helper="hub")
    assert c.lookup("docker.io/library/busybox:1") == Lookup(server=DOCKER_HUB_KEY, helper="hub")
    assert c.lookup(IMAGE) == Lookup(server=LOCAL)


def test_registry_flag_names_the_hub_server() -> None:
    mirror = "https://mirror.example:5000/v1/"
    c = creds({"credHelpers": {"mirror.example:5000": "m"}}, hub_key=mirror)
    assert c.lookup("myorg/foo:qa") == Lookup(server=mirror, helper="m")


def test_empty_helper_names_mean_none() -> None:
    c = creds({"credsStore": "", "credHelpers": {LOCAL: ""}})
    assert c.lookup(IMAGE) == Lookup(server=LOCAL)
    assert not c.uses_helpers


@pytest.mark.parametrize("config", [
    {"credHelpers": {LOCAL: "../../bin/sh"}},
    {"credHelpers": {LOCAL: 3}},
    {"credHelpers": ["x"]},
    {"credsStore": "a b"},
    {"credsStore": {"x": 1}},
])
def test_bad_helper_names_are_refused(config: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match=r"config\.json"):
        creds(config)


def _home(tmp_path: Path, config: dict[str, Any]) -> dict[str, str]:
    (tmp_path / ".docker").mkdir(exist_ok=True)
    (tmp_path / ".docker" / "config.json").write_text(json.dumps(config))
    return {"HOME": str(tmp_path)}


def test_dockercfg_entries_win_over_config_json_helpers(tmp_path: Path) -> None:
    env = _home(tmp_path, {"credsStore": "desktop", "auths": {LOCAL: {"auth": _b64("a:b")}}})
    legacy = tmp_path / "legacy"
    legacy.write_text(json.dumps({f"https://{LOCAL}": {"auth": _b64("c:d")}}))
    c = load_credentials(str(legacy), environ=env)
    assert c.lookup(IMAGE) == Lookup(
        server=LOCAL, static=RegistryAuth(username="c", password="d",
                                          serveraddress=f"https://{LOCAL}"))
    assert c.lookup("quay.io/x/y:1").helper == "desktop"


def test_shadowed_inline_entries_are_told_once_at_start(tmp_path: Path) -> None:
    env = _home(tmp_path, {"credsStore": "desktop",
                           "auths": {LOCAL: {"auth": _b64(f"u:{SECRET}")}, "quay.io": {}}})
    with capturedLogs() as events:
        c = load_credentials(None, environ=env)
    text = [formatEvent(e) for e in events]
    assert c.lookup(IMAGE).helper == "desktop"
    assert any(LOCAL in t and "desktop" in t for t in text), text
    assert not any("quay.io" in t and "inline" in t for t in text)
    assert not any(SECRET in t for t in text)


def test_explicit_dockercfg_without_hub_entry_is_fine_when_a_helper_covers_hub(
    tmp_path: Path,
) -> None:
    env = _home(tmp_path, {"credsStore": "desktop"})
    legacy = tmp_path / "legacy"
    legacy.write_text(json.dumps({LOCAL: {"auth": _b64("c:d")}}))
    with capturedLogs() as events:
        load_credentials(str(legacy), environ=env)
    assert not any("go anonymous" in formatEvent(e) for e in events)


# -- fake helpers ---------------------------------------------------------------------------------


class Helpers:
    """Writes ``docker-credential-<name>`` scripts into a directory that is the whole PATH."""

    def __init__(self, base: Path) -> None:
        self.bin = base / "bin"
        self.bin.mkdir()
        self.base = base
        self.environ = {"PATH": f"{self.bin}:/usr/bin:/bin", "HOME": str(base)}

    def add(self, name: str, body: str) -> Path:
        path = self.bin / f"docker-credential-{name}"
        path.write_text(
            "#!/bin/sh\n"
            f'echo run >> "{self.base}/{name}.runs"\n'
            f'server=$(cat); printf %s "$server" > "{self.base}/{name}.stdin"\n'
            f"{body}\n"
        )
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
        return path

    def answering(self, name: str, username: str = "alice", secret: str = SECRET) -> Path:
        answer = json.dumps({"ServerURL": "ignored", "Username": username, "Secret": secret})
        return self.add(name, f"echo '{answer}'")

    def runs(self, name: str) -> int:
        path = self.base / f"{name}.runs"
        return len(path.read_text().splitlines()) if path.exists() else 0

    def stdin(self, name: str) -> str:
        return (self.base / f"{name}.stdin").read_text()

    def resolver(self, config: dict[str, Any], clock: Clock | None = None,
                 **kw: Any) -> RegistryCredentials:
        return RegistryCredentials(reactor, creds(config), clock=clock or Clock(),
                                   environ=self.environ, **kw)


@pytest.fixture
def helpers(tmp_path: Path) -> Helpers:
    return Helpers(tmp_path)


@pytest.fixture
def logged() -> Iterator[list[dict[str, Any]]]:
    with capturedLogs() as events:
        yield events


def texts(events: list[dict[str, Any]]) -> list[str]:
    return [formatEvent(e) for e in events]


def no_secret_in(events: list[dict[str, Any]], *secrets: str) -> None:
    for event in events:
        text = formatEvent(event) + repr(event)
        for secret in secrets:
            assert secret not in text


@pytest_twisted.ensureDeferred
async def test_helper_answer_becomes_the_pull_credentials(
    helpers: Helpers, logged: list[dict[str, Any]],
) -> None:
    helpers.answering("test")
    auth = await helpers.resolver({"credHelpers": {LOCAL: "test"}}).for_image(IMAGE)
    assert auth == RegistryAuth(username="alice", password=SECRET, serveraddress=LOCAL)
    assert helpers.stdin("test") == LOCAL  # the CLI writes the address without a newline
    header = json.loads(base64.urlsafe_b64decode(auth.header()))
    assert header == {"username": "alice", "password": SECRET, "serveraddress": LOCAL}
    no_secret_in(logged, SECRET)


@pytest_twisted.ensureDeferred
async def test_token_username_means_identity_token(helpers: Helpers) -> None:
    helpers.answering("tok", username="<token>", secret="refresh-token-xyz")
    auth = await helpers.resolver({"credsStore": "tok"}).for_image("myorg/app:1")
    assert auth == RegistryAuth(identitytoken="refresh-token-xyz", serveraddress=DOCKER_HUB_KEY)
    assert helpers.stdin("tok") == DOCKER_HUB_KEY
    header = json.loads(base64.urlsafe_b64decode(auth.header()))
    assert header == {"identitytoken": "refresh-token-xyz", "serveraddress": DOCKER_HUB_KEY}


@pytest_twisted.ensureDeferred
async def test_not_found_is_anonymous_even_with_an_inline_entry(
    helpers: Helpers, logged: list[dict[str, Any]],
) -> None:
    helpers.add("empty", f'echo "{NOT_FOUND}"; exit 1')
    resolver = helpers.resolver({"credsStore": "empty",
                                 "auths": {LOCAL: {"auth": _b64("u:inline")}}})
    assert await resolver.for_image(IMAGE) is None
    assert any("holds no credentials" in t for t in texts(logged))
    assert not [e for e in logged if e["log_level"] >= LogLevel.error]


@pytest_twisted.ensureDeferred
async def test_failing_helper_falls_back_to_the_inline_entry_and_logs_no_secret(
    helpers: Helpers, logged: list[dict[str, Any]],
) -> None:
    answer = json.dumps({"Username": "alice", "Secret": SECRET})
    helpers.add("broken", f"echo '{answer}'\n"
                          f"echo 'keyring locked; tried {SECRET} for alice' >&2\n"
                          "echo 'second line' >&2\nexit 3")
    resolver = helpers.resolver({"credHelpers": {LOCAL: "broken"},
                                 "auths": {LOCAL: {"auth": _b64("u:inline")}}})
    auth = await resolver.for_image(IMAGE)
    assert auth == RegistryAuth(username="u", password="inline", serveraddress=LOCAL)
    errors = [formatEvent(e) for e in logged if e["log_level"] == LogLevel.error]
    assert len(errors) == 1
    assert "docker-credential-broken exited with status 3" in errors[0]
    assert "keyring locked; tried *** for *** second line" in errors[0]  # all of stdout masked
    assert "inline config.json entry" in errors[0]
    no_secret_in(logged, SECRET)


@pytest_twisted.ensureDeferred
async def test_failing_helper_without_inline_entry_is_anonymous(
    helpers: Helpers, logged: list[dict[str, Any]],
) -> None:
    helpers.add("broken", "echo 'no dbus' >&2; exit 1")
    assert await helpers.resolver({"credsStore": "broken"}).for_image(IMAGE) is None
    errors = [formatEvent(e) for e in logged if e["log_level"] == LogLevel.error]
    assert errors and "no dbus" in errors[0] and "anonymous" in errors[0]


@pytest_twisted.ensureDeferred
async def test_garbage_output_is_an_error_that_does_not_quote_it(
    helpers: Helpers, logged: list[dict[str, Any]],
) -> None:
    helpers.add("garbage", f"echo 'user=alice password={SECRET}'")
    assert await helpers.resolver({"credsStore": "garbage"}).for_image(IMAGE) is None
    errors = [formatEvent(e) for e in logged if e["log_level"] == LogLevel.error]
    assert errors and "not credentials JSON" in errors[0]
    no_secret_in(logged, SECRET)


@pytest.mark.parametrize("answer", [
    '{"Username": "alice"}', '{"Username": 3, "Secret": "x"}', '["alice", "pw"]', "",
])
@pytest_twisted.ensureDeferred
async def test_json_that_is_not_credentials_is_refused(helpers: Helpers, answer: str) -> None:
    helpers.add("odd", f"printf %s '{answer}'")
    with pytest.raises(CredentialHelperError, match="not credentials JSON"):
        await run_helper(reactor, Clock(), "odd", LOCAL, environ=helpers.environ)


@pytest_twisted.ensureDeferred
async def test_too_much_output_is_refused(helpers: Helpers) -> None:
    helpers.add("chatty", "head -c 200000 /dev/zero")
    with pytest.raises(CredentialHelperError, match="more than"):
        await run_helper(reactor, Clock(), "chatty", LOCAL, environ=helpers.environ)


@pytest_twisted.ensureDeferred
async def test_missing_helper_is_logged_and_anonymous(
    helpers: Helpers, logged: list[dict[str, Any]],
) -> None:
    assert await helpers.resolver({"credsStore": "nowhere"}).for_image(IMAGE) is None
    errors = [formatEvent(e) for e in logged if e["log_level"] == LogLevel.error]
    assert errors and "docker-credential-nowhere is not an executable on PATH" in errors[0]


async def _until(check: Any, what: str) -> None:
    for _ in range(2000):
        if check():
            return
        await deferLater(reactor, 0.01, lambda: None)
    raise AssertionError(f"never: {what}")


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


@pytest_twisted.ensureDeferred
async def test_hanging_helper_is_killed_after_the_timeout(
    helpers: Helpers, logged: list[dict[str, Any]],
) -> None:
    pidfile = helpers.base / "hang.pid"
    helpers.add("hang", f'echo $$ > "{pidfile}"; exec sleep 600')
    clock = Clock()
    resolver = helpers.resolver({"credsStore": "hang"}, clock=clock, timeout=10)
    d = Deferred.fromCoroutine(resolver.for_image(IMAGE))
    await _until(pidfile.exists, "the helper started")
    pid = int(pidfile.read_text())
    clock.advance(9.9)
    assert not d.called and _alive(pid)
    clock.advance(0.2)
    assert await d is None
    await _until(lambda: not _alive(pid), "the helper was killed")
    errors = [formatEvent(e) for e in logged if e["log_level"] == LogLevel.error]
    assert errors and "docker-credential-hang get: timed out after 10s" in errors[0]


@pytest_twisted.ensureDeferred
async def test_timeout_is_timed_out_for_run_helper(helpers: Helpers) -> None:
    helpers.add("hang", "exec sleep 600")
    clock = Clock()
    d = Deferred.fromCoroutine(
        run_helper(reactor, clock, "hang", LOCAL, timeout=1, environ=helpers.environ))
    clock.advance(1)
    with pytest.raises(TimedOut):
        await d


@pytest_twisted.ensureDeferred
async def test_the_reactor_runs_while_a_helper_does(helpers: Helpers) -> None:
    """The helper answers only once the test, on the reactor, has let it: a helper run that
    blocked the reactor would never see the go-ahead (and would answer "not found")."""
    go = helpers.base / "go"
    answer = json.dumps({"Username": "alice", "Secret": SECRET})
    helpers.add("slow",
                f'i=0; while [ ! -e "{go}" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done\n'
                f'[ -e "{go}" ] || {{ echo "{NOT_FOUND}"; exit 1; }}\n'
                f"echo '{answer}'")
    d = Deferred.fromCoroutine(helpers.resolver({"credsStore": "slow"}).for_image(IMAGE))
    assert not d.called
    await deferLater(reactor, 0.05, lambda: None)
    assert not d.called
    go.write_text("")
    auth = await d
    assert auth is not None and auth.password == SECRET


@pytest_twisted.ensureDeferred
async def test_answers_are_kept_for_a_while_and_shared(helpers: Helpers) -> None:
    helpers.answering("test")
    clock = Clock()
    resolver = helpers.resolver({"credsStore": "test"}, clock=clock, cache_for=60)
    first = [Deferred.fromCoroutine(resolver.for_image(f"{LOCAL}/app{i}:qa")) for i in range(5)]
    answers = [await d for d in first]
    assert len(set(answers)) == 1 and answers[0] is not None
    assert helpers.runs("test") == 1
    clock.advance(59)
    assert await resolver.for_image(IMAGE) == answers[0]
    assert helpers.runs("test") == 1
    await resolver.for_image("quay.io/other/app:1")  # another server: another answer
    assert helpers.runs("test") == 2
    clock.advance(2)
    await resolver.for_image(IMAGE)
    assert helpers.runs("test") == 3


@pytest_twisted.ensureDeferred
async def test_not_found_is_kept_failures_are_not(helpers: Helpers) -> None:
    helpers.add("empty", f'echo "{NOT_FOUND}"; exit 1')
    helpers.add("broken", "exit 1")
    resolver = helpers.resolver({"credHelpers": {LOCAL: "empty", "quay.io": "broken"}})
    for _ in range(2):
        assert await resolver.for_image(IMAGE) is None
        assert await resolver.for_image("quay.io/x/y:1") is None
    assert (helpers.runs("empty"), helpers.runs("broken")) == (1, 2)


@pytest_twisted.ensureDeferred
async def test_a_caller_that_gives_up_leaves_the_others_their_answer(helpers: Helpers) -> None:
    go = helpers.base / "go"
    answer = json.dumps({"Username": "alice", "Secret": SECRET})
    helpers.add("slow", f'while [ ! -e "{go}" ]; do sleep 0.05; done; echo \'{answer}\'')
    resolver = helpers.resolver({"credsStore": "slow"})
    impatient = Deferred.fromCoroutine(resolver.for_image(IMAGE))
    patient = Deferred.fromCoroutine(resolver.for_image(IMAGE))
    impatient.cancel()
    impatient.addErrback(lambda f: None)
    go.write_text("")
    auth = await patient
    assert auth is not None and auth.password == SECRET
    assert helpers.runs("slow") == 1


@pytest_twisted.ensureDeferred
async def test_without_helpers_no_process_runs(helpers: Helpers) -> None:
    resolver = helpers.resolver({"auths": {LOCAL: {"auth": _b64("u:p")}}})
    assert await resolver.for_image(IMAGE) == RegistryAuth("u", "p", serveraddress=LOCAL)
    assert await resolver.for_image("quay.io/x/y:1") is None
    assert not any(helpers.base.glob("*.runs"))


def test_of_wraps_static_credentials_once() -> None:
    static = Credentials()
    resolver = RegistryCredentials.of(reactor, static)
    assert resolver.credentials is static
    assert RegistryCredentials.of(reactor, resolver) is resolver
    assert RegistryCredentials.of(reactor, None).credentials == Credentials()


def test_helper_scripts_are_executable(helpers: Helpers) -> None:
    """The fixture itself: a script that could not run would make the tests above vacuous."""
    path = helpers.answering("test")
    assert os.access(path, os.X_OK)
