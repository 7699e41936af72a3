"""The fleet's shared log of updates, kept in etcd (v3, through its JSON gateway).

Key layout
----------
``<prefix>`` is ``--etcd_prefix`` without any trailing slash (default ``/deployer``).

``<prefix>/<pattern>``
    A trigger. ``<pattern>`` is :attr:`deployer.model.Update.pattern`: ``[host/]repo`` (every
    local tag of the repository), ``[host/]repo:tag`` (that tag only) or ``*`` (every local
    image). These are the keys of the Go original, so ``etcdctl put /deployer/myorg/foo anything``
    deploys ``myorg/foo``. The value written by :meth:`Etcd.record` is a JSON object with the
    keys ``repository``, ``registry``, ``tag``, ``digest``, ``source``, ``received`` and
    ``event_id``. A value that is not such an object (an operator's ``anything``), or one that
    describes another repository than its key, still triggers: the update then comes from the key
    alone, with source ``etcd``. A key whose pattern is not a valid Docker reference is logged and
    ignored. A DELETE deploys nothing.

``<prefix>/_/...``
    Reserved for daemon state that must never trigger a deploy (locks, host status). The watch
    ignores these keys; no valid repository name starts with ``_``.

The watch covers ``<prefix>/`` with the slash, so a ``/deployer`` daemon never sees
``/deployer2/...``.

Delivery
--------
:class:`WatchService` reads every key under the prefix when it starts and hands each recorded
pattern to its callback once (the Go original's catch-up), then watches from the revision after
that read. After any interruption it resumes from the last revision it processed plus one, so
nothing is missed and nothing is delivered twice; the processed revision advances with the
events' ``mod_revision`` and with progress notifications (sent by etcd only to watchers that are
up to date), never with the header of a response that carries events or of the ``created``
response, which can be ahead of what was delivered. If etcd has compacted that revision away,
the service reads everything again and delivers every key once more (a full resync).

:meth:`Etcd.record` commits in groups: the first write goes out at once, and every write that
arrives while a transaction is in flight joins the next transaction, sent as soon as the
in-flight one ends (at most :data:`MAX_TXN_OPS` keys each, etcd's default ``--max-txn-ops``).
A write that timed out may still have been applied: writes are at least once.

Members are used in the order of ``--etcd_nodes``; writes and the watch share the member in use,
and a failure of that member moves both to the next one. A write tries every member once, each
within ``dial_timeout``; the watch retries forever after a backoff (``retry_delay`` doubled per
failure, capped at :data:`MAX_BACKOFF`, with jitter, and never shorter than
:data:`MIN_RETRY_DELAY`). Reads are serializable (served by the member itself) unless
``--strong_consistency`` asks for linearizable ones.

Every request carries ``Grpc-Metadata-hasleader: true`` (:data:`REQUIRE_LEADER`), which the
gateway passes on to etcd as gRPC metadata. A member that has lost its leader (cut off from the
rest of the cluster) then answers reads and writes with ``etcdserver: no leader`` (HTTP 503)
instead of serving stale data, and ends a watch stream with that error after a few election
timeouts (about 12 s with etcd's defaults) instead of keeping it open and silent while the rest
of the cluster moves on. Either way the request fails over to the next member.

Why not txaioetcd's ``Client``
------------------------------
txaioetcd 18.10.2 builds every URL under ``/v3alpha/`` (a 404 since etcd 3.4), posts through the
module-level ``treq.post`` rather than its own pool, ignores ``serializable`` and most range
arguments, talks to a single URL, drops any watch message that arrives split across two TCP
reads, and hides the event type (PUT or DELETE) and compaction notices from the watch callback.
So this module keeps txaioetcd's value types and marshalling (:class:`~txaioetcd.KeySet`,
``KeyValue._parse``, ``Header._parse``, ``Range._parse``, ``Error._parse``) and does the HTTP
itself: a :class:`treq.client.HTTPClient` over its own ``Agent`` and ``HTTPConnectionPool``
against ``/v3/...``, member failover, and :class:`JSONLinesReader`, a watch stream reader that
buffers partial lines. Transactions are built as plain JSON (:func:`put_transaction`).

Only txaioetcd's ``_types`` module is loaded (:func:`_txaioetcd_types`): the package's
``__init__`` also imports its LMDB database layer (zlmdb, which brings numpy), about 15 MB of
resident memory that this daemon never uses.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import random
import sys
from base64 import b64encode
from collections.abc import Callable, Iterable
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
from treq import content
from treq.client import HTTPClient
from twisted.application.service import Service
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.error import ConnectError, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IDelayedCall,
    IPushProducer,
    IReactorTime,
    IStreamClientEndpoint,
)
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    URI,
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from deployer.errors import EtcdUnavailable
from deployer.model import Update
from deployer.reference import InvalidReference, check_digest, parse_reference


def _txaioetcd_types() -> ModuleType:
    """``txaioetcd._types``, without running the package's ``__init__`` (see the module
    docstring); the package's own module when something else imported it already."""
    loaded = sys.modules.get("txaioetcd._types")
    if loaded is not None:
        return loaded
    package = importlib.util.find_spec("txaioetcd")
    if package is None or not package.submodule_search_locations:
        raise ImportError("txaioetcd is not installed")
    path = os.path.join(next(iter(package.submodule_search_locations)), "_types.py")
    spec = importlib.util.spec_from_file_location("deployer._txaioetcd_types", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[spec.name] = module
    return module


if TYPE_CHECKING:
    from txaioetcd import Error, Header, KeySet, KeyValue, Range
else:
    _types = _txaioetcd_types()
    Error, Header, KeySet, KeyValue = _types.Error, _types.Header, _types.KeySet, _types.KeyValue
    Range = _types.Range

_T = TypeVar("_T")

MAX_TXN_OPS = 128
"""etcd's default ``--max-txn-ops``: the most keys one group-commit transaction carries."""

MAX_BACKOFF = 30.0
"""The cap, in seconds, of the watch's reconnection backoff."""

MIN_RETRY_DELAY = 0.1
"""The shortest wait, in seconds, before the watch retries, and the ``retry_delay`` that a
smaller one counts as: with a delay of 0 a watch on an unreachable etcd would retry in a busy
loop, logging every attempt."""

REQUIRE_LEADER = "Grpc-Metadata-hasleader"
"""The header (``true``) that makes etcd refuse requests and end watches on a member that has no
leader (see the module docstring)."""

WATCH_IDLE_TIMEOUT = 11 * 60.0
"""A watch stream silent for this long is presumed dead and reopened. The watch asks for
progress notifications, which etcd sends every 10 minutes by default to an idle watcher, so
this catches connections that died without a FIN or RST (a crashed host, a partition)."""

MAX_LINE = 16 * 1024 * 1024
"""The longest watch message accepted, in bytes."""

RESERVED = "_"
"""``<prefix>/_/...`` holds daemon state that never triggers."""


@attrs.define
class EtcdConfig:
    """How to reach etcd; one field per command-line flag."""

    nodes: tuple[str, ...]
    prefix: str = "/deployer"
    dial_timeout: float = 5.0
    retry_delay: float = 2.0
    strong_consistency: bool = False


class InvalidKey(ValueError):
    """A key under the prefix that names no valid repository pattern."""


def _strip_slashes(prefix: str) -> str:
    return prefix.rstrip("/")


@attrs.frozen
class KeyLayout:
    """The mapping between updates and keys/values under one prefix (see the module docstring)."""

    prefix: str = attrs.field(converter=_strip_slashes)

    @property
    def root(self) -> bytes:
        """``<prefix>/``: every trigger and reserved key starts with it."""
        return (self.prefix + "/").encode()

    def watched(self) -> KeySet:
        return KeySet(self.root, prefix=True)

    def key(self, update: Update) -> bytes:
        return self.root + update.pattern.encode()

    def value(self, update: Update) -> bytes:
        return json.dumps(
            {
                "repository": update.repository,
                "registry": update.registry,
                "tag": update.tag,
                "digest": update.digest,
                "source": update.source,
                "received": update.received,
                "event_id": update.event_id,
            },
            sort_keys=True,
            separators=(",", ":"),
        ).encode()

    def decode(self, key: bytes, value: bytes, now: float) -> Update | None:
        """The update that a PUT of ``key`` = ``value`` asks for.

        None for keys outside the prefix and reserved keys; :class:`InvalidKey` for a key
        whose pattern is not a valid reference. ``now`` is the ``received`` time of an update
        that comes from the key alone.
        """
        if not key.startswith(self.root):
            return None
        try:
            pattern = key[len(self.root):].decode("utf-8")
        except UnicodeDecodeError as e:
            raise InvalidKey(f"key {key!r} is not UTF-8") from e
        if pattern == RESERVED or pattern.startswith(RESERVED + "/"):
            return None
        if pattern == "*":
            bare = Update(repository="*", source="etcd", received=now)
        else:
            try:
                bare = Update.from_reference(parse_reference(pattern), source="etcd", received=now)
            except InvalidReference as e:
                raise InvalidKey(f"key {key!r}: {e}") from e
        return _from_value(bare, value) or bare


def _from_value(bare: Update, value: bytes) -> Update | None:
    """The update that ``value`` describes, if it is a value :meth:`KeyLayout.value` wrote for
    the same repository pattern as ``bare``; None otherwise."""
    try:
        obj = json.loads(value)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict):
        return None
    if (obj.get("repository"), obj.get("registry"), obj.get("tag")) != (
        bare.repository,
        bare.registry,
        bare.tag,
    ):
        return None
    source, received = obj.get("source"), obj.get("received")
    digest, event_id = obj.get("digest"), obj.get("event_id")
    if not isinstance(source, str) or not source:
        return None
    if not isinstance(received, int | float) or isinstance(received, bool):
        return None
    try:
        received = float(received)
    except OverflowError:
        return None
    if not math.isfinite(received):
        return None
    if not (event_id is None or isinstance(event_id, str)):
        return None
    if digest is not None:
        try:
            check_digest(digest if isinstance(digest, str) else "")
        except InvalidReference:
            return None
    if bare.digest is not None and digest not in (None, bare.digest):
        return None
    return bare.evolve(
        source=source,
        received=received,
        digest=digest if digest is not None else bare.digest,
        event_id=event_id,
    )


