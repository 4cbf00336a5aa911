"""Chat templates kvloom ships (``--chat-template NAME``; a family's default where its files have none)."""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def names() -> list[str]:
    return sorted(p.stem for p in FOLDER.glob("*.jinja"))


def read(name: str) -> str | None:
    """The text of kvloom's template ``name``, or None if there is none of that name."""
    path = FOLDER / f"{name}.jinja"
    return path.read_text() if path.is_file() else None
