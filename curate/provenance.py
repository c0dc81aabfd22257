"""Facts about how a version was made that go into its manifest: time, toolkit version, git commit."""

from __future__ import annotations

import datetime as dt
import subprocess
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()


@cache
def toolkit_info() -> dict[str, Any]:
    try:
        version = metadata.version("ethics-curate")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    commit = dirty = None
    if not _is_toolkit_checkout(REPO_ROOT):  # an installed wheel: any git repo around it is someone else's
        return {"package": "ethics-curate", "version": version, "git_commit": None, "git_dirty": None}
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True, text=True, check=True,
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"package": "ethics-curate", "version": version, "git_commit": commit, "git_dirty": dirty}


def _is_toolkit_checkout(root: Path) -> bool:
    """True when `root` is this project's own source tree (its pyproject names the distribution)."""
    try:
        return (root / ".git").exists() and 'name = "ethics-curate"' in (root / "pyproject.toml").read_text()
    except OSError:
        return False
