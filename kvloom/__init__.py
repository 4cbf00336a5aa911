"""kvloom: a small, exact LLM inference engine on PyTorch."""

from kvloom.engine import LLMEngine
from kvloom.llm import LLM
from kvloom.outputs import CompletionOutput, RequestOutput
from kvloom.sampling_params import SamplingParams

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
