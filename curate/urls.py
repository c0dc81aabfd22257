"""One place that decides what part of an endpoint URL may be written down (manifests, cards, caches, logs).

A base URL can carry credentials: ``http://user:password@host/v1`` or ``...?api_key=...``. Every URL the
toolkit records goes through `redact_url`, so a secret given on the command line never reaches a file.
"""

from __future__ import annotations

import re
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "REDACTED"
# Query parameters whose value is a credential (matched case-insensitively, `-` and `_` ignored).
_SECRET_PARAM = re.compile(
    r"^(x)?(api)?(key|keys|token|tokens|secret|password|passwd|pwd|auth|authorization|signature|sig|"
    r"accesstoken|apikey|accesskey|secretkey|clientsecret|sessiontoken|bearer|credential|credentials)$"
)


def is_secret_param(name: str) -> bool:
    """True for query parameter names that carry credentials (``api_key``, ``key``, ``token``, ``sig``...)."""
    return bool(_SECRET_PARAM.match(name.lower().replace("-", "").replace("_", "")))


def redact_url(url: str | None) -> str | None:
    """``url`` without userinfo, credential-like query parameters or fragment.

    ``http://u:pw@host:8000/v1?api_key=x&v=2`` -> ``http://host:8000/v1?v=2``. The result identifies the
    endpoint (it is part of response-cache keys), so the same server with other credentials gives the same
    text. Text that is not a URL with a scheme and host (a local path) is returned unchanged; ``None`` stays
    ``None``.
    """
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname
        port = parts.port
    except ValueError:  # an unparseable URL (bad port, broken IPv6): keep only what cannot hold a secret
        return REDACTED
    if not parts.scheme or not parts.netloc:
        return url
    netloc = host or ""
    if ":" in netloc:  # IPv6 literal
        netloc = f"[{netloc}]"
    if port is not None:
        netloc += f":{port}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, v) for k, v in pairs if not is_secret_param(k)], safe="/:,")
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))  # fragments never reach a server


def split_credentials(url: str) -> tuple[str, tuple[str, str] | None, dict[str, str]]:
    """(url without userinfo and query, (user, password) from the userinfo, query parameters).

    The LLM client hands the SDK the bare URL and passes the rest as HTTP basic auth and default query
    parameters, so HTTP-level logs and error messages only ever see the bare URL.
    """
    parts = urlsplit(url)
    auth = None
    if parts.username is not None or parts.password is not None:
        from urllib.parse import unquote

        auth = (unquote(parts.username or ""), unquote(parts.password or ""))
    netloc = parts.netloc.rpartition("@")[2]
    query = dict(parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")), auth, query
