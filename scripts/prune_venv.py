"""Uninstall from a virtualenv every distribution that a program's requirements do not reach.

The image's build runs it with the virtualenv's own python, after ``pip install``::

    /opt/deployer/bin/python scripts/prune_venv.py deployer --partial txaioetcd=txaioetcd/_types.py

What is kept is computed from the installed metadata (``importlib.metadata``), never from a list
kept by hand: the root distribution, and whatever its ``Requires-Dist`` reach, transitively, with
the markers evaluated for this interpreter and the extras that a requirement names
(``twisted[tls]`` brings pyOpenSSL, cryptography, and through it cffi and pycparser).

``--partial NAME=FILE``: of distribution NAME the program loads only FILE, by path, without the
package's ``__init__``. NAME is kept whole, but its own requirements are replaced by the
distributions that provide what FILE imports when it is loaded (its module-level imports, those of
its class bodies included, not those inside functions; the standard library and NAME's own package
need nothing). deployer loads only txaioetcd's ``_types.py``, which imports ``six``: zlmdb, numpy,
aiohttp and what they bring go.

The installer (pip, setuptools, wheel) is neither kept nor dropped here: this runs pip to
uninstall, and the Dockerfile removes pip and setuptools afterwards. A requirement that is reached
but not installed is an error: the virtualenv would not run the program.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import os
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from packaging.requirements import Requirement
else:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # not in the virtualenv: pip's own copy (pip is there while this runs)
        from pip._vendor.packaging.requirements import Requirement

INSTALLER = frozenset({"pip", "setuptools", "wheel"})
"""Left to the caller: pip runs the uninstall here, and the Dockerfile removes pip and setuptools
after it."""


def canonicalize_name(name: str) -> str:
    """A distribution's or an extra's name as PEP 503 compares it: ``PyYAML``, ``pyyaml``."""
    return re.sub(r"[-_.]+", "-", name).lower()


class PruneError(Exception):
    """The requirements cannot be followed: something reached is not installed."""


def needed(root: str, requires: Mapping[str, Sequence[str]]) -> set[str]:
    """The canonical names of ``root`` and of every distribution its requirements reach.

    ``requires`` maps each installed distribution's canonical name to its requirement strings
    (``Requires-Dist``). A requirement counts when it has no marker, or its marker holds for this
    interpreter with ``extra`` set to one of the extras asked of its distribution (or to none).
    :class:`PruneError` when a requirement that counts names a distribution not in ``requires``.
    """
    start = canonicalize_name(root)
    if start not in requires:
        raise PruneError(f"{root} is not installed")
    # (distribution, extra): "" is the distribution itself, an extra what it adds.
    visited = {(start, "")}
    pending = [(start, "")]
    while pending:
        name, extra = pending.pop()
        for line in requires[name]:
            requirement = Requirement(line)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
                continue
            dependency = canonicalize_name(requirement.name)
            if dependency not in requires:
                raise PruneError(f"{name} requires {line!r}, which is not installed")
            for asked in ("", *sorted(canonicalize_name(e) for e in requirement.extras)):
                if (dependency, asked) not in visited:
                    visited.add((dependency, asked))
                    pending.append((dependency, asked))
    return {name for name, _ in visited}


def loaded_imports(source: str) -> set[str]:
    """The top-level names of the modules that ``source`` imports when it is loaded: at module
    level, in ``if``/``try``/``with`` blocks and class bodies, not in functions (run only when
    called). Relative imports (the module's own package) are left out."""
    names: set[str] = set()
    body: list[ast.AST] = [ast.parse(source)]
    while body:
        node = body.pop()
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name.partition(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.partition(".")[0])
        body.extend(ast.iter_child_nodes(node))
    return names


def providers(modules: Iterable[str], package: str,
              distributions: Mapping[str, Sequence[str]]) -> list[str]:
    """The requirement strings for the distributions that provide ``modules``: none for the
    standard library, ``__future__`` or ``package`` itself. ``distributions`` maps a top-level
    module to the distributions that provide it (:func:`importlib.metadata.packages_distributions`).
    :class:`PruneError` for a module that nothing installed provides."""
    found: set[str] = set()
    for module in sorted(modules):
        if module in sys.stdlib_module_names or module in ("__future__", package):
            continue
        if not distributions.get(module):
            raise PruneError(f"{package} loads {module}, which no installed distribution provides")
        found.update(distributions[module])
    return sorted(found)


def installed() -> dict[str, importlib.metadata.Distribution]:
    """This interpreter's distributions by canonical name."""
    found: dict[str, importlib.metadata.Distribution] = {}
    for distribution in importlib.metadata.distributions():
        name = distribution.metadata["Name"]
        if name:  # not a broken dist-info left behind
            found.setdefault(canonicalize_name(name), distribution)
    return found


def requirements(distributions: Mapping[str, importlib.metadata.Distribution],
                 partial: Mapping[str, str]) -> dict[str, list[str]]:
    """Each distribution's requirement strings; for one in ``partial`` (canonical name: a file of
    it, as its RECORD names it), those of the distributions that provide what the file loads."""
    requires = {name: list(d.requires or ()) for name, d in distributions.items()}
    for name, path in partial.items():
        distribution = distributions.get(name)
        if distribution is None:
            raise PruneError(f"{name} is not installed")
        files = [f for f in distribution.files or () if f.as_posix() == path]
        if not files:
            raise PruneError(f"{name} has no file {path}")
        source = files[0].read_text(encoding="utf-8")
        top = path.partition("/")[0]
        requires[name] = providers(loaded_imports(source), top,
                                   importlib.metadata.packages_distributions())
    return requires


def size(distribution: importlib.metadata.Distribution) -> int:
    """The bytes of a distribution's files that are on disk."""
    total = 0
    for path in distribution.files or ():
        try:
            total += os.path.getsize(str(distribution.locate_file(path)))
        except OSError:
            pass
    return total


def parse_partial(values: Iterable[str]) -> dict[str, str]:
    partial: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise argparse.ArgumentTypeError(f"--partial {value!r}: give NAME=FILE")
        partial[canonicalize_name(name)] = path
    return partial


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.partition("\n")[0])
    parser.add_argument("root", help="the distribution whose requirements are kept")
    parser.add_argument("--partial", action="append", default=[], metavar="NAME=FILE",
                        help="of NAME only FILE is loaded: keep what FILE imports instead of"
                             " NAME's requirements")
    parser.add_argument("--dry-run", action="store_true", help="say what would go, and stop")
    args = parser.parse_args(argv)
    try:
        distributions = installed()
        keep = needed(args.root, requirements(distributions, parse_partial(args.partial)))
    except (PruneError, argparse.ArgumentTypeError) as e:
        print(f"prune_venv: {e}", file=sys.stderr)
        return 1
    drop = sorted(set(distributions) - keep - INSTALLER)
    megabytes = sum(size(distributions[name]) for name in drop) / 1e6
    print(f"prune_venv: keeping {', '.join(sorted(keep))}")
    print(f"prune_venv: dropping {', '.join(drop) or 'nothing'} ({megabytes:.1f} MB)")
    if args.dry_run or not drop:
        return 0
    return subprocess.run([sys.executable, "-m", "pip", "uninstall", "--yes", "--quiet", *drop],
                          check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
