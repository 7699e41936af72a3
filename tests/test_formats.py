"""deployer.formats: every registry's payload becomes the same Update, or a 400; never a 500.

The last tests push to a real docker-registry that notifies a webhook served here, and run what
it really sends through the same code.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.logger import capturedLogs
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site

from deployer.auth import TokenAuth
from deployer.bodies import (
    JSON_CONTENT_TYPES,
    MAX_DEPTH,
    REGISTRY_CONTENT_TYPES,
    check_content_type,
    decode_json,
)
from deployer.errors import BadWebhook
from deployer.formats import (
    MANIFEST_MEDIA_TYPES,
    DockerHubHook,
    SeenEvents,
    parse_dockerhub,
    parse_generic,
    parse_github,
    parse_harbor,
    parse_quay,
    parse_registry_events,
)
from deployer.model import Update
from tests.helpers import assert_valid, paths, replaced

SAMPLES = Path(__file__).parent / "samples"
NOW = 1700000000.0
DIGEST = "sha256:" + "ab" * 32
OTHER_DIGEST = "sha256:" + "cd" * 32


def sample(name: str) -> Any:
    return json.loads((SAMPLES / name).read_text())


# -- decode_json ----------------------------------------------------------------------------------


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_decode_json_samples() -> None:
    for path in sorted(SAMPLES.glob("*.json")):
        assert decode_json(path.read_bytes()) == json.loads(path.read_text())


def test_decode_json_duplicate_keys_last_wins() -> None:
    assert decode_json(b'{"a": 1, "a": 2}') == {"a": 2}


@pytest.mark.parametrize(
    "body, words",
    [
        (b"\xff\xfe{}", "not UTF-8"),
        (b"", "not JSON"),
        (b"{", "not JSON"),
        (b"{'a': 1}", "not JSON"),
        (b'{"a": NaN}', "NaN"),
        (b"[Infinity]", "Infinity"),
        (b"1" * 5000, "not JSON"),
        (b'{"a": 1} trailing', "not JSON"),
    ],
)
def test_decode_json_refuses(body: bytes, words: str) -> None:
    with pytest.raises(BadWebhook) as e:
        decode_json(body)
    assert e.value.code == 400
    assert words in e.value.reason
    assert e.value.reason.startswith("body is not JSON")


def test_decode_json_depth_limit() -> None:
    assert decode_json(nested(MAX_DEPTH).encode()) is not None
    for depth in (MAX_DEPTH + 1, 1000, 200_000):
        with pytest.raises(BadWebhook) as e:
            decode_json(nested(depth).encode())
        assert e.value.code == 400
        assert "nested deeper" in e.value.reason


@pytest.mark.parametrize(
    "body",
    [
        "[" * 200_000,  # unbalanced: never closed
        '{"a":' * 100_000 + "1",
        "[" * 50_000 + '"x"' + "]" * 49_999,
    ],
)
def test_decode_json_deep_garbage_is_400_not_recursion(body: str) -> None:
    with pytest.raises(BadWebhook) as e:
        decode_json(body.encode())
    assert e.value.code == 400


def test_decode_json_brackets_in_strings_do_not_count() -> None:
    text = json.dumps({"a": nested(500), "b": '\\"[[[[' * 100, "c": ["\\", ["]]]]"]]})
    assert decode_json(text.encode()) == json.loads(text)


def json_depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((json_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((json_depth(v) for v in value.values()), default=0)
    return 0


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=25,
)


@given(json_values)
def test_decode_json_round_trip(value: Any) -> None:
    assert decode_json(json.dumps(value).encode()) == value
    assert decode_json(json.dumps(value, ensure_ascii=False).encode()) == value


@given(st.integers(min_value=1, max_value=70), st.sampled_from(["[", "{\"k\":"]), json_scalars)
def test_decode_json_depth_is_exact(depth: int, opener: str, leaf: Any) -> None:
    closer = "]" if opener == "[" else "}"
    text = opener * depth + json.dumps(leaf) + closer * depth
    if depth <= MAX_DEPTH:
        assert json_depth(decode_json(text.encode())) == depth
    else:
        with pytest.raises(BadWebhook):
            decode_json(text.encode())


@given(st.binary(max_size=300))
def test_decode_json_arbitrary_bytes(body: bytes) -> None:
    try:
        decode_json(body)
    except BadWebhook as e:
        assert e.code == 400


# -- check_content_type ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        b"application/json",
        b"Application/JSON",
        b"application/json; charset=utf-8",
        b"  application/json ;charset=UTF-8",
        None,
        b"",
    ],
)
def test_content_type_accepted(header: bytes | None) -> None:
    check_content_type(header, JSON_CONTENT_TYPES)


@pytest.mark.parametrize(
    "header",
    [b"text/plain", b"application/x-www-form-urlencoded", b"application/jsonx", b"json"],
)
def test_content_type_refused(header: bytes) -> None:
    with pytest.raises(BadWebhook) as e:
        check_content_type(header, JSON_CONTENT_TYPES)
    assert e.value.code == 415
    assert "application/json" in e.value.reason


def test_content_type_missing_can_be_refused() -> None:
    with pytest.raises(BadWebhook) as e:
        check_content_type(None, JSON_CONTENT_TYPES, missing_ok=False)
    assert e.value.code == 415


def test_content_type_registry_events() -> None:
    for header in (
        b"application/vnd.docker.distribution.events.v1+json",
        b"application/vnd.docker.distribution.events.v2+json",
        b"application/json",
    ):
        check_content_type(header, REGISTRY_CONTENT_TYPES)
    with pytest.raises(BadWebhook):
        check_content_type(b"application/vnd.docker.distribution.events.v1+json",
                           JSON_CONTENT_TYPES)


# -- Docker Hub -----------------------------------------------------------------------------------


def test_dockerhub_sample() -> None:
    hook = parse_dockerhub(sample("dockerhub-webhook.json"), NOW)
    assert hook == DockerHubHook(
        update=Update(
            repository="svendowideit/testhook", source="dockerhub", received=NOW, tag="latest"
        ),
        callback_url="https://registry.hub.docker.com/u/svendowideit/testhook/hook/"
        "2141b5bi5i5b02bec211i4eeih0242eg11000a/",
    )
    assert hook.update.pattern == "svendowideit/testhook:latest"


def test_dockerhub_older_payload() -> None:
    old = {
        "push_data": {
            "pushed_at": 1.385141110e09,
            "images": ["imagehash1", "imagehash2"],
            "pusher": "username",
        },
        "repository": {"repo_name": "username/reponame", "status": "Active"},
    }
    hook = parse_dockerhub(old, NOW)
    assert hook.update.tag is None
    assert hook.update.pattern == "username/reponame"
    assert hook.callback_url is None


@pytest.mark.parametrize(
    "repo_name, expected",
    [
        ("library/busybox", ("busybox", None)),
        ("myorg/foo", ("myorg/foo", None)),
        ("registry.example.com:5000/a/b", ("a/b", "registry.example.com:5000")),
        ("a" * 255, ("a" * 255, None)),
    ],
)
def test_dockerhub_names(repo_name: str, expected: tuple[str, str | None]) -> None:
    update = parse_dockerhub({"repository": {"repo_name": repo_name}}, NOW).update
    assert (update.repository, update.registry) == expected
    assert_valid(update)


@pytest.mark.parametrize(
    "body, field",
    [
        ({"repository": {"repo_name": "MyOrg/foo"}}, "repository.repo_name"),
        ({"repository": {"repo_name": "myorg/../foo"}}, "repository.repo_name"),
        ({"repository": {"repo_name": "myorg..foo"}}, "repository.repo_name"),
        ({"repository": {"repo_name": "/myorg/foo"}}, "repository.repo_name"),
        ({"repository": {"repo_name": "*"}}, "repository.repo_name"),
        ({"repository": {"repo_name": "myorg/*"}}, "repository.repo_name"),
        ({"repository": {"repo_name": "foo\n"}}, "repository.repo_name"),
        ({"repository": {"repo_name": "foo\x00bar"}}, "repository.repo_name"),
        ({"repository": {"repo_name": "föö"}}, "repository.repo_name"),
        ({"repository": {"repo_name": "a" * 256}}, "repository.repo_name"),
        ({"repository": {"repo_name": 12}}, "repository.repo_name"),
        ({"repository": {"repo_name": ["a"]}}, "repository.repo_name"),
        ({"repository": {"repo_name": ""}}, "repository.repo_name"),
        ({"repository": {}}, "repository.repo_name"),
        ({"repository": "myorg/foo"}, "repository"),
        ({"repository": None}, "repository.repo_name"),
        ({}, "repository.repo_name"),
        ({"repository": {"repo_name": "a/b"}, "push_data": []}, "push_data"),
        ({"repository": {"repo_name": "a/b"}, "push_data": {"tag": 1}}, "push_data.tag"),
        ({"repository": {"repo_name": "a/b"}, "push_data": {"tag": "-x"}}, "push_data.tag"),
        ({"repository": {"repo_name": "a/b"}, "push_data": {"tag": "a" * 129}}, "push_data.tag"),
        ({"repository": {"repo_name": "a/b"}, "push_data": {"tag": "v1\n"}}, "push_data.tag"),
        ({"repository": {"repo_name": "a/b"}, "callback_url": 5}, "callback_url"),
    ],
)
def test_dockerhub_refused(body: Any, field: str) -> None:
    with pytest.raises(BadWebhook) as e:
        parse_dockerhub(body, NOW)
    assert e.value.code == 400
    assert field in e.value.reason
    assert len(e.value.reason) <= 300


@pytest.mark.parametrize("body", [[], "x", 1, None, True])
def test_dockerhub_not_an_object(body: Any) -> None:
    with pytest.raises(BadWebhook) as e:
        parse_dockerhub(body, NOW)
    assert "body must be an object" in e.value.reason


# -- Distribution registry ------------------------------------------------------------------------


def registry_event(**changes: Any) -> dict[str, Any]:
    event: dict[str, Any] = copy.deepcopy(
        sample("registry-notification-manifest-push.json")["events"][0]
    )
    for path, value in changes.items():
        where = event
        *parents, key = path.split("__")
        for parent in parents:
            where = where[parent]
        if value is ...:
            del where[key]
        else:
            where[key] = value
    return event


def test_registry_manifest_sample() -> None:
    updates = parse_registry_events(sample("registry-notification-manifest-push.json"), NOW)
    assert updates == [
        Update(
            repository="myorg/foo",
            registry="127.0.0.1:5001",
            tag="qa",
            digest="sha256:3db7d173d85ca461a96e138f251a396d8b4ff8fa4cce744d6a84470ea4a4bc08",
            event_id="d065ce33-7e74-4c63-8e3d-ea53322590cc",
            source="registry",
            received=NOW,
        )
    ]
    assert updates[0].pattern == "127.0.0.1:5001/myorg/foo:qa"


def test_registry_blob_sample_is_ignored() -> None:
    assert parse_registry_events(sample("registry-notification-blob-push.json"), NOW) == []


@pytest.mark.parametrize("media_type", sorted(MANIFEST_MEDIA_TYPES))
def test_registry_manifest_types(media_type: str) -> None:
    updates = parse_registry_events({"events": [registry_event(target__mediaType=media_type)]},
                                    NOW)
    assert [u.tag for u in updates] == ["qa"]


@pytest.mark.parametrize(
    "changes",
    [
        {"action": "pull"},
        {"action": "delete"},
        {"action": "mount"},
        {"target__mediaType": "application/octet-stream"},
        {"target__mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"},
        {"target__mediaType": ...},
        {"target__tag": ...},  # a push by digest; the tag's own event follows
        {"target__tag": None},
    ],
)
def test_registry_events_not_for_us(changes: dict[str, Any]) -> None:
    assert parse_registry_events({"events": [registry_event(**changes)]}, NOW) == []


@pytest.mark.parametrize(
    "body", [[], "events", None, {}, {"events": {}}, {"events": "x"}, {"events": None}]
)
def test_registry_malformed_envelope(body: Any) -> None:
    with pytest.raises(BadWebhook) as e:
        parse_registry_events(body, NOW)
    assert e.value.code == 400


@pytest.mark.parametrize(
    "bad",
    [
        "not an event",
        registry_event(target__repository="MyOrg/Foo"),
        registry_event(target__repository="*"),
        registry_event(target__repository=5),
        registry_event(target__repository=...),
        registry_event(target__tag="bad tag"),
        registry_event(target__tag=["qa"]),
        registry_event(target__digest="md5:zz"),
        registry_event(request__host="bad host!"),
        registry_event(request__host="registry"),  # would read as a Docker Hub namespace
        registry_event(request__host=...),
        registry_event(request="127.0.0.1:5001"),
        registry_event(target=[]),
        registry_event(id=7),
    ],
)
def test_registry_malformed_event_is_skipped_good_ones_kept(bad: Any) -> None:
    good = registry_event(id="good-1", target__tag="v2")
    with capturedLogs() as events:
        updates = parse_registry_events({"events": [bad, good]}, NOW)
    assert [(u.tag, u.event_id) for u in updates] == [("v2", "good-1")]
    warnings = [e for e in events if "malformed registry event" in e.get("log_format", "")]
    assert len(warnings) == 1
    assert "events[0]" in warnings[0]["reason"]


def test_registry_several_events() -> None:
    envelope = {
        "events": [
            sample("registry-notification-blob-push.json")["events"][0],
            registry_event(id="a", target__tag="qa"),
            registry_event(id="b", target__tag="prod", request__host="reg.example.com"),
        ]
    }
    updates = parse_registry_events(envelope, NOW)
    assert [(u.pattern, u.event_id) for u in updates] == [
        ("127.0.0.1:5001/myorg/foo:qa", "a"),
        ("reg.example.com/myorg/foo:prod", "b"),
    ]


def test_registry_hub_host_is_familiar() -> None:
    event = registry_event(request__host="docker.io", target__repository="library/busybox")
    [update] = parse_registry_events({"events": [event]}, NOW)
    assert (update.registry, update.repository) == (None, "busybox")


# -- the generic form -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, pattern, digest",
    [
        ({"repository": "myorg/foo"}, "myorg/foo", None),
        ({"repository": "myorg/foo", "tag": "qa"}, "myorg/foo:qa", None),
        ({"repository": "myorg/foo", "tag": None, "digest": None}, "myorg/foo", None),
        ({"repository": "127.0.0.1:5000/myorg/foo", "tag": "qa", "digest": DIGEST},
         "127.0.0.1:5000/myorg/foo:qa", DIGEST),
        ({"repository": "docker.io/library/busybox", "tag": "1"}, "busybox:1", None),
    ],
)
def test_generic(body: dict[str, Any], pattern: str, digest: str | None) -> None:
    update = parse_generic(body, NOW)
    assert (update.pattern, update.digest, update.source) == (pattern, digest, "api")
    assert_valid(update)


@pytest.mark.parametrize(
    "body, field",
    [
        ({"repository": "*"}, "repository"),
        ({"repository": "myorg/foo:qa"}, "repository"),
        ({"repository": "myorg/foo", "tag": "*"}, "tag"),
        ({"repository": "myorg/foo", "digest": "sha256:xyz"}, "digest"),
        ({"repository": "myorg/foo", "digest": 5}, "digest"),
        ({"repository": ["myorg/foo"]}, "repository"),
        ({"tag": "qa"}, "repository"),
    ],
)
def test_generic_refused(body: Any, field: str) -> None:
    with pytest.raises(BadWebhook) as e:
        parse_generic(body, NOW)
    assert e.value.code == 400
    assert e.value.reason.startswith(field) or f"field {field}" in e.value.reason


# -- Quay -----------------------------------------------------------------------------------------


QUAY = {
    "name": "repository",
    "repository": "mynamespace/repository",
    "namespace": "mynamespace",
    "docker_url": "quay.io/mynamespace/repository",
    "homepage": "https://quay.io/repository/mynamespace/repository",
    "updated_tags": ["latest", "v1"],
}


def test_quay_tags_list() -> None:
    updates = parse_quay(QUAY, NOW)
    assert [u.pattern for u in updates] == [
        "quay.io/mynamespace/repository:latest",
        "quay.io/mynamespace/repository:v1",
    ]
    for update in updates:
        assert update.source == "quay"
        assert_valid(update)


def test_quay_tags_object() -> None:
    body = dict(QUAY, updated_tags={"latest": "b" * 64, "prod": "c" * 64})
    assert [u.tag for u in parse_quay(body, NOW)] == ["latest", "prod"]


@pytest.mark.parametrize("tags", [[], {}, None])
def test_quay_no_tags_means_every_tag(tags: Any) -> None:
    assert [u.pattern for u in parse_quay(dict(QUAY, updated_tags=tags), NOW)] == [
        "quay.io/mynamespace/repository"
    ]


def test_quay_duplicate_tags_once() -> None:
    assert [u.tag for u in parse_quay(dict(QUAY, updated_tags=["a", "a", "b"]), NOW)] == [
        "a", "b"
    ]


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"updated_tags": "latest"}, "updated_tags"),
        ({"updated_tags": [1]}, "updated_tags[0]"),
        ({"updated_tags": ["ok", "no way"]}, "updated_tags[1]"),
        ({"docker_url": "quay.io/MyNamespace/repository"}, "docker_url"),
        ({"docker_url": None}, "docker_url"),
        ({"docker_url": {"url": "x"}}, "docker_url"),
    ],
)
def test_quay_refused(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(BadWebhook) as e:
        parse_quay(dict(QUAY, **changes), NOW)
    assert field in e.value.reason


# -- Harbor ---------------------------------------------------------------------------------------


HARBOR = {
    "type": "PUSH_ARTIFACT",
    "occur_at": 1680501893,
    "operator": "harbor-jobservice",
    "event_data": {
        "resources": [
            {
                "digest": DIGEST,
                "tag": "v1.0",
                "resource_url": f"harbor.example.com/library/app@{DIGEST}",
            }
        ],
        "repository": {
            "date_created": 1680501893,
            "name": "app",
            "namespace": "library",
            "repo_full_name": "library/app",
            "repo_type": "private",
        },
    },
}


def harbor(*resources: dict[str, Any], kind: str = "PUSH_ARTIFACT") -> dict[str, Any]:
    body = copy.deepcopy(HARBOR)
    body["type"] = kind
    if resources:
        body["event_data"]["resources"] = list(resources)
    return body


def test_harbor_push_artifact() -> None:
    [update] = parse_harbor(HARBOR, NOW)
    assert update == Update(
        repository="library/app",
        registry="harbor.example.com",
        tag="v1.0",
        digest=DIGEST,
        source="harbor",
        received=NOW,
    )


def test_harbor_tag_that_is_a_digest_means_by_digest() -> None:
    resource = {"tag": DIGEST, "resource_url": f"harbor.example.com/library/app@{DIGEST}"}
    [update] = parse_harbor(harbor(resource), NOW)
    assert (update.tag, update.digest) == (None, DIGEST)


def test_harbor_old_push_image() -> None:
    resource = {"digest": DIGEST, "tag": "latest",
                "resource_url": "hub.harbor.com/test-webhook/debian:latest"}
    [update] = parse_harbor(harbor(resource, kind="pushImage"), NOW)
    assert update.pattern == "hub.harbor.com/test-webhook/debian:latest"
    assert update.digest == DIGEST


def test_harbor_tag_from_url_when_no_tag_field() -> None:
    [update] = parse_harbor(harbor({"resource_url": "h.example.com:8443/ns/app:v3"}), NOW)
    assert (update.registry, update.repository, update.tag) == ("h.example.com:8443", "ns/app",
                                                                "v3")


def test_harbor_several_resources() -> None:
    body = harbor(
        {"tag": "a", "resource_url": "h.example.com/ns/app:a"},
        {"tag": "b", "digest": OTHER_DIGEST, "resource_url": "h.example.com/ns/app:b"},
        {"tag": "a", "resource_url": "h.example.com/ns/app:a"},
    )
    assert [(u.tag, u.digest) for u in parse_harbor(body, NOW)] == [
        ("a", None), ("b", OTHER_DIGEST)
    ]


@pytest.mark.parametrize(
    "kind", ["PULL_ARTIFACT", "DELETE_ARTIFACT", "SCANNING_COMPLETED", "pullImage", "QUOTA_WARNING"]
)
def test_harbor_other_events_ignored(kind: str) -> None:
    assert parse_harbor(harbor(kind=kind), NOW) == []


@pytest.mark.parametrize(
    "body, field",
    [
        ({"type": 5}, "type"),
        ({}, "type"),
        ({"type": "PUSH_ARTIFACT"}, "event_data.resources"),
        ({"type": "PUSH_ARTIFACT", "event_data": []}, "event_data"),
        ({"type": "PUSH_ARTIFACT", "event_data": {"resources": {}}}, "event_data.resources"),
        (harbor({"tag": "v1"}), "event_data.resources[0].resource_url"),
        (harbor({"resource_url": "h.example.com/NS/app:v1"}), "resources[0].resource_url"),
        (harbor({"resource_url": "h.example.com/ns/app", "tag": "a b"}), "resources[0].tag"),
        (harbor({"resource_url": "h.example.com/ns/app", "digest": "x"}), "resources[0].digest"),
        (harbor("resource"), "event_data.resources[0]"),
    ],
)
def test_harbor_refused(body: Any, field: str) -> None:
    with pytest.raises(BadWebhook) as e:
        parse_harbor(body, NOW)
    assert field in e.value.reason


# -- GitHub ---------------------------------------------------------------------------------------


def github_package(
    *, tag: str | None = "v1.2.0", package_type: str = "CONTAINER", owner: str = "Octo-Org"
) -> dict[str, Any]:
    """The shape of a real ``registry_package`` "published" event (fields we do not read cut)."""
    return {
        "action": "published",
        "registry_package": {
            "id": 1234567,
            "name": "my-app",
            "namespace": owner,
            "ecosystem": package_type,
            "package_type": package_type,
            "html_url": f"https://github.com/{owner}/packages/1234567",
            "owner": {"login": owner, "id": 42, "type": "Organization"},
            "package_version": {
                "id": 7654321,
                "version": DIGEST,
                "name": DIGEST,
                "container_metadata": {
                    "tag": {"name": tag or "", "digest": DIGEST},
                    "labels": {"all_labels": {}},
                    "manifest": {
                        "digest": DIGEST,
                        "media_type": "application/vnd.oci.image.index.v1+json",
                    },
                },
                "package_url": f"ghcr.io/{owner.lower()}/my-app:{tag}",
            },
            "registry": {
                "name": "GitHub CONTAINER registry",
                "type": "CONTAINER",
                "url": f"https://CONTAINER.pkg.github.com/{owner}",
                "vendor": "GitHub Inc",
            },
        },
        "repository": {"full_name": f"{owner}/my-app", "owner": {"login": owner}},
        "sender": {"login": "someone"},
    }


def test_github_registry_package() -> None:
    [update] = parse_github(github_package(), "registry_package", NOW, delivery="guid-1")
    assert update == Update(
        repository="octo-org/my-app",
        registry="ghcr.io",
        tag="v1.2.0",
        digest=DIGEST,
        event_id="guid-1",
        source="github",
        received=NOW,
    )


def test_github_package_event() -> None:
    body = github_package()
    body["package"] = body.pop("registry_package")
    [update] = parse_github(body, "package", NOW)
    assert update.pattern == "ghcr.io/octo-org/my-app:v1.2.0"
    assert update.event_id is None


def test_github_old_docker_type() -> None:
    body = github_package(package_type="docker", owner="DingGGu")
    version = body["registry_package"]["package_version"]
    del version["container_metadata"]
    version["version"] = "1.2.3"
    [update] = parse_github(body, "registry_package", NOW)
    assert (update.name, update.tag, update.digest) == ("ghcr.io/dingggu/my-app", "1.2.3", None)


def test_github_owner_from_namespace() -> None:
    body = github_package()
    del body["registry_package"]["owner"]
    [update] = parse_github(body, "registry_package", NOW)
    assert update.repository == "octo-org/my-app"


def test_github_untagged_version_ignored() -> None:
    assert parse_github(github_package(tag=None), "registry_package", NOW) == []


@pytest.mark.parametrize(
    "event, changes",
    [
        ("ping", {}),
        ("push", {}),
        ("registry_package", {"action": "updated"}),
        ("registry_package", {"action": None}),
        ("package", {}),  # the body says registry_package, the header says package
    ],
)
def test_github_ignored(event: str, changes: dict[str, Any]) -> None:
    body = github_package() | changes
    if event == "package":
        with pytest.raises(BadWebhook):
            parse_github(body, event, NOW)
    else:
        assert parse_github(body, event, NOW) == []


@pytest.mark.parametrize("package_type", ["npm", "maven", "RUBYGEMS", "nuget"])
def test_github_other_package_types_ignored(package_type: str) -> None:
    body = github_package(package_type=package_type)
    assert parse_github(body, "registry_package", NOW) == []


@pytest.mark.parametrize(
    "mutate, field",
    [
        (lambda b: b["registry_package"].update(name=None), "registry_package.name"),
        (lambda b: b["registry_package"].update(name=3), "registry_package.name"),
        (lambda b: b["registry_package"].update(name="my app"), "registry_package.name"),
        (lambda b: b.update(registry_package=[]), "registry_package"),
        (lambda b: b["registry_package"]["package_version"]["container_metadata"].update(
            tag={"name": "bad tag!"}), "container_metadata.tag.name"),
        (lambda b: b["registry_package"]["package_version"]["container_metadata"].update(
            tag="v1"), "container_metadata.tag"),
        (lambda b: (b["registry_package"].pop("owner"), b["registry_package"].pop("namespace"),
                    b.pop("repository")), "owner.login"),
    ],
)
def test_github_refused(mutate: Callable[[dict[str, Any]], Any], field: str) -> None:
    body = github_package()
    mutate(body)
    with pytest.raises(BadWebhook) as e:
        parse_github(body, "registry_package", NOW)
    assert field in e.value.reason


# -- every parser, on anything --------------------------------------------------------------------


def _github(event: str) -> Callable[[Any], list[Update]]:
    return lambda obj: parse_github(obj, event, NOW)


PARSERS: dict[str, Callable[[Any], list[Update]]] = {
    "dockerhub": lambda obj: [parse_dockerhub(obj, NOW).update],
    "registry": lambda obj: parse_registry_events(obj, NOW),
    "generic": lambda obj: [parse_generic(obj, NOW)],
    "quay": lambda obj: parse_quay(obj, NOW),
    "harbor": lambda obj: parse_harbor(obj, NOW),
    "github": _github("registry_package"),
    "github-package": _github("package"),
}


def _github_package_body() -> dict[str, Any]:
    body = github_package()
    body["package"] = body.pop("registry_package")
    return body


GOOD = {
    "dockerhub": lambda: sample("dockerhub-webhook.json"),
    "registry": lambda: {
        "events": [
            sample("registry-notification-blob-push.json")["events"][0],
            registry_event(),
        ]
    },
    "generic": lambda: {"repository": "127.0.0.1:5000/myorg/foo", "tag": "qa", "digest": DIGEST},
    "quay": lambda: copy.deepcopy(QUAY),
    "harbor": lambda: copy.deepcopy(HARBOR),
    "github": github_package,
    "github-package": _github_package_body,
}

# Values that reach further into the parsers than random text would.
interesting_strings = st.sampled_from(
    [
        "", "*", "push", "published", "PUSH_ARTIFACT", "pushImage", "CONTAINER", "docker",
        "application/vnd.docker.distribution.manifest.v2+json", "application/octet-stream",
        "myorg/foo", "MyOrg/foo", "127.0.0.1:5000", "quay.io/ns/repo", "h.example.com/ns/a:v1",
        f"h.example.com/ns/a@{DIGEST}", "registry", "latest", "v1\n", "a b", DIGEST,
        "sha256:", "..", "/x", "a" * 300, "ghcr.io", "\x00", "é",
    ]
) | st.text(max_size=12)


mutants = st.recursive(
    json_scalars | interesting_strings,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=8) | interesting_strings, children, max_size=3),
    max_leaves=10,
)


def outcome(parser: Callable[[Any], list[Update]], obj: Any) -> list[Update] | None:
    """The parser's updates (each checked), or None for a 400; anything else fails."""
    try:
        updates = parser(obj)
    except BadWebhook as e:
        assert e.code == 400
        assert e.reason and len(e.reason) <= 300
        return None
    assert isinstance(updates, list)
    for update in updates:
        assert_valid(update)
    return updates


