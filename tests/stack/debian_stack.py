"""A stock Debian 12 userland and wheelhouses, for the image and install tests.

:func:`debian_rootfs` is ``debootstrap --variant=minbase --include=python3,python3-venv
bookworm`` from the mirror of this machine's apt sources (read at run time), kept as a tarball
under ``/var/cache/deployer-tests`` (``$DEPLOYER_TEST_CACHE``) so that only the first run pays
for it. :func:`build_wheels` is ``pip wheel SPEC -w DIR``, offline from a cache of earlier
wheels when it can, from PyPI otherwise.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.stack.docker_stack import StackError, require_binary, run

ROOT = Path(__file__).resolve().parent.parent.parent
CACHE = Path(os.environ.get("DEPLOYER_TEST_CACHE", "/var/cache/deployer-tests"))
SUITE = "bookworm"
PACKAGES = ("python3", "python3-venv")
APT = Path("/etc/apt")
BUILD_REQUIREMENTS = ("setuptools", "wheel")


@contextlib.contextmanager
def cache_lock(name: str) -> Iterator[Path]:
    """The cache directory, held exclusively (test runs in other processes wait)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with (CACHE / f".{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield CACHE
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def apt_mirror(apt: Path = APT, suite: str = SUITE) -> str:
    """The Debian archive this machine's apt uses for ``suite`` (not its security archive).

    Reads the deb822 ``*.sources`` files (``URIs:`` of a stanza whose ``Suites:`` name the
    suite), then the one-line ``deb URI SUITE ...`` form.
    """
    sources = sorted((apt / "sources.list.d").glob("*.sources"))
    for path in sources:
        for stanza in re.split(r"\n\s*\n", path.read_text(errors="replace")):
            fields = dict(
                (m.group(1).lower(), m.group(2).split())
                for m in re.finditer(r"^([A-Za-z-]+):[ \t]*(.*)$", stanza, re.MULTILINE)
            )
            if ("deb" in fields.get("types", []) and suite in fields.get("suites", [])
                    and fields.get("enabled", ["yes"]) != ["no"] and fields.get("uris")):
                return fields["uris"][0]
    lists = [apt / "sources.list", *sorted((apt / "sources.list.d").glob("*.list"))]
    for path in lists:
        if not path.exists():
            continue
        for line in path.read_text(errors="replace").splitlines():
            m = re.match(r"\s*deb\s+(?:\[[^\]]*\]\s+)?(\S+)\s+(\S+)", line)
            if m and m.group(2) == suite:
                return m.group(1)
    pytest.fail(f"no apt source for {suite} in {apt}: the Debian rootfs needs a mirror",
                pytrace=False)


def debian_rootfs() -> tuple[Path, float | None]:
    """The cached tarball of the rootfs, and how long debootstrap took (None: from the cache)."""
    name = f"{SUITE}-minbase-{'-'.join(PACKAGES)}.tar"
    with cache_lock("rootfs") as cache:
        tarball = cache / name
        if tarball.exists():
            return tarball, None
        debootstrap = require_binary("debootstrap")
        mirror = apt_mirror()
        work = Path(tempfile.mkdtemp(prefix="rootfs-", dir=cache))
        try:
            started = time.monotonic()
            run([debootstrap, "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE,
                 str(work / "root"), mirror], timeout=900)
            took = time.monotonic() - started
            # The downloaded packages and the package lists: not needed in a base image.
            for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for path in (work / "root" / junk).glob("*"):
                    if path.is_file():
                        path.unlink()
            run(["tar", "-C", str(work / "root"), "--numeric-owner", "-cf",
                 str(work / "rootfs.tar"), "."], timeout=300)
            os.replace(work / "rootfs.tar", tarball)
            return tarball, took
        finally:
            shutil.rmtree(work, ignore_errors=True)


def unpack(tarball: Path, dest: Path) -> Path:
    """``tarball`` unpacked into ``dest`` (owners, modes and device nodes kept: needs root)."""
    dest.mkdir(parents=True, exist_ok=True)
    run(["tar", "-C", str(dest), "--numeric-owner", "-xf", str(tarball)], timeout=300)
    return dest


def build_wheels(requirements: Sequence[str], dest: Path) -> Path:
    """``pip wheel REQUIREMENTS -w DEST`` run from the project's root (``.`` is the project).

    Tried first with no index, from the wheels of earlier runs; then from PyPI. Every wheel
    but the project's own is kept for the next run, and so are the project's build
    requirements (setuptools, wheel), so that the next run needs no index at all.
    """
    dest.mkdir(parents=True, exist_ok=True)
    with cache_lock("wheels") as cache:
        cached = cache / "wheels"
        cached.mkdir(exist_ok=True)
        _pip_wheel(["--no-deps", *BUILD_REQUIREMENTS], cached, cached)
        _pip_wheel(requirements, dest, cached)
        for wheel in dest.glob("*.whl"):
            if not wheel.name.startswith("deployer-") and not (cached / wheel.name).exists():
                shutil.copy2(wheel, cached / wheel.name)
    return dest


def _pip_wheel(requirements: Sequence[str], dest: Path, cached: Path) -> None:
    base = [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
            "--find-links", str(cached), "-w", str(dest), *requirements]
    for offline in (True, False):
        done = subprocess.run(base + (["--no-index"] if offline else []), cwd=ROOT,
                              capture_output=True, timeout=900, check=False)
        if done.returncode == 0:
            return
    raise StackError(f"pip wheel {' '.join(requirements)} failed:"
                     f" {done.stderr.decode(errors='replace')[-3000:]}")


def project_files() -> list[Path]:
    """The project's files as a checkout has them: tracked, or new and not ignored."""
    out = run(["git", "-C", str(ROOT), "ls-files", "--cached", "--others", "--exclude-standard",
               "-z"])
    return [ROOT / name for name in out.split("\0") if name and (ROOT / name).is_file()]


def copy_project(dest: Path) -> Path:
    """A copy of the checkout's files (no build products) in ``dest``."""
    for path in project_files():
        target = dest / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return dest


__all__ = ["apt_mirror", "build_wheels", "copy_project", "debian_rootfs", "unpack"]
