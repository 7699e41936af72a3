"""Docker credential helpers, run as the docker CLI runs them, without blocking the reactor.

A helper is a program ``docker-credential-<name>`` on PATH, named by config.json's
``credHelpers`` (per registry host) or ``credsStore`` (every other registry); see
:mod:`deployer.dockercfg` for which one is asked. ``docker-credential-<name> get`` reads a
registry's server address on stdin (the host, ``127.0.0.1:5000``, or ``https://index.docker.io/v1/``
for Docker Hub) and writes ``{"ServerURL": ..., "Username": ..., "Secret": ...}`` on stdout; the
Username ``<token>`` means that the Secret is an identity token. A helper that holds nothing for
the server says ``credentials not found in native keychain``: the pull then goes anonymous.

A helper that cannot be started, exits with an error, answers with something that is not
credentials, or does not answer within ``timeout`` (it is then killed) is logged, and the pull
uses the inline ``auths`` entry of config.json for the registry if there is one, else goes
anonymous, as the docker CLI does. What a helper writes on stdout is never logged (it is the
secret, or an error that may quote one); its stderr is logged trimmed, with whatever its stdout
held taken out.

Answers are kept ``cache_for`` seconds (60 by default), so that a round of pulls does not start
one process per image; callers that ask while a helper runs share its answer.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ProcessDone, ProcessExitedAlready, ProcessTerminated
from twisted.internet.interfaces import IProcessTransport, IReactorProcess, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from deployer.dockercfg import Credentials, RegistryAuth
from deployer.errors import CredentialHelperError, TimedOut
from deployer.timeouts import cancel_after

log = Logger()

PROGRAM_PREFIX = "docker-credential-"
#: What a helper answers (on stdout, exiting 1) when it holds nothing for the server.
NOT_FOUND = "credentials not found in native keychain"
#: The Username that marks the Secret as an identity token.
TOKEN_USERNAME = "<token>"
DEFAULT_TIMEOUT = 10.0
DEFAULT_CACHE_FOR = 60.0
#: More than this on stdout or stderr is not an answer.
OUTPUT_LIMIT = 64 * 1024
#: How much of a failing helper's stderr the log shows.
STDERR_SHOWN = 200


@attrs.define(eq=False)
class _Exit:
    code: int | None
    signal: int | None
    stdout: bytes
    stderr: bytes
    overflow: bool


class _HelperProcess(ProcessProtocol):
    """Writes the server address, closes stdin, and collects both outputs until the end."""

    def __init__(self, server: bytes) -> None:
        self.server = server
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.overflow = False
        self.ended: Deferred[_Exit] = Deferred(canceller=self._kill)

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.server)
        self.transport.closeStdin()

    def _collect(self, into: bytearray, data: bytes) -> None:
        if len(into) + len(data) > OUTPUT_LIMIT:
            self.overflow = True
            data = data[: max(0, OUTPUT_LIMIT - len(into))]
        into.extend(data)

    def outReceived(self, data: bytes) -> None:
        self._collect(self.stdout, data)

    def errReceived(self, data: bytes) -> None:
        self._collect(self.stderr, data)

    def processEnded(self, reason: Failure) -> None:
        if self.ended.called:  # given up on already (see _kill)
            return
        code: int | None = 0
        signal: int | None = None
        if isinstance(reason.value, ProcessTerminated):
            code, signal = reason.value.exitCode, reason.value.signal
        elif not isinstance(reason.value, ProcessDone):
            code = None
        self.ended.callback(
            _Exit(code, signal, bytes(self.stdout), bytes(self.stderr), self.overflow)
        )

    def _kill(self, _: Deferred[_Exit]) -> None:
        """Kill the helper and close its pipes (a child it left behind may hold them open)."""
        transport: IProcessTransport | None = self.transport
        if transport is None:
            return
        try:
            transport.signalProcess("KILL")
        except (ProcessExitedAlready, OSError):
            pass
        transport.loseConnection()


async def run_helper(
    reactor: IReactorProcess,
    clock: IReactorTime,
    name: str,
    server: str,
    timeout: float = DEFAULT_TIMEOUT,
    environ: Mapping[str, str] | None = None,
) -> RegistryAuth | None:
    """``docker-credential-<name> get`` for ``server``: its credentials, or None when it holds
    none. Raises :class:`CredentialHelperError`, or :class:`TimedOut` after ``timeout`` seconds on
    ``clock`` (the helper is then killed). ``environ`` (default ``os.environ``) is the helper's
    environment, and its PATH is where the program is looked for."""
    program = PROGRAM_PREFIX + name
    env = dict(os.environ if environ is None else environ)
    path = shutil.which(program, path=env.get("PATH", os.defpath))
    if path is None:
        raise CredentialHelperError(f"{program} is not an executable on PATH")
    process = _HelperProcess(server.encode())
    try:
        reactor.spawnProcess(process, path, [program, "get"], env=env)
    except OSError as e:
        raise CredentialHelperError(f"{program} could not be started: {e.strerror}") from e
    ended = await cancel_after(process.ended, timeout, clock, f"{program} get")
    return _answer(program, server, ended)


def _answer(program: str, server: str, ended: _Exit) -> RegistryAuth | None:
    if ended.overflow:
        raise CredentialHelperError(f"{program} wrote more than {OUTPUT_LIMIT} bytes")
    if NOT_FOUND in (ended.stdout.decode("utf-8", "replace").strip(),
                     ended.stderr.decode("utf-8", "replace").strip()):
        return None
    if ended.code != 0:
        how = (f"was killed by signal {ended.signal}" if ended.signal is not None
               else f"exited with status {ended.code}")
        raise CredentialHelperError(f"{program} {how}{_stderr_note(ended)}")
    try:
        data = json.loads(ended.stdout)
    except ValueError:
        data = None
    if not (
        isinstance(data, dict)
        and isinstance(data.get("Username", ""), str)
        and isinstance(data.get("Secret"), str)
    ):
        raise CredentialHelperError(
            f"{program} answered with {len(ended.stdout)} bytes that are not credentials JSON"
            f" (an object with the strings Username and Secret){_stderr_note(ended)}"
        )
    username, secret = str(data.get("Username", "")), str(data["Secret"])
    if not secret:
        return None
    if username == TOKEN_USERNAME:
        return RegistryAuth(identitytoken=secret, serveraddress=server)
    return RegistryAuth(username=username, password=secret, serveraddress=server)


def _stderr_note(ended: _Exit) -> str:
    """``": <stderr>"``, on one line, at most :data:`STDERR_SHOWN` characters, with every string
    of the helper's stdout (the secret, if it wrote one) masked; "" when stderr is empty."""
    text = ended.stderr.decode("utf-8", "replace")
    for secret in sorted(_strings_of(ended.stdout), key=len, reverse=True):
        text = text.replace(secret, "***")
    text = " ".join(text.split())
    if not text:
        return ""
    if len(text) > STDERR_SHOWN:
        text = text[:STDERR_SHOWN] + "..."
    return f": {text}"


