"""Llama family (Llama 2/3, SmolLM2, TinyLlama) and the shared decoder the other families configure.

Module names follow transformers so checkpoints load by name; q/k/v and gate/up are fused into one
matmul each at load time.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kvloom.distributed.parallel_state import get_tp, local_heads
from kvloom.layers.attention import TorchAttention
from kvloom.layers.linear import Embedding, Linear, LMHead, column_parallel, row_parallel
from kvloom.layers.mlp import MLP
from kvloom.layers.norm import RMSNorm
from kvloom.layers.quantization import QuantizedWeight
from kvloom.layers.rotary import RotaryEmbedding


@dataclass(frozen=True)
class AttentionOptions:
    """What distinguishes the families' attention blocks."""

    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    window: int | None  # sliding window in tokens (the query included), None = full attention
    scale: float | None = None  # of q.k before the softmax; None: head_dim ** -0.5
    rope: str = "default"  # which of the model's rotary tables (``rotary_tables``) the layer uses


def layer_window(config: Any, layer: int) -> int | None:
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if layer_types[layer] == "sliding_attention" else None
    return window


class Attention(nn.Module):
    # How attention runs: PyTorch ops, or the implementation a backend gives the layer (kvloom/backends).
    impl = TorchAttention()
    norm_class: type[nn.Module] = RMSNorm  # of q and k, where the family has them
    # Whether q and k are normalized per head, then rotated, as split_qkv below does; False: a family's own
    # split_qkv (OLMoE: norms over whole projections, clipping), which a backend must run as it is.
    standard_qk = True

    def __init__(self, config: Any, opts: AttentionOptions, rotary: RotaryEmbedding) -> None:
        super().__init__()
        # this rank's heads (all of them without tensor parallel)
        self.num_heads, self.num_kv_heads, kv_start = local_heads(
            config.num_attention_heads, config.num_key_value_heads
        )
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = opts.scale if opts.scale is not None else self.head_dim**-0.5
        self.window = opts.window
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=opts.qkv_bias)
        kv = (kv_start * self.head_dim, self.kv_size)
        column_parallel(self.qkv_proj, [(get_tp().rank * self.q_size, self.q_size), kv, kv])
        self.o_proj = row_parallel(Linear(self.q_size, config.hidden_size, bias=opts.o_bias))
        if opts.qk_norm:
            self.q_norm = self.norm_class(self.head_dim, config.rms_norm_eps)
            self.k_norm = self.norm_class(self.head_dim, config.rms_norm_eps)
        self.qk_norm = opts.qk_norm
        # NOTE: a plain attribute, not a submodule: the tables are shared by all layers.
        self.rotary = rotary

    def split_qkv(
        self, positions: torch.Tensor, qkv: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The fused projection's output -> q [n, H, D], k, v [n, KVH, D]: q/k normalized (where the
        family does) and rotated."""
        q, k, v = self.split_normed(qkv)
        q, k = self.rotary(positions, q, k)
        return q, k, v

    def split_normed(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """split_qkv before the rotary (views of ``qkv`` where nothing is normalized); a backend that
        rotates in its own kernel starts here (``standard_qk`` layers)."""
        n = qkv.shape[0]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def forward(
        self, positions: torch.Tensor, x: torch.Tensor, kv_cache: torch.Tensor, meta: Any
    ) -> torch.Tensor:
        return self.o_proj(self.impl.forward(self, positions, self.qkv_proj(x), kv_cache, meta))


class DecoderLayer(nn.Module):
    attention_class: type[Attention] = Attention
    norm_class: type[nn.Module] = RMSNorm
    # Gemma 3's form: norms of the attention's and the MLP's outputs (a backend's fused layers read this)
    output_norms = False

    def __init__(self, config: Any, opts: AttentionOptions, rotary: RotaryEmbedding, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = self.norm_class(config.hidden_size, config.rms_norm_eps)
        self.self_attn = self.attention_class(config, opts, rotary)
        self.post_attention_layernorm = self.norm_class(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp

    @property
    def mlp_norm(self) -> nn.Module:
        """The norm whose output is the MLP's input."""
        return self.post_attention_layernorm

    def enter(self, h: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's input norm over the residual stream: (normalized, residual)."""
        if residual is None:
            return self.input_layernorm(h), h
        return self.input_layernorm(h, residual)

    def forward(
        self,
        positions: torch.Tensor,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        meta: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h, residual) -> (h, residual): the residual stream is summed inside the next norm."""
        x, residual = self.enter(h, residual)
        h = self.self_attn(positions, x, kv_cache, meta)
        x, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    def __init__(
        self,
        config: Any,
        options: list[AttentionOptions],
        rotaries: dict[str, RotaryEmbedding],
        layer_class: type[nn.Module],
        norm_class: type[nn.Module],
        mlps: list[nn.Module],
    ) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            layer_class(config, o, rotaries[o.rope], mlp) for o, mlp in zip(options, mlps, strict=True)
        )
        self.norm = norm_class(config.hidden_size, config.rms_norm_eps)


# HF parameter name piece -> (fused parameter name piece, shard index)
_STACKED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class LlamaForCausalLM(nn.Module):
    """A decoder-only transformer; subclasses say how their attention differs, and where their layers
    differ, which layer and norm classes they use (``layer_class``, ``norm_class``)."""

    layer_class: type[nn.Module] = DecoderLayer
    norm_class: type[nn.Module] = RMSNorm

    @classmethod
    def attention_options(cls, config: Any, layer: int) -> AttentionOptions:
        bias = getattr(config, "attention_bias", False)
        return AttentionOptions(qkv_bias=bias, o_bias=bias, qk_norm=False, window=None)

    def __init__(
        self, config: Any, max_positions: int, dtype: torch.dtype, device: str | torch.device
    ) -> None:
        super().__init__()
        self.config = config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        with torch.device(device):
            self.rotaries = self.rotary_tables(config, head_dim, max_positions, dtype)
        layers = range(config.num_hidden_layers)
        options = [self.attention_options(config, i) for i in layers]
        mlps = [self.build_mlp(config, i) for i in layers]
        self.model = DecoderModel(config, options, self.rotaries, self.layer_class, self.norm_class, mlps)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size)
        scale = self.embedding_scale(config)
        # NOTE: a plain attribute made on the real device, as the rotary tables (the model is built on meta)
        self.scale = None if scale is None else torch.tensor(scale, dtype=dtype, device=device)

    @classmethod
    def build_mlp(cls, config: Any, layer: int) -> nn.Module:
        """The layer's MLP (mixture-of-experts families: a SparseMoeBlock where the layer has one)."""
        return MLP(config)

    @classmethod
    def embedding_scale(cls, config: Any) -> float | None:
        """What the embeddings are multiplied by (Gemma: sqrt(hidden_size)); None: nothing."""
        return None

    @classmethod
    def rotary_tables(
        cls, config: Any, head_dim: int, max_positions: int, dtype: torch.dtype
    ) -> dict[str, RotaryEmbedding]:
        """The rotary tables the layers use, by name (``AttentionOptions.rope``)."""
        return {"default": RotaryEmbedding(config, head_dim, max_positions, dtype)}

    def forward(
        self,
        input_ids: torch.Tensor,  # [num_tokens]
        positions: torch.Tensor,  # [num_tokens]
        kv_caches: list[torch.Tensor],  # per layer [2, num_kv_heads, num_blocks, block_size, head_dim]
        metas: list[Any],  # per layer: the attention metadata of its KV group (the same object in a group)
    ) -> torch.Tensor:
        h = self.model.embed_tokens(input_ids)
        if self.scale is not None:
            h = h * self.scale
        fused = self.fused_decode
        if fused is not None and fused.takes(metas):
            # skips the last layer's attention, o and MLP for the rows not in output_rows
            h, residual = fused(h, positions, kv_caches, metas)
            return self.model.norm(h, residual)[0]
        residual = None
        for layer, kv_cache, meta in zip(self.model.layers, kv_caches, metas, strict=True):
            h, residual = layer(positions, h, residual, kv_cache, meta)
        rows = metas[-1].output_rows
        if rows is not None:
            h, residual = h[rows], residual[rows]
        return self.model.norm(h, residual)[0]  # [num_outputs, hidden_size]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[num_seqs, vocab_size], model dtype (the sampler converts); None on tensor-parallel ranks but
        the first."""
        return self.lm_head.logits(hidden)

    # Set by a backend (backends/cpu: FusedDecodeLayers): all layers in one call on the steps it takes
    # (``takes(metas)``), the same computation as the layers' own forward (held equal by the tests).
    fused_decode = None

    def checkpoint_slice(self, name: str) -> tuple[int, int, int] | None:
        """Which (dim, start, length) of checkpoint tensor ``name`` this tensor-parallel rank loads; None:
        all of it. The loaders read only that part."""
        if get_tp().size == 1:
            return None
        parts = name.split(".")
        shard = 0
        if len(parts) >= 2 and parts[-2] in _STACKED:
            parts[-2], shard = _STACKED[parts[-2]]
        module = self.get_submodule(".".join(parts[:-1])) if len(parts) > 1 else None
        if isinstance(module, Embedding):
            start = module.vocab_start
            return 0, start, min(module.num_embeddings, module.vocab_size - start)
        if isinstance(module, Linear) and module.shard_slices is not None:
            dim, start, n = module.shard_slices[shard]
            if parts[-1] in ("bias", "weight_scale"):  # per output: whole in a row-parallel layer
                return None if dim == 1 else (0, start, n)  # (rank 0 alone adds the bias)
            return dim, start, n
        return None

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (transformers names, this rank's slices: ``checkpoint_slice``) into the
        parameters, fusing q/k/v and gate/up."""
        tied = getattr(self.config, "tie_word_embeddings", False)
        params = dict(self.named_parameters(remove_duplicate=False))
        vocab_split = {"model.embed_tokens.weight", "lm_head.weight"}
        loaded: set[tuple[str, int]] = set()
        # Quantized linear weights (GGUF kept as is) wait here, by parameter and shard, for the backend
        # that runs them (backends/cpu: use_cpu_kernels).
        self.quantized: dict[str, dict[int, QuantizedWeight]] = {}
        for name, tensor in weights:
            key = self.load_other(name, tensor, params)
            if key is not None:
                loaded.add(key)
                continue
            if isinstance(tensor, QuantizedWeight):
                parts = name.split(".")
                shard = 0
                if len(parts) >= 2 and parts[-2] in _STACKED:
                    parts[-2], shard = _STACKED[parts[-2]]
                target = ".".join(parts)
                if target not in params and target != "lm_head.weight":
                    raise ValueError(
                        f"model: checkpoint tensor {name!r} has no place in {type(self).__name__}"
                    )
                if target == "lm_head.weight" and tensor.shape[0] < self.lm_head.out_features:
                    tensor = tensor.pad_rows(self.lm_head.out_features)  # the last rank's vocabulary slice
                self.quantized.setdefault(target, {})[shard] = tensor
                loaded.add((target, shard))
                continue
            if "rotary_emb" in name or (tied and name == "lm_head.weight"):
                continue
            parts = name.split(".")
            shard = None
            if len(parts) >= 2 and parts[-2] in _STACKED:
                parts[-2], shard = _STACKED[parts[-2]]
            target = ".".join(parts)
            if target not in params:
                raise ValueError(f"model: checkpoint tensor {name!r} has no place in {type(self).__name__}")
            param = params[target].data
            if target in vocab_split and tensor.shape[0] < param.shape[0]:
                param[tensor.shape[0] :].zero_()  # the last rank's padding rows
                dst = param.narrow(0, 0, tensor.shape[0])
            elif shard is None:
                dst = param
            else:
                sizes = self._shard_sizes(target)
                offset = sum(sizes[:shard])
                dst = param.narrow(0, offset, sizes[shard])
            if dst.shape != tensor.shape:
                raise ValueError(
                    f"model: {name} has shape {tuple(tensor.shape)}, expected {tuple(dst.shape)}"
                )
            dst.copy_(tensor)
            if parts[-1] == "bias" and get_tp().rank > 0:
                owner = self.get_submodule(".".join(parts[:-1]))
                if owner.reduce_output:
                    dst.zero_()  # rank 0 adds the bias of a row-parallel layer once
            loaded.add((target, 0 if shard is None else shard))
        for target, shards in list(self.quantized.items()):
            sizes = self._shard_sizes(target)
            if len(shards) < len(sizes):
                # Some shards of this fused layer came dense (a GGUF type the backend does not run, as
                # Gemma 3 files' Q5_0 q/k beside a Q8_0 v): the layer runs dense, all of it.
                param = params[target].data
                for shard, qw in shards.items():
                    param.narrow(0, sum(sizes[:shard]), sizes[shard]).copy_(qw.dequantize(param.dtype))
                del self.quantized[target]
        if tied and "lm_head.weight" not in self.quantized:
            self.lm_head.weight = self.model.embed_tokens.weight
            loaded.add(("lm_head.weight", 0))
        missing = [n for n in params if not all((n, s) in loaded for s in range(self.num_shards(n)))]
        if missing:
            raise ValueError(f"model: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")

    def checkpoint_tensor(self, name: str) -> tuple[torch.Tensor | None, str]:
        """(the model's current value of checkpoint tensor ``name``: where load_weights put it, a fused
        layer's rows of that shard; the parameter's name). The value is None where the model keeps the
        tensor otherwise (a family's own loading, rotary buffers, a tied output layer). One rank's model."""
        parts = name.split(".")
        shard = None
        if len(parts) >= 2 and parts[-2] in _STACKED:
            parts[-2], shard = _STACKED[parts[-2]]
        target = ".".join(parts)
        param = dict(self.named_parameters(remove_duplicate=False)).get(target)
        if param is None:
            return None, target
        if shard is None:
            return param.data, target
        sizes = self._shard_sizes(target)
        return param.data.narrow(0, sum(sizes[:shard]), sizes[shard]), target

    def load_other(self, name: str, tensor: Any, params: dict) -> tuple[str, int] | None:
        """Where a family loads a checkpoint tensor its own way (experts): copy it and return the
        (parameter, shard) it filled; None: the common path loads it."""
        return None

    def num_shards(self, param: str) -> int:
        """How many checkpoint tensors fill a parameter (q/k/v: 3, gate/up: 2, most: 1)."""
        return len(self._shard_sizes(param))

    def _shard_sizes(self, param: str) -> list[int]:
        """This rank's rows of each checkpoint shard of a fused layer's parameter (by name)."""
        parts = param.split(".")
        if len(parts) < 3 or parts[-2] not in ("qkv_proj", "gate_up_proj"):
            return [0]
        owner = self.get_submodule(".".join(parts[:-2]))
        if parts[-2] == "qkv_proj":
            return [owner.q_size, owner.kv_size, owner.kv_size]
        return [owner.intermediate_size] * 2
