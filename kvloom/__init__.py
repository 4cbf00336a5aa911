"""kvloom: a small, exact LLM inference engine on PyTorch.

The names below load on first use (PEP 562), so that `import kvloom.cli` can start work (a first start's
kernel compile) before torch is imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvloom.engine import LLMEngine
    from kvloom.llm import LLM
    from kvloom.outputs import CompletionOutput, RequestOutput, RequestOutputKind
    from kvloom.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = [
    "LLM",
    "LLMEngine",
    "SamplingParams",
    "StructuredOutputsParams",
    "RequestOutput",
    "RequestOutputKind",
    "CompletionOutput",
]
__version__ = "0.1.0"

_WHERE = {
    "LLM": "kvloom.llm",
    "LLMEngine": "kvloom.engine",
    "SamplingParams": "kvloom.sampling_params",
    "StructuredOutputsParams": "kvloom.sampling_params",
    "RequestOutput": "kvloom.outputs",
    "RequestOutputKind": "kvloom.outputs",
    "CompletionOutput": "kvloom.outputs",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kvloom' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
