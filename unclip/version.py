"""Version and source revision recorded in every checkpoint."""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

from unclip import __version__


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the source tree unclip runs from, or None outside a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def version_info() -> dict:
    return {"version": __version__, "git_commit": git_commit()}
