"""deployer.auth: tokens in every accepted form, GitHub signatures, token sources, peers."""

from __future__ import annotations

import hashlib
import hmac
from base64 import b64encode
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.resource import Resource
from twisted.web.server import Site
from twisted.web.test.requesthelper import DummyRequest

from deployer import auth as auth_module
from deployer.auth import TOKEN_ENV, TokenAuth, load_token, peer, verify_github_signature
from deployer.errors import ConfigError, Unauthorized

GITHUB_SECRET = b"It's a Secret to Everybody"
GITHUB_BODY = b"Hello, World!"
GITHUB_SIGNATURE = b"sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


def request(
    authorization: bytes | list[bytes] | None = None, uri: bytes = b"/hook"
) -> DummyRequest:
    r = DummyRequest([b"hook"])
    r.uri = uri
    if authorization is not None:
        values = authorization if isinstance(authorization, list) else [authorization]
        r.requestHeaders.setRawHeaders(b"authorization", values)
    return r


def basic(user: str, password: str) -> bytes:
    return b"Basic " + b64encode(f"{user}:{password}".encode())


def forms(token: str) -> list[DummyRequest]:
    """``token`` offered in every form the module documents."""
    raw = token.encode()
    return [
        request(b"Bearer " + raw),
        request(b"Token " + raw),
        request(basic("deployer", token)),
        request(uri=b"/hook?token=" + quote(token, safe="").encode()),
    ]


# -- TokenAuth ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "req",
    [
        request(b"Bearer tok-1"),
        request(b"bearer tok-1"),
        request(b"BEARER   tok-1  "),
        request(b"Token tok-1"),
        request(basic("anyone", "tok-1")),
        request(basic("", "tok-1")),
        request(uri=b"/hook?token=tok-1"),
        request(uri=b"/hook?x=1&token=tok-1&y=2"),
        request(uri=b"/hook?token=wrong&token=tok-1"),
        request([b"Bearer wrong", b"Bearer tok-1"]),
        request(b"Bearer wrong", uri=b"/hook?token=tok-1"),
        request(b"Bearer tok-2"),
    ],
)
def test_accepted(req: DummyRequest) -> None:
    TokenAuth(["tok-1", "tok-2"]).check(req)


@pytest.mark.parametrize(
    "req, reason",
    [
        (request(), "missing token"),
        (request(b""), "missing token"),
        (request(b"Bearer"), "missing token"),
        (request(b"Bearer "), "missing token"),
        (request(b"Digest tok-1"), "missing token"),
        (request(b"tok-1"), "missing token"),
        (request(basic("tok-1", "")), "missing token"),  # the token is the password
        (request(b"Basic !!!not-base64"), "missing token"),
        (request(uri=b"/hook?token="), "missing token"),
        (request(uri=b"/hook?tok=tok-1"), "missing token"),
        (request(b"Bearer tok-11"), "invalid token"),
        (request(b"Bearer tok-"), "invalid token"),
        (request(b"Bearer TOK-1"), "invalid token"),
        (request(b"Bearer tok-1 tok-1"), "invalid token"),
        (request(basic("deployer", "tok-2")), "invalid token"),
        (request(uri=b"/hook?token=tok-2"), "invalid token"),
        (request(uri=b"/hook/tok-1"), "missing token"),
    ],
)
def test_refused(req: DummyRequest, reason: str) -> None:
    with pytest.raises(Unauthorized) as e:
        TokenAuth(["tok-1"]).check(req)
    assert e.value.code == 401
    assert e.value.reason == reason


def test_non_ascii_token() -> None:
    auth = TokenAuth(["clé-🔑"])
    for req in forms("clé-🔑"):
        auth.check(req)
    with pytest.raises(Unauthorized):
        auth.check(request("Bearer clé".encode()))


def test_no_tokens_is_insecure_mode() -> None:
    auth = TokenAuth([])
    assert auth.insecure
    auth.check(request())
    assert not TokenAuth(["x"]).insecure


@pytest.mark.parametrize("tokens", [[""], ["ok", "has space"], ["tab\there"], ["new\nline"]])
def test_bad_configured_tokens(tokens: list[str]) -> None:
    with pytest.raises(ConfigError):
        TokenAuth(tokens)


def test_one_string_is_not_a_list_of_tokens() -> None:
    with pytest.raises(TypeError):
        TokenAuth("secret")  # type: ignore[arg-type]


