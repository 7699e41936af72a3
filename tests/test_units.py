"""The systemd units in systemd/: ``systemd-analyze verify`` on each, and what they promise.

``verify`` checks that each command a unit runs is executable: deployer.service needs
/opt/deployer/bin/twistd, which ``bash .ci/install`` puts there (the README's install).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = sorted((ROOT / "systemd").glob("*.service"))
DAEMON_UNITS = ("deployer.service", "deployer-docker.service")
ANALYZE = shutil.which("systemd-analyze") or shutil.which("systemd-analyze", path="/usr/bin:/bin")


def directives(unit: Path) -> dict[str, list[str]]:
    """``{key: [value, ...]}`` of a unit file, continuation lines joined, comments left out."""
    text = re.sub(r"\\\n\s*", " ", unit.read_text())
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    if ANALYZE is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    return subprocess.run([ANALYZE, "verify", str(path)], capture_output=True, text=True,
                          timeout=120, check=False)


def test_every_unit_is_tested() -> None:
    assert {u.name for u in UNITS} == {"deployer.service", "deployer-docker.service",
                                       "app@.service"}


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_systemd_analyze_verify(unit: Path) -> None:
    done = verify(unit)
    hint = ""
    if "/opt/deployer/bin/twistd" in done.stderr:
        hint = "\n(bash .ci/install installs the daemon into /opt/deployer, as the README says)"
    assert done.returncode == 0, done.stderr + hint
    name = unit.name.replace("@.", "@i.")  # a template is verified as an instance
    mine = [line for line in done.stderr.splitlines() if line.startswith(name)]
    assert mine == [], "\n".join(mine)


def test_a_template_instance_verifies(tmp_path: Path) -> None:
    shutil.copy(ROOT / "systemd" / "app@.service", tmp_path / "app@.service")
    done = verify(tmp_path / "app@web.service")
    assert done.returncode == 0, done.stderr
    assert not [line for line in done.stderr.splitlines() if line.startswith("app@web")]


@pytest.mark.parametrize("name", DAEMON_UNITS)
def test_deployer_units_raise_the_open_file_limit(name: str) -> None:
    assert directives(ROOT / "systemd" / name)["LimitNOFILE"] == ["65536"]


def test_the_daemon_runs_from_the_documented_virtualenv() -> None:
    (command,) = directives(ROOT / "systemd" / "deployer.service")["ExecStart"]
    assert command.split()[:4] == ["/opt/deployer/bin/twistd", "--nodaemon", "--pidfile=",
                                   "deployer"]


def test_the_app_unit_restarts_without_pulling() -> None:
    unit = directives(ROOT / "systemd" / "app@.service")
    assert unit["Restart"] == ["always"]
    commands = [c for key in ("ExecStartPre", "ExecStart", "ExecStartPost") for c in
                unit.get(key, [])]
    assert commands and not any(" pull " in f" {c} " for c in commands)
    assert "undo a rollback" in (ROOT / "systemd" / "app@.service").read_text()


def test_the_container_unit_runs_the_image_with_the_engine_socket() -> None:
    unit = directives(ROOT / "systemd" / "deployer-docker.service")
    (command,) = unit["ExecStart"]
    words = command.split()
    assert words[:3] == ["/usr/bin/docker", "run", "--rm"]
    for option in (["--name", "deployer"], ["--network", "host"],
                   ["-v", "/var/run/docker.sock:/var/run/docker.sock"],
                   ["--ulimit", "nofile=65536:65536"], ["-e", "DEPLOYER_WEBHOOK_TOKEN"]):
        assert any(words[i:i + 2] == option for i in range(len(words))), option
    assert unit["Restart"] == ["always"]
    assert "/etc/deployer/env" in unit["EnvironmentFile"]
