"""Model registry: transformers ``model_type`` -> model class. One family per file."""

from __future__ import annotations

from kvloom.models.bitnet import BitNetForCausalLM
from kvloom.models.gemma3 import Gemma3ForCausalLM
from kvloom.models.llama import LlamaForCausalLM
from kvloom.models.mistral import MistralForCausalLM
from kvloom.models.mixtral import MixtralForCausalLM
from kvloom.models.olmoe import OlmoeForCausalLM
from kvloom.models.phi3 import Phi3ForCausalLM
from kvloom.models.qwen2 import Qwen2ForCausalLM
from kvloom.models.qwen2_moe import Qwen2MoeForCausalLM
from kvloom.models.qwen3 import Qwen3ForCausalLM
from kvloom.models.qwen3_moe import Qwen3MoeForCausalLM

MODEL_REGISTRY: dict[str, type[LlamaForCausalLM]] = {
    "bitnet": BitNetForCausalLM,
    "gemma3_text": Gemma3ForCausalLM,
    "llama": LlamaForCausalLM,
    "mistral": MistralForCausalLM,
    "mixtral": MixtralForCausalLM,
    "olmoe": OlmoeForCausalLM,
    "phi3": Phi3ForCausalLM,
    "qwen2": Qwen2ForCausalLM,
    "qwen2_moe": Qwen2MoeForCausalLM,
    "qwen3": Qwen3ForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
}


def get_model_class(model_type: str) -> type[LlamaForCausalLM]:
    if model_type not in MODEL_REGISTRY:
        raise ValueError(
            f"model: unsupported architecture {model_type!r} (supported: {', '.join(sorted(MODEL_REGISTRY))})"
        )
    return MODEL_REGISTRY[model_type]