@attrs.define
class Backoff:
    """Capped exponential backoff with jitter: attempt ``n`` waits between half and all of
    ``min(cap, base * 2**n)`` seconds, and never less than ``floor``. A ``base`` below
    ``floor`` counts as ``floor``, so a zero ``base`` still backs off."""

    base: float
    rng: random.Random
    cap: float = MAX_BACKOFF
    floor: float = MIN_RETRY_DELAY

    def delay(self, attempt: int) -> float:
        base = max(self.base, self.floor)
        ceiling = min(self.cap, base * 2 ** min(attempt, 32))
        return max(self.floor, ceiling / 2 + self.rng.uniform(0, ceiling / 2))


@attrs.define
class Members:
    """The etcd members, in the order given, and the one in use (shared by writes and the
    watch). A failure of the member in use moves every later request to the next one."""

    nodes: tuple[str, ...]
    current: int = 0

    def __attrs_post_init__(self) -> None:
        if not self.nodes:
            raise ValueError("no etcd nodes given")
        self.nodes = tuple(n.rstrip("/") for n in self.nodes)

    def in_turn(self) -> list[int]:
        """Every member once, starting with the one in use."""
        n = len(self.nodes)
        return [(self.current + i) % n for i in range(n)]

    def failed(self, index: int) -> None:
        if index == self.current:
            self.current = (index + 1) % len(self.nodes)


