"""The watch stream reader as the etcd watch uses it: deployer.lines.JSONLinesReader, strict
(a line that is not a JSON object breaks the stream), fed any cut of the gateway's stream."""

from __future__ import annotations

import base64
import itertools
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from deployer.lines import BadLine, JSONLinesReader


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


MESSAGES = [
    {"result": {"header": {"revision": "4"}, "created": True}},
    {"result": {"header": {"revision": "5"}, "events": [
        {"kv": {"key": b64(b"/deployer/myorg/foo"), "value": b64(b"x" * 300),
                "mod_revision": "5"}}]}},
    {"result": {"header": {"revision": "6"}, "events": [
        {"type": "DELETE", "kv": {"key": b64(b"/deployer/myorg/foo"), "mod_revision": "6"}}]}},
]
STREAM = b"".join(json.dumps(m).encode() + b"\n" for m in MESSAGES)


def reader_on(transport: StringTransport | None = None) -> tuple[JSONLinesReader, list[Any]]:
    got: list[Any] = []
    reader = JSONLinesReader(got.append, strict=True)
    reader.makeConnection(transport or StringTransport())
    return reader, got


def test_reader_one_byte_at_a_time() -> None:
    reader, got = reader_on()
    for i in range(len(STREAM)):
        reader.dataReceived(STREAM[i : i + 1])
    assert got == MESSAGES
    reader.connectionLost(Failure(ResponseDone()))
    assert reader.done.called
    assert reader.done.result is None


@given(cuts=st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=30))
def test_reader_any_split(cuts: list[int]) -> None:
    reader, got = reader_on()
    bounds = [0, *sorted(cuts), len(STREAM)]
    for start, end in itertools.pairwise(bounds):
        reader.dataReceived(STREAM[start:end])
    assert got == MESSAGES


def test_reader_skips_blank_lines_and_crlf() -> None:
    reader, got = reader_on()
    reader.dataReceived(b'\n\r\n{"a": 1}\r\n\n{"b"')
    reader.dataReceived(b": 2}\n")
    assert got == [{"a": 1}, {"b": 2}]


def failure_of(d: Deferred[Any]) -> Failure:
    results: list[Any] = []
    d.addErrback(results.append)
    assert results and isinstance(results[0], Failure), f"{d} did not fail"
    return results[0]


def test_reader_fails_and_stops_on_a_line_that_is_not_a_json_object() -> None:
    transport = StringTransport()
    reader, got = reader_on(transport)
    reader.dataReceived(b'{"a": 1}\n[1, 2]\n{"b": 2}\n')
    assert got == [{"a": 1}]
    assert failure_of(reader.done).check(BadLine)
    assert transport.producerState == "stopped"
    reader.dataReceived(b'{"c": 3}\n')  # ignored once failed
    assert got == [{"a": 1}]


def test_reader_fails_when_the_handler_raises() -> None:
    def boom(message: dict[str, Any]) -> None:
        raise KeyError("boom")

    transport = StringTransport()
    reader = JSONLinesReader(boom, strict=True)
    reader.makeConnection(transport)
    reader.dataReceived(b'{"a": 1}\n')
    assert failure_of(reader.done).check(KeyError)
    assert transport.producerState == "stopped"


def test_reader_end_inside_a_message_is_an_error() -> None:
    reader, _ = reader_on()
    reader.dataReceived(b'{"a": 1}\n{"b"')
    reader.connectionLost(Failure(ResponseDone()))
    assert failure_of(reader.done).check(ConnectionLost)


def test_reader_reads_a_last_object_without_newline_at_the_end() -> None:
    # What etcd's gateway sends when the member shuts down under a watch.
    reader, got = reader_on()
    last = b'{"error":{"grpc_code":14,"http_code":503,"message":"transport is closing"}}'
    reader.dataReceived(b'{"a": 1}\n' + last)
    assert got == [{"a": 1}]
    reader.connectionLost(Failure(ResponseDone()))
    assert got == [{"a": 1}, json.loads(last)]
    assert reader.done.result is None


def test_reader_fails_when_the_last_object_is_refused() -> None:
    def refuse(message: dict[str, Any]) -> None:
        if "error" in message:
            raise RuntimeError(message["error"]["message"])

    reader = JSONLinesReader(refuse, strict=True)
    reader.makeConnection(StringTransport())
    reader.dataReceived(b'{"error": {"message": "transport is closing"}}')
    reader.connectionLost(Failure(ResponseDone()))
    assert failure_of(reader.done).check(RuntimeError)


def test_reader_passes_on_a_lost_connection() -> None:
    reader, _ = reader_on()
    reader.connectionLost(Failure(ConnectionLost("gone")))
    assert failure_of(reader.done).check(ConnectionLost)


def test_reader_cancel_stops_the_transport() -> None:
    transport = StringTransport()
    reader, _ = reader_on(transport)
    reader.done.cancel()
    assert transport.producerState == "stopped"
    failure_of(reader.done)


def test_reader_stops_a_body_that_arrives_after_it_failed() -> None:
    reader = JSONLinesReader(lambda m: None, strict=True)
    reader.fail(ValueError("too late"))
    transport = StringTransport()
    reader.makeConnection(transport)
    assert transport.producerState == "stopped"
    failure_of(reader.done)


def test_reader_refuses_a_message_longer_than_its_limit() -> None:
    transport = StringTransport()
    got: list[Any] = []
    reader = JSONLinesReader(got.append, strict=True, max_length=64)
    reader.makeConnection(transport)
    reader.dataReceived(b'{"a": 1}\n{"b": "' + b"x" * 100)
    assert got == [{"a": 1}]
    assert failure_of(reader.done).check(BadLine)
    assert transport.producerState == "stopped"
