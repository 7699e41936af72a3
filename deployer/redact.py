"""What no log line shows: the one masking of query strings, shared by the access log
(:mod:`deployer.site`) and the log observers (:mod:`deployer.logs`)."""

from __future__ import annotations

REDACTED = "***"


def masked_query(query: str) -> str:
    """A query string for logs: every value masked (``token=***``), and a part without a
    value too (``***``: ``?SECRET`` may be the secret itself). Masking twice changes nothing."""
    parts = []
    for part in query.split("&"):
        if part:
            key, equals, _ = part.partition("=")
            parts.append(key + "=" + REDACTED if equals else REDACTED)
    return "&".join(parts)
