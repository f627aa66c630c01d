"""Files the package reads or serves: found inside the wheel, or at the repo root in a checkout."""

from __future__ import annotations

from pathlib import Path

_PACKAGED = Path(__file__).parent / "_data"
_REPO = Path(__file__).resolve().parent.parent


def resource_path(relative: str) -> Path:
    """Path of ``lua/presence.lua``, ``http/openapi.yaml``, ``gateway/...`` in any install."""
    for base in (_PACKAGED, _REPO):
        path = base / relative
        if path.exists():
            return path
    raise FileNotFoundError(f"{relative} is neither in {_PACKAGED} nor in {_REPO}")
