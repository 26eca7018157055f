"""Where recipes are found: as given, or relative to the repository (shared by the CLI and the demo)."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def find_recipe(name: str) -> Path:
    """A recipe path as given, or relative to the repository (so ``prefopt demo`` works from any directory)."""
    path = Path(name)
    if path.is_file():
        return path
    candidate = REPO_ROOT / name
    return candidate if candidate.is_file() else path
