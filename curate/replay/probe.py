"""Recognise a replay server from the client side, so replayed builds are labelled and cached apart."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

import httpx

from curate.urls import redact_url, split_credentials

logger = logging.getLogger(__name__)
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


def replay_sources(base_url: str, timeout: float = 2.0) -> list[dict[str, Any]] | None:
    """The recording files (location, sha256, bytes) a replay server at ``base_url`` answers from, or None.

    Only loopback endpoints are asked (``GET <base_url>/replay``): a remote provider never gets an extra
    request, and no credentials are sent with the probe.
    """
    bare, _, _ = split_credentials(base_url)
    if (urlsplit(bare).hostname or "") not in LOOPBACK:
        return None
    try:
        resp = httpx.get(bare.rstrip("/") + "/replay", timeout=timeout)
    except httpx.HTTPError as e:
        logger.debug("no replay server at %s: %s", redact_url(bare), type(e).__name__)
        return None
    if resp.status_code != 200:
        return None
    try:
        body = resp.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or body.get("object") != "replay" or not isinstance(body.get("sources"), list):
        return None
    return [{"location": str(s["location"]), "sha256": str(s["sha256"]), "bytes": int(s["bytes"])}
            for s in body["sources"]]
