"""The KV cache's element formats (``--kv-cache-dtype``): the model's dtype, or one byte per element.

A quantized cache keeps each (token, KV head)'s K (and V) as D bytes and a bf16 scale: x = scale * q,
scale = amax / QMAX over the D values rounded up to a bf16 (1 where they are all zero), q = x / scale
rounded to the nearest int8 (half to even, |q| <= 127) or FP8 value (E4M3: |q| <= 448; E5M2: |q| <=
57344). A token's row of a head is then D + 2 bytes instead of 2 D: 1.94x the tokens per GiB at D = 64,
1.97x at D = 128. Scales per token and head follow each token's own range (K's outlier channels and
position-dependent rotary magnitudes), with nothing to calibrate; vLLM's FP8 cache keeps one scale per
tensor (exactly 2x). Decision: bf16, not a power of two in one byte (OCP's E8M0, 1.97x at D = 64): the
largest value of a row then lands anywhere in the top binade instead of on QMAX, and FP8's relative steps
there cost its error 1.6x (SmolLM2 perplexity, E4M3: +2.0% against +0.3% with an exact scale); bf16's
rounding up moves it by at most 2^-8 (the same error as fp32 scales, measured).

The PyTorch reference stores a token's row as [D bytes | scale as 2 bytes] in a [..., D + 2] uint8 cache;
the CPU kernels keep the bytes in their own layout with a block's scales after its data
(kvloom/backends/cpu/cpu_kernels.c, "KV cache layout"). Both quantize bit for bit alike (``quantize``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvloom.config import KV_CACHE_DTYPES


@dataclass(frozen=True)
class KVFormat:
    """A one-byte KV cache format."""

    name: str  # as --kv-cache-dtype spells it (fp8 is fp8_e4m3, as in vLLM)
    kind: int  # the CPU kernels' code: 1 int8, 2 FP8 E4M3, 3 FP8 E5M2
    qmax: float
    dtype: torch.dtype  # the byte's torch dtype

    @staticmethod
    def of(name: str) -> KVFormat | None:
        """The format of a --kv-cache-dtype value; None: the model's dtype (auto)."""
        if name not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype: {name!r} is not one of {', '.join(KV_CACHE_DTYPES)}")
        return _FORMATS.get(name)

    def row_bytes(self, head_dim: int) -> int:
        """Bytes of one token's K (or V) of one head: the values and their scale."""
        return head_dim + 2

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., D + 2] uint8 rows: the D bytes, then the bf16 scale's 2."""
        xf = x.float()
        amax = xf.abs().amax(dim=-1, keepdim=True)
        # NOTE: tensor / tensor: a true division, as the kernels' (torch divides by a Python scalar through
        # its reciprocal, which differs in the last bit)
        bits = (amax / torch.full_like(amax, self.qmax)).view(torch.int32)
        bits = torch.where((bits & 0xFFFF) != 0, (bits + 0x10000) & -0x10000, bits)  # up to a bf16
        scale = torch.where(amax > 0, bits.view(torch.float32), torch.ones_like(amax))
        y = (xf / scale).clamp(-self.qmax, self.qmax)
        q = y.round().to(torch.int8) if self.kind == 1 else y.to(self.dtype)
        return torch.cat([q.view(torch.uint8), scale.to(torch.bfloat16).view(torch.uint8)], dim=-1)

    def dequantize(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[..., D + 2] uint8 rows -> [..., D] values in ``dtype`` (each rounded once, from fp32)."""
        d = rows.shape[-1] - 2
        q = rows[..., :d].contiguous().view(self.dtype).float()
        scale = rows[..., d:].contiguous().view(torch.bfloat16).float()
        return (q * scale).to(dtype)


_FORMATS = {
    "int8": KVFormat("int8", 1, 127.0, torch.int8),
    "fp8": KVFormat("fp8_e4m3", 2, 448.0, torch.float8_e4m3fn),
    "fp8_e4m3": KVFormat("fp8_e4m3", 2, 448.0, torch.float8_e4m3fn),
    "fp8_e5m2": KVFormat("fp8_e5m2", 3, 57344.0, torch.float8_e5m2),
}


def kv_cache_density(config) -> str:  # noqa: ANN001 - EngineConfig
    """The start-up log's words for the cache's format and how many tokens a GiB of it holds (this rank's
    heads of every layer), against the model's dtype."""
    per_gib = (1 << 30) // config.kv_bytes_per_token
    dtype = str(config.dtype).removeprefix("torch.")
    fmt = KVFormat.of(config.cache.kv_cache_dtype)
    if fmt is None:
        return f"{dtype}: {per_gib} tokens per GiB"
    plain = config.kv_bytes_per_token_as(one_byte=False)
    return (
        f"{fmt.name} with a bf16 scale per token and head: {per_gib} tokens per GiB, "
        f"{plain / config.kv_bytes_per_token:.2f}x {dtype}'s {(1 << 30) // plain}"
    )
