"""Write a transformers model (Llama, Mixtral, Qwen3 / Qwen3-MoE) as a GGUF file the way llama.cpp's
conversion does (llama q/k rows permuted, rope_freqs for Llama 3 rope scaling, each layer's experts in one
3-D tensor), with the default model's byte-level tokenizer."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

_LAYER = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate": "ffn_gate_inp",
    "self_attn.attn_sub_norm": "attn_sub_norm",  # BitNet
    "mlp.ffn_sub_norm": "ffn_sub_norm",
}
_EXPERTS = {
    "ffn_gate_exps": ("w1", "gate_proj"),
    "ffn_up_exps": ("w3", "up_proj"),
    "ffn_down_exps": ("w2", "down_proj"),
}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order for its interleaved rotary."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(config) -> np.ndarray:  # noqa: ANN001
    """rope_freqs as llama.cpp's conversion computes it from a llama3 rope config."""
    p = config.rope_parameters
    head_dim = config.head_dim
    freqs = 1.0 / (p["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old = p["original_max_position_embeddings"]
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_gguf(  # noqa: ANN001
    model, path: Path, arch: str = "llama", rope: dict | None = None, qtype=None, float_type: str = "f32"
) -> Path:
    """``rope``: extra rope metadata ({"scaling.type": "yarn", ...}); llama3 rope writes rope_freqs.
    ``qtype``: the matrices (experts' too) quantized to it (a type the gguf package writes), else stored in
    ``float_type`` (f32 or f16; vectors stay f32)."""
    from gguf import GGUFWriter
    from gguf.quants import quantize

    def add(name: str, t: np.ndarray) -> None:
        t = np.ascontiguousarray(t, dtype=np.float32)
        if qtype is None or t.ndim < 2 or name.startswith("token_embd"):
            w.add_tensor(name, t.astype(np.float16) if float_type == "f16" and t.ndim >= 2 else t)
        else:
            blocks = quantize(t, qtype)
            w.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=qtype)

    from kvloom.loader.checkpoint import default_model_path
    from kvloom.loader.gguf import read_header
    from kvloom.loader.gguf_tokenizer import TOKENIZER_KEYS

    c = model.config
    meta, _ = read_header(default_model_path(), TOKENIZER_KEYS)
    assert c.vocab_size == len(meta["tokenizer.ggml.tokens"])
    w = GGUFWriter(str(path), arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(c.head_dim)
    for key, value in (rope or {}).items():
        if isinstance(value, str):
            w.add_string(f"{arch}.rope.{key}", value)
        elif isinstance(value, int):
            w.add_uint32(f"{arch}.rope.{key}", value)
        else:
            w.add_float32(f"{arch}.rope.{key}", value)
    experts = getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(c.num_experts_per_tok)
        if getattr(c, "moe_intermediate_size", None):
            w.add_expert_feed_forward_length(c.moe_intermediate_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(c.bos_token_id)
    w.add_eos_token_id(c.eos_token_id)
    if c.rope_parameters.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(c))
    sd = {k.replace(".block_sparse_moe.", ".mlp."): v.float().numpy() for k, v in model.state_dict().items()}
    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    if not c.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        for hf, gg in _LAYER.items():
            t = sd.get(f"model.layers.{i}.{hf}.weight")
            if t is None:  # not in this family (q/k norms, experts)
                continue
            if gg == "attn_q" and arch == "llama":
                t = _permute(t, c.num_attention_heads)
            elif gg == "attn_k" and arch == "llama":
                t = _permute(t, c.num_key_value_heads)
            add(f"blk.{i}.{gg}.weight", t)
        # transformers 5 holds a layer's experts stacked: gate_up [E, 2I, H] (gate rows first), down [E, H, I]
        gate_up = sd.get(f"model.layers.{i}.mlp.experts.gate_up_proj")
        if gate_up is not None:
            inter = gate_up.shape[1] // 2
            add(f"blk.{i}.ffn_gate_exps.weight", gate_up[:, :inter])
            add(f"blk.{i}.ffn_up_exps.weight", gate_up[:, inter:])
            add(f"blk.{i}.ffn_down_exps.weight", sd[f"model.layers.{i}.mlp.experts.down_proj"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def random_llama(config, seed: int = 0):  # noqa: ANN001
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def requantize(src: Path, out: Path, qtype) -> Path:  # noqa: ANN001 - gguf.GGMLQuantizationType
    """A copy of a GGUF file with its matrices quantized again to ``qtype`` (the types the gguf package
    writes: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0), everything else as it was."""
    import gguf
    from gguf.quants import dequantize, quantize

    reader = gguf.GGUFReader(src)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    w = gguf.GGUFWriter(out, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(field.name, field.contents(), kind, sub_type=sub)
    for t in reader.tensors:
        shape = [int(d) for d in reversed(t.shape)]
        data = dequantize(t.data, t.tensor_type).reshape(shape).astype(np.float32)
        if len(shape) == 2 and shape[1] % 32 == 0:
            blocks = quantize(data, qtype)
            w.add_tensor(t.name, blocks, raw_shape=blocks.shape, raw_dtype=qtype)
        else:
            w.add_tensor(t.name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