@pytest.mark.parametrize("kind", sorted(PARSERS))
def test_good_payloads_give_valid_updates(kind: str) -> None:
    updates = outcome(PARSERS[kind], GOOD[kind]())
    assert updates, f"{kind}: the good payload gave no update"


# pytest-twisted wraps each Hypothesis test once per function, which breaks when the same
# function is also parametrized: the parser is drawn by Hypothesis instead.
kinds = st.sampled_from(sorted(PARSERS))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=kinds, obj=json_values)
def test_any_json_gives_updates_or_400(kind: str, obj: Any) -> None:
    outcome(PARSERS[kind], obj)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=kinds, data=st.data(), new=mutants)
def test_mutated_payloads_give_updates_or_400(kind: str, data: st.DataObject, new: Any) -> None:
    good = GOOD[kind]()
    path = data.draw(st.sampled_from(list(paths(good))))
    outcome(PARSERS[kind], replaced(good, path, new))


@settings(max_examples=300, deadline=None)
@given(kind=kinds, body=st.binary(max_size=200))
def test_any_bytes_give_updates_or_400(kind: str, body: bytes) -> None:
    try:
        obj = decode_json(body)
    except BadWebhook as e:
        assert e.code == 400
        return
    outcome(PARSERS[kind], obj)


# -- SeenEvents -----------------------------------------------------------------------------------


