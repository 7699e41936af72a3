"""An update's time is a registry event's own time: a retried or late registry notification then
carries the time of its push, not of its arrival."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from deployer.formats import parse_dockerhub, parse_harbor, parse_registry_events, sent_time

NOW = 1_800_000_000.0
SAMPLES = Path(__file__).parent / "samples"


def manifest_envelope(timestamp: object = ...) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((SAMPLES / "registry-notification-manifest-push.json")
                                      .read_text())
    body = copy.deepcopy(body)
    if timestamp is ...:
        del body["events"][0]["timestamp"]
    else:
        body["events"][0]["timestamp"] = timestamp
    return body


def test_a_registry_event_carries_the_time_of_its_push() -> None:
    # The sample's own: 2026-11-26T14:15:42.541890192Z, nanoseconds cut to microseconds.
    [update] = parse_registry_events(manifest_envelope("2026-11-26T14:15:42.541890192Z"), NOW)
    assert update.received == pytest.approx(1795702542.54189)


def test_offsets_are_honoured() -> None:
    [utc] = parse_registry_events(manifest_envelope("2026-11-26T14:15:42Z"), NOW)
    [west] = parse_registry_events(manifest_envelope("2026-11-26T06:15:42-08:00"), NOW)
    assert utc.received == west.received == 1795702542.0


@pytest.mark.parametrize("timestamp", [
    ..., None, "", "yesterday", "2026-11-26T14:15:42",  # no offset: a time of no known zone
    "2026-13-26T14:15:42Z", True, [], {}, "9" * 100, -1, 0, float("inf"),
])
def test_an_event_without_a_readable_time_has_its_arrival_time(timestamp: object) -> None:
    [update] = parse_registry_events(manifest_envelope(timestamp), NOW)
    assert update.received == NOW


def test_a_time_from_the_future_is_the_arrival_time() -> None:
    # A sender whose clock runs ahead must not make its events look newer than they are.
    [update] = parse_registry_events(manifest_envelope("2030-01-01T00:00:00Z"), 1_700_000_000.0)
    assert update.received == 1_700_000_000.0


def test_docker_hub_and_harbor_times_are_whole_seconds_and_not_used() -> None:
    hub = {"repository": {"repo_name": "myorg/foo"}, "push_data": {"tag": "qa",
                                                                  "pushed_at": 1_700_000_001}}
    assert parse_dockerhub(hub, NOW).update.received == NOW
    harbor = {"type": "PUSH_ARTIFACT", "occur_at": 1_700_000_002, "event_data": {
        "resources": [{"tag": "v1", "resource_url": "harbor.example.com/library/app:v1"}]}}
    [update] = parse_harbor(harbor, NOW)
    assert update.received == NOW


def test_sent_time_never_raises_on_a_body_of_the_wrong_shape() -> None:
    assert sent_time({"push_data": "x"}, "push_data.pushed_at", NOW) == NOW
    assert sent_time([], "timestamp", NOW) == NOW
    assert sent_time({"timestamp": 10**400}, "timestamp", NOW) == NOW
