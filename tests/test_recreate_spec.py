"""The spec that re-creates a container (:mod:`deployer.container_spec`), from inspects recorded
on dockerd 20.10 (tests/samples/recreate-inspect.json): what the user set is kept, what came from
the old image is left to the new image, and the containers that must not be re-created.

The sample holds ``GET /containers/{name}/json`` of containers run on two images, and
``GET /images/{ref}/json`` of each:

- ``app:plain``: ``docker import --change 'CMD ["/bin/sh","/app/run.sh"]' --change 'LABEL
  version=v1' --change 'ENV A=1 PATH=/bin' --change 'WORKDIR /app' --change 'VOLUME /data'
  --change 'EXPOSE 80' --change 'LABEL img=yes'``;
- ``app:entry``: the same with ``ENTRYPOINT ["/bin/sh"]``, ``CMD ["/app/run.sh"]``, ``USER 0``
  and a ``HEALTHCHECK`` (interval 1s, timeout 2s, 2 retries).

The containers: ``web`` (``--restart unless-stopped -e B=2 -e A=1 -l mine=1 -v vol1:/v1
-v /anon -v /tmp/rcbind:/b:ro -p 127.0.0.1:18080:80 --hostname webhost --network front
--network-alias www``, then ``docker network connect --alias wb back web``), ``plain`` (no
option), ``compose`` (Compose's labels, ``--network back --network-alias web``), ``side``
(``--network container:web``), ``volfrom`` (``--volumes-from web``), on ``app:entry``:
``ep_cleared`` (``--entrypoint "" app:entry /bin/sh /app/run.sh``), ``ep_user`` (``--entrypoint
/bin/sh app:entry -c 'exec /app/run.sh'``), ``cmd_user`` (``app:entry -c 'exec /app/run.sh'``),
``entry_defaults`` (no option), ``hostnet`` (``--network host``), ``health_user``
(``--health-interval 5s``) and ``misc`` (``--rm --user 1:1 -w /tmp --stop-signal SIGINT
--stop-timeout 7 --mount type=volume,src=mv,dst=/mv --tmpfs /tt --no-healthcheck --expose 9000
--init --cap-add NET_ADMIN --ulimit nofile=1024:2048 --memory 64m --network front --ip
10.77.0.50 --add-host h:1.2.3.4 --dns 1.1.1.1 --label img=no -e A=2``). ``list`` is
``GET /containers/json?all=1``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from deployer.container_spec import ContainerSpec, container_spec, refusal

SAMPLE = json.loads((Path(__file__).parent / "samples" / "recreate-inspect.json").read_text())
IMAGE_OF = {
    "web": "app:plain", "plain": "app:plain", "compose": "app:plain", "side": "app:plain",
    "volfrom": "app:plain",
}


def inspect(name: str) -> dict[str, Any]:
    found: dict[str, Any] = copy.deepcopy(SAMPLE["containers"][name])
    return found


def image_of(name: str) -> dict[str, Any]:
    found: dict[str, Any] = copy.deepcopy(SAMPLE["images"][IMAGE_OF.get(name, "app:entry")])
    return found


def spec(name: str, **kw: Any) -> ContainerSpec:
    return container_spec(inspect(name), image_of(name), **kw)


def anonymous(name: str, destination: str) -> str:
    for mount in SAMPLE["containers"][name]["Mounts"]:
        if mount["Destination"] == destination:
            return str(mount["Name"])
    raise AssertionError(f"{name} has no mount at {destination}")


# -- web: everything a `docker run` user sets ---------------------------------------------------


def test_web_keeps_what_the_user_set_and_leaves_the_image_defaults_out() -> None:
    s = spec("web")
    body = s.body
    assert s.name == "web"
    assert body["Image"] == "app:plain"
    assert body["Env"] == ["B=2"]  # A=1 and PATH=/bin are the image's
    assert body["Labels"] == {"mine": "1"}  # img=yes and version=v1 are the image's
    assert body["Hostname"] == "webhost"
    for key in ("Cmd", "Entrypoint", "WorkingDir", "User", "Volumes", "Healthcheck",
                "StopSignal"):
        assert key not in body, key
    assert body["ExposedPorts"] == {"80/tcp": {}}  # published, so kept although the image's


def test_web_host_config_is_passed_on_with_its_restart_policy_ports_and_binds() -> None:
    host = spec("web").body["HostConfig"]
    original = inspect("web")["HostConfig"]
    assert host["RestartPolicy"] == {"Name": "unless-stopped", "MaximumRetryCount": 0}
    assert host["PortBindings"] == {"80/tcp": [{"HostIp": "127.0.0.1", "HostPort": "18080"}]}
    assert host["Binds"] == ["vol1:/v1", "/tmp/rcbind:/b:ro"]
    assert host["NetworkMode"] == "front"
    assert "ContainerIDFile" not in host
    unchanged = {k for k in original if k not in ("ContainerIDFile", "Mounts")}
    assert {k: host[k] for k in unchanged} == {k: original[k] for k in unchanged}


def test_anonymous_volumes_are_taken_over_by_name() -> None:
    s = spec("web")
    assert s.volumes == {"/anon": anonymous("web", "/anon"), "/data": anonymous("web", "/data")}
    assert s.body["HostConfig"]["Mounts"] == [
        {"Type": "volume", "Source": anonymous("web", "/anon"), "Target": "/anon",
         "ReadOnly": False},
        {"Type": "volume", "Source": anonymous("web", "/data"), "Target": "/data",
         "ReadOnly": False},
    ]


def test_networks_primary_in_create_others_by_connect_without_automatic_aliases() -> None:
    s = spec("web")
    assert s.primary_network == "front"
    assert s.body["NetworkingConfig"] == {"EndpointsConfig": {"front": {"Aliases": ["www"]}}}
    assert s.connects == (("back", {"Aliases": ["wb"]}),)


def test_static_address_is_kept() -> None:
    s = spec("misc")
    assert s.body["NetworkingConfig"] == {
        "EndpointsConfig": {"front": {"IPAMConfig": {"IPv4Address": "10.77.0.50"}}}
    }
    assert s.connects == ()


# -- image defaults against the user's own ------------------------------------------------------


def test_a_container_of_defaults_gets_the_new_images_defaults() -> None:
    for name in ("plain", "entry_defaults"):
        body = spec(name).body
        assert set(body) - set(inspect(name)["Config"]) == {"HostConfig"}, name
        for key in ("Cmd", "Entrypoint", "Env", "Labels", "WorkingDir", "User", "Hostname",
                    "ExposedPorts", "Healthcheck", "Volumes", "NetworkingConfig"):
            assert key not in body, (name, key)


def test_default_hostname_is_the_short_id_and_is_left_out() -> None:
    c = inspect("plain")
    assert c["Config"]["Hostname"] == c["Id"][:12]
    assert "Hostname" not in spec("plain").body


def test_host_network_takes_the_hosts_name() -> None:
    c = inspect("hostnet")
    assert c["Config"]["Hostname"] != c["Id"][:12]
    body = spec("hostnet").body
    assert "Hostname" not in body
    assert body["HostConfig"]["NetworkMode"] == "host"
    assert "NetworkingConfig" not in body


def test_user_entrypoint_keeps_its_command() -> None:
    c = inspect("ep_user")
    c["Config"]["Entrypoint"] = ["/bin/busybox", "sh"]
    c["Config"]["Cmd"] = ["/app/run.sh"]  # the image's command, but not taken from it
    body = container_spec(c, image_of("ep_user")).body
    assert body["Entrypoint"] == ["/bin/busybox", "sh"]
    assert body["Cmd"] == ["/app/run.sh"]
    c["Config"]["Cmd"] = None
    body = container_spec(c, image_of("ep_user")).body
    assert body["Entrypoint"] == ["/bin/busybox", "sh"]
    assert "Cmd" not in body  # the engine does not take the image's Cmd for it either


def test_the_images_entrypoint_given_again_counts_as_the_images() -> None:
    """``--entrypoint /bin/sh`` on an image whose entrypoint is /bin/sh: the same container as
    a command alone; the new image's entrypoint applies."""
    assert spec("ep_user").body["Cmd"] == spec("cmd_user").body["Cmd"] == [
        "-c", "exec /app/run.sh"]
    assert "Entrypoint" not in spec("ep_user").body