def test_seen_events_first_time_only() -> None:
    seen = SeenEvents()
    assert seen.first_time("a")
    assert not seen.first_time("a")
    assert seen.first_time("b")
    assert "a" in seen and "c" not in seen
    assert len(seen) == 2


def test_seen_events_bounded_least_recent_dropped() -> None:
    seen = SeenEvents(capacity=3)
    for event_id in "abc":
        assert seen.first_time(event_id)
    assert not seen.first_time("a")  # a is now the most recent
    assert seen.first_time("d")  # drops b, the least recently seen
    assert len(seen) == 3
    assert "b" not in seen
    assert not seen.first_time("a")
    assert seen.first_time("b")


def test_seen_events_capacity_checked() -> None:
    with pytest.raises(ValueError):
        SeenEvents(capacity=0)


@given(st.lists(st.text(max_size=3), max_size=60), st.integers(min_value=1, max_value=8))
def test_seen_events_model(ids: list[str], capacity: int) -> None:
    """Against a plain list kept in least-recently-seen order."""
    seen = SeenEvents(capacity=capacity)
    model: list[str] = []
    for event_id in ids:
        expected = event_id not in model
        if not expected:
            model.remove(event_id)
        model.append(event_id)
        del model[:-capacity]
        assert seen.first_time(event_id) is expected
        assert len(seen) == len(model)


