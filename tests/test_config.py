"""Options are plain parsing: no reactor, no network."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.python import usage

from deployer.config import FLAGS, Config, listen_endpoint, parse_duration
from deployer.errors import ConfigError
from deployer.tap import Options

GO_FLAGS = [
    "docker", "dockercfg", "etcd_dial_timeout", "etcd_nodes", "etcd_prefix", "etcd_retry_delay",
    "kill_timeout", "listen", "max_threads", "registry", "repull_period", "slack_username",
    "slack_webhook_url", "strong_consistency", "webhook_path",
]


def parse(args: list[str], environ: dict[str, str] | None = None, home: Path | None = None):
    env = {"HOME": str(home or "/nonexistent")}
    env.update(environ or {})
    opts = Options(environ=env)
    opts.parseOptions(args)
    assert opts.config is not None
    return opts.config


def test_every_go_flag_is_listed_with_its_default() -> None:
    text = " ".join(str(Options(environ={})).split())
    for flag in GO_FLAGS:
        assert f"--{flag}" in text, flag
    assert "[default: 5s]" in text  # etcd_dial_timeout
    assert "[default: /deployer]" in text
    assert "[default: :4500]" in text
    assert "[default: 24h0m0s]" in text
    assert "[default: /api/dockerhub/webhook]" in text
    assert "[default: https://index.docker.io/v1/]" in text


def test_defaults_match_the_go_original() -> None:
    c = parse(["--insecure_webhooks"])
    assert c.docker == "unix:///var/run/docker.sock"
    assert c.etcd_nodes == ()  # standalone
    assert c.standalone
    assert c.etcd_prefix == "/deployer"
    assert c.etcd_dial_timeout == 5.0
    assert c.etcd_retry_delay == 2.0
    assert c.kill_timeout == 10
    assert c.listen == "tcp:4500"
    assert c.max_threads == 4
    assert c.registry == "https://index.docker.io/v1/"
    assert c.repull_period == 86400.0
    assert c.slack_username == "Deployer"
    assert c.slack_webhook_url is None
    assert c.strong_consistency is False
    assert c.webhook_path == "/api/dockerhub/webhook"


@pytest.mark.parametrize(
    "args",
    [
        ["--etcd_nodes", "http://a:2379,http://b:2379", "--strong_consistency",
         "--kill_timeout", "3"],
        ["--etcd-nodes", "http://a:2379,http://b:2379", "--strong-consistency", "--kill-timeout=3"],
        ["-etcd_nodes=http://a:2379,http://b:2379", "-strong_consistency", "-kill_timeout", "3"],
        ["-etcd_nodes", "http://a:2379,http://b:2379", "-strong_consistency=true",
         "-kill_timeout=3"],
    ],
)
def test_go_single_dash_and_dashed_spellings(args: list[str]) -> None:
    c = parse([*args, "--insecure_webhooks"])
    assert c.etcd_nodes == ("http://a:2379", "http://b:2379")
    assert c.strong_consistency is True
    assert c.kill_timeout == 3
    assert not c.standalone


def test_option_values_that_look_like_flags_are_left_alone() -> None:
    c = parse(["--slack_username", "-qa deploy", "--insecure_webhooks"])
    assert c.slack_username == "-qa deploy"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5s", 5), ("2m", 120), ("24h0m0s", 86400), ("1m30s", 90), ("250ms", 0.25), ("1.5h", 5400),
     ("0", 0), ("7", 7), ("0s", 0)],
)
def test_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5x", "s", "-5s", "5s3", "1h 2m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text)


@pytest.mark.parametrize(
    ("text", "endpoint"),
    [
        (":4500", "tcp:4500"),
        ("127.0.0.1:4500", "tcp:4500:interface=127.0.0.1"),
        ("[::1]:4500", "tcp:4500:interface=\\:\\:1"),
        ("tcp:4500:interface=127.0.0.1", "tcp:4500:interface=127.0.0.1"),
        ("unix:/run/deployer.sock", "unix:/run/deployer.sock"),
    ],
)
def test_listen_forms(text: str, endpoint: str) -> None:
    assert listen_endpoint(text) == endpoint


def test_environment_fallbacks() -> None:
    c = parse(
        [],
        {
            "DOCKER_HOST": "tcp://10.0.0.1:2375",
            "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/x",
            "DEPLOYER_WEBHOOK_TOKEN": "s3cret",
        },
    )
    assert c.docker == "tcp://10.0.0.1:2375"
    assert c.slack_webhook_url == "https://hooks.slack.com/services/x"
    assert c.webhook_tokens == ("s3cret",)
    c = parse(["--docker", "unix:///x.sock"], {"DOCKER_HOST": "tcp://10.0.0.1:2375",
                                                "DEPLOYER_WEBHOOK_TOKEN": "t"})
    assert c.docker == "unix:///x.sock"


def test_no_token_refuses_to_start_and_says_how() -> None:
    with pytest.raises(usage.UsageError) as e:
        parse([])
    assert "--webhook_token" in str(e.value)
    assert "DEPLOYER_WEBHOOK_TOKEN" in str(e.value)
    assert "--insecure_webhooks" in str(e.value)


def test_token_file(tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text("abc123\n")
    assert parse(["--webhook_token_file", str(f)]).webhook_tokens == ("abc123",)
    with pytest.raises(usage.UsageError, match="cannot read the webhook token file"):
        parse(["--webhook_token_file", str(tmp_path / "missing")])


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--kill_timeout", "soon"], "kill_timeout"),
        (["--max_threads", "0"], "max_threads"),
        (["--etcd_dial_timeout", "5 parsecs"], "etcd_dial_timeout"),
        (["--listen", "everywhere"], "listen"),
        (["--etcd_nodes", "ftp://x"], "etcd_nodes"),
        (["--docker", "/var/run/docker.sock"], "docker"),
        (["--webhook_path", "hook"], "webhook_path"),
        (["--slack_webhook_url", "hooks.slack.com/x"], "slack_webhook_url"),
        (["--etcd_dial_timeout", "nan"], "etcd_dial_timeout"),
        (["--repull_period", "inf"], "repull_period"),
        (["--etcd_dial_timeout", "0"], "etcd_dial_timeout"),
        (["--etcd_retry_delay", "0s"], "etcd_retry_delay"),
        (["--docker", "unix://"], "docker"),
        (["--docker", "tcp://host:abc"], "docker"),
        (["--listen", "tcp:abc"], "listen"),
        (["--listen", "foo:bar"], "listen"),
        (["--etcd_nodes", "http://127.0.0.1:abc"], "etcd_nodes"),
        (["--webhook_path", "/a/<x>"], "webhook_path"),
        (["--webhook_path", "/a b"], "webhook_path"),
        (["--notify_url", "ftp://example.com/x"], "notify_url"),
    ],
)
def test_bad_values_get_clear_messages(args: list[str], words: str) -> None:
    with pytest.raises(usage.UsageError, match=words):
        parse([*args, "--insecure_webhooks"])


def test_tls_to_the_engine_is_refused_clearly() -> None:
    with pytest.raises(usage.UsageError, match="DOCKER_TLS_VERIFY"):
        parse(["--insecure_webhooks"], {"DOCKER_HOST": "tcp://10.0.0.1:2376",
                                        "DOCKER_TLS_VERIFY": "1"})


def test_engine_over_ipv6_tcp() -> None:
    assert parse(["--insecure_webhooks", "--docker", "tcp://[::1]:2375"]).docker == (
        "tcp://[::1]:2375"
    )


def test_named_dockercfg_must_be_readable(tmp_path: Path) -> None:
    with pytest.raises(usage.UsageError, match="cannot read registry credentials"):
        parse(["--dockercfg", str(tmp_path / "nope"), "--insecure_webhooks"])
    bad = tmp_path / "bad"
    bad.write_text("{not json")
    with pytest.raises(usage.UsageError, match="not valid JSON"):
        parse(["--dockercfg", str(bad), "--insecure_webhooks"])


def test_default_dockercfg_missing_means_anonymous(tmp_path: Path) -> None:
    c = parse(["--insecure_webhooks"], home=tmp_path)
    assert len(c.credentials) == 0


def test_credentials_from_both_formats(tmp_path: Path) -> None:
    auth = base64.b64encode(b"hubuser:hubpass").decode()
    (tmp_path / ".dockercfg").write_text(
        json.dumps({"https://index.docker.io/v1/": {"auth": auth, "email": "x@y"}})
    )
    (tmp_path / ".docker").mkdir()
    (tmp_path / ".docker" / "config.json").write_text(
        json.dumps({"auths": {"127.0.0.1:5000": {"username": "u", "password": "p"},
                              "quay.io": {}}})
    )
    c = parse(["--insecure_webhooks"], home=tmp_path)
    hub = c.credentials.for_image("myorg/foo:qa")
    assert hub is not None and (hub.username, hub.password) == ("hubuser", "hubpass")
    local = c.credentials.for_image("127.0.0.1:5000/myorg/foo:qa")
    assert local is not None and (local.username, local.password) == ("u", "p")
    assert c.credentials.for_image("quay.io/x/y:1") is None
    header = json.loads(base64.urlsafe_b64decode(local.header()))
    assert header == {"username": "u", "password": "p", "serveraddress": "127.0.0.1:5000"}


# -- one source of defaults -----------------------------------------------------------------------


def test_config_defaults_are_the_flags_defaults() -> None:
    """``Config()`` and the command line without flags agree on every value."""
    built = parse(["--insecure_webhooks"])
    assert attrs.evolve(built, insecure_webhooks=False) == Config(
        credentials=built.credentials, hostname=built.hostname
    )


def test_every_flag_default_is_in_the_help() -> None:
    text = " ".join(str(Options(environ={})).split())
    for flag in FLAGS:
        assert f"--{flag.name}" in text, flag.name
        if flag.option_default is not None:
            assert f"[default: {flag.option_default}]" in text, flag.name
    assert "[default: $DOCKER_HOST, else unix:///var/run/docker.sock]" in text
    assert "[default: $DEPLOYER_GITHUB_SECRET]" in text
    assert "[default: registry.hub.docker.com]" in text


def test_empty_values_count_as_not_given() -> None:
    c = parse(["--etcd_prefix", "", "--registry=", "--slack_username", "", "--hostname=",
               "--insecure_webhooks"], {"DOCKER_HOST": "tcp://10.0.0.1:2375"})
    assert c.etcd_prefix == "/deployer"
    assert c.registry == "https://index.docker.io/v1/"
    assert c.slack_username == "Deployer"
    assert c.hostname
    assert parse(["--docker=", "--insecure_webhooks"],
                 {"DOCKER_HOST": "tcp://10.0.0.1:2375"}).docker == "tcp://10.0.0.1:2375"
    # An empty list of callback hosts is a value: callbacks go nowhere.
    assert parse(["--callback_hosts=", "--insecure_webhooks"]).callback_hosts == frozenset()
    assert parse(["--insecure_webhooks"]).callback_hosts == {"registry.hub.docker.com"}


# -- secrets: the webhook token and the GitHub secret follow the same rules ----------------------


SECRETS = [
    ("webhook_token", "DEPLOYER_WEBHOOK_TOKEN", lambda c: c.webhook_tokens[0]),
    ("github_secret", "DEPLOYER_GITHUB_SECRET", lambda c: c.github_secret),
]


@pytest.mark.parametrize(("flag", "env", "get"), SECRETS)
def test_secret_from_flag_file_or_environment(
    tmp_path: Path, flag: str, env: str, get: Any
) -> None:
    path = tmp_path / "secret"
    path.write_text("from-file\n")
    environ = {"DEPLOYER_WEBHOOK_TOKEN": "token", env: "from-env"}
    assert get(parse([f"--{flag}", "from-flag"], environ)) == "from-flag"
    assert get(parse([f"--{flag}_file", str(path)], environ)) == "from-file"
    assert get(parse([], environ)) == "from-env"


@pytest.mark.parametrize(("flag", "env", "get"), SECRETS)
@pytest.mark.parametrize(
    ("content", "words"),
    [(b"", "is empty"), (b"\n", "is empty"), (b"a\x01b", "control characters"),
     (None, "cannot read")],
)
def test_bad_secret_files_stop_start_up(
    tmp_path: Path, flag: str, env: str, get: Any, content: bytes | None, words: str
) -> None:
    path = tmp_path / "secret"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(usage.UsageError, match=words):
        parse([f"--{flag}_file", str(path), "--insecure_webhooks"],
              {"DEPLOYER_WEBHOOK_TOKEN": "token", env: "from-env"})


@pytest.mark.parametrize(("flag", "env", "get"), SECRETS)
def test_secret_inline_and_as_a_file_is_refused(
    tmp_path: Path, flag: str, env: str, get: Any
) -> None:
    path = tmp_path / "secret"
    path.write_text("x")
    with pytest.raises(usage.UsageError, match="not both"):
        parse([f"--{flag}", "y", f"--{flag}_file", str(path), "--insecure_webhooks"])


def test_github_secret_may_hold_spaces_a_token_may_not(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("It's a Secret to Everybody\n")
    assert parse(["--github_secret_file", str(path), "--insecure_webhooks"]).github_secret == (
        "It's a Secret to Everybody"
    )
    with pytest.raises(usage.UsageError, match="whitespace"):
        parse(["--webhook_token_file", str(path)])


def test_request_and_pull_stall_timeouts() -> None:
    c = parse(["--insecure_webhooks"])
    assert (c.request_timeout, c.pull_stall_timeout) == (10.0, 120.0)
    c = parse(["--insecure_webhooks", "--request-timeout=3s", "-pull_stall_timeout", "1m30s"])
    assert (c.request_timeout, c.pull_stall_timeout) == (3.0, 90.0)
    text = " ".join(str(Options(environ={})).split())
    assert "--request_timeout=" in text and "[default: 10s]" in text
    assert "--pull_stall_timeout=" in text and "[default: 2m]" in text


@pytest.mark.parametrize("flag", ["request_timeout", "pull_stall_timeout"])
@pytest.mark.parametrize("value", ["0", "0s", "-1s", "soon", "inf"])
def test_bad_timeouts_are_refused(flag: str, value: str) -> None:
    with pytest.raises(usage.UsageError, match=flag):
        parse([f"--{flag}={value}", "--insecure_webhooks"])
