"""scripts/prune_venv.py: what the image keeps of its virtualenv, from the installed metadata."""

from __future__ import annotations

import importlib.metadata

import pytest

from scripts.prune_venv import (
    PruneError,
    installed,
    loaded_imports,
    main,
    needed,
    providers,
    requirements,
)

# Made-up metadata shaped like the image's: treq asks for twisted[tls], whose extra brings
# pyOpenSSL and through it cryptography, cffi and pycparser; the rest is what txaioetcd brings.
METADATA = {
    "app": ["twisted>=24.7", "treq", "lib==1.0", "pytest>=7; extra == 'test'"],
    "twisted": [
        "attrs>=22.2.0",
        "idna>=2.5; extra == 'tls'",
        "pyopenssl>=25.3.0; extra == 'tls'",
        "h2<5.0,>=3.2; extra == 'http2'",
        "typing-extensions; python_version < '3.0'",
    ],
    "treq": ["attrs", "Twisted[TLS]>=22.10.0", "httpbin==0.10.2; extra == 'dev'"],
    "attrs": [],
    "idna": [],
    "pyopenssl": ["cryptography<51,>=49.0.0"],
    "cryptography": ["cffi>=2.0.0 ; platform_python_implementation != 'PyPy'"],
    "cffi": ['pycparser; implementation_name != "PyPy"'],
    "pycparser": [],
    "lib": ["six (>=1.10.0)", "heavy (>=18.10.1)"],
    "six": [],
    "heavy": ["numpy>=1.24.1", "cffi>=1.15.1"],
    "numpy": [],
    "h2": [],
    "pytest": [],
}


def test_the_requirements_are_followed_with_their_extras_and_markers() -> None:
    keep = needed("app", METADATA)
    assert keep == {"app", "twisted", "treq", "attrs", "idna", "pyopenssl", "cryptography",
                    "cffi", "pycparser", "lib", "six", "heavy", "numpy"}
    # Neither an extra that nothing asks for, nor a marker that this interpreter fails.
    assert not keep & {"h2", "pytest", "httpbin", "typing-extensions"}


def test_a_partial_distribution_keeps_only_what_its_file_needs() -> None:
    keep = needed("app", {**METADATA, "lib": ["six"]})
    assert "six" in keep and "lib" in keep
    assert not keep & {"heavy", "numpy"}
    # cffi stays all the same: cryptography, through twisted[tls], needs it.
    assert {"cffi", "pycparser"} <= keep


def test_names_are_compared_as_pep_503_does() -> None:
    assert needed("App", {"app": ["Zope.Interface", "PyYAML[C_Ext]"], "zope-interface": [],
                          "pyyaml": ["x; extra == 'c-ext'"], "x": []}) == {
        "app", "zope-interface", "pyyaml", "x"}


def test_a_requirement_that_is_not_installed_is_an_error() -> None:
    with pytest.raises(PruneError, match=r"^cffi requires 'pycparser; .*', which is not installed"):
        needed("app", {k: v for k, v in METADATA.items() if k != "pycparser"})
    with pytest.raises(PruneError, match="nothing is not installed"):
        needed("nothing", METADATA)


def test_the_imports_that_run_when_a_file_is_loaded() -> None:
    source = (
        "from __future__ import annotations\n"
        "import binascii, os.path\n"
        "import six\n"
        "from yaml.loader import Loader\n"
        "from . import sibling\n"
        "from .sub import other\n"
        "try:\n    import simplejson as json\nexcept ImportError:\n    import json\n"
        "if True:\n    import attr\n"
        "class Op:\n    import zope.interface\n"
        "    def method(self):\n        from lib._lease import Lease\n"
        "def helper():\n    import numpy\n"
        "async def later():\n    import aiohttp\n"
        "f = lambda: __import__('cbor2')\n"
    )
    assert loaded_imports(source) == {"__future__", "binascii", "os", "six", "yaml",
                                      "simplejson", "json", "attr", "zope"}


def test_the_distributions_that_provide_the_imports() -> None:
    modules = {"__future__", "binascii", "six", "lib", "yaml"}
    found = providers(modules, "lib", {"six": ["six"], "yaml": ["PyYAML"], "lib": ["lib"]})
    assert found == ["PyYAML", "six"]
    with pytest.raises(PruneError, match="lib loads mystery, which no installed"):
        providers({"mystery"}, "lib", {})


def test_deployer_keeps_what_it_imports_in_this_interpreter() -> None:
    """The same computation as the image's build, on this interpreter's metadata (the project
    and its requirements are installed wherever its tests run)."""
    distributions = installed()
    if "deployer" not in distributions:
        pytest.fail("deployer is not installed: pip install -e '.[test,dev]'", pytrace=False)
    requires = requirements(distributions, {"txaioetcd": "txaioetcd/_types.py"})
    assert requires["txaioetcd"] == ["six"]
    keep = needed("deployer", requires)
    assert {"deployer", "twisted", "klein", "treq", "txaioetcd", "six", "prometheus-client",
            "pyopenssl", "service-identity", "cryptography", "cffi", "pycparser"} <= keep
    assert not keep & {"zlmdb", "numpy", "aiohttp", "yarl", "multidict", "cbor2", "txaio",
                       "pytest", "mypy", "ruff", "hypothesis"}
    # Whatever is kept is installed, and a module that deployer imports directly is in it.
    for module in ("twisted", "klein", "treq", "attr", "prometheus_client", "zope"):
        dists = importlib.metadata.packages_distributions()[module]
        assert any(d.lower().replace("_", "-").replace(".", "-") in keep for d in dists), module


def test_a_file_the_distribution_does_not_have_is_an_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["deployer", "--partial", "txaioetcd=txaioetcd/_nothing.py", "--dry-run"]) == 1
    assert "txaioetcd has no file txaioetcd/_nothing.py" in capsys.readouterr().err
    assert main(["deployer", "--partial", "txaioetcd", "--dry-run"]) == 1
    assert "give NAME=FILE" in capsys.readouterr().err


def test_a_dry_run_names_what_would_go(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deployer", "--partial", "txaioetcd=txaioetcd/_types.py", "--dry-run"]) == 0
    kept, dropped = (line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines())
    kept_names = set(kept.split(", "))
    dropped_names = set(dropped.rpartition(" (")[0].split(", "))
    assert {"deployer", "six", "cffi"} <= kept_names
    assert {"numpy", "zlmdb", "aiohttp"} <= dropped_names
    assert dropped.endswith(" MB)")
    # pip, setuptools and wheel are the installer's: in neither list.
    assert not (kept_names | dropped_names) & {"pip", "setuptools", "wheel"}