# -- against a real docker-registry ---------------------------------------------------------------


class HookReceiver(Resource):
    """What a webhook endpoint does with registry notifications, recorded for the test.

    With ``lose_first_answer``, the first envelope with an update is acted on but answered
    500, as when the answer is lost: the registry sends it again, and the event ids must then
    be recognised as already seen.
    """

    isLeaf = True

    def __init__(self, token: str, lose_first_answer: bool = False) -> None:
        super().__init__()
        self.auth = TokenAuth([token])
        self.seen = SeenEvents()
        self.lose_first_answer = lose_first_answer
        self.deliveries: list[dict[str, Any]] = []
        self.acted_on: list[Update] = []
        self._waiters: list[tuple[Callable[[], bool], Deferred[None]]] = []

    def render_POST(self, request: Any) -> bytes:
        delivery: dict[str, Any] = {
            "content_type": request.getHeader(b"content-type"),
            "event_ids": [],
            "updates": [],
            "fresh": None,  # a list once the updates are acted on
        }
        self.deliveries.append(delivery)
        try:
            self.auth.check(request)
            check_content_type(request.requestHeaders.getRawHeaders(b"content-type", [None])[0],
                               REGISTRY_CONTENT_TYPES)
            obj = decode_json(request.content.read())
            delivery["event_ids"] = [e.get("id") for e in obj.get("events", [])]
            delivery["updates"] = parse_registry_events(obj, NOW)
        except BadWebhook as e:
            delivery["refused"] = (e.code, e.reason)
            request.setResponseCode(e.code)
            return e.reason.encode()
        finally:
            self._wake()
        fresh = [u for u in delivery["updates"]
                 if u.event_id is None or self.seen.first_time(u.event_id)]
        delivery["fresh"] = fresh
        self.acted_on.extend(fresh)
        self._wake()
        if fresh and self.lose_first_answer:
            self.lose_first_answer = False
            request.setResponseCode(500)
            return b"answer lost"
        return b"{}"

    def _wake(self) -> None:
        for check, d in list(self._waiters):
            if check():
                self._waiters.remove((check, d))
                d.callback(None)

    def until(self, check: Callable[[], bool], timeout: float = 15.0) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if check():
            d.callback(None)
            return d
        self._waiters.append((check, d))
        return d.addTimeout(timeout, reactor)


