"""Atomic writes: a reader (or a crash) sees the old file or the complete new one, never a half-written one.

Every "write to a temp name, then rename" in the toolkit goes through here, so the temp names, the fsyncs
and the clean-up on failure are the same everywhere. The temp file sits in the destination's own folder
(a rename is only atomic within one file system) and is named ``.<name>.tmp-<hex>`` so that stale ones
are recognisable (`is_temp_name`).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_MARK = ".tmp-"


def temp_sibling(dest: str | os.PathLike[str]) -> Path:
    """A fresh temp name beside `dest` (same folder, so the final rename is atomic)."""
    dest = Path(dest)
    return dest.with_name(f".{dest.name}{TMP_MARK}{uuid.uuid4().hex}")


def is_temp_name(name: str) -> bool:
    """True for names made by `temp_sibling` (and the store's `.tmp-<hex>` version folders)."""
    return name.startswith(".") and TMP_MARK in name


def _fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's entry list is what makes a rename durable); best effort on
    platforms that cannot open folders (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(folder: str | os.PathLike[str]) -> None:
    """fsync every file and folder under `folder` (before renaming it into place)."""
    folder = Path(folder)
    for dirpath, _dirnames, filenames in os.walk(folder):
        for f in filenames:
            p = Path(dirpath) / f
            if not p.is_symlink():
                _fsync_path(p)
        _fsync_path(Path(dirpath))


@contextmanager
def atomic_path(dest: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside `dest` for any writer (``pq.write_table(t, tmp)``, ``tar.extractall(tmp)``...).

    On a clean exit the temp file is fsynced and ``os.replace``d onto `dest`; on an exception it is removed
    and `dest` is untouched. A folder written there replaces only a missing or empty `dest` (POSIX rename
    rules); to place a folder that must never overwrite anything use `atomic_place_dir`.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(dest)
    try:
        yield tmp
        if tmp.is_dir():
            fsync_tree(tmp)
        else:
            _fsync_path(tmp)
        os.replace(tmp, dest)
        _fsync_path(dest.parent)
    except BaseException:
        _remove(tmp)
        raise


def atomic_write_bytes(dest: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `dest` atomically; returns `dest`."""
    with atomic_path(dest) as tmp, open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(dest)


def atomic_write_text(dest: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `dest` atomically (UTF-8 by default, whatever the locale); returns `dest`."""
    return atomic_write_bytes(dest, text.encode(encoding))


def atomic_write_json(dest: str | os.PathLike[str], obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
                      default: Any = None) -> Path:
    """Write `obj` as JSON (plus a final newline) to `dest` atomically; returns `dest`."""
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default, ensure_ascii=False) + "\n"
    return atomic_write_text(dest, text)


def atomic_place_dir(src: str | os.PathLike[str], dest: str | os.PathLike[str]) -> Path:
    """Move a complete folder `src` to `dest` in one rename (after fsyncing its contents).

    `src` must be on the same file system as `dest` (build it beside `dest`). Raises `FileExistsError` when
    `dest` already exists (a non-empty folder or a file), so a complete version is never overwritten.
    """
    src, dest = Path(src), Path(dest)
    fsync_tree(src)
    if dest.exists() or dest.is_symlink():
        raise FileExistsError(f"{dest} already exists")
    os.rename(src, dest)
    _fsync_path(dest.parent)
    return dest


def _remove(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
