"""Who may call the webhooks: shared tokens, GitHub signatures, and where tokens come from.

A token is accepted in any of these forms, so that every registry can send one:

- ``Authorization: Bearer TOKEN`` (our own API, the ``trigger`` command, Distribution's
  ``notifications.endpoints[].headers``, Harbor's "Auth Header" set to ``Bearer TOKEN``);
- ``Authorization: Token TOKEN`` (the same, for tools that say Token);
- ``Authorization: Basic base64(USER:TOKEN)``: the token is the password and the user name is
  not looked at (URLs of the form ``https://deployer:TOKEN@host/...``);
- ``?token=TOKEN`` in the query string, for senders that can be given nothing but a URL
  (Docker Hub, Quay). Such URLs end up in access logs: prefer a header where there is a choice.

Tokens are compared in constant time against every configured token, and never logged.
"""

from __future__ import annotations

import binascii
import hashlib
import hmac
from base64 import b64decode
from collections.abc import Mapping, Sequence
from urllib.parse import parse_qs, urlsplit

import attrs
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.web.iweb import IRequest

from deployer.errors import ConfigError, Unauthorized

TOKEN_ENV = "DEPLOYER_WEBHOOK_TOKEN"

_MAX_CANDIDATES = 8


@attrs.frozen
class SecretSource:
    """One kind of secret: ``what`` it is (for messages), the environment variable ``env`` read
    when neither flag gives it, and ``spaces`` when it may hold spaces (a key that is never
    sent, unlike a token)."""

    what: str
    env: str
    spaces: bool = False


WEBHOOK_TOKEN = SecretSource("webhook token", TOKEN_ENV)
GITHUB_SECRET = SecretSource("GitHub webhook secret", "DEPLOYER_GITHUB_SECRET", spaces=True)


def _check_secret(secret: str, what: str, where: str, spaces: bool = False) -> str:
    if not secret:
        raise ConfigError(f"the {what} from {where} is empty")
    if not secret.isprintable():
        raise ConfigError(f"the {what} from {where} contains control characters")
    if not spaces and any(c.isspace() for c in secret):
        raise ConfigError(f"the {what} from {where} contains whitespace")
    return secret


def _encode_tokens(tokens: Sequence[str]) -> tuple[bytes, ...]:
    if isinstance(tokens, str):
        raise TypeError("tokens must be a sequence of strings, not one string")
    return tuple(
        _check_secret(t, WEBHOOK_TOKEN.what, "the configuration").encode("utf-8") for t in tokens
    )


@attrs.frozen
class TokenAuth:
    """Accepts requests that carry one of ``tokens``; with no tokens at all, every request.

    Running without tokens is the caller's explicit choice (an insecure mode); see
    :attr:`insecure`.
    """

    tokens: tuple[bytes, ...] = attrs.field(converter=_encode_tokens, repr=False)

    @property
    def insecure(self) -> bool:
        return not self.tokens

    def check(self, request: IRequest) -> None:
        """Return if ``request`` carries a configured token, else raise Unauthorized."""
        if self.insecure:
            return
        candidates = _candidates(request)
        if not candidates:
            raise Unauthorized("missing token")
        accepted = False
        for candidate in candidates:
            for token in self.tokens:
                # Every comparison is made, whatever the outcome of the others.
                accepted |= hmac.compare_digest(candidate, token)
        if not accepted:
            raise Unauthorized("invalid token")


def _candidates(request: IRequest) -> list[bytes]:
    """Every token that ``request`` offers, in the forms listed in the module's docs."""
    found: list[bytes] = []
    for value in request.requestHeaders.getRawHeaders(b"authorization", [])[:_MAX_CANDIDATES]:
        scheme, _, credentials = value.strip().partition(b" ")
        scheme = scheme.lower()
        credentials = credentials.strip()
        if scheme in (b"bearer", b"token") and credentials:
            found.append(credentials)
        elif scheme == b"basic" and credentials:
            try:
                decoded = b64decode(credentials, validate=True)
            except (binascii.Error, ValueError):
                continue
            _user, colon, password = decoded.partition(b":")
            if colon and password:
                found.append(password)
    query = urlsplit(request.uri).query.decode("ascii", "replace")
    if query:
        try:
            args = parse_qs(query, max_num_fields=64, encoding="utf-8", errors="strict")
        except ValueError:  # too many fields, or a value that is not UTF-8
            args = {}
        found.extend(value.encode("utf-8") for value in args.get("token", [])[:_MAX_CANDIDATES])
    return found


def verify_github_signature(secret: bytes, body: bytes, header: bytes | None) -> None:
    """Check ``X-Hub-Signature-256: sha256=<hex HMAC-SHA256(secret, body)>``.

    Raises Unauthorized when the header is missing or does not match, and ConfigError when the
    secret is empty (anyone could sign with an empty key).
    """
    if not secret:
        raise ConfigError("the GitHub webhook secret is empty")
    if not header:
        raise Unauthorized("missing X-Hub-Signature-256 header")
    algorithm, _, signature = header.strip().partition(b"=")
    if algorithm.lower() != b"sha256" or not signature:
        raise Unauthorized("X-Hub-Signature-256 is not sha256=<hex>")
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest().encode("ascii")
    if not hmac.compare_digest(expected, signature.lower()):
        raise Unauthorized("invalid X-Hub-Signature-256 signature")


def load_secret(
    source: SecretSource, flag_value: str | None, file_path: str | None,
    environ: Mapping[str, str],
) -> str | None:
    """The secret from the flag, the file or the environment variable, in that order; None
    when none of them is set (an empty value counts as not set).

    The file's trailing newline is stripped. Giving both the flag and the file is an error, as
    are an unreadable or empty file and a secret with control characters (or whitespace, unless
    ``source.spaces``).
    """
    what, spaces = source.what, source.spaces
    if flag_value and file_path:
        raise ConfigError(f"give the {what} either inline or as a file, not both")
    if flag_value:
        return _check_secret(flag_value, what, "the command line", spaces)
    if file_path:
        try:
            with open(file_path, "rb") as f:
                raw = f.read(64 * 1024)
        except OSError as e:
            raise ConfigError(
                f"cannot read the {what} file {file_path}: {e.strerror or e}"
            ) from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigError(f"the {what} file {file_path} is not UTF-8") from None
        return _check_secret(text.rstrip("\r\n"), what, f"the file {file_path}", spaces)
    value = environ.get(source.env)
    if value:
        return _check_secret(value, what, f"${source.env}", spaces)
    return None


def load_token(
    flag_value: str | None, file_path: str | None, environ: Mapping[str, str]
) -> str | None:
    """The webhook token from ``--webhook_token``, ``--webhook_token_file`` or
    ``$DEPLOYER_WEBHOOK_TOKEN`` (see :func:`load_secret`)."""
    return load_secret(WEBHOOK_TOKEN, flag_value, file_path, environ)


def peer(request: IRequest) -> str:
    """The address of the caller, for logs (``host:port``, ``[v6]:port`` or ``unix:path``)."""
    address = request.getClientAddress()
    if isinstance(address, IPv4Address):
        return f"{address.host}:{address.port}"
    if isinstance(address, IPv6Address):
        return f"[{address.host}]:{address.port}"
    if isinstance(address, UNIXAddress):
        name = address.name
        text = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
        return f"unix:{text or '?'}"
    return "unknown"