@pytest.fixture
def http_client() -> Iterator[HTTPClient]:
    pool = HTTPConnectionPool(reactor, persistent=False)
    yield HTTPClient(Agent(reactor, pool=pool))
    pytest_twisted.blockon(pool.closeCachedConnections())


@pytest.fixture
def receiver_factory() -> Iterator[Callable[[HookReceiver], str]]:
    """``receiver_factory(resource)``: serve it on 127.0.0.1; returns the URL."""
    ports = []

    def serve(resource: HookReceiver) -> str:
        port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
        ports.append(port)
        return f"http://127.0.0.1:{port.getHost().port}/events"

    yield serve
    for port in ports:
        pytest_twisted.blockon(port.stopListening())


async def push_image(http: HTTPClient, base: str, repository: str, reference: str) -> str:
    """Upload a tiny image (a layer and a config blob) and its manifest under ``reference``
    (a tag, or a digest); returns the manifest's digest."""

    def digest_of(data: bytes) -> str:
        return "sha256:" + hashlib.sha256(data).hexdigest()

    layer = os.urandom(64)
    config = json.dumps(
        {"architecture": "amd64", "os": "linux",
         "rootfs": {"type": "layers", "diff_ids": [digest_of(layer)]}}
    ).encode()
    for blob in (layer, config):
        started = await http.post(f"{base}/v2/{repository}/blobs/uploads/")
        assert started.code == 202, await started.text()
        location = started.headers.getRawHeaders(b"location")[0].decode()
        if location.startswith("/"):
            location = base + location
        separator = "&" if "?" in location else "?"
        done = await http.put(
            f"{location}{separator}digest={digest_of(blob)}",
            data=blob,
            headers={b"Content-Type": [b"application/octet-stream"]},
        )
        assert done.code == 201, await done.text()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {
                "mediaType": "application/vnd.docker.container.image.v1+json",
                "size": len(config),
                "digest": digest_of(config),
            },
            "layers": [
                {
                    "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                    "size": len(layer),
                    "digest": digest_of(layer),
                }
            ],
        }
    ).encode()
    if reference == "by-digest":
        reference = digest_of(manifest)
    put = await http.put(
        f"{base}/v2/{repository}/manifests/{reference}",
        data=manifest,
        headers={b"Content-Type": [b"application/vnd.docker.distribution.manifest.v2+json"]},
    )
    assert put.code == 201, await put.text()
    return digest_of(manifest)


