"""The user cache folder where loaders keep converted weights and tokenised corpora."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """A folder under the user cache (`$TL_DEGENERACY_CACHE`, else `~/.cache/tl_degeneracy`),
    created if missing."""
    root = os.environ.get("TL_DEGENERACY_CACHE") or Path.home() / ".cache" / "tl_degeneracy"
    path = Path(root).expanduser().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
