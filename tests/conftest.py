from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def stories_path() -> Path:
    """The real 1 MB TinyStories Llama in ../shared (never copied into the repo)."""
    return Path(os.environ.get("KVLOOM_STORIES", REPO.parent / "shared" / "models" / "stories260K"))


@pytest.fixture(scope="session")
def stories() -> Path:
    path = stories_path()
    if not (path / "config.json").is_file():
        pytest.fail(f"stories260K not found at {path}; set KVLOOM_STORIES")
    return path


@pytest.fixture(scope="session")
def stories_llm(stories):
    from kvloom import LLM

    return LLM(str(stories), dtype="float32", show_progress=False)