def _strings_of(stdout: bytes) -> set[str]:
    """The strings that a helper's stdout could carry a secret in: its JSON string values and
    its lines (at least 4 characters: shorter ones would mask half the message)."""
    text = stdout.decode("utf-8", "replace")
    found = {line.strip() for line in text.splitlines()}
    try:
        data: Any = json.loads(text)
    except ValueError:
        data = None
    stack = [data]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            found.add(value)
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return {s for s in found if len(s) >= 4}


@attrs.frozen
class _Cached:
    until: float
    auth: RegistryAuth | None


class RegistryCredentials:
    """The credentials for each pull: the entries of the files (``credentials``) and the answers
    of the credential helpers they name.

    ``reactor`` runs the helpers; ``clock`` (default: ``reactor``) times them out after
    ``timeout`` seconds and keeps their answers ``cache_for`` seconds; ``environ`` (default:
    ``os.environ`` when a helper starts) is their environment.
    """

    def __init__(
        self,
        reactor: IReactorProcess,
        credentials: Credentials | None = None,
        clock: IReactorTime | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        cache_for: float = DEFAULT_CACHE_FOR,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.reactor = reactor
        self.credentials = Credentials() if credentials is None else credentials
        self.clock: IReactorTime = reactor if clock is None else clock  # type: ignore[assignment]
        self.timeout = timeout
        self.cache_for = cache_for
        self.environ = environ
        self._cache: dict[tuple[str, str], _Cached] = {}
        self._waiting: dict[tuple[str, str], list[Deferred[RegistryAuth | None]]] = {}

    @classmethod
    def of(
        cls, reactor: Any, credentials: Credentials | RegistryCredentials | None
    ) -> RegistryCredentials:
        """``credentials`` as they are if they are a resolver already, else a resolver over them
        that runs helpers on ``reactor``."""
        if isinstance(credentials, RegistryCredentials):
            return credentials
        return cls(reactor, credentials)

    async def for_image(self, repotag: str) -> RegistryAuth | None:
        """The credentials to pull ``repotag`` with; None means anonymous. Never raises for a
        helper's failure: it is logged, and the file's entry (or anonymous) is used."""
        found = self.credentials.lookup(repotag)
        if found.helper is None:
            return found.static
        try:
            return await self._ask(found.helper, found.server, found.static is not None)
        except (CredentialHelperError, TimedOut):
            return found.static  # logged once for every caller by _settle

    def _ask(self, helper: str, server: str, fallback: bool) -> Deferred[RegistryAuth | None]:
        key = (helper, server)
        cached = self._cache.get(key)
        if cached is not None and cached.until > self.clock.seconds():
            return succeed(cached.auth)
        first = key not in self._waiting
        waiters = self._waiting.setdefault(key, [])
        # A caller that gives up leaves the others (and the helper) alone.
        waiter: Deferred[RegistryAuth | None] = Deferred(canceller=waiters.remove)
        waiters.append(waiter)
        if first:
            run = Deferred.fromCoroutine(run_helper(
                self.reactor, self.clock, helper, server, self.timeout, self.environ
            ))
            run.addBoth(self._settle, key, fallback)
        return waiter

    def _settle(
        self, result: RegistryAuth | Failure | None, key: tuple[str, str], fallback: bool
    ) -> None:
        helper, server = key
        waiters = self._waiting.pop(key, [])
        if isinstance(result, Failure):
            instead = "the inline config.json entry" if fallback else "no credentials (anonymous)"
            if result.check(CredentialHelperError, TimedOut):
                log.error(
                    "credential helper {helper} gave no credentials for {server}: {why};"
                    " pulling with {instead}",
                    helper=helper, server=server, why=result.getErrorMessage(), instead=instead,
                )
            else:
                log.failure("credential helper {helper} for {server}", result,
                            helper=helper, server=server)
            for waiter in waiters:
                waiter.errback(result)
            return
        self._cache[key] = _Cached(self.clock.seconds() + self.cache_for, result)
        if result is None:
            log.info("credential helper {helper} holds no credentials for {server};"
                     " pulling anonymously", helper=helper, server=server)
        else:
            log.debug("credentials for {server} from credential helper {helper}",
                      helper=helper, server=server)
        for waiter in waiters:
            waiter.callback(result)