class EtcdHTTPError(Exception):
    """etcd answered a request with an HTTP error; ``code`` is etcd's (gRPC) code."""

    def __init__(self, url: str, status: int, code: int | None, message: str) -> None:
        super().__init__(f"{url} answered HTTP {status}: {message}")
        self.status = status
        self.code = code

    @property
    def member_failed(self) -> bool:
        """True when the member itself is at fault (5xx), not the request (4xx)."""
        return self.status >= 500


class WatchCanceled(Exception):
    """etcd ended a watch, or sent an error on the watch stream."""


class Compacted(Exception):
    """The revision a watch asked for was compacted away."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (compact_revision {compact_revision})")
        self.compact_revision = compact_revision


_EXPECTED_FAILURES = (
    ConnectError,
    ConnectionDone,
    ConnectionLost,
    ResponseFailed,
    ResponseNeverReceived,
    TimeoutError,
    EtcdHTTPError,
    WatchCanceled,
    EtcdUnavailable,
)


def describe(failure: BaseException) -> str:
    """A one-line reason for logs and ``/healthz``."""
    if isinstance(failure, ResponseFailed | ResponseNeverReceived):
        inner = [r.getErrorMessage() for r in failure.reasons]
        return f"{type(failure).__name__}: {'; '.join(inner)}"
    if isinstance(failure, TimeoutError):
        return str(failure) or "timed out"
    text = str(failure)
    return f"{type(failure).__name__}: {text}" if text else type(failure).__name__


def _parse_line(line: bytes) -> dict[str, Any] | None:
    if not line.strip():
        return None
    obj = json.loads(line)
    if not isinstance(obj, dict):
        raise ValueError(f"watch message is not a JSON object: {line[:200]!r}")
    return obj


class JSONLinesReader(Protocol):
    """Reads a response body of newline-delimited JSON objects (the gateway's watch stream).

    Bytes are buffered until a newline, whatever the TCP reads are cut into. Each object goes to
    ``on_message``; if that raises, or a line is not a JSON object, the stream is stopped and
    :attr:`done` fails with that error. At a clean end of the body, what is left after the last
    newline is read as a last object (the gateway sends its final error that way), and
    :attr:`done` fires None; it fails with the reason when the body ends otherwise, or inside an
    object. Cancelling :attr:`done` stops the stream.
    """

    def __init__(self, on_message: Callable[[dict[str, Any]], object]) -> None:
        self._on_message = on_message
        self._buffer = bytearray()
        self._scanned = 0
        self.done: Deferred[None] = Deferred(lambda _: self._stop())

    def connectionMade(self) -> None:
        if self.done.called:  # failed or cancelled before the body arrived
            self._stop()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._buffer += data
        while not self.done.called:
            end = self._buffer.find(b"\n", self._scanned)
            if end < 0:
                self._scanned = len(self._buffer)
                if self._scanned > MAX_LINE:
                    self.fail(ValueError(f"watch message longer than {MAX_LINE} bytes"))
                return
            line = bytes(self._buffer[:end])
            del self._buffer[: end + 1]
            self._scanned = 0
            try:
                obj = _parse_line(line)
                if obj is not None:
                    self._on_message(obj)
            except Exception:
                self._fail(Failure())

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        if self.done.called:
            return
        if not reason.check(ResponseDone):
            self.done.errback(reason)
            return
        # The gateway ends a stream with an error object and no newline after it.
        rest, self._buffer = bytes(self._buffer), bytearray()
        try:
            last = _parse_line(rest)
        except ValueError:
            self.done.errback(ConnectionLost(f"the stream ended inside a message: {rest[:200]!r}"))
            return
        try:
            if last is not None:
                self._on_message(last)
        except Exception:
            self.done.errback(Failure())
        else:
            self.done.callback(None)

    def fail(self, error: Exception) -> None:
        """Stop the stream; :attr:`done` fails with ``error``."""
        self._fail(Failure(error))

    def _fail(self, failure: Failure) -> None:
        if not self.done.called:
            self.done.errback(failure)
        self._stop()

    def _stop(self) -> None:
        if self.transport is not None:
            IPushProducer(self.transport).stopProducing()


@implementer(IAgentEndpointFactory)
@attrs.frozen
class MemberEndpoints:
    """How the agent reaches a member: directly when the URL names an IP address.

    ``HostnameEndpoint`` reports a refused connection only at its next attempt tick (0.3 s), so
    with it every dead member would delay the failover to the next one.
    """

    reactor: Any
    timeout: float

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii").strip("[]")
        endpoint: IStreamClientEndpoint
        if isIPAddress(host):
            endpoint = TCP4ClientEndpoint(self.reactor, host, uri.port, timeout=self.timeout)
        elif isIPv6Address(host):
            endpoint = TCP6ClientEndpoint(self.reactor, host, uri.port, timeout=self.timeout)
        else:
            endpoint = HostnameEndpoint(self.reactor, host, uri.port, timeout=self.timeout)
        if uri.scheme == b"https":
            tls = BrowserLikePolicyForHTTPS().creatorForNetloc(uri.host, uri.port)
            endpoint = wrapClientTLS(tls, endpoint)
        return endpoint



def put_transaction(items: Iterable[tuple[bytes, bytes]]) -> dict[str, Any]:
    """The JSON body of one ``/v3/kv/txn`` that puts every ``(key, value)``, unconditionally.

    Built here rather than with txaioetcd's ``Transaction``/``OpSet``: their marshalling imports
    the whole txaioetcd package at the first write (see the module docstring).
    """
    return {
        "success": [
            {"request_put": {"key": b64encode(key).decode(), "value": b64encode(value).decode()}}
            for key, value in items
        ]
    }


class Etcd:
    """The fleet's log of updates: group-committed writes and watches (see the module docstring).

    One per daemon. It owns its connection pool unless ``http`` is given (tests).
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        config: EtcdConfig,
        *,
        http: HTTPClient | None = None,
        rng: random.Random | None = None,
        max_txn_ops: int = MAX_TXN_OPS,
        max_backoff: float = MAX_BACKOFF,
    ) -> None:
        self.reactor = reactor
        self.config = config
        self.layout = KeyLayout(config.prefix)
        self.members = Members(config.nodes)
        self.rng = rng if rng is not None else random.Random()
        self.max_backoff = max_backoff
        self._pool: HTTPConnectionPool | None = None
        if http is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool._factory.noisy = False  # no "Starting factory" line per connection
            endpoints = MemberEndpoints(reactor, config.dial_timeout)
            http = HTTPClient(Agent.usingEndpointFactory(reactor, endpoints, pool=self._pool))
        self._http = http
        self._max_txn_ops = max_txn_ops
        self._queue: list[tuple[bytes, bytes, Deferred[int]]] = []
        self._in_flight: Deferred[None] | None = None
        self.transactions = 0

    # -- writes ------------------------------------------------------------------------------

    def key_for(self, update: Update) -> str:
        """The key that :meth:`record` writes ``update`` to."""
        return self.layout.key(update).decode()

    def record(self, update: Update) -> Deferred[int]:
        """Write ``update``; fires with the etcd revision once etcd acknowledged the write, or
        fails with :class:`~deployer.errors.EtcdUnavailable` once every member was tried."""
        done: Deferred[int] = Deferred()
        self._queue.append((self.layout.key(update), self.layout.value(update), done))
        if self._in_flight is None:
            self._send_next()
        return done

    def _send_next(self) -> None:
        if not self._queue:
            self._in_flight = None
            return
        batch: dict[bytes, tuple[bytes, list[Deferred[int]]]] = {}
        taken = 0
        for key, value, done in self._queue:
            if key not in batch and len(batch) == self._max_txn_ops:
                break
            waiting = batch[key][1] if key in batch else []
            waiting.append(done)
            batch[key] = (value, waiting)  # the last value for a key wins
            taken += 1
        del self._queue[:taken]
        self._in_flight = Deferred.fromCoroutine(self._commit(batch))
        self._in_flight.addBoth(lambda _: self._send_next())

    async def _commit(self, batch: dict[bytes, tuple[bytes, list[Deferred[int]]]]) -> None:
        txn = put_transaction((key, value) for key, (value, _) in batch.items())
        waiting = [done for _, callers in batch.values() for done in callers]
        try:
            revision = await self._write(txn, len(batch))
        except Exception:
            failure = Failure()
            for done in waiting:
                if not done.called:
                    done.errback(failure)
            return
        for done in waiting:
            if not done.called:
                done.callback(revision)

    async def _write(self, body: dict[str, Any], keys: int) -> int:
        reasons = []
        for index in self.members.in_turn():
            url = self.members.nodes[index]
            try:
                reply = await self.call(url, "/v3/kv/txn", body)
            except CancelledError:
                raise
            except Exception as e:
                reasons.append(f"{url}: {describe(e)}")
                self.log.warn(
                    "etcd write of {keys} key(s) to {url} failed: {why}",
                    keys=keys,
                    url=url,
                    why=describe(e),
                )
                if not isinstance(e, _EXPECTED_FAILURES):
                    self.log.failure("unexpected error writing to {url}", Failure(), url=url)
                if not isinstance(e, EtcdHTTPError) or e.member_failed:
                    self.members.failed(index)
                continue
            header = Header._parse(reply.get("header", {}))
            if not reply.get("succeeded", False) or header.revision is None:
                reasons.append(f"{url}: unexpected answer {reply!r}")
                continue
            self.transactions += 1
            return int(header.revision)
        raise EtcdUnavailable(
            f"no etcd member acknowledged the write within {self.config.dial_timeout:g}s each: "
            + "; ".join(reasons)
        )

    # -- requests ----------------------------------------------------------------------------

    def call(self, url: str, path: str, body: dict[str, Any]) -> Deferred[dict[str, Any]]:
        """POST ``body`` to one member's gateway; the JSON answer, within ``dial_timeout``."""
        d = Deferred.fromCoroutine(self._call(url, path, body))
        return _within(d, self.config.dial_timeout, self.reactor)

    async def _call(self, url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self._http.post(
            url + path, json=body, headers=_require_leader(), allow_redirects=False
        )
        return await _json_answer(url, response)

    async def read_all(self, url: str) -> tuple[int, list[KeyValue]]:
        """Every key under the prefix, from one member, and the revision of that read."""
        body = self.layout.watched()._marshal()
        if not self.config.strong_consistency:
            body["serializable"] = True
        result = Range._parse(await self.call(url, "/v3/kv/range", body))
        if result.header is None or result.header.revision is None:
            raise WatchCanceled(f"{url}: range answer without a revision")
        return int(result.header.revision), list(result.kvs)

    async def open_watch(self, url: str, start_revision: int, reader: JSONLinesReader) -> None:
        """Start a watch stream of the prefix from ``start_revision``, read by ``reader``."""
        create = self.layout.watched()._marshal()
        create["start_revision"] = start_revision
        create["progress_notify"] = True
        d = self._http.post(
            url + "/v3/watch",
            json={"create_request": create},
            headers=_require_leader(),
            unbuffered=True,
            allow_redirects=False,
        )
        response = await _within(d, self.config.dial_timeout, self.reactor)
        if response.code != 200:
            await _json_answer(url, response)  # raises EtcdHTTPError
        response.deliverBody(reader)

    def watch(self, on_update: Callable[[Update], object]) -> WatchService:
        """A service that delivers every recorded update to ``on_update`` (see
        :class:`WatchService`)."""
        return WatchService(self, on_update)

    async def close(self) -> None:
        """Wait for the writes in progress, then close the pool's connections."""
        while self._in_flight is not None:
            await self._in_flight
        if self._pool is not None:
            await self._pool.closeCachedConnections()


def _require_leader() -> Headers:
    return Headers({REQUIRE_LEADER: ["true"]})


def _within(d: Deferred[_T], timeout: float, clock: IReactorTime) -> Deferred[_T]:
    """``d``, cancelled after ``timeout`` seconds; it then fails with TimeoutError whatever the
    cancelled request failed with (an agent turns the cancellation into ResponseNeverReceived)."""

    def timed_out(result: _T | Failure, timeout: float) -> _T | Failure:
        if isinstance(result, Failure):
            return Failure(TimeoutError(f"timed out after {timeout:g}s"))
        return result

    return d.addTimeout(timeout, clock, onTimeoutCancel=timed_out)


async def _json_answer(url: str, response: IResponse) -> dict[str, Any]:
    raw = await content(response)
    try:
        obj = json.loads(raw)
    except ValueError:
        obj = None
    if response.code != 200 or not isinstance(obj, dict) or "error" in obj:
        error = Error._parse(obj) if isinstance(obj, dict) else Error(None, None)
        message = error.message or raw[:200].decode("utf-8", "replace")
        raise EtcdHTTPError(url, response.code, error.code, message)
    return obj


class WatchService(Service):
    """Delivers every update recorded under the prefix to ``on_update``, for as long as it runs.

    Starts with a catch-up read of every key, then watches (see the module docstring). Any
    failure moves to the next member after a capped, jittered backoff; it never raises out and
    runs until :meth:`stopService`, whose Deferred fires as soon as the request in flight or the
    backoff is cancelled. :attr:`live` is True while a watch stream is established;
    :attr:`reason` says why not; :attr:`reconnects` counts reconnection attempts.
    """

    log = Logger()

    def __init__(self, etcd: Etcd, on_update: Callable[[Update], object]) -> None:
        self._etcd = etcd
        self._on_update = on_update
        self._backoff = Backoff(etcd.config.retry_delay, etcd.rng, etcd.max_backoff)
        self._loop: Deferred[None] | None = None
        self._failures = 0
        self._url = ""
        self._quiet: IDelayedCall | None = None
        self.revision = 0  # the last revision processed; the watch resumes after it
        self.live = False
        self.reason = "not started"
        self.reconnects = 0
        self.resyncs = 0
        self.on_reconnect: Callable[[], object] = lambda: None

    def startService(self) -> None:
        super().startService()
        self._loop = Deferred.fromCoroutine(self._run())
        self._loop.addErrback(self._ended)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self.live = False
        self.reason = "stopped"
        loop, self._loop = self._loop, None
        if loop is None:
            return succeed(None)
        loop.cancel()
        return loop

    def _ended(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            self.log.failure("the etcd watch of {prefix} ended", failure,
                             prefix=self._etcd.layout.prefix)

    async def _run(self) -> None:
        # stopService cancels what the loop awaits. A cancelled HTTP request fails with what the
        # agent makes of it (ResponseNeverReceived, ConnectingCancelledError), not with
        # CancelledError, and a callback may call stopService while the loop is not waiting on
        # anything: so the loop also checks ``running`` after every step, before it retries.
        members = self._etcd.members
        resync = True
        while self.running:
            index = members.current
            url = members.nodes[index]
            try:
                if resync:
                    self.reason = f"reading {self._etcd.layout.prefix}/ from {url}"
                    await self._read_all(url)
                    resync = False
                    if not self.running:
                        return
                await self._watch(url)
                why = "the watch stream ended"
            except CancelledError:
                raise
            except Exception as e:
                if not self.running:
                    return
                if isinstance(e, Compacted):
                    self.log.warn(
                        "etcd {url} compacted the watch's revision {revision} ({why}):"
                        " reading everything again",
                        url=url,
                        revision=self.revision + 1,
                        why=e,
                    )
                    self.live = False
                    self.reason = f"{url}: {e}; resyncing"
                    resync = True
                    self.resyncs += 1
                    continue
                why = describe(e)
                if not isinstance(e, _EXPECTED_FAILURES):
                    self.log.failure("unexpected error in the etcd watch on {url}", url=url)
            if not self.running:
                return
            self.live = False
            self.reason = f"{url}: {why}"
            members.failed(index)
            delay = self._backoff.delay(self._failures)
            self._failures += 1
            self.log.warn(
                "etcd watch of {prefix}/ on {url} failed after revision {revision}: {why};"
                " retrying on {next} in {delay:.1f}s",
                prefix=self._etcd.layout.prefix,
                url=url,
                revision=self.revision,
                why=why,
                next=members.nodes[members.current],
                delay=delay,
            )
            await deferLater(self._etcd.reactor, delay)  # a cancel raises CancelledError
            self.reconnects += 1
            self.on_reconnect()

    async def _read_all(self, url: str) -> None:
        revision, kvs = await self._etcd.read_all(url)
        self.log.info(
            "read {count} key(s) under {prefix}/ from {url} at revision {revision}",
            count=len(kvs),
            prefix=self._etcd.layout.prefix,
            url=url,
            revision=revision,
        )
        for kv in kvs:
            self._deliver(kv)
        self.revision = revision

    async def _watch(self, url: str) -> None:
        reader = JSONLinesReader(self._handle)
        self._quiet = self._etcd.reactor.callLater(
            self._etcd.config.dial_timeout, self._too_quiet, reader
        )
        self._url = url
        try:
            await self._etcd.open_watch(url, self.revision + 1, reader)
            await reader.done
        finally:
            if self._quiet.active():
                self._quiet.cancel()
            self._quiet = None
            if not reader.done.called:
                reader.done.cancel()  # the stream never started: make sure it never does
            # Its failure, if any, is the one propagating now or was superseded by it.
            reader.done.addErrback(lambda _: None)

    def _too_quiet(self, reader: JSONLinesReader) -> None:
        if self.live:
            why = f"no message from etcd for {WATCH_IDLE_TIMEOUT:g}s"
        else:
            why = f"timed out after {self._etcd.config.dial_timeout:g}s waiting for the watch"
        reader.fail(TimeoutError(why))

    def _heard(self) -> None:
        """A message arrived: the stream is alive for another WATCH_IDLE_TIMEOUT."""
        if self._quiet is not None and self._quiet.active():
            self._quiet.reset(WATCH_IDLE_TIMEOUT)

    def _handle(self, message: dict[str, Any]) -> None:
        """One message of the watch stream."""
        self._heard()
        if "error" in message:
            error = message["error"]
            if isinstance(error, dict):
                error = error.get("message", error)
            raise WatchCanceled(f"etcd error on the watch stream: {error}")
        result = message.get("result", {})
        compact = int(result.get("compact_revision", 0) or 0)
        if compact:
            raise Compacted(compact)
        if result.get("canceled"):
            raise WatchCanceled(f"etcd canceled the watch: {result.get('cancel_reason', '')}")
        events = result.get("events", [])
        if result.get("created"):
            self.live = True
            self.reason = ""
            self._failures = 0
            self.log.info(
                "watching {prefix}/ on {url} from revision {revision}",
                prefix=self._etcd.layout.prefix,
                url=self._url,
                revision=self.revision + 1,
            )
        elif events:
            # A revision's events always come in one response, so whole responses are the unit
            # of progress: skip what was processed before, then move past this response.
            floor = self.revision
            newest = floor
            for event in events:
                kv = KeyValue._parse(event.get("kv", {}))
                revision = kv.mod_revision or 0
                if revision <= floor:
                    continue
                newest = max(newest, revision)
                if event.get("type", "PUT") == "PUT":
                    self._deliver(kv)
            self.revision = newest
        else:
            # A progress notification: etcd sends it only to a watcher that has been sent every
            # event up to the header's revision.
            header = Header._parse(result.get("header", {}))
            if header.revision is not None:
                self.revision = max(self.revision, int(header.revision))

    def _deliver(self, kv: KeyValue) -> None:
        try:
            update = self._etcd.layout.decode(kv.key, kv.value or b"", self._etcd.reactor.seconds())
        except InvalidKey as e:
            self.log.warn("ignoring etcd key at revision {revision}: {why}",
                          revision=kv.mod_revision, why=e)
            return
        except Exception:
            # Never let one odd entry stop the watch: it would fail again at every resume.
            self.log.failure("ignoring etcd key {key!r} at revision {revision}",
                             key=kv.key, revision=kv.mod_revision)
            return
        if update is None:
            return
        try:
            result = self._on_update(update)
        except Exception:
            self.log.failure("handling {update} failed", update=update.describe())
            return
        if isinstance(result, Deferred):
            result.addErrback(
                lambda f: self.log.failure(
                    "handling {update} failed", f, update=update.describe()
                )
            )
