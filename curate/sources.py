"""Find a builder's input files: a local folder (`--source`), or the canonical upstream URLs.

Downloads land in a cache (``$CURATE_CACHE`` or ``~/.cache/curate/sources``) keyed by URL, so a rebuild
does not fetch twice. Dropped connections, timeouts, 408/429 and 5xx answers are retried with exponential
backoff (``$CURATE_DOWNLOAD_RETRIES`` retries, default 4; first wait ``$CURATE_DOWNLOAD_BACKOFF_S``, default
1 s, doubling up to 8 s; a ``Retry-After`` is honoured up to 30 s). The manifest records each file's location
and sha256 either way.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tarfile
import time
import urllib.parse
from pathlib import Path

import httpx
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from curate.errors import CurateError
from curate.store import SourceFile


def cache_dir() -> Path:
    d = Path(os.environ.get("CURATE_CACHE", Path.home() / ".cache" / "curate")) / "sources"
    d.mkdir(parents=True, exist_ok=True)
    return d


def is_url(s: str | os.PathLike[str]) -> bool:
    return str(s).startswith(("http://", "https://"))


RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})
log = logging.getLogger(__name__)


def download(url: str, *, retries: int | None = None, backoff_s: float | None = None) -> Path:
    """Fetch `url` into the cache (atomically) and return the local path; transient failures are retried.

    Any failure that remains is one `CurateError` line naming the URL.
    """
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    dest = cache_dir() / hashlib.sha256(url.encode()).hexdigest()[:16] / urllib.parse.unquote(name)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    retries = int(os.environ.get("CURATE_DOWNLOAD_RETRIES", 4)) if retries is None else retries
    wait = float(os.environ.get("CURATE_DOWNLOAD_BACKOFF_S", 1.0)) if backoff_s is None else backoff_s
    # A hand-written loop, not huggingface_hub's http_backoff: its session refuses every URL while
    # HF_HUB_OFFLINE is set, and these are GitHub/university URLs, not the Hub.
    for attempt in range(retries + 1):
        last = attempt == retries
        try:
            _fetch(url, tmp, name)
            break
        except _Retry as e:
            tmp.unlink(missing_ok=True)
            if last:
                raise CurateError(f"could not download {url}: {e.reason} (after {retries + 1} attempts)") from None
            pause = min(e.retry_after, 30.0) if e.retry_after is not None else wait
            log.warning("download %s: %s; retrying in %.1f s (%d/%d)", url, e.reason, pause, attempt + 1, retries)
            time.sleep(pause)
            wait = min(wait * 2, 8.0)
        except httpx.HTTPError as e:
            tmp.unlink(missing_ok=True)
            raise CurateError(f"could not download {url}: {e}") from None
    tmp.replace(dest)
    return dest


class _Retry(Exception):
    """A transient failure: worth another attempt."""

    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.reason, self.retry_after = reason, retry_after


# getaddrinfo's answers for a host name that does not resolve (glibc, musl/BSD)
UNKNOWN_HOST = ("Name or service not known", "nodename nor servname provided", "No address associated with hostname")


def _fetch(url: str, tmp: Path, name: str) -> None:
    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=60) as r:
            if r.status_code in RETRY_STATUS:
                after = r.headers.get("retry-after", "")
                raise _Retry(f"HTTP {r.status_code}", float(after) if after.isdigit() else None)
            if r.status_code >= 400:
                raise CurateError(f"could not download {url}: HTTP {r.status_code}")
            total = int(r.headers.get("content-length", 0)) or None
            with Progress(BarColumn(), DownloadColumn(), TransferSpeedColumn(), transient=True) as bar, \
                    open(tmp, "wb") as f:
                task = bar.add_task(name, total=total)
                for chunk in r.iter_bytes():
                    f.write(chunk)
                    bar.advance(task, len(chunk))
    except httpx.ConnectError as e:
        if any(m in str(e) for m in UNKNOWN_HOST):  # no network or a typo: waiting will not help
            raise CurateError(f"could not download {url}: cannot resolve {httpx.URL(url).host} (offline? give a local "
                              f"folder with --source)") from None
        raise _Retry(f"{type(e).__name__}: {e}") from None
    except httpx.TransportError as e:  # refused, reset, timed out, cut off mid-body
        raise _Retry(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__) from None


def fetch_tree(url: str) -> Path:
    """Download a tarball and unpack it once; returns the unpacked folder."""
    archive = download(url)
    out = archive.parent / "unpacked"
    if not out.exists():
        tmp = archive.parent / "unpacked.part"
        with tarfile.open(archive) as tf:
            tf.extractall(tmp, filter="data")
        tmp.rename(out)
    return out


def resolve_files(
    source: str | os.PathLike[str], names: list[str], upstream: dict[str, str]
) -> dict[str, tuple[Path, str]]:
    """Map each wanted file name to (local path, recorded location).

    ``source`` is a folder, or ``"upstream"`` to use the ``upstream`` name → URL map.
    Missing files are simply absent from the result: the builder decides whether that is fatal.
    """
    out: dict[str, tuple[Path, str]] = {}
    if str(source) == "upstream":
        for n in names:
            if n in upstream:
                out[n] = (download(upstream[n]), upstream[n])
        return out
    folder = Path(source).expanduser()
    if not folder.is_dir():
        raise CurateError(f"--source {folder} is not a folder (give the folder holding the CSV files, or 'upstream')")
    for n in names:
        p = folder / n
        if p.is_file():
            out[n] = (p, str(p.resolve()))
    return out


def source_record(path: Path, location: str) -> SourceFile:
    return SourceFile.from_path(path, location)
