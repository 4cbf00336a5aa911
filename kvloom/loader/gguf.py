"""GGUF files, read with the ``gguf`` package: config and tensors (dequantized to the run dtype for now)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

# GGUF architecture -> transformers model_type
_ARCHS = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "mistral": "mistral"}

# GGUF tensor name pieces -> Hugging Face parameter name pieces
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


class GGUFFile:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.reader = GGUFReader(path)
        self.arch = self.field("general.architecture")
        if self.arch not in _ARCHS:
            raise ValueError(
                f"model: unsupported GGUF architecture {self.arch!r} (supported: {', '.join(_ARCHS)})"
            )

    def field(self, key: str, default=None):  # noqa: ANN001, ANN201 - GGUF values are str/int/float/list
        f = self.reader.fields.get(key)
        return default if f is None else f.contents()

    def hf_config(self):  # noqa: ANN201 - transformers.PretrainedConfig
        from transformers import AutoConfig

        a = self.arch
        n_heads = self.field(f"{a}.attention.head_count")
        hidden = self.field(f"{a}.embedding_length")
        tensor_names = {t.name for t in self.reader.tensors}
        vocab = self.field(f"{a}.vocab_size") or len(self.reader.fields["tokenizer.ggml.tokens"].data)
        rope: dict = {"rope_type": "default", "rope_theta": float(self.field(f"{a}.rope.freq_base", 10000.0))}
        scaling = self.field(f"{a}.rope.scaling.type")
        if scaling == "linear":
            rope.update(rope_type="linear", factor=float(self.field(f"{a}.rope.scaling.factor")))
        elif scaling not in (None, "none"):
            raise ValueError(f"model: GGUF rope scaling {scaling!r} is not supported yet")
        if "rope_freqs.weight" in tensor_names:
            raise ValueError("model: GGUF files with rope_freqs (Llama 3.1 scaling) are not supported yet")
        kwargs = dict(
            vocab_size=int(vocab),
            hidden_size=int(hidden),
            intermediate_size=int(self.field(f"{a}.feed_forward_length")),
            num_hidden_layers=int(self.field(f"{a}.block_count")),
            num_attention_heads=int(n_heads),
            num_key_value_heads=int(self.field(f"{a}.attention.head_count_kv", n_heads)),
            head_dim=int(self.field(f"{a}.attention.key_length", hidden // n_heads)),
            max_position_embeddings=int(self.field(f"{a}.context_length", 2048)),
            rms_norm_eps=float(self.field(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)),
            rope_parameters=rope,
            tie_word_embeddings="output.weight" not in tensor_names,
            bos_token_id=self.field("tokenizer.ggml.bos_token_id"),
            eos_token_id=self.field("tokenizer.ggml.eos_token_id"),
        )
        if self.field(f"{a}.attention.sliding_window") is not None:
            kwargs["sliding_window"] = int(self.field(f"{a}.attention.sliding_window"))
        return AutoConfig.for_model(_ARCHS[a], **kwargs)

    def iter_tensors(self, hf_config, dtype: torch.dtype, keep_quantized: bool = False) -> Iterator[tuple]:  # noqa: ANN001
        from kvloom.layers.quantization import GGUF_NATIVE, from_gguf

        tied = getattr(hf_config, "tie_word_embeddings", False)
        for t in self.reader.tensors:
            name = _hf_name(t.name)
            if name is None:
                continue
            rows, cols = (int(d) for d in reversed(t.shape)) if len(t.shape) == 2 else (0, 0)
            native = keep_quantized and t.tensor_type in GGUF_NATIVE and len(t.shape) == 2
            if native and (
                name.endswith("_proj.weight")
                or name == "lm_head.weight"
                or tied
                and name.endswith("embed_tokens.weight")
            ):
                qw = from_gguf(t.tensor_type, t.data, rows, cols)
                if self.arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
                    kv = t.name.endswith("attn_k.weight")
                    n_head = hf_config.num_key_value_heads if kv else hf_config.num_attention_heads
                    qw = qw.permute_rows(lambda a, n=n_head: _unpermute_rope_rows(a, n))
                if name.endswith("embed_tokens.weight"):
                    # Tied: the output layer runs on the file's quantized embedding; the lookup table
                    # itself is dense (one row read per token).
                    yield "lm_head.weight", qw
                    yield name, qw.dequantize(dtype)
                    continue
                yield name, qw
                continue
            if t.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                array = np.asarray(t.data, dtype=np.float32)
            else:
                array = dequantize(t.data, t.tensor_type)
            # GGUF lists dims fastest-first; numpy data is already [rows, cols] in torch order.
            array = array.reshape([int(d) for d in reversed(t.shape)])
            if self.arch == "llama" and t.name.endswith(("attn_q.weight", "attn_k.weight")):
                kv = t.name.endswith("attn_k.weight")
                n_head = hf_config.num_key_value_heads if kv else hf_config.num_attention_heads
                array = _unpermute_rope_rows(array, n_head)
            # NOTE: F32 tensors are read-only views of the memory-mapped file; torch wants its own copy.
            array = np.ascontiguousarray(array) if array.flags.writeable else array.copy()
            yield name, torch.from_numpy(array).to(dtype)


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def _unpermute_rope_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's conversion-time permutation of q/k rows (interleaved -> half-split rotary)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