@pytest.mark.real
@pytest_twisted.ensureDeferred
async def test_real_registry_notifications(
    registry_factory: Any, receiver_factory: Any, http_client: HTTPClient
) -> None:
    """A push to a real registry reaches us as exactly one Update per tagged manifest, with
    its digest and event id, authenticated by the registry's configured Bearer token; blob
    pushes and a push by digest are ignored; a redelivered event is acted on once."""
    receiver = HookReceiver("s3cret-token", lose_first_answer=True)
    url = receiver_factory(receiver)
    registry = registry_factory(
        notify_url=url, notify_headers={"Authorization": "Bearer s3cret-token"}
    )
    try:
        digest = await push_image(http_client, registry.url, "myorg/foo", "qa")
        # The first answer is "lost" (500): the registry must send the same event again.
        await receiver.until(
            lambda: any(d["updates"] and d["fresh"] == [] for d in receiver.deliveries)
        )
        by_digest = await push_image(http_client, registry.url, "myorg/foo", "by-digest")
        digest2 = await push_image(http_client, registry.url, "myorg/bar", "v2")
        await receiver.until(lambda: any(u.tag == "v2" for u in receiver.acted_on))
    finally:
        registry.cleanup()

    assert [(u.pattern, u.digest) for u in receiver.acted_on] == [
        (f"{registry.host}/myorg/foo:qa", digest),
        (f"{registry.host}/myorg/bar:v2", digest2),
    ]
    for update in receiver.acted_on:
        assert update.event_id
        assert_valid(update)
    assert all("refused" not in d for d in receiver.deliveries), receiver.deliveries
    assert {d["content_type"] for d in receiver.deliveries} == {
        b"application/vnd.docker.distribution.events.v1+json"
    }
    # The retried delivery carried the event id that had been acted on already.
    redelivered = [d for d in receiver.deliveries if d["updates"] and not d["fresh"]]
    assert redelivered[0]["updates"][0].event_id == receiver.acted_on[0].event_id
    # Blob pushes were delivered too, and gave nothing; so did the manifest pushed by digest.
    assert sum(len(d["event_ids"]) for d in receiver.deliveries) > 4
    assert all(u.digest != by_digest for d in receiver.deliveries for u in d["updates"])


@pytest.mark.real
@pytest_twisted.ensureDeferred
async def test_real_registry_with_wrong_token_is_refused(
    registry_factory: Any, receiver_factory: Any, http_client: HTTPClient
) -> None:
    receiver = HookReceiver("the-right-token")
    url = receiver_factory(receiver)
    registry = registry_factory(
        notify_url=url, notify_headers={"Authorization": "Bearer a-wrong-token"}
    )
    try:
        await push_image(http_client, registry.url, "myorg/foo", "qa")
        await receiver.until(lambda: len(receiver.deliveries) >= 2)
    finally:
        registry.cleanup()
    assert {d.get("refused") for d in receiver.deliveries} == {(401, "invalid token")}
    assert receiver.acted_on == []
