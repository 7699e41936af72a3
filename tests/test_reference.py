"""deployer.reference: the one split of ``[host/]path[:tag][@digest]`` and what is built on it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deployer.reference import (
    InvalidReference,
    Reference,
    familiar,
    matches,
    parse_reference,
    registry_host,
    split,
    with_tag,
)

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("busybox", ("busybox", None, None)),
        ("busybox:1", ("busybox", "1", None)),
        ("127.0.0.1:5000/myorg/foo", ("127.0.0.1:5000/myorg/foo", None, None)),
        ("127.0.0.1:5000/myorg/foo:qa", ("127.0.0.1:5000/myorg/foo", "qa", None)),
        (f"127.0.0.1:5000/foo@{DIGEST}", ("127.0.0.1:5000/foo", None, DIGEST)),
        (f"foo:qa@{DIGEST}", ("foo", "qa", DIGEST)),
        ("foo:", ("foo", "", None)),
        ("foo@", ("foo", None, "")),
    ],
)
def test_split(text: str, parts: tuple[str, str | None, str | None]) -> None:
    assert split(text) == parts


def test_parse_reference_checks_what_split_cut() -> None:
    assert parse_reference(f"docker.io/library/busybox:1@{DIGEST}") == Reference(
        None, "busybox", "1", DIGEST
    )
    assert parse_reference("localhost:5000/a/b") == Reference("localhost:5000", "a/b")
    for bad in ("foo/Bar:qa", "foo:-qa", "foo@sha256:xyz", "foo:qa:qa"):
        with pytest.raises(InvalidReference):
            parse_reference(bad)


@pytest.mark.parametrize(
    ("name", "familiar_form", "tagged"),
    [
        ("docker.io/library/busybox:1", "busybox:1", "busybox:1"),
        ("index.docker.io/myorg/foo", "myorg/foo", "myorg/foo:latest"),
        ("registry.test:5000/foo", "registry.test:5000/foo", "registry.test:5000/foo:latest"),
        (f"registry.test:5000/foo@{DIGEST}", f"registry.test:5000/foo@{DIGEST}",
         f"registry.test:5000/foo@{DIGEST}"),
    ],
)
def test_familiar_and_with_tag(name: str, familiar_form: str, tagged: str) -> None:
    assert familiar(name) == familiar_form
    assert with_tag(name) == tagged


@pytest.mark.parametrize(
    ("pattern", "repotag", "expected"),
    [
        ("*", "anything:x", True),
        ("*", "<none>:<none>", False),
        ("registry.test:5000/foo", "registry.test:5000/foo:qa", True),
        ("registry.test:5000/foo", "registry.test:5000/foobar:qa", False),
        ("registry.test:5000/foo", "registry.test:5000/foo/sub:qa", False),
        ("registry.test:5000/foo:qa", "registry.test:5000/foo:qa", True),
        ("registry.test:5000/foo:qa", "registry.test:5000/foo:prod", False),
        ("docker.io/library/busybox", "busybox:1", True),
        ("busybox:1", "docker.io/library/busybox:1", True),
        (f"registry.test:5000/foo@{DIGEST}", "registry.test:5000/foo:qa", False),
    ],
)
def test_matches(pattern: str, repotag: str, expected: bool) -> None:
    assert matches(pattern, repotag) is expected


def test_registry_host() -> None:
    assert registry_host("docker.io/library/busybox:1") is None
    assert registry_host("myorg/foo:qa") is None
    assert registry_host("registry.test:5000/foo:qa") == "registry.test:5000"


_component = st.from_regex(r"\A[a-z0-9]{1,8}\Z")
_tag = st.from_regex(r"\A[A-Za-z0-9_][A-Za-z0-9_.-]{0,10}\Z")


@given(
    st.sampled_from([None, "registry.test:5000", "localhost", "ghcr.io"]),
    st.lists(_component, min_size=1, max_size=3),
    st.none() | _tag,
    st.booleans(),
)
def test_a_reference_reads_back_as_itself(
    host: str | None, path: list[str], tag: str | None, with_digest: bool
) -> None:
    ref = Reference(host, "/".join(path), tag, DIGEST if with_digest else None)
    assert parse_reference(str(ref)) == ref
    assert split(str(ref)) == (ref.name, ref.tag, ref.digest)
    assert familiar(str(ref)) == str(ref)
