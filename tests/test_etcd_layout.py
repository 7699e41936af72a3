"""Fast tests of deployer.etcd.layout: the keys under the prefix and the values triggers hold."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deployer.etcd import InvalidKey, KeyLayout
from deployer.model import Update
from deployer.reference import parse_reference


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


UPDATES = [
    Update(repository="myorg/foo", source="webhook", received=1.5),
    Update(repository="busybox", tag="latest", source="dockerhub", received=2.0, event_id="e1"),
    Update(repository="myorg/foo", registry="127.0.0.1:5000", tag="qa",
           digest="sha256:" + "0123456789abcdef" * 4, source="registry", received=3.25,
           event_id="5a0c"),
    Update(repository="*", source="repull", received=4.0),
]


@pytest.mark.parametrize("update", UPDATES, ids=lambda u: u.pattern)
def test_key_and_value_round_trip(update: Update) -> None:
    layout = KeyLayout("/deployer")
    key = layout.key(update)
    assert key == b"/deployer/" + update.pattern.encode()
    assert layout.decode(key, layout.value(update), now=99.0) == update
    value = json.loads(layout.value(update))
    assert set(value) == {"repository", "registry", "tag", "digest", "source", "received",
                          "event_id"}


path_component = st.from_regex(r"[a-z0-9]{1,8}([._-][a-z0-9]{1,8})?", fullmatch=True)


@given(
    path=st.lists(path_component, min_size=1, max_size=3).map("/".join),
    registry=st.none() | st.sampled_from(["127.0.0.1:5000", "registry.example.com", "localhost"]),
    tag=st.none() | st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True),
    received=st.floats(min_value=0, max_value=4e9, allow_nan=False),
    event_id=st.none() | st.text(max_size=20),
)
def test_round_trip_any_valid_update(
    path: str, registry: str | None, tag: str | None, received: float, event_id: str | None
) -> None:
    # The familiar form is what the engine lists; take it from the reference grammar.
    ref = parse_reference(f"{registry}/{path}" if registry else path)
    update = Update(repository=ref.path, registry=ref.host, tag=tag, source="webhook",
                    received=received, event_id=event_id)
    layout = KeyLayout("/deployer")
    assert layout.decode(layout.key(update), layout.value(update), now=0.0) == update


def test_trailing_slash_in_prefix() -> None:
    layout = KeyLayout("/deployer//")
    assert layout.prefix == "/deployer"
    assert layout.key(UPDATES[0]) == b"/deployer/myorg/foo"
    watched = layout.watched()._marshal()
    assert unb64(watched["key"]) == b"/deployer/"
    assert unb64(watched["range_end"]) == b"/deployer0"  # '/' + 1: nothing of /deployer2/...


ODD_RECEIVED = [
    b'{"repository": "myorg/foo", "registry": null, "tag": "qa", "source": "x", "received": %s}'
    % raw
    for raw in (b"1e999", b"1" + b"0" * 400, b"NaN", b"true", b'"soon"')
]


@pytest.mark.parametrize("value", [b"anything", b"", b"1700000000", b"[1, 2]", b'{"x": 1}',
                                   b"\xff\xfe", b"[" * 100_000, *ODD_RECEIVED])
def test_operator_values_trigger_from_the_key(value: bytes) -> None:
    update = KeyLayout("/deployer").decode(b"/deployer/myorg/foo:qa", value, now=42.0)
    assert update == Update(repository="myorg/foo", tag="qa", source="etcd", received=42.0)


def test_a_value_describing_another_repository_is_not_trusted() -> None:
    layout = KeyLayout("/deployer")
    other = layout.value(Update(repository="myorg/other", source="webhook", received=1.0))
    assert layout.decode(b"/deployer/myorg/foo", other, now=5.0) == Update(
        repository="myorg/foo", source="etcd", received=5.0
    )
    bad_digest = json.dumps({"repository": "myorg/foo", "registry": None, "tag": None,
                             "digest": "nope", "source": "x", "received": 1}).encode()
    assert layout.decode(b"/deployer/myorg/foo", bad_digest, now=5.0).source == "etcd"


def test_a_digest_in_the_key_is_kept() -> None:
    digest = "sha256:" + "ab" * 32
    update = KeyLayout("/deployer").decode(b"/deployer/myorg/foo:qa@" + digest.encode(), b"x", 1.0)
    assert update is not None
    assert (update.repository, update.tag, update.digest) == ("myorg/foo", "qa", digest)


@pytest.mark.parametrize("key", [b"/deployer/_/lock/host1", b"/deployer/_", b"/deployer2/myorg/foo",
                                 b"/other/myorg/foo", b"/deployer"])
def test_reserved_and_foreign_keys_deliver_nothing(key: bytes) -> None:
    assert KeyLayout("/deployer").decode(key, b"x", now=1.0) is None


@pytest.mark.parametrize("key", [b"/deployer/", b"/deployer/Not A Repo",
                                 b"/deployer/myorg/foo:bad tag", b"/deployer/myorg//foo",
                                 b"/deployer/\xff\xfe", b"/deployer/_x"])
def test_invalid_keys_raise(key: bytes) -> None:
    with pytest.raises(InvalidKey):
        KeyLayout("/deployer").decode(key, b"x", now=1.0)


def test_the_value_is_the_updates_json() -> None:
    update = UPDATES[2]
    assert json.loads(KeyLayout("/deployer").value(update)) == update.to_json()


def test_state_keys_are_reserved() -> None:
    layout = KeyLayout("/deployer/")
    key = layout.state("lock", "host1")
    assert key == b"/deployer/_/lock/host1"
    assert layout.decode(key, b"x", now=1.0) is None


def test_the_same_update_written_again_is_a_repeat() -> None:
    layout = KeyLayout("/deployer")
    one = Update(repository="myorg/foo", tag="qa", source="registry", received=5.0,
                 event_id="ev-1")
    key, value = layout.key(one), layout.value(one)
    assert layout.repeated(key, value, value)
    # Not a repeat: a new key, another update of the same tag, an operator's value put twice,
    # a value for another repository, reserved and invalid keys.
    assert not layout.repeated(key, value, None)
    later = layout.value(one.evolve(received=6.0, event_id="ev-2"))
    assert not layout.repeated(key, later, value)
    assert not layout.repeated(key, b"anything", b"anything")
    other = layout.value(Update(repository="myorg/bar", source="test", received=5.0))
    assert not layout.repeated(key, other, other)
    assert not layout.repeated(layout.state("builds", "myorg/foo"), value, value)
    assert not layout.repeated(b"/deployer/Bad Key", value, value)