def test_tokens_not_in_repr() -> None:
    assert "sekrit" not in repr(TokenAuth(["sekrit"]))


def test_every_token_compared_whatever_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The number of comparisons does not tell which token (if any) matched."""
    calls: list[tuple[bytes, bytes]] = []
    compare = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return compare(a, b)

    monkeypatch.setattr(auth_module.hmac, "compare_digest", counting)
    auth = TokenAuth(["first", "second", "third"])
    counts = []
    for offered in ("first", "third", "nope"):
        calls.clear()
        try:
            auth.check(request(b"Bearer " + offered.encode()))
        except Unauthorized:
            pass
        counts.append(len(calls))
        assert all(isinstance(a, bytes) and isinstance(b, bytes) for a, b in calls)
    assert counts == [3, 3, 3]


tokens = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cc", "Cs", "Zs", "Zl", "Zp", "Cf", "Co"]),
    min_size=1,
    max_size=40,
).filter(lambda t: t.isprintable() and not any(c.isspace() for c in t))


@given(st.lists(tokens, min_size=1, max_size=4), tokens)
def test_never_accepts_a_wrong_token(configured: list[str], offered: str) -> None:
    if offered in configured:
        offered += "x"
    auth = TokenAuth(configured)
    for req in forms(offered):
        with pytest.raises(Unauthorized):
            auth.check(req)


@given(st.lists(tokens, min_size=1, max_size=4), st.data())
def test_accepts_each_configured_token(configured: list[str], data: st.DataObject) -> None:
    auth = TokenAuth(configured)
    token = data.draw(st.sampled_from(configured))
    for req in forms(token):
        auth.check(req)


# -- GitHub signatures ----------------------------------------------------------------------------


def test_github_published_vector() -> None:
    verify_github_signature(GITHUB_SECRET, GITHUB_BODY, GITHUB_SIGNATURE)
    verify_github_signature(GITHUB_SECRET, GITHUB_BODY, GITHUB_SIGNATURE.upper()[:7].lower()
                            + GITHUB_SIGNATURE[7:].upper())


@pytest.mark.parametrize(
    "secret, body, header, reason",
    [
        (GITHUB_SECRET, GITHUB_BODY, None, "missing"),
        (GITHUB_SECRET, GITHUB_BODY, b"", "missing"),
        (GITHUB_SECRET, GITHUB_BODY + b" ", GITHUB_SIGNATURE, "invalid"),
        (b"another secret", GITHUB_BODY, GITHUB_SIGNATURE, "invalid"),
        (GITHUB_SECRET, GITHUB_BODY, GITHUB_SIGNATURE[:-1], "invalid"),
        (GITHUB_SECRET, GITHUB_BODY, GITHUB_SIGNATURE[7:], "not sha256"),
        (GITHUB_SECRET, GITHUB_BODY, b"sha1=" + GITHUB_SIGNATURE[7:], "not sha256"),
        (GITHUB_SECRET, GITHUB_BODY, b"sha256=", "not sha256"),
        (GITHUB_SECRET, GITHUB_BODY, b"sha256=\xff\xfe", "invalid"),
    ],
)
def test_github_refused(secret: bytes, body: bytes, header: bytes | None, reason: str) -> None:
    with pytest.raises(Unauthorized) as e:
        verify_github_signature(secret, body, header)
    assert reason in e.value.reason
    assert e.value.code == 401


def test_github_empty_secret_is_a_config_error() -> None:
    signature = b"sha256=" + hmac.new(b"", GITHUB_BODY, hashlib.sha256).hexdigest().encode()
    with pytest.raises(ConfigError):
        verify_github_signature(b"", GITHUB_BODY, signature)


@given(st.binary(min_size=1, max_size=64), st.binary(max_size=200), st.binary(min_size=1,
                                                                              max_size=4))
def test_github_signature_binds_body(secret: bytes, body: bytes, extra: bytes) -> None:
    header = b"sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest().encode()
    verify_github_signature(secret, body, header)
    with pytest.raises(Unauthorized):
        verify_github_signature(secret, body + extra, header)


# -- load_token -----------------------------------------------------------------------------------


def test_load_token_sources(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("from-file\n")
    env = {TOKEN_ENV: "from-env"}
    assert load_token("from-flag", None, env) == "from-flag"
    assert load_token(None, str(token_file), env) == "from-file"
    assert load_token(None, None, env) == "from-env"
    assert load_token(None, None, {}) is None
    assert load_token("", "", {TOKEN_ENV: ""}) is None


@pytest.mark.parametrize("content", [b"tok\n", b"tok\r\n", b"tok", b"tok\n\n"])
def test_load_token_file_strips_trailing_newline(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "token"
    path.write_bytes(content)
    assert load_token(None, str(path), {}) == "tok"


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "empty"),
        (b"\n", "empty"),
        (b"two words\n", "whitespace"),
        (b" tok\n", "whitespace"),
        (b"\xff\xfe", "not UTF-8"),
    ],
)
def test_load_token_bad_file(tmp_path: Path, content: bytes, words: str) -> None:
    path = tmp_path / "token"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_token(None, str(path), {})
    assert words in str(e.value)
    assert str(path) in str(e.value)


def test_load_token_unreadable_file(tmp_path: Path) -> None:
    for path, words in ((tmp_path / "missing", "No such file"), (tmp_path, "directory")):
        with pytest.raises(ConfigError) as e:
            load_token(None, str(path), {TOKEN_ENV: "from-env"})
        message = str(e.value)
        assert f"cannot read the webhook token file {path}" in message
        assert words in message


def test_load_token_flag_and_file_conflict(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("x")
    with pytest.raises(ConfigError):
        load_token("y", str(path), {})


def test_load_token_refuses_whitespace_inline() -> None:
    with pytest.raises(ConfigError):
        load_token("a b", None, {})
    with pytest.raises(ConfigError) as e:
        load_token(None, None, {TOKEN_ENV: "a\tb"})
    assert TOKEN_ENV in str(e.value)
    assert "a\tb" not in str(e.value)


# -- peer -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address, expected",
    [
        (IPv4Address("TCP", "10.1.2.3", 4567), "10.1.2.3:4567"),
        (IPv6Address("TCP", "::1", 8080), "[::1]:8080"),
        (UNIXAddress(b"/run/deployer.sock"), "unix:/run/deployer.sock"),
        (UNIXAddress(None), "unix:?"),
        (None, "unknown"),
    ],
)
def test_peer(address: Any, expected: str) -> None:
    req = DummyRequest([b""])
    req.client = address
    assert peer(req) == expected


# -- over real HTTP -------------------------------------------------------------------------------


class Guarded(Resource):
    isLeaf = True

    def __init__(self, auth: TokenAuth) -> None:
        super().__init__()
        self.auth = auth
        self.peers: list[str] = []

    def render_POST(self, request: Any) -> bytes:
        self.peers.append(peer(request))
        try:
            self.auth.check(request)
        except Unauthorized as e:
            request.setResponseCode(e.code)
            return e.reason.encode()
        return b"ok"


@pytest.fixture
def guarded() -> Iterator[tuple[str, Guarded]]:
    resource = Guarded(TokenAuth(["real-token"]))
    port = reactor.listenTCP(0, Site(resource), interface="127.0.0.1")
    yield f"http://127.0.0.1:{port.getHost().port}/hook", resource
    pytest_twisted.blockon(port.stopListening())


@pytest_twisted.ensureDeferred
async def test_over_real_http(guarded: tuple[str, Guarded]) -> None:
    url, resource = guarded
    pool = HTTPConnectionPool(reactor, persistent=False)
    http = HTTPClient(Agent(reactor, pool=pool))
    cases: list[tuple[dict[str, Any], int, bytes]] = [
        ({"headers": {"Authorization": "Bearer real-token"}}, 200, b"ok"),
        ({"headers": {"Authorization": "Token real-token"}}, 200, b"ok"),
        ({"auth": ("deployer", "real-token")}, 200, b"ok"),
        ({"params": {"token": "real-token"}}, 200, b"ok"),
        ({}, 401, b"missing token"),
        ({"headers": {"Authorization": "Bearer nope"}}, 401, b"invalid token"),
        ({"params": {"token": "real-tokenx"}}, 401, b"invalid token"),
    ]
    try:
        for kwargs, code, body in cases:
            response = await http.post(url, data=b"{}", **kwargs)
            assert (response.code, await response.content()) == (code, body), kwargs
    finally:
        await pool.closeCachedConnections()
    assert len(resource.peers) == len(cases)
    assert all(p.startswith("127.0.0.1:") for p in resource.peers)
