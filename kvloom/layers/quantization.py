"""Group-quantized linear weights: GGUF blocks read value for value, and round-to-nearest int8/int4 for
dense checkpoints (``--quantization``). A backend's linear method runs them without expanding them to
bf16 (kvloom/backends/cpu: pack_quantized, the kernels' layout).

Every format here is one of these kinds, with w = scale * q + min per group of ``group`` consecutive inputs:
- kind 4: q in 0..15: Q4_0, Q4_1, Q4_K, int4 (group 32); Q3_K (q + 4, group 16), Q2_K (0..3, group 16);
- kind 5: q in 0..31: Q5_0 (the min is -16 scale), Q5_1 and Q5_K (group 32), stored in the kernels as
  kind 4's nibbles and a plane of fifth bits: 5 bits a weight, as in the file;
- kind 6: q in 0..63: Q6_K (the min is -32 scale, group 16), kind 5's planes and one of sixth bits;
- kind 8: q in -128..127: Q8_0, IQ4_NL and IQ4_XS (their 16 non-linear levels, -127..113), int8 (group 32);
- kind 9: W8A8 (``--quantization w8a8``): kind 8's q in -127..127 with one scale per output channel (group
  = the input size), run with int8 activations (a scale per token, computed as they come);
- kind 10: FP8 E4M3 (compressed-tensors FP8 checkpoints): q holds the bytes, w = scale * fp8(q), one scale
  per output channel or per tensor (group = the input size); the kernels widen it to bf16 exactly.
The IQ4 formats take 8 bits a weight here (their files: 4.25-4.5), still half of bf16.
Scales and mins are fp32: GGUF's fp16 d, m times the blocks' integer sub-scales convert to them exactly,
so a backend computes with the file's exact weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

GGUF_NATIVE = (
    T.Q4_0,
    T.Q4_1,
    T.Q8_0,
    T.Q4_K,
    T.Q6_K,
    T.Q5_0,
    T.Q5_1,
    T.Q5_K,
    T.Q3_K,
    T.Q2_K,
    T.IQ4_NL,
    T.IQ4_XS,
)
# IQ4's 16 levels (ggml's kvalues_iq4nl)
_IQ4_LEVELS = np.array(
    [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8
)


@dataclass
class QuantizedWeight:
    kind: int  # 4, 5, 6, 8, 9 or 10
    q: torch.Tensor  # [N, K] uint8 (kinds 4, 5, 6 and 10: FP8 bytes) or int8 (kinds 8 and 9)
    scale: torch.Tensor  # [N, K // group] float32
    min: torch.Tensor | None  # [N, K // group] float32, or None (symmetric)
    group: int
    # Input j of q is the layer's input perm[j] (GPTQ act-order: groups made contiguous); None: in order.
    perm: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.q.shape
        q = self.q.view(torch.float8_e4m3fn).float() if self.kind == 10 else self.q.float()
        w = q.view(n, k // self.group, self.group) * self.scale[..., None]
        if self.min is not None:
            w = w + self.min[..., None]
        w = w.view(n, k)
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(1, self.perm, w)
        return w.to(dtype)

    def as_kind(self, kind: int, group: int) -> QuantizedWeight:
        """The same weights as a wider kind (4 -> 5 -> 6 -> 8) with a smaller or equal group (exact: 0..15,
        0..31 and 0..63 fit every wider kind)."""
        rep = self.group // group
        mins = None if self.min is None else self.min.repeat_interleave(rep, dim=1)
        q = self.q.to(torch.int8) if kind == 8 and self.kind != 8 else self.q
        return QuantizedWeight(kind, q, self.scale.repeat_interleave(rep, dim=1), mins, group, self.perm)

    @staticmethod
    def cat(parts: list[QuantizedWeight]) -> QuantizedWeight:
        """Row-wise concatenation (fused q/k/v, gate/up); mixed formats meet as the widest kind among
        them, smallest group."""
        if len({(p.kind, p.group) for p in parts}) > 1:
            if {p.kind for p in parts} & {9, 10}:
                raise ValueError(f"model: fused shards of kinds {sorted({p.kind for p in parts})} do not mix")
            kind, group = max(p.kind for p in parts), min(p.group for p in parts)
            parts = [p.as_kind(kind, group) for p in parts]
        has_min = any(p.min is not None for p in parts)
        mins = None
        if has_min:
            mins = torch.cat([p.min if p.min is not None else torch.zeros_like(p.scale) for p in parts])
        first = parts[0]
        if any(not _same(p.perm, first.perm) for p in parts):
            raise ValueError("model: fused shards permute their inputs differently (GPTQ act-order)")
        return QuantizedWeight(
            first.kind,
            torch.cat([p.q for p in parts]),
            torch.cat([p.scale for p in parts]),
            mins,
            first.group,
            first.perm,
        )

    def pad_rows(self, n: int) -> QuantizedWeight:
        """The same weights with zero rows appended up to ``n`` rows (a tensor-parallel vocabulary slice)."""

        def pad(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else torch.cat([t, t.new_zeros(n - t.shape[0], t.shape[1])])

        return QuantizedWeight(self.kind, pad(self.q), pad(self.scale), pad(self.min), self.group, self.perm)

    def permute_rows(self, fn) -> QuantizedWeight:  # noqa: ANN001 - a numpy row permutation
        def apply(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else torch.from_numpy(np.ascontiguousarray(fn(t.numpy())))

        q, scale, mins = apply(self.q), apply(self.scale), apply(self.min)
        return QuantizedWeight(self.kind, q, scale, mins, self.group, self.perm)


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def quantize_rtn(w: torch.Tensor, bits: int, group: int = 32) -> QuantizedWeight:
    """Round to nearest, group-wise: int8 symmetric (absmax / 127), int4 asymmetric (min, 15 steps)."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"quantization: input size {k} is not a multiple of the group size {group}")
    wg = w.float().view(n, k // group, group)
    if bits == 8:
        scale = wg.abs().amax(-1) / 127
        inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
        q = torch.round(wg * inv[..., None]).clamp(-127, 127).to(torch.int8)
        return QuantizedWeight(8, q.view(n, k), scale, None, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = (hi - lo) / 15
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    q = torch.round((wg - lo[..., None]) * inv[..., None]).clamp(0, 15).to(torch.uint8)
    return QuantizedWeight(4, q.view(n, k), scale, lo, group)


def quantize_w8a8(w: torch.Tensor) -> QuantizedWeight:
    """Kind 9: int8 per output channel, symmetric (absmax / 127), round to nearest."""
    n, k = w.shape
    if k % 4:
        raise ValueError(f"quantization: w8a8 needs an input size divisible by 4, got {k}")
    q8 = quantize_rtn(w, 8, group=k)
    return QuantizedWeight(9, q8.q, q8.scale, None, k)


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W8A8's activations, per row (token): (q [M, K] int8 in -127..127, scale [M] fp32), q = rint(x * (127 /
    amax)), scale = amax / 127 (the kernels' arithmetic, in fp32)."""
    x = x.float()
    amax = x.abs().amax(-1)
    # NOTE: tensor by tensor: PyTorch divides by (and into) a Python scalar through its reciprocal, one ulp
    # off a true division now and then, which moves ties like 63.499996 -> 64
    c = torch.full_like(amax, 127.0)
    inv = torch.where(amax > 0, c / amax, torch.zeros_like(amax))
    return torch.round(x * inv[:, None]).to(torch.int8), amax / c


def w8a8_reference(
    x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None = None, outlier: float | None = None
) -> torch.Tensor:
    """y = bf16(float(xq @ q.T) * scale_w * scale_x + bias): the kernels' W8A8 result, on PyTorch ops (exact
    integer sums in int64). ``outlier``: LLM.int8's decomposition, as the kernels do it: the columns whose
    magnitude exceeds it in any row are left out of xq and added in fp32, column by column in ascending
    order, as x[:, c] q[:, c] (exact products) times scale_w."""
    cols = [] if outlier is None else (x.float().abs().amax(0) > outlier).nonzero()[:, 0].tolist()
    xin = x.clone()
    xin[:, cols] = 0
    xq, sx = quantize_activations(xin)
    acc = (xq.long() @ w.q.long().T).to(torch.int32).float()
    y = acc * w.scale[:, 0] * sx[:, None]
    if cols:
        extra = torch.zeros_like(y)
        for c in cols:
            extra = extra + x[:, c : c + 1].float() * w.q[:, c].float()[None, :]
        y = y + extra * w.scale[:, 0]
    if bias is not None:
        y = y + bias.float()
    return y.to(torch.bfloat16)


def _f16(b: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(b).view(np.float16).astype(np.float32)


def from_gguf(qtype: T, data: np.ndarray, rows: int, cols: int) -> QuantizedWeight:
    """A GGUF tensor's raw blocks -> QuantizedWeight [rows, cols], value for value what gguf dequantizes."""
    raw = np.asarray(data).reshape(-1).view(np.uint8)
    if qtype == T.Q4_0 or qtype == T.Q4_1:
        has_min = qtype == T.Q4_1
        b = raw.reshape(-1, 20 if has_min else 18)
        d = _f16(b[:, :2])
        m = _f16(b[:, 2:4]) if has_min else -8 * d
        qs = b[:, 4:20] if has_min else b[:, 2:18]
        q = np.concatenate([qs & 15, qs >> 4], axis=1)
        return _make(4, q, d, m, 32, rows, cols)
    if qtype == T.Q8_0:
        b = raw.reshape(-1, 34)
        return _make(8, b[:, 2:].view(np.int8), _f16(b[:, :2]), None, 32, rows, cols)
    if qtype == T.Q4_K:
        from gguf.quants import Q4_K

        b = raw.reshape(-1, 144)
        nb = b.shape[0]
        sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
        scale = _f16(b[:, :2]) * sc.astype(np.float32)  # [nb, 8]
        mins = -_f16(b[:, 2:4]) * mn.astype(np.float32)
        qs = b[:, 16:].reshape(nb, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        return _make(4, (qs & 15).reshape(nb, 256), scale, mins, 32, rows, cols)
    if qtype == T.Q6_K:
        b = raw.reshape(-1, 210)
        nb = b.shape[0]
        ql = b[:, :128].reshape(nb, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        ql = (ql & 15).reshape(nb, 2, 128)
        qh = b[:, 128:192].reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
        qh = (qh & 3).reshape(nb, 2, 128)
        q = (ql | (qh << 4)).reshape(nb, 256)  # the file's q + 32
        scale = _f16(b[:, 208:210]) * np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
        return _make(6, q, scale, -32 * scale, 16, rows, cols)
    if qtype == T.Q5_0 or qtype == T.Q5_1:
        has_min = qtype == T.Q5_1
        b = raw.reshape(-1, 24 if has_min else 22)
        d = _f16(b[:, :2])
        at = 4 if has_min else 2
        q = _five_bits(b[:, at + 4 : at + 20], b[:, at : at + 4].view(np.uint32)[:, 0])
        return _make(5, q, d, _f16(b[:, 2:4]) if has_min else -16 * d, 32, rows, cols)
    if qtype == T.Q5_K:
        from gguf.quants import Q4_K

        b = raw.reshape(-1, 176)
        nb = b.shape[0]
        sc, mn = Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
        scale = _f16(b[:, :2]) * sc.astype(np.float32)  # [nb, 8]
        mins = -_f16(b[:, 2:4]) * mn.astype(np.float32)
        ql = b[:, 48:].reshape(nb, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        qh = b[:, 16:48].reshape(nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
        q = (ql & 15).reshape(nb, 8, 32) | ((qh & 1) << 4)
        return _make(5, q.reshape(nb, 256), scale, mins, 32, rows, cols)
    if qtype == T.Q3_K:
        b = raw.reshape(-1, 110)
        nb = b.shape[0]
        lo = (b[:, 96:104].reshape(nb, 1, 8) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)) & 15
        hi = (b[:, 104:108].reshape(nb, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)) & 3
        sc = (lo.reshape(nb, 16) | (hi.reshape(nb, 16) << 4)).astype(np.int8) - np.int8(32)
        scale = _f16(b[:, 108:110]) * sc.astype(np.float32)  # [nb, 16]
        ql = (
            b[:, 32:96].reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
        ) & 3
        qh = (b[:, :32].reshape(nb, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
        q = ql.reshape(nb, 256) + (qh.reshape(nb, 256) << 2)  # the file's q (-4..3) + 4
        return _make(4, q, scale, -4 * scale, 16, rows, cols)
    if qtype == T.Q2_K:
        b = raw.reshape(-1, 84)
        nb = b.shape[0]
        scale = _f16(b[:, 80:82]) * (b[:, :16] & 15).astype(np.float32)  # [nb, 16]
        mins = -_f16(b[:, 82:84]) * (b[:, :16] >> 4).astype(np.float32)
        q = (
            b[:, 16:80].reshape(nb, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
        ) & 3
        return _make(4, q.reshape(nb, 256), scale, mins, 16, rows, cols)
    if qtype == T.IQ4_NL:
        b = raw.reshape(-1, 18)
        q = np.concatenate([b[:, 2:] & 15, b[:, 2:] >> 4], axis=1)
        return _make(8, _IQ4_LEVELS[q], _f16(b[:, :2]), None, 32, rows, cols)
    if qtype == T.IQ4_XS:
        b = raw.reshape(-1, 136)
        nb = b.shape[0]
        lo = (b[:, 4:8].reshape(nb, 4, 1) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2)) & 15
        hi = (b[:, 2:4].view(np.uint16) >> (2 * np.arange(8, dtype=np.uint16)).reshape(1, 8)) & 3
        sc = (lo.reshape(nb, 8) | (hi.astype(np.uint8) << 4)).astype(np.int8) - np.int8(32)
        scale = _f16(b[:, :2]) * sc.astype(np.float32)  # [nb, 8]
        qs = b[:, 8:].reshape(nb, 8, 1, 16) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
        return _make(8, _IQ4_LEVELS[(qs & 15).reshape(nb, 256)], scale, None, 32, rows, cols)
    raise ValueError(f"GGUF type {qtype.name} is not read as blocks (only {[t.name for t in GGUF_NATIVE]})")


def _five_bits(qs: np.ndarray, qh: np.ndarray) -> np.ndarray:
    """Q5_0 / Q5_1 blocks: 32 values of 0..31 from 16 bytes of low nibbles and 32 high bits."""
    low = np.concatenate([qs & 15, qs >> 4], axis=1)  # [nb, 32]
    high = ((qh[:, None] >> np.arange(32, dtype=np.uint32)[None, :]) & 1).astype(np.uint8)
    return low | (high << 4)


def _make(kind, q, scale, mins, group, rows, cols) -> QuantizedWeight:  # noqa: ANN001
    g = cols // group
    return QuantizedWeight(
        kind,
        torch.from_numpy(np.ascontiguousarray(q).reshape(rows, cols)),
        torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32).reshape(rows, g)),
        None
        if mins is None
        else torch.from_numpy(np.ascontiguousarray(mins, dtype=np.float32).reshape(rows, g)),
        group,
    )


class QuantizedTorchMethod:
    """A Linear on PyTorch ops from a QuantizedWeight, for a backend without kernels of its own: kind 9 (W8A8,
    BitNet) quantizes its input per token and multiplies the integer values (exact in fp32 below 2^24),
    then scales; other kinds multiply the dequantized weight."""

    def __init__(self, w: QuantizedWeight, dtype: torch.dtype) -> None:
        self.weight_format = f"q{w.kind}"
        self.w8a8 = w.kind == 9
        if self.w8a8:
            self.q, self.scale = w.q.to(torch.float32), w.scale[:, 0].float()
        else:
            self.weight = w.dequantize(dtype)

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - Linear
        if not self.w8a8:
            return torch.nn.functional.linear(x, self.weight.to(x.device), layer.bias)
        xq, sx = quantize_activations(x)
        y = (
            torch.nn.functional.linear(xq.float(), self.q.to(x.device))
            * self.scale.to(x.device)
            * sx[:, None]
        )
        if layer.bias is not None:
            y = y + layer.bias.float()
        return y.to(x.dtype)
