"""Find a builder's input files: a local folder (`--source`), or the canonical upstream URLs.

Downloads land in a cache (``$CURATE_CACHE`` or ``~/.cache/curate/sources``) keyed by URL, so a rebuild
does not fetch twice. The manifest records each file's location and sha256 either way.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
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


def download(url: str) -> Path:
    """Fetch `url` into the cache (atomically) and return the local path."""
    name = Path(urllib.parse.urlparse(url).path).name or "download"
    dest = cache_dir() / hashlib.sha256(url.encode()).hexdigest()[:16] / urllib.parse.unquote(name)
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".part")
    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=60) as r:
            r.raise_for_status()
            total = int(r.headers.get("content-length", 0)) or None
            with Progress(BarColumn(), DownloadColumn(), TransferSpeedColumn(), transient=True) as bar, \
                    open(tmp, "wb") as f:
                task = bar.add_task(name, total=total)
                for chunk in r.iter_bytes():
                    f.write(chunk)
                    bar.advance(task, len(chunk))
    except httpx.HTTPError as e:
        tmp.unlink(missing_ok=True)
        raise CurateError(f"could not download {url}: {e}") from None
    tmp.replace(dest)
    return dest


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
