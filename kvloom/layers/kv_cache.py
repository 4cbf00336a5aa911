"""The KV cache's element formats (``--kv-cache-dtype``): the model's dtype, or one byte per element.

A quantized cache keeps each (token, KV head)'s K (and V) as D bytes and one fp32 scale: x = scale * q,
scale = amax / QMAX over the D values (1 where they are all zero), q = x / scale rounded to the nearest
int8 (half to even, |q| <= 127) or FP8 value (E4M3: |q| <= 448; E5M2: |q| <= 57344). A token's row of a
head is then D + 4 bytes instead of 2 D: 1.88x the tokens per GiB at D = 64, 1.94x at D = 128. Scales per
token and head follow each token's own range (K's outlier channels and position-dependent rotary
magnitudes), with nothing to calibrate; vLLM's FP8 cache keeps one scale per tensor (exactly 2x).

The PyTorch reference stores a token's row as [D bytes | scale as 4 bytes] in a [..., D + 4] uint8 cache;
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
        return head_dim + 4

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., D + 4] uint8 rows: the D bytes, then the fp32 scale's 4."""
        xf = x.float()
        amax = xf.abs().amax(dim=-1, keepdim=True)
        # NOTE: tensor / tensor: a true division, as the kernels' (torch divides by a Python scalar through
        # its reciprocal, which differs in the last bit)
        scale = amax / torch.full_like(amax, self.qmax)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        y = (xf / scale).clamp(-self.qmax, self.qmax)
        q = y.round().to(torch.int8) if self.kind == 1 else y.to(self.dtype)
        return torch.cat([q.view(torch.uint8), scale.view(torch.uint8)], dim=-1)

    def dequantize(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[..., D + 4] uint8 rows -> [..., D] values in ``dtype`` (each rounded once, from fp32)."""
        d = rows.shape[-1] - 4
        q = rows[..., :d].contiguous().view(self.dtype).float()
        scale = rows[..., d:].contiguous().view(torch.float32)
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
        f"{fmt.name} with a scale per token and head: {per_gib} tokens per GiB, "
        f"{plain / config.kv_bytes_per_token:.2f}x {dtype}'s {(1 << 30) // plain}"
    )
