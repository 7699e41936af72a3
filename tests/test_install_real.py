"""``.ci/install`` on a stock Debian 12, whose python3 has no pip and takes no packages.

The Python part of the install runs in a debootstrapped bookworm (Debian's python3 and
python3-venv, nothing else; see tests/stack/debian_stack.py) with the checkout copied in, from
a wheelhouse built here (``pip wheel '.[test,dev]' -w``), so nothing is fetched.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.stack.debian_stack import build_wheels, copy_project, debian_rootfs, unpack
from tests.stack.docker_stack import require_binary

pytestmark = [pytest.mark.real, pytest.mark.slow]

PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@pytest.fixture
def bookworm(tmp_path: Path) -> Iterator[Path]:
    """A fresh copy of the cached rootfs (removed after the test)."""
    rootfs, took = debian_rootfs()
    if took is not None:
        print(f"\ndebootstrap took {took:.0f} s")
    root = unpack(rootfs, tmp_path / "root")
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def chroot(root: Path, *args: str, env: dict[str, str] | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess[str]:
    """``args`` in ``root`` with a clean environment (PATH, HOME and ``env``)."""
    environ = [f"{k}={v}" for k, v in {"PATH": PATH, "HOME": "/root", **(env or {})}.items()]
    return subprocess.run([require_binary("chroot"), str(root), "/usr/bin/env", "-i", *environ,
                           *args], capture_output=True, text=True, timeout=timeout, check=False)


def test_ci_install_makes_a_virtualenv_on_stock_debian(bookworm: Path, tmp_path: Path) -> None:
    # What the README's promise is up against: no pip, and PEP 668's marker.
    done = chroot(bookworm, "python3", "-m", "pip", "--version")
    assert done.returncode != 0 and "No module named pip" in done.stderr
    assert list(bookworm.glob("usr/lib/python3.*/EXTERNALLY-MANAGED"))

    copy_project(bookworm / "src")
    started = time.monotonic()
    build_wheels([".[test,dev]", "setuptools", "wheel"], bookworm / "wheels")
    print(f"\npip wheel '.[test,dev]': {time.monotonic() - started:.1f} s")

    started = time.monotonic()
    done = chroot(bookworm, "bash", "/src/.ci/install", "--no-apt",
                  env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/wheels"})
    print(f".ci/install --no-apt in the chroot: {time.monotonic() - started:.1f} s")
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout == "/opt/deployer/bin/python\n"
    assert "python3 takes no packages" in done.stderr

    venv = bookworm / "opt" / "deployer" / "bin"
    for tool in ("twistd", "deployer", "pytest", "ruff", "mypy"):
        assert (venv / tool).is_file(), tool

    done = chroot(bookworm, "/opt/deployer/bin/twistd", "deployer", "--help")
    assert done.returncode == 0, done.stderr
    assert "--etcd_nodes=" in done.stdout
    done = chroot(bookworm, "/opt/deployer/bin/deployer", "--help")
    assert done.returncode == 0, done.stderr
    assert "trigger" in done.stdout
    # The checkout is installed in place (-e): the plugin is found from /src.
    done = chroot(bookworm, "/opt/deployer/bin/python", "-c",
                  "import deployer; print(deployer.__file__)")
    assert done.stdout.strip() == "/src/deployer/__init__.py", done.stderr

    # Run again: the virtualenv is reused.
    done = chroot(bookworm, "bash", "/src/.ci/install", "--no-apt",
                  env={"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": "/wheels"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert "making a virtualenv" not in done.stderr


def test_ci_install_says_what_is_missing_without_python3_venv(bookworm: Path) -> None:
    """Debian's python3 without python3-venv has no ensurepip: the install says what to do."""
    for ensurepip in bookworm.glob("usr/lib/python3.*/ensurepip"):
        shutil.rmtree(ensurepip)
    copy_project(bookworm / "src")
    done = chroot(bookworm, "bash", "/src/.ci/install", "--no-apt")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.strip().splitlines()[-1] == (
        "python3 cannot make a virtualenv: apt-get install python3-venv"
    )
