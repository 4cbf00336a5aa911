"""CPU kernels for bf16 models (cpu_kernels.c), built on first use and called through ctypes.

`load_cpu_kernels()` returns a `CpuKernels` or None when they cannot run here: not x86-64 with AVX-512 BF16,
no C compiler, or KVLOOM_CPU_KERNELS=0. Every caller keeps its PyTorch path for None, for fp32/fp16 models
and for shapes a kernel does not take, so the kernels only ever replace work, never add features.

Building and caching the shared object: kvloom/backends/cpu/build.py (standard library only, so the CLI starts
the compile before it imports torch).
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kvloom.backends.cpu.attention import KernelAttentionMetadata
from kvloom.backends.cpu.build import _build, _cpu_flags, _unsupported, wait_for_prebuild
from kvloom.config import CPU_QUANTIZATIONS
from kvloom.layers.linear import Linear, LinearMethod
from kvloom.layers.mlp import MLP
from kvloom.layers.moe import FusedExperts, SparseMoeBlock
from kvloom.layers.norm import RMSNorm
from kvloom.layers.quantization import QuantizedWeight, quantize_rtn, quantize_w8a8
from kvloom.logger import init_logger
from kvloom.models.llama import DecoderLayer
from kvloom.quantization.smoothquant import w8a8_linears

logger = init_logger(__name__)

_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class KvLin(ctypes.Structure):
    """kv_lin in cpu_kernels.c: one linear layer's packed weights (kind 0 = bf16, 4 / 5 / 6 / 8 / 10 =
    quantized, 9 = W8A8), LLM.int8's threshold and the packing's layout (pack_quantized)."""

    _fields_ = [
        ("kind", _I),
        ("w", _P),
        ("has_min", _I),
        ("group", _I),
        ("bias", _P),
        ("outlier", _F),
        ("sub", _I),
    ]


_SIGNATURES = {
    "kv_lin_forward": [ctypes.POINTER(KvLin), _P, _I, _P, _I, _I, _I, _I],
    "kv_set_amx": [_I],
    "kv_set_batch_invariant": [_I],
    "kv_rms_norm_bf16": [_P, _I, _P, _I, _P, _P, _I, _I, _I, _F],
    "kv_silu_mul_bf16": [_P, _I, _P, _I, _I, _I],
    "kv_gelu_tanh_mul_bf16": [_P, _I, _P, _I, _I, _I],
    # gate/up descriptors, down descriptors, xs, ldx, counts, experts, out, ldo, E, I, 2 scratch buffers
    "kv_moe_experts_bf16": [_P, _P, _P, _I, _P, _I, _P, _I, _I, _I, _P, _P],
    # router, gate/up and down descriptors, x, ldx, T, E, I, experts, k, renormalize, 6 buffers (y last)
    "kv_moe_layer_bf16": [_P, _P, _P, _P, _I, _I, _I, _I, _I, _I, _I, *[_P] * 6],
    # q, ldq, k, ldk, v, ldv, positions, cos, sin, T, H, KVH, D, caches, slots, num_blocks, block_size, rope,
    # the cache's kind (0 bf16, 1 int8, 2 FP8 E4M3, 3 FP8 E5M2: KVFormat.kind)
    "kv_rope_cache_bf16": [_P, _I] * 3 + [_P] * 3 + [_I] * 4 + [_P] * 3 + [_I, _I, ctypes.c_int, _I],
    "kv_argmax_bf16": [_P, _I, _I, _I, _P],
    "kv_decode_attention_bf16": [_P, _I, _P, _P, _P, _P, _I, _P, _P, _I, _I, _I, _I, _I, _I, _I, _F, _I, _I],
    # layers, L, h, residual, S, E, I, H, KVH, D, positions, slots per group, tables per group, row table,
    # table widths per group, context lengths, num_blocks, block_size, 5 scratch buffers, out rows, n_out,
    # the cache's kind
    "kv_decode_layers_bf16": [_P, _I, _P, _P, *[_I] * 6, *[_P] * 6, _I, _I, *[_P] * 6, _I, _I],
    "kv_head_norm_bf16": [_P, _I, _I, _I, _I, _I, _P, _P, _F],
}


class KvLayer(ctypes.Structure):
    """kv_layer in cpu_kernels.c: what one decoder layer's C call needs beyond the step's tensors."""

    _fields_ = [
        ("norm_in", _P),
        ("norm_post", _P),
        ("qkv", ctypes.POINTER(KvLin)),
        ("o", ctypes.POINTER(KvLin)),
        ("gu", ctypes.POINTER(KvLin)),
        ("down", ctypes.POINTER(KvLin)),
        ("k_cache", _P),
        ("v_cache", _P),
        ("eps", _F),
        ("scale", _F),
        ("window", _I),
        ("norm_q", _P),
        ("norm_k", _P),
        ("norm_attn", _P),
        ("norm_mlp", _P),
        ("cos", _P),
        ("sin", _P),
        ("act", _I),
        ("group", _I),
        ("router", ctypes.POINTER(KvLin)),
        ("moe_gu", ctypes.POINTER(KvLin)),
        ("moe_down", ctypes.POINTER(KvLin)),
        ("n_experts", _I),
        ("top_k", _I),
        ("renormalize", _I),
        ("moe_inter", _I),
    ]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class CpuKernels:
    """Typed entry points of the shared object. Callers check `*_ok` before calling."""

    def __init__(self, path: Path) -> None:
        lib = ctypes.CDLL(str(path))
        for name, argtypes in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = argtypes, None
        lib.kv_set_amx.restype = ctypes.c_int
        self._lib = lib
        self.path = path
        # bf16 and W8A8 linears on AMX where the CPU has it (KVLOOM_AMX=0: AVX-512 alone)
        amx = {"amx_tile", "amx_bf16", "amx_int8"} <= _cpu_flags()
        self.amx = self.set_amx(amx and os.environ.get("KVLOOM_AMX", "1") != "0")

    def set_amx(self, on: bool) -> bool:
        """Run bf16 linears (K a multiple of 32, every M) and W8A8 ones (K a multiple of 64, above 4 rows)
        on AMX tiles, or on AVX-512 alone (W8A8: the same bits either way; bf16: sums in another order).
        Returns whether AMX is on (it needs the CPU and Linux's permission)."""
        self.amx = bool(self._lib.kv_set_amx(int(on)))
        return self.amx

    def set_batch_invariant(self, on: bool) -> None:
        """Quantized (GGUF, int4/int8) linears: with AMX on, steps of more than 4 rows run on AMX tiles,
        3-4x faster than AVX-512 but not its bits, so a row's result depends on its step's size (as in
        llama.cpp and vLLM). On: every row on AVX-512, the same bits whatever the batch. Process-wide: the
        shared object's setting (the engine sets it from --batch-invariant when it starts)."""
        self._lib.kv_set_batch_invariant(int(on))

    # -- linear on packed weights -----------------------------------------------------------------------
    @staticmethod
    def can_pack(weight: torch.Tensor) -> bool:
        return weight.dtype == torch.bfloat16 and weight.dim() == 2 and weight.shape[1] % 2 == 0

    @staticmethod
    def pack_linear_weight(weight: torch.Tensor) -> torch.Tensor:
        """[N, K] -> [ceil(N / 16), K / 2, 16, 2] (zero rows pad N): the layout linear_bf16_body streams."""
        n, k = weight.shape
        pad = -n % 16
        if pad:
            weight = torch.cat([weight, weight.new_zeros(pad, k)])
        return weight.view(-1, 16, k // 2, 2).permute(0, 2, 1, 3).contiguous()

    @staticmethod
    def linear_desc(
        packed: torch.Tensor | tuple, bias: torch.Tensor | None, kind: int = 0, group: int = 0
    ) -> KvLin:
        """The C descriptor of a packed layer: a packed bf16 weight, or (bytes, has_min, layout) of a
        quantized one (pack_quantized). NOTE: it holds raw addresses; the caller keeps the tensors alive."""
        if kind == 0:
            return KvLin(0, _ptr(packed), 0, 0, _ptr(bias))
        buf, has_min, sub = packed
        return KvLin(kind, _ptr(buf), int(has_min), group, _ptr(bias), sub=int(sub))

    def run_linear(self, desc: KvLin, x: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
        """x [M, K] bf16 (rows may be strided) through a packed layer -> [M, out_features] bf16."""
        if x.stride(-1) != 1:
            x = x.contiguous()
        m = x.shape[0]
        y = torch.empty(m, out_features, dtype=x.dtype)
        self._lib.kv_lin_forward(
            ctypes.byref(desc), _ptr(x), x.stride(0), _ptr(y), out_features, m, out_features, in_features
        )
        return y

    def linear(
        self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
    ) -> torch.Tensor:
        """One-off call on a packed bf16 weight (tests, benchmarks)."""
        return self.run_linear(self.linear_desc(packed, bias), x, x.shape[1], out_features)

    # -- RMSNorm (+ residual add) ----------------------------------------------------------------------
    @staticmethod
    def rms_norm_ok(x: torch.Tensor) -> bool:
        return x.dtype == torch.bfloat16 and x.dim() == 2 and x.stride(1) == 1 and x.shape[1] % 16 == 0

    def rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> torch.Tensor:
        """Normalized rows of x (+ residual, which is updated in place to the sum)."""
        t, d = x.shape
        out = torch.empty(t, d, dtype=x.dtype)
        ldr = residual.stride(0) if residual is not None else 0
        self._lib.kv_rms_norm_bf16(
            _ptr(x), x.stride(0), _ptr(residual), ldr, _ptr(weight), _ptr(out), d, t, d, eps
        )
        return out

    def head_norm(self, qkv: torch.Tensor, heads: int, kv_heads: int, head_dim: int, q_norm, k_norm) -> None:  # noqa: ANN001
        """Per-head q and k norms, in place in a fused projection's output [T, W] (RMSNorm modules)."""
        self._lib.kv_head_norm_bf16(
            _ptr(qkv),
            qkv.stride(0),
            qkv.shape[0],
            heads,
            kv_heads,
            head_dim,
            _ptr(q_norm.kernel_weight),
            _ptr(k_norm.kernel_weight),
            q_norm.eps,
        )

    # -- greedy sampling --------------------------------------------------------------------------------
    @staticmethod
    def argmax_ok(x: torch.Tensor) -> bool:
        return x.dtype == torch.bfloat16 and x.dim() == 2 and x.stride(1) == 1 and x.shape[1] > 0

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """torch.argmax(x, dim=-1) of a [rows, cols] bf16 tensor (same index on ties and NaN)."""
        out = torch.empty(x.shape[0], dtype=torch.long)
        self._lib.kv_argmax_bf16(_ptr(x), x.stride(0), x.shape[0], x.shape[1], _ptr(out))
        return out

    # -- SiLU(gate) * up -------------------------------------------------------------------------------
    @staticmethod
    def act_mul_ok(gate_up: torch.Tensor) -> bool:
        return (
            gate_up.dtype == torch.bfloat16
            and gate_up.dim() == 2
            and gate_up.stride(1) == 1
            and gate_up.shape[1] % 32 == 0
        )

    def act_mul(self, gate_up: torch.Tensor, act: str = "silu") -> torch.Tensor:
        """act(gate) * up, act silu or gelu_pytorch_tanh (Gemma's GeGLU)."""
        t, two_i = gate_up.shape
        out = torch.empty(t, two_i // 2, dtype=gate_up.dtype)
        fn = self._lib.kv_silu_mul_bf16 if act == "silu" else self._lib.kv_gelu_tanh_mul_bf16
        fn(_ptr(gate_up), gate_up.stride(0), _ptr(out), two_i // 2, t, two_i // 2)
        return out

    # -- rotary + KV cache write -----------------------------------------------------------------------
    # The kernels keep the KV cache in a layout of their own (cpu_kernels.c, "KV cache layout"): within each
    # block, K as [D / 2, block_size, 2] and V as [block_size / 2, D, 2]; a one-byte cache (uint8,
    # [..., D + 2] rows in the reference's layout) the same in bytes, then the block's bf16 scales. The
    # pool's shape is unchanged; only the kernels write and read it (the CPU backend picks this layout
    # where KernelAttention.supports the model).
    @staticmethod
    def to_kernel_layout(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[KVH, num_blocks, block_size, D] caches in the usual layout -> the same in the kernels' layout."""
        return _relayout(k_cache, True, False), _relayout(v_cache, False, False)

    @staticmethod
    def from_kernel_layout(k_cache: torch.Tensor, v_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The inverse of to_kernel_layout."""
        return _relayout(k_cache, True, True), _relayout(v_cache, False, True)

    def rope_and_cache(
        self,
        qkv: torch.Tensor,  # [tokens, (H + 2 * KVH) * D], rotated in place
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        positions: torch.Tensor,
        cos: torch.Tensor | None,  # None: no rotary (write the cache only)
        sin: torch.Tensor | None,
        k_cache: torch.Tensor,  # [KVH, num_blocks, block_size, D], the kernels' layout
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_kind: int = 0,  # the cache's format: 0 bf16, else KVFormat.kind (kvloom/layers/kv_cache.py)
    ) -> None:
        t, ld = qkv.shape
        base = qkv.data_ptr()
        el = qkv.element_size()
        k_off = num_heads * head_dim * el
        v_off = (num_heads + num_kv_heads) * head_dim * el
        self._lib.kv_rope_cache_bf16(
            base,
            ld,
            base + k_off,
            ld,
            base + v_off,
            ld,
            _ptr(positions),
            _ptr(cos),
            _ptr(sin),
            t,
            num_heads,
            num_kv_heads,
            head_dim,
            _ptr(k_cache),
            _ptr(v_cache),
            _ptr(slot_mapping),
            k_cache.shape[1],
            k_cache.shape[2],
            int(cos is not None),
            kv_kind,
        )

    def write_cache(
        self,
        k: torch.Tensor,  # [tokens, KVH, D] (rows may be strided; heads contiguous)
        v: torch.Tensor,
        k_cache: torch.Tensor,  # [KVH, num_blocks, block_size, D], the kernels' layout
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_kind: int = 0,
    ) -> None:
        """Write K/V rows to their slots, k already rotated (layers with their own q/k handling: OLMoE)."""
        t, kvh, d = k.shape
        if k.stride(1) != d or k.stride(2) != 1:
            k = k.contiguous()
        if v.stride(1) != d or v.stride(2) != 1:
            v = v.contiguous()
        self._lib.kv_rope_cache_bf16(
            None,
            0,
            _ptr(k),
            k.stride(0),
            _ptr(v),
            v.stride(0),
            None,
            None,
            None,
            t,
            0,
            kvh,
            d,
            _ptr(k_cache),
            _ptr(v_cache),
            _ptr(slot_mapping),
            k_cache.shape[1],
            k_cache.shape[2],
            0,
            kv_kind,
        )

    # -- decode attention ------------------------------------------------------------------------------
    def decode_attention(
        self,
        q: torch.Tensor,  # [num_seqs, H, D], heads contiguous
        k_cache: torch.Tensor,  # the kernels' layout
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,  # [num_seqs, max_blocks] int64
        context_lens: torch.Tensor,  # [num_seqs] int64
        out: torch.Tensor,  # [num_seqs, H, D]
        scale: float,
        window: int | None,
        row_table: torch.Tensor | None = None,  # [num_rows] int64: row i reads block_tables[row_table[i]]
        kv_kind: int = 0,
    ) -> None:
        """One query row per entry of context_lens, attending positions [0, context_len) of its table (the
        last `window` of them): decodes, and prefill rows too once their K/V are in the cache."""
        s, h, d = q.shape
        if q.stride(2) != 1 or q.stride(1) != d:
            q = q.contiguous()
        kvh, num_blocks, block_size, _ = k_cache.shape
        self._lib.kv_decode_attention_bf16(
            _ptr(q),
            q.stride(0),
            _ptr(k_cache),
            _ptr(v_cache),
            _ptr(block_tables),
            _ptr(row_table),
            block_tables.shape[1],
            _ptr(context_lens),
            _ptr(out),
            out.stride(0),
            s,
            h,
            kvh,
            d,
            num_blocks,
            block_size,
            scale,
            window or 0,
            kv_kind,
        )


class FusedDecodeLayers:
    """All decoder layers as one C call per step (kv_decode_layers_bf16), for every step the kernels run.
    The weights' addresses are collected once (the parameters never move), the caches' on the first call.
    Layers of Llama's form (DecoderLayer), with q/k norms where the family has them, a mixture of experts
    where KernelMoe runs it (no shared expert), and Gemma 3's (``DecoderLayer.output_norms``: norms of
    the attention's and the MLP's outputs, GeGLU)."""

    def __init__(self, kernels: CpuKernels, model) -> None:
        cfg = model.config
        attn0 = model.model.layers[0].self_attn
        self.lib = kernels._lib
        self.inter = cfg.intermediate_size
        self.heads, self.kv_heads, self.head_dim = attn0.num_heads, attn0.num_kv_heads, attn0.head_dim
        self.layers = (KvLayer * len(model.model.layers))()
        self._descs = []  # the KvLin descriptors the array points at
        for spec, layer in zip(self.layers, model.model.layers, strict=True):
            a, m = layer.self_attn, layer.mlp
            if isinstance(m, SparseMoeBlock):  # its KernelMoe's descriptors (it keeps them alive)
                moe = m.fused
                descs = [a.qkv_proj.method.desc, a.o_proj.method.desc]
                spec.router = ctypes.pointer(moe.router)
                spec.moe_gu = ctypes.cast(moe.experts.gu, ctypes.POINTER(KvLin))
                spec.moe_down = ctypes.cast(moe.experts.down, ctypes.POINTER(KvLin))
                spec.n_experts, spec.top_k, spec.renormalize = moe.experts.n, moe.k, moe.renormalize
                spec.moe_inter = moe.experts.inter
                spec.qkv, spec.o = (ctypes.pointer(d) for d in descs)
            else:
                descs = [lin.method.desc for lin in (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj)]
                spec.qkv, spec.o, spec.gu, spec.down = (ctypes.pointer(d) for d in descs)
                spec.act = 0 if m.act == "silu" else 1
            self._descs.append(descs)
            if layer.output_norms:  # the norm before the MLP adds the residual; the other two do not
                spec.norm_post = _ptr(layer.pre_feedforward_layernorm.kernel_weight)
                spec.norm_attn = _ptr(layer.post_attention_layernorm.kernel_weight)
                spec.norm_mlp = _ptr(layer.post_feedforward_layernorm.kernel_weight)
            else:
                spec.norm_post = _ptr(layer.post_attention_layernorm.kernel_weight)
            spec.norm_in = _ptr(layer.input_layernorm.kernel_weight)
            if a.qk_norm:
                spec.norm_q, spec.norm_k = _ptr(a.q_norm.kernel_weight), _ptr(a.k_norm.kernel_weight)
            spec.eps, spec.scale, spec.window = layer.input_layernorm.eps, a.scale, a.window or 0
            spec.cos, spec.sin = _ptr(a.rotary.cos), _ptr(a.rotary.sin)
            spec.group = -1  # set from each step's metadata
        self._caches = None  # data_ptr of the first layer's cache the array holds
        self.kv_kind = 0  # the cache's format (KVFormat.kind; 0: bf16), the backend's attention's

    @staticmethod
    def unsupported(model) -> str | None:  # noqa: ANN001
        """Why the fused call cannot run this model (the layers then run one by one), or None."""
        cfg = model.config
        for layer in model.model.layers:
            if type(layer) is not DecoderLayer and not layer.output_norms:
                return f"{type(layer).__name__} layers (the fused call runs Llama's and Gemma 3's)"
            a, m = layer.self_attn, layer.mlp
            if not a.standard_qk:
                return f"{type(a).__name__}'s own q/k handling"
            if isinstance(m, SparseMoeBlock):
                if not isinstance(m.fused, KernelMoe):
                    return "mixture-of-experts layers the kernels do not run in one call"
                if m.shared_expert is not None:
                    return "shared experts"
                linears = (a.qkv_proj, a.o_proj, m.gate)
            elif not isinstance(m, MLP):
                return f"{type(m).__name__} layers"
            else:
                linears = (a.qkv_proj, a.o_proj, m.gate_up_proj, m.down_proj)
                if m.act not in ("silu", "gelu_pytorch_tanh"):
                    return f"the {m.act} activation"
            if any(not isinstance(lin.method, PackedLinearMethod) for lin in linears):
                return "a linear layer the kernels do not run"
            if any(lin.method.perm is not None for lin in linears):
                return "inputs permuted per layer (GPTQ act-order)"
            if any(lin.reduce_output for lin in linears):
                return "tensor parallel (sums over the ranks between the layers' halves)"
            if a.num_heads // a.num_kv_heads > 16 or a.head_dim % 16 or a.head_dim > 256:
                return f"{a.num_heads}/{a.num_kv_heads} heads of {a.head_dim}"
            norms = [mod for mod in layer.modules() if isinstance(mod, RMSNorm)]
            if len({mod.eps for mod in norms}) > 1:
                return "two norm epsilons in a layer"
        if cfg.hidden_size % 16 or cfg.intermediate_size % 16:
            return f"hidden size {cfg.hidden_size} / MLP size {cfg.intermediate_size} not multiples of 16"
        return None

    @staticmethod
    def takes(metas: list) -> bool:
        """Every step whose attention runs on the kernels (their cache layout)."""
        return isinstance(metas[0], KernelAttentionMetadata)

    def __call__(
        self, h: torch.Tensor, positions: torch.Tensor, kv_caches, metas: list
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h [S, hidden] (embeddings; overwritten) -> (h, residual) after the last layer: of the rows
        output_rows when set (the last layer runs its attention, o and MLP on those alone). ``metas``: each
        layer's KV group's metadata."""
        if self._caches != kv_caches[0].data_ptr():
            for spec, kv in zip(self.layers, kv_caches, strict=True):
                spec.k_cache, spec.v_cache = _ptr(kv[0]), _ptr(kv[1])
            self._caches = kv_caches[0].data_ptr()
        groups: dict[int, int] = {}  # metadata id -> its index in the per-group arrays
        slots, tables, widths = [], [], []
        for spec, meta in zip(self.layers, metas, strict=True):
            g = groups.get(id(meta))
            if g is None:
                g = groups[id(meta)] = len(groups)
                slots.append(_ptr(meta.slot_mapping))
                tables.append(_ptr(meta.block_tables))
                widths.append(meta.block_tables.shape[1])
            if spec.group != g:
                spec.group = g
        n = len(groups)
        meta = metas[0]
        s, e = h.shape
        H, KVH, D, inter = self.heads, self.kv_heads, self.head_dim, self.inter
        residual = torch.zeros_like(h)
        x = torch.empty_like(h)
        qkv = torch.empty(s, (H + 2 * KVH) * D, dtype=h.dtype)
        a = torch.empty(s, H * D, dtype=h.dtype)
        gu = torch.empty(s, 2 * inter, dtype=h.dtype)
        act = torch.empty(s, inter, dtype=h.dtype)
        k0 = kv_caches[0][0]
        # decode steps want every row; then attention writes each row's K/V itself (no row table)
        decode = meta.block_tables.shape[0] == s
        out_rows = None if decode else meta.output_rows
        n_out = s if out_rows is None else out_rows.shape[0]
        self.lib.kv_decode_layers_bf16(
            self.layers,
            len(self.layers),
            _ptr(h),
            _ptr(residual),
            s,
            e,
            inter,
            H,
            KVH,
            D,
            _ptr(positions),
            (ctypes.c_void_p * n)(*slots),
            (ctypes.c_void_p * n)(*tables),
            None if decode else _ptr(meta.table_index),
            (ctypes.c_int64 * n)(*widths),
            _ptr(meta.context_lens),
            k0.shape[1],
            k0.shape[2],
            _ptr(x),
            _ptr(qkv),
            _ptr(a),
            _ptr(gu),
            _ptr(act),
            None if out_rows is None else _ptr(out_rows),
            n_out,
            self.kv_kind,
        )
        return h[:n_out], residual[:n_out]


def _relayout(cache: torch.Tensor, is_k: bool, inverse: bool) -> torch.Tensor:
    """A K or V cache [KVH, num_blocks, bs, W] from the usual layout to the kernels' (``inverse``: back)."""
    kvh, nb, bs, w = cache.shape
    if cache.dtype != torch.uint8:
        return _permute(cache, is_k, inverse)
    d = w - 2  # a one-byte cache: the values' bytes relaid, the block's scales after them
    if inverse:
        flat = cache.reshape(kvh, nb, bs * w)
        data = _permute(flat[..., : bs * d].reshape(kvh, nb, bs, d), is_k, True)
        return torch.cat([data, flat[..., bs * d :].reshape(kvh, nb, bs, 2)], dim=-1)
    data = _permute(cache[..., :d], is_k, False).reshape(kvh, nb, bs * d)
    return torch.cat([data, cache[..., d:].reshape(kvh, nb, bs * 2)], dim=-1).view(kvh, nb, bs, w)


def _permute(cache: torch.Tensor, is_k: bool, inverse: bool) -> torch.Tensor:
    """K: [bs, D / 2, 2] <-> [D / 2, bs, 2] per block;  V: [bs / 2, 2, D] <-> [bs / 2, D, 2]."""
    kvh, nb, bs, d = cache.shape
    if is_k:
        shape = (kvh, nb, d // 2, bs, 2) if inverse else (kvh, nb, bs, d // 2, 2)
        perm = (0, 1, 3, 2, 4)
    else:
        shape = (kvh, nb, bs // 2, d, 2) if inverse else (kvh, nb, bs // 2, 2, d)
        perm = (0, 1, 2, 4, 3)
    return cache.reshape(shape).permute(perm).contiguous().view(kvh, nb, bs, d)


@functools.cache
def load_cpu_kernels() -> CpuKernels | None:
    """The kernels, or None (with the reason logged once) when they cannot run on this machine."""
    reason = _unsupported()
    if reason is not None:
        logger.info("CPU kernels off: %s", reason)
        return None
    wait_for_prebuild()
    try:
        return CpuKernels(_build())
    except (RuntimeError, OSError) as e:
        logger.warning("CPU kernels off: %s", e)
        return None


def pack_w8a8(w: QuantizedWeight) -> torch.Tensor:
    """Kind 9 in the kernels' layout (cpu_kernels.c, w8a8_body): per item of 32 outputs, the q as [K / 4
    quads][2 blocks][16 outputs][4 k], then the 32 scales (fp32) and the 32 row sums of q (int32)."""
    n, k = w.q.shape
    pad = -n % 32
    items = (n + pad) // 32
    q, scale = w.q, w.scale[:, 0].float()
    if pad:
        q, scale = torch.cat([q, q.new_zeros(pad, k)]), torch.cat([scale, scale.new_zeros(pad)])
    packed = q.view(items, 32, k // 4, 4).transpose(1, 2).reshape(items, k * 32).view(torch.uint8)
    wsum = q.to(torch.int32).sum(1, dtype=torch.int32).view(items, 32)
    parts = [packed, scale.view(items, 32).view(torch.uint8), wsum.view(torch.uint8)]
    return torch.cat(parts, dim=1).contiguous()


SPAN = 256  # inputs per span of two-level scales (cpu_kernels.c, QSPAN): a K-quant super-block


def two_level(t: torch.Tensor, groups_per_span: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """[N, g] fp32 group scales -> (d [N, g / groups_per_span] fp32, codes [N, g] int8) with d * code equal
    to every scale exactly in fp32, or None where some span has no such d. K-quant files hold exactly that
    (an fp16 d per super-block times 4-8-bit sub-scales); the search finds a d whatever the file's format
    called it: for each span still open, d = max |scale| / c for c = 127, 126, ... down to 1, kept where
    every code is an integer in -128..127 that gives the scale back (Q6_K's sub-scales reach -128, and its
    d may be negative: then d = -max / c)."""
    n, g = t.shape
    spans = t.float().reshape(n * g // groups_per_span, groups_per_span)
    amax = spans.abs().amax(1)
    d = torch.zeros_like(amax)
    codes = torch.zeros(spans.shape, dtype=torch.int8)
    open_ = (amax > 0).nonzero()[:, 0]  # all-zero spans: d 0, codes 0
    probe = open_[:64]
    for c in range(128, 0, -1):
        if open_.numel() == 0:
            break
        if c == 120 and probe.numel() and bool(torch.isin(probe, open_).all()):
            return None  # the first spans fit no large code: scales of their own (Q4_0, Q8_0, int4)
        dc = amax[open_] / torch.full_like(amax[open_], float(c))  # NOTE: tensor / tensor: a true division
        q = torch.round(spans[open_] / dc[:, None])
        exact = (q * dc[:, None] == spans[open_]).all(1)
        flip = exact & ~((q >= -128) & (q <= 127)).all(1)  # a negative d (Q6_K's): codes -q
        ok = exact & (~flip | (q >= -127).all(1) & (q <= 128).all(1))
        sign = torch.where(flip, -1.0, 1.0)
        d[open_[ok]] = (dc * sign)[ok]
        codes[open_[ok]] = (q * sign[:, None])[ok].to(torch.int8)
        open_ = open_[~ok]
    if open_.numel():
        return None
    return d.view(n, g // groups_per_span), codes.view(n, g)


def _is_half(t: torch.Tensor) -> bool:
    """Every value of ``t`` (fp32) exactly an fp16 value."""
    return bool((t.half().float() == t).all())


def pack_ternary(w: QuantizedWeight) -> torch.Tensor:
    """A kind-9 weight whose q are all -1, 0 or 1 (BitNet b1.58) in 2 bits (cpu_kernels.c,
    w8a8_ternary_item_bytes): pack_w8a8's q bytes, quads 4h .. 4h + 3 of each block as 2-bit fields q + 1 of
    one byte, then its scales and row sums as they are."""
    k = w.shape[1]
    int8 = pack_w8a8(w)
    items = int8.shape[0]
    q = int8[:, : k * 32].view(torch.int8).view(items, k // 16, 4, 2, 64).to(torch.int32) + 1
    t = q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)
    return torch.cat([t.to(torch.uint8).reshape(items, k * 8), int8[:, k * 32 :]], dim=1).contiguous()


def pack_quantized(w: QuantizedWeight, compact: bool = True) -> tuple[torch.Tensor, bool, int]:
    """The kernels' layout (cpu_kernels.c, qlinear_bf16_body): for each item of 32 outputs and each
    group of inputs, its q, scales and mins together, so a thread reads one sequential stream (kind 9:
    pack_w8a8). Where the scales and mins factor exactly into a d per span of 256 inputs times int8 codes
    (K-quant files: two_level), they are stored so (1 byte a group instead of 4); where they are fp16 values
    (the other GGUF files), as fp16; unless ``compact`` is False. The kernel computes the same fp32 values
    from every layout. Kind 9 whose q are all ternary (BitNet) takes 2 bits a weight (pack_ternary). Returns
    (bytes, has_min, the layout: 0 fp32 scales / int8 kind 9, 1 two-level / ternary, 2 fp16)."""
    if w.kind == 9:
        if compact and w.shape[1] % 16 == 0 and bool((w.q.abs() <= 1).all()):
            return pack_ternary(w), False, 1
        return pack_w8a8(w), False, 0
    n, k = w.q.shape
    pad = -n % 32
    g = k // w.group
    items = (n + pad) // 32

    def rows(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros(pad, t.shape[1])]) if pad else t

    def per_group(t: torch.Tensor) -> torch.Tensor:  # [N, g] scales or mins -> [items, g, 32 outputs] bytes
        return rows(t).view(items, 32, g).transpose(1, 2).contiguous().view(torch.uint8)

    # [items, blocks, outputs j, k pairs, e] -> [items, groups, pairs in group, blocks, 32 lanes (2j + e)]
    q = rows(w.q).view(items, 2, 16, k // 2, 2).permute(0, 3, 1, 2, 4)
    q = q.reshape(items, g, w.group // 2, 2, 32)
    mins = w.min
    parts = []
    if w.kind in (4, 5, 6):  # four pairs per 16-bit lane: pair 4c + i in nibble i
        q = q.reshape(items, g, w.group // 8, 4, 2, 32).transpose(3, 4).to(torch.int32)
        nib = q & 15
        nib = nib[..., 0, :] | (nib[..., 1, :] << 4) | (nib[..., 2, :] << 8) | (nib[..., 3, :] << 12)
        parts.append(torch.from_numpy(nib.numpy().astype(np.uint16)))  # [items, g, chunks, blocks, 32]
        for bit in range(4, w.kind):
            # the fifth (sixth) bits: pair 4c + i of a block as one 32-bit mask, bit l = lane l
            high = ((q >> bit) & 1).numpy().astype(np.uint8)
            parts.append(torch.from_numpy(np.packbits(high, axis=-1, bitorder="little")))  # 4 bytes each
    else:
        parts.append(q)
    parts = [p.reshape(items, g, -1).view(torch.uint8) for p in parts]
    has_min = w.min is not None or w.kind in (4, 5, 6)
    raw_min = w.min if w.min is not None or not has_min else torch.zeros_like(w.scale)
    gps = SPAN // w.group if w.group <= SPAN and SPAN % w.group == 0 else 0
    factors = None
    if compact and w.kind in (4, 5, 6, 8) and gps and k % SPAN == 0:
        factors = [two_level(t, gps) for t in ((w.scale, raw_min) if has_min else (w.scale,))]
        factors = None if None in factors else factors
    if factors is None and compact and all(_is_half(t) for t in (w.scale, raw_min) if t is not None):
        parts += [per_group(t.half()) for t in (w.scale, raw_min) if t is not None]  # q_half_group_bytes
        return torch.cat([p.reshape(items, g, -1) for p in parts], dim=2).contiguous(), has_min, 2
    if factors is not None:  # per span: d, dm [items, spans, 32] fp32; codes [items, spans, gps x 32] int8
        spans = k // SPAN
        head = [
            rows(dd).view(items, 32, spans).transpose(1, 2).contiguous().view(torch.uint8)
            for dd, _ in factors
        ]
        head += [
            rows(cc).view(items, 32, g).transpose(1, 2).reshape(items, spans, gps * 32).view(torch.uint8)
            for _, cc in factors
        ]
        body = torch.cat(parts, dim=2).reshape(items, spans, -1)
        return torch.cat([*head, body], dim=2).contiguous(), has_min, 1
    if w.kind in (4, 5, 6):
        # The kernel sums x (128 + q): the stored min takes the 128 back out (see cpu_kernels.c).
        mins = (0.0 if mins is None else mins) - 128.0 * w.scale
    parts += [per_group(t.float()) for t in (w.scale, mins) if t is not None]
    return torch.cat([p.reshape(items, g, -1) for p in parts], dim=2).contiguous(), has_min, 0


class PackedLinearMethod(LinearMethod):
    """A Linear on the kernels: its weight packed (bf16) or kept quantized (``QuantizedWeight``: GGUF
    blocks as loaded, or int8/int4 from --quantization), in place of the plain one. NOTE: ``desc`` holds
    raw addresses of ``packed`` (and the layer's bias), which this method keeps alive."""

    perm = None  # the input's permutation (GPTQ act-order), applied before the kernel

    def __init__(self, kernels: CpuKernels, packed: torch.Tensor, desc: KvLin, weight_format: str) -> None:
        self.kernels, self.packed, self.desc, self.weight_format = kernels, packed, desc, weight_format

    @classmethod
    def install(cls, kernels: CpuKernels, layer: Linear, quantized: QuantizedWeight | None = None) -> None:
        """Give ``layer`` this method, packing its weight (or taking ``quantized``), and drop the plain
        weight."""
        if quantized is None:
            packed = kernels.pack_linear_weight(layer.weight.data)
            method = cls(kernels, packed, kernels.linear_desc(packed, layer.bias), "bf16")
        else:
            if quantized.shape != (layer.out_features, layer.in_features):
                raise ValueError(
                    f"model: quantized weight of shape {quantized.shape} for a "
                    f"{layer.out_features}x{layer.in_features} layer"
                )
            packed = pack_quantized(quantized)
            desc = kernels.linear_desc(packed, layer.bias, quantized.kind, quantized.group)
            method = cls(kernels, packed, desc, f"q{quantized.kind}")
            method.perm = quantized.perm
        layer.weight = None
        layer.method = method

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        return self.kernels.run_linear(self.desc, x, layer.in_features, layer.out_features)


class KernelExperts:
    """FusedExperts.fused on the kernels: every expert of a layer in one call (bf16 rows, silu experts
    whose matrices all run on the kernels)."""

    def __init__(self, kernels: CpuKernels, experts: FusedExperts) -> None:
        self.kernels = kernels
        n = experts.num_experts
        # NOTE: copies of the descriptors; the Linears' methods keep the weights they point to alive
        self.gu = (KvLin * n)(*(pair[0].method.desc for pair in experts.linears))
        self.down = (KvLin * n)(*(pair[1].method.desc for pair in experts.linears))
        self.n, self.hidden, self.inter = n, experts.hidden, experts.intermediate

    @staticmethod
    def supports(experts: FusedExperts) -> bool:
        linears = [lin for pair in experts.linears or [] for lin in pair]
        return (
            bool(linears)
            and experts.act is F.silu
            and experts.intermediate % 16 == 0
            and all(isinstance(lin.method, PackedLinearMethod) for lin in linears)
        )

    def __call__(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
        """xs [R, E] bf16 rows grouped by expert, counts [experts] int64 -> [R, E]."""
        if xs.dtype != torch.bfloat16 or xs.stride(1) != 1:
            return None
        r, e, i = xs.shape[0], self.hidden, self.inter
        out = torch.empty(r, e, dtype=xs.dtype)
        gu, act = torch.empty(r, 2 * i, dtype=xs.dtype), torch.empty(r, i, dtype=xs.dtype)
        counts = counts.to(torch.int64).contiguous()
        self.kernels._lib.kv_moe_experts_bf16(
            ctypes.addressof(self.gu),
            ctypes.addressof(self.down),
            _ptr(xs),
            xs.stride(0),
            _ptr(counts),
            self.n,
            _ptr(out),
            e,
            e,
            i,
            _ptr(gu),
            _ptr(act),
        )
        return out


class KernelMoe:
    """SparseMoeBlock.fused on the kernels: router, softmax top-k, grouping, experts and the weighted sum
    in one call (kv_moe_layer_bf16), where its router and experts run on the kernels."""

    def __init__(self, kernels: CpuKernels, block: SparseMoeBlock) -> None:
        self.kernels, self.experts = kernels, block.experts.fused
        self.router = block.gate.method.desc
        self.k, self.renormalize = block.top_k, int(block.renormalize)

    @staticmethod
    def supports(block: SparseMoeBlock) -> bool:
        return (
            isinstance(block.gate.method, PackedLinearMethod)
            and isinstance(block.experts.fused, KernelExperts)
            and block.experts.hidden % 16 == 0
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [T, E] bf16 -> the experts' weighted sum [T, E] (before any sum over tensor-parallel ranks)."""
        if x.dtype != torch.bfloat16 or x.dim() != 2 or x.stride(1) != 1:
            return None
        ex = self.experts
        t, e, i, r = x.shape[0], ex.hidden, ex.inter, x.shape[0] * self.k
        bufs = [
            torch.empty(t, ex.n, dtype=x.dtype),  # router logits
            torch.empty(r, e, dtype=x.dtype),  # rows grouped by expert
            torch.empty(r, e, dtype=x.dtype),  # their outputs
            torch.empty(r, 2 * i, dtype=x.dtype),
            torch.empty(r, i, dtype=x.dtype),
            torch.empty(t, e, dtype=x.dtype),  # y
        ]
        self.kernels._lib.kv_moe_layer_bf16(
            ctypes.byref(self.router),
            ctypes.addressof(ex.gu),
            ctypes.addressof(ex.down),
            _ptr(x),
            x.stride(0),
            t,
            e,
            i,
            ex.n,
            self.k,
            self.renormalize,
            *(_ptr(b) for b in bufs),
        )
        return bufs[-1]


class KernelRMSNorm:
    """RMSNorm.fused on the kernels: residual add and norm in one pass (bf16 rows of 16k elements)."""

    def __init__(self, kernels: CpuKernels) -> None:
        self.kernels = kernels

    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> torch.Tensor | None:
        k = self.kernels
        if not k.rms_norm_ok(x) or (residual is not None and not k.rms_norm_ok(residual)):
            return None
        return k.rms_norm(x, residual, weight, eps)


class KernelActMul:
    """MLP.fused_act on the kernels: act(gate) * up in one pass (silu, or Gemma's tanh gelu)."""

    def __init__(self, kernels: CpuKernels, act: str = "silu") -> None:
        self.kernels, self.act = kernels, act

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor | None:
        return self.kernels.act_mul(gate_up, self.act) if self.kernels.act_mul_ok(gate_up) else None


def use_cpu_kernels(
    model: torch.nn.Module,
    kernels: CpuKernels,
    quantization: str = "auto",
    llm_int8_threshold: float | None = None,
) -> None:
    """Run a built, loaded model on the kernels: give every linear layer a PackedLinearMethod (in place of
    its plain weight), point the norms, attention and MLP blocks at the kernels, and, where the model's
    shapes allow, run all-decode steps as one call per step (FusedDecodeLayers). Weights loaded
    quantized (``model.quantized``: GGUF blocks) run quantized; quantization int8/int4 quantizes the others
    (round to nearest, groups of 32; the output layer gets int8 under int4, as llama.cpp keeps it at 6 bits),
    w8a8 the attention's and dense MLPs' layers to int8 per output channel with int8 activations (the rest
    stays bf16: smoothquant.w8a8_linears). ``llm_int8_threshold``: LLM.int8's decomposition in every W8A8
    layer (input columns above it in any row of a step run in fp32 from the int8 weights).
    """
    quantized = getattr(model, "quantized", {})
    w8a8 = set(w8a8_linears(model).values()) if quantization == "w8a8" else set()
    for name, module in list(model.named_modules()):  # NOTE: a list: experts add Linears as they go
        if isinstance(module, Linear):
            key = f"{name}.weight"
            if key in quantized:
                shards = [s for _, s in sorted(quantized.pop(key).items())]
                try:
                    PackedLinearMethod.install(kernels, module, QuantizedWeight.cat(shards))
                except ValueError as e:  # shards that do not fuse (act-order of their own): run dense
                    logger.info("%s: %s; runs dequantized", name, e)
                    module.weight.data.copy_(torch.cat([s.dequantize(module.weight.dtype) for s in shards]))
                    PackedLinearMethod.install(kernels, module)
            elif module.weight is None or not kernels.can_pack(module.weight):
                continue
            elif module in w8a8:
                PackedLinearMethod.install(kernels, module, quantize_w8a8(module.weight.data))
            elif quantization in ("int8", "int4"):
                bits = 4 if quantization == "int4" and name != "lm_head" else 8
                PackedLinearMethod.install(kernels, module, quantize_rtn(module.weight.data, bits))
            else:
                PackedLinearMethod.install(kernels, module)
        elif isinstance(module, FusedExperts):
            # each expert's matrices on the kernels: its GGUF blocks, else its weights packed (bf16), or
            # quantized as --quantization says (int8 / int4 round to nearest, w8a8 per output channel)
            def install(lin: Linear, qw: QuantizedWeight | None) -> None:
                if qw is None and kernels.can_pack(lin.weight) and quantization in CPU_QUANTIZATIONS:
                    if quantization == "w8a8":
                        qw = quantize_w8a8(lin.weight.data)
                    else:
                        qw = quantize_rtn(lin.weight.data, 4 if quantization == "int4" else 8)
                if qw is not None or kernels.can_pack(lin.weight):
                    PackedLinearMethod.install(kernels, lin, qw)

            module.as_linears(install)
            if KernelExperts.supports(module):
                module.fused = KernelExperts(kernels, module)
        elif isinstance(module, RMSNorm):
            module.fused = KernelRMSNorm(kernels)
        elif isinstance(module, MLP) and module.act in ("silu", "gelu_pytorch_tanh"):
            module.fused_act = KernelActMul(kernels, module.act)
    for module in model.modules():  # after every Linear has its method: the router's is needed
        if isinstance(module, SparseMoeBlock) and KernelMoe.supports(module):
            module.fused = KernelMoe(kernels, module)
    if llm_int8_threshold:  # the fused layers point at these descriptors: they see it too
        for module in model.modules():
            if isinstance(module, Linear) and isinstance(module.method, PackedLinearMethod):
                if module.method.desc.kind == 9:
                    module.method.desc.outlier = llm_int8_threshold
    reason = FusedDecodeLayers.unsupported(model)
    if reason is None:
        model.fused_decode = FusedDecodeLayers(kernels, model)
    else:
        logger.info("CPU kernels: the decoder layers run one by one (no fused call: %s)", reason)