def test_user_command_on_the_images_entrypoint() -> None:
    body = spec("cmd_user").body
    assert "Entrypoint" not in body
    assert body["Cmd"] == ["-c", "exec /app/run.sh"]


def test_a_cleared_entrypoint_stays_cleared() -> None:
    c = inspect("ep_cleared")
    assert c["Config"]["Entrypoint"] is None
    body = spec("ep_cleared").body
    assert body["Entrypoint"] == [""]
    assert body["Cmd"] == ["/bin/sh", "/app/run.sh"]


def test_health_options_are_kept_field_by_field() -> None:
    assert spec("health_user").body["Healthcheck"] == {"Interval": 5_000_000_000}
    assert spec("misc").body["Healthcheck"] == {"Test": ["NONE"]}
    assert "Healthcheck" not in spec("entry_defaults").body


def test_every_run_option_of_misc() -> None:
    body = spec("misc").body
    host = body["HostConfig"]
    assert body["User"] == "1:1"
    assert body["WorkingDir"] == "/tmp"
    assert body["StopSignal"] == "SIGINT"
    assert body["StopTimeout"] == 7
    assert body["Env"] == ["A=2"]
    assert body["Labels"] == {"img": "no"}  # the user's value of an image label
    assert body["ExposedPorts"] == {"9000/tcp": {}}
    assert host["Init"] is True
    assert host["CapAdd"] == ["CAP_NET_ADMIN"]
    assert host["Ulimits"] == [{"Name": "nofile", "Hard": 2048, "Soft": 1024}]
    assert host["Memory"] == 64 * 1024 * 1024
    assert host["ExtraHosts"] == ["h:1.2.3.4"]
    assert host["Dns"] == ["1.1.1.1"]
    assert host["Tmpfs"] == {"/tt": ""}
    # the named volume of --mount stays; the image's VOLUME /data is taken over by name
    assert host["Mounts"] == [
        {"Type": "volume", "Source": "mv", "Target": "/mv"},
        {"Type": "volume", "Source": anonymous("misc", "/data"), "Target": "/data",
         "ReadOnly": False},
    ]


