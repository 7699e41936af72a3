"""The parts of txaioetcd that deployer.etcd uses (deployer/etcd/_txaioetcd.py), pinned: each is
exercised here the way deployer calls it, so that a txaioetcd that changes or drops one fails
this file, loudly, before any daemon meets it."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import types
from importlib.metadata import version
from pathlib import Path

import pytest

from deployer.etcd import _txaioetcd
from deployer.etcd._txaioetcd import Error, Header, KeySet, KeyValue, Range

ROOT = Path(__file__).resolve().parent.parent


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_the_installed_release_is_the_pinned_one() -> None:
    pins = re.findall(r'"txaioetcd==([^"]+)"', (ROOT / "setup.py").read_text())
    assert pins == [_txaioetcd.VERSION]
    assert version("txaioetcd") == _txaioetcd.VERSION


def test_keyset_marshals_a_prefix_and_a_single_key() -> None:
    assert KeySet(b"/deployer/", prefix=True)._marshal() == {
        "key": b64(b"/deployer/"),
        "range_end": b64(b"/deployer0"),
    }
    assert KeySet(b"/deployer/_/x")._marshal() == {"key": b64(b"/deployer/_/x")}


def test_keyvalue_parses_the_gateways_kv() -> None:
    kv = KeyValue._parse({"key": b64(b"/deployer/myorg/foo"), "value": b64(b"x"),
                          "version": "2", "create_revision": "4", "mod_revision": "7"})
    assert (kv.key, kv.value, kv.version, kv.create_revision, kv.mod_revision) == (
        b"/deployer/myorg/foo", b"x", 2, 4, 7)
    deleted = KeyValue._parse({"key": b64(b"/deployer/myorg/foo"), "mod_revision": "8"})
    assert (deleted.value, deleted.version, deleted.mod_revision) == (None, None, 8)


def test_header_parses_int64_strings() -> None:
    header = Header._parse({"cluster_id": "14841639068965178418", "member_id": "1",
                            "revision": "42", "raft_term": "2"})
    assert (header.revision, header.raft_term, header.member_id) == (42, 2, 1)
    assert header.cluster_id == 14841639068965178418
    assert Header._parse({"raft_term": "2"}).revision is None


def test_range_parses_an_answer_with_and_without_keys() -> None:
    answer = Range._parse({
        "header": {"revision": "9"},
        "kvs": [{"key": b64(b"/a"), "value": b64(b"1"), "mod_revision": "5"}],
        "count": "1",
    })
    assert answer.header.revision == 9
    assert [(kv.key, kv.value, kv.mod_revision) for kv in answer.kvs] == [(b"/a", b"1", 5)]
    empty = Range._parse({"header": {"revision": "9"}})
    assert (empty.kvs, empty.header.revision) == ([], 9)


def test_error_parses_the_gateways_error_body() -> None:
    error = Error._parse({"error": "etcdserver: duplicate key given in txn request",
                          "message": "etcdserver: duplicate key given in txn request",
                          "code": 3})
    assert (error.code, error.message) == (3, "etcdserver: duplicate key given in txn request")
    assert (Error._parse({}).code, Error._parse({}).message) == (None, None)


def test_a_missing_part_fails_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    changed = types.ModuleType("txaioetcd._types")
    for name in ("KeySet", "KeyValue", "Header", "Range", "Error"):
        setattr(changed, name, getattr(_txaioetcd, name))
    changed.Range = type("Range", (), {})  # a release without Range._parse
    monkeypatch.setitem(sys.modules, "txaioetcd._types", changed)
    with pytest.raises(ImportError, match=r"no Range\._parse.*txaioetcd==18\.10\.2"):
        _txaioetcd.load_types()


def test_only_the_types_module_is_loaded() -> None:
    """txaioetcd's package (and the numpy behind its LMDB layer) stays out of the daemon."""
    code = ("import sys, deployer.etcd, deployer.testing.fake_etcd;"
            "print(sorted(m for m in ('txaioetcd', 'numpy', 'zlmdb') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60, check=True)
    assert done.stdout.strip() == "[]"