def test_compose_labels_are_kept() -> None:
    body = spec("compose").body
    labels = body["Labels"]
    assert labels == {k: v for k, v in inspect("compose")["Config"]["Labels"].items()
                      if k.startswith("com.docker.compose.")}
    assert labels["com.docker.compose.project"] == "demo"
    assert body["NetworkingConfig"] == {"EndpointsConfig": {"back": {"Aliases": ["web"]}}}


def test_compose_labels_are_kept_even_when_the_image_has_them() -> None:
    image = image_of("compose")
    image["Config"]["Labels"]["com.docker.compose.project"] = "demo"
    assert container_spec(inspect("compose"), image).body["Labels"][
        "com.docker.compose.project"] == "demo"


def test_volumes_from_gives_its_volumes_again_and_they_are_not_taken_over() -> None:
    inherited = {m["Destination"] for m in SAMPLE["containers"]["web"]["Mounts"]}
    s = spec("volfrom", inherited=inherited)
    assert s.body["HostConfig"]["VolumesFrom"] == ["web"]
    assert s.volumes == {}
    assert "Mounts" not in s.body["HostConfig"] or not s.body["HostConfig"]["Mounts"]
    # without knowing what web gives, its volumes would be mounted twice
    assert spec("volfrom").volumes


def test_image_ref_may_be_given() -> None:
    assert spec("web", image_ref="sha256:abc").body["Image"] == "sha256:abc"


def test_legacy_links_go_back_to_the_form_run_takes() -> None:
    c = inspect("plain")
    c["HostConfig"]["Links"] = ["/db:/plain/database", "/cache:/plain/cache"]
    body = container_spec(c, image_of("plain")).body
    assert body["HostConfig"]["Links"] == ["db:database", "cache:cache"]


def test_the_network_mode_may_be_a_network_id() -> None:
    c = inspect("web")
    c["HostConfig"]["NetworkMode"] = c["NetworkSettings"]["Networks"]["front"]["NetworkID"][:20]
    s = container_spec(c, image_of("web"))
    assert s.body["NetworkingConfig"] == {"EndpointsConfig": {"front": {"Aliases": ["www"]}}}
    assert s.connects == (("back", {"Aliases": ["wb"]}),)


def test_a_network_without_an_endpoint_left_is_still_the_primary() -> None:
    """The container of a network removed since: create will name it, and fail."""
    c = inspect("web")
    c["HostConfig"]["NetworkMode"] = "gone"
    c["NetworkSettings"]["Networks"] = {}
    s = container_spec(c, image_of("web"))
    assert s.body["HostConfig"]["NetworkMode"] == "gone"
    assert "NetworkingConfig" not in s.body
    assert s.connects == ()


# -- refusals ---------------------------------------------------------------------------------


def test_refusals() -> None:
    everyone = SAMPLE["list"]
    assert refusal(inspect("plain"), everyone) is None
    assert refusal(inspect("compose"), everyone) is None
    side = refusal(inspect("side"), everyone)
    assert side is not None and "network namespace of another container" in side
    web = refusal(inspect("web"), everyone)
    assert web is not None and "side share its network namespace" in web
    misc = refusal(inspect("misc"), everyone)
    assert misc is not None and "--rm" in misc


@pytest.mark.parametrize("mode", ["container:web", "container:{id}", "container:{short}"])
def test_followers_are_found_by_name_or_id(mode: str) -> None:
    web = inspect("web")
    follower = {"Id": "f" * 64, "Names": ["/f"],
                "HostConfig": {"NetworkMode": mode.format(id=web["Id"], short=web["Id"][:12])}}
    why = refusal(web, [follower])
    assert why is not None and "f share" in why
    stranger = {"Id": "e" * 64, "Names": ["/e"], "HostConfig": {"NetworkMode": "container:x"}}
    assert refusal(web, [stranger]) is None
