"""Paged attention on PyTorch ops (CPU and CUDA alike): the reference every backend is held to.

K/V of every scheduled token are written into their cache slots, then each sequence attends over the
blocks of its block table. Single-token queries (decodes) are batched into one call over padded block
tables; longer queries (prefill chunks) get one call each, in slices of query rows when long. Every call
is `_grouped_attention`: two batched matmuls with a boolean mask and an fp32 softmax, which on CPU
measured faster than SDPA's kernels for every shape we run (see its NOTE).

``TorchAttention`` is the attention implementation a model's Attention layers use unless a backend gives
them another (kvloom/backends: the CPU kernels' one keeps the cache in their own layout). An
implementation builds its metadata once per step (``build_metadata``, from the step's ModelInput) and
runs each layer's attention (``forward``) from the layer's fused qkv output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from kvloom.layers.kv_cache import KVFormat


@dataclass
class PrefillSeq:
    q_start: int  # first row of this sequence in the flat token batch
    q_len: int
    start: int  # tokens already in the cache before this step (== position of the first query)
    block_ids: torch.Tensor  # [num_blocks] long

    @property
    def context_len(self) -> int:
        return self.start + self.q_len


@dataclass
class AttentionMetadata:
    """TorchAttention's per-step data, shared by all layers.

    NOTE: the flat token batch holds the ``num_decodes`` single-token queries first, then the prefills.
    """

    slot_mapping: torch.Tensor  # [num_tokens] long
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] long
    decode_context_lens: torch.Tensor | None  # [num_decodes] long
    prefills: list[PrefillSeq]
    block_size: int
    # The rows whose hidden state the step wants (ascending): the model returns those alone. None: all.
    output_rows: torch.Tensor | None = None  # [num_outputs] long
    _masks: dict = field(default_factory=dict)

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """[num_decodes, 1, max_blocks * block_size] bool: which cached positions each decode reads."""
        key = ("decode", window)
        if key not in self._masks:
            length = self.decode_block_tables.shape[1] * self.block_size
            pos = torch.arange(length, device=self.slot_mapping.device)[None, :]
            ctx = self.decode_context_lens[:, None]
            mask = pos < ctx
            if window is not None:
                mask &= pos > ctx - 1 - window
            self._masks[key] = mask[:, None, :]
        return self._masks[key]

    def prefill_mask(self, i: int, window: int | None) -> torch.Tensor:
        """[q_len, context_len] bool: causal, and within the sliding window when there is one."""
        p = self.prefills[i]
        key = ("prefill", i, window)
        if key not in self._masks:
            device = self.slot_mapping.device
            q_pos = torch.arange(p.start, p.context_len, device=device)[:, None]
            k_pos = torch.arange(p.context_len, device=device)[None, :]
            mask = k_pos <= q_pos
            if window is not None:
                mask &= k_pos > q_pos - window
            self._masks[key] = mask
        return self._masks[key]


# The most score elements (num_heads x query rows x context) one attention call materializes; longer
# prefills are cut into slices of query rows (64 MiB of fp32 scores at most).
_MAX_GROUPED_SCORES = 1 << 24


def _grouped_attention(
    q: torch.Tensor,  # [batch, q_len, num_heads, head_dim]
    k: torch.Tensor,  # [num_kv_heads, batch, length, head_dim]
    v: torch.Tensor,
    mask: torch.Tensor,  # [batch, q_len, length] bool: which keys each query reads
    scale: float,
) -> torch.Tensor:
    """Masked attention as two batched matmuls, query heads grouped under their KV head.

    K/V come head-major, as the cache stores them, so the matmuls read them without a copy.
    NOTE: measured on 2 CPU cores in bf16 (9/3 heads, head_dim 64), against SDPA's CPU kernel with the same
    mask: 32 decodes x 208 positions 0.46 vs 4.8 ms; one 64-token chunk over 1088 positions 2.0 vs 6.6 ms.
    """
    b, q_len, num_heads, head_dim = q.shape
    num_kv_heads, length = k.shape[0], k.shape[2]
    group = num_heads // num_kv_heads
    qg = (q * scale).view(b, q_len, num_kv_heads, group, head_dim).permute(2, 0, 3, 1, 4)
    qg = qg.reshape(num_kv_heads, b, group * q_len, head_dim)
    # NOTE: scores and probabilities stay in the model dtype: the matmul rounds the scores to it anyway, the
    # CPU softmax kernel accumulates bf16 in fp32, and the PV matmul reads bf16 probabilities. Dtype
    # conversions of the score matrix cost more than the matmuls here (1088 positions: 65 -> 35 ms).
    scores = torch.matmul(qg, k.transpose(-1, -2))  # [kv_heads, b, group * q_len, length]
    scores = scores.view(num_kv_heads, b, group, q_len, length)
    scores.masked_fill_(~mask[None, :, None], float("-inf"))
    probs = scores.softmax(dim=-1).view(num_kv_heads, b, group * q_len, length)
    out = torch.matmul(probs, v).view(num_kv_heads, b, group, q_len, head_dim)
    return out.permute(1, 3, 0, 2, 4).reshape(b, q_len, num_heads, head_dim)


def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """[num_kv_heads, num_blocks, block_size, head_dim] -> [num_kv_heads, len(block_ids) * block_size,
    head_dim]: whole blocks copied as rows (index_select on a 3-D view, not element-wise indexing)."""
    kv_heads, num_blocks, block_size, head_dim = cache.shape
    rows = cache.view(kv_heads, num_blocks, block_size * head_dim).index_select(1, block_ids)
    return rows.view(kv_heads, -1, head_dim)


def write_cache(
    k: torch.Tensor,  # [tokens, num_kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_kv_heads, num_blocks, block_size, head_dim]
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [tokens] long
) -> None:
    """Each token's K/V into its slot of the cache (a slot: block * block_size + offset)."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, slot_mapping, k.transpose(0, 1))
    v_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, slot_mapping, v.transpose(0, 1))


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_kv_heads, num_blocks, block_size, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
    fmt: KVFormat | None = None,  # a one-byte cache's format (kv_cache.py); None: the cache holds q's dtype
) -> torch.Tensor:
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    gather = _gather
    if fmt is None:
        write_cache(k, v, k_cache, v_cache, meta.slot_mapping)
    else:  # attention reads what the cache holds, this step's K/V included
        kq, vq = fmt.quantize(k), fmt.quantize(v)
        write_cache(kq, vq, k_cache, v_cache, meta.slot_mapping)
        k, v = fmt.dequantize(kq, q.dtype), fmt.dequantize(vq, q.dtype)

        def gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
            return fmt.dequantize(_gather(cache, block_ids), q.dtype)

    nd = meta.num_decodes
    if nd:
        # [num_kv_heads, num_decodes, max_blocks * block_size, head_dim]
        tables = meta.decode_block_tables
        kd = gather(k_cache, tables.flatten()).view(num_kv_heads, nd, -1, head_dim)
        vd = gather(v_cache, tables.flatten()).view(num_kv_heads, nd, -1, head_dim)
        out[:nd] = _grouped_attention(q[:nd, None], kd, vd, meta.decode_mask(window), scale)[:, 0]

    for i, p in enumerate(meta.prefills):
        rows = slice(p.q_start, p.q_start + p.q_len)
        if p.start == 0:
            # The whole context is this step's tokens: read them directly instead of from the cache.
            kp, vp = k[rows].transpose(0, 1), v[rows].transpose(0, 1)  # [num_kv_heads, q_len, head_dim]
        else:
            kp = gather(k_cache, p.block_ids)[:, : p.context_len]  # [num_kv_heads, context_len, head_dim]
            vp = gather(v_cache, p.block_ids)[:, : p.context_len]
        mask = meta.prefill_mask(i, window)
        # Slices of query rows keep each score matrix under _MAX_GROUPED_SCORES elements.
        step = max(1, _MAX_GROUPED_SCORES // (q.shape[1] * p.context_len))
        for a in range(0, p.q_len, step):
            b = min(p.q_len, a + step)
            # Keys past the slice's last query are all masked out: leave them out.
            end = p.start + b
            out[p.q_start + a : p.q_start + b] = _grouped_attention(
                q[p.q_start + a : p.q_start + b][None],
                kp[:, None, :end],
                vp[:, None, :end],
                mask[None, a:b, :end],
                scale,
            )[0]
    return out


def padded_tables(rows: list[list[int]]) -> np.ndarray:
    """Block tables of unequal length as one [len(rows), longest] int64 array, zero-padded."""
    width = max((len(r) for r in rows), default=0)
    return np.array([r + [0] * (width - len(r)) for r in rows], dtype=np.int64).reshape(len(rows), width)


class TorchAttention:
    """Paged attention on PyTorch ops, the cache in the usual [KVH, num_blocks, block_size, D] layout (a
    one-byte cache: [..., D + 2] uint8 rows, kv_cache.py)."""

    name = "PyTorch"

    def __init__(self, fmt: KVFormat | None = None) -> None:
        self.fmt = fmt

    def build_metadata(self, inp, group: int, block_size: int, device: torch.device) -> AttentionMetadata:  # noqa: ANN001 - ModelInput
        """KV group ``group``'s metadata."""
        lens = inp.query_lens
        block_tables = inp.block_tables[group]
        num_decodes = sum(1 for n in lens if n == 1)  # decodes come first
        tables = lens_ctx = None
        if num_decodes:
            tables = torch.from_numpy(padded_tables(block_tables[:num_decodes])).to(device)
            lens_ctx = torch.from_numpy(inp.positions[:num_decodes] + 1).to(device)
        prefills: list[PrefillSeq] = []
        row = num_decodes
        for n, blocks in zip(lens[num_decodes:], block_tables[num_decodes:], strict=True):
            block_ids = torch.tensor(blocks, dtype=torch.long, device=device)
            prefills.append(PrefillSeq(row, n, int(inp.positions[row]), block_ids))
            row += n
        return AttentionMetadata(
            slot_mapping=torch.from_numpy(inp.slots[group]).to(device),
            num_decodes=num_decodes,
            decode_block_tables=tables,
            decode_context_lens=lens_ctx,
            prefills=prefills,
            block_size=block_size,
            output_rows=output_rows(inp, device),
        )

    def forward(
        self,
        layer,
        positions: torch.Tensor,
        qkv: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,  # noqa: ANN001 - models' Attention
    ) -> torch.Tensor:
        """[tokens, q_size] attention output of ``layer`` (its fused qkv output given)."""
        q, k, v = layer.split_qkv(positions, qkv)
        o = self.paged(q, k, v, kv_cache[0], kv_cache[1], meta, layer.scale, layer.window)
        return o.reshape(qkv.shape[0], layer.q_size)

    def paged(self, q, k, v, k_cache, v_cache, meta, scale, window):  # noqa: ANN001, ANN201 - paged_attention's
        """The step's K/V written, then every row's attention (a subclass's kernels in its place)."""
        return paged_attention(q, k, v, k_cache, v_cache, meta, scale, window, self.fmt)


def output_rows(inp, device: torch.device) -> torch.Tensor | None:  # noqa: ANN001 - ModelInput
    rows = inp.output_rows
    return None if rows is None else torch.tensor(rows, dtype=torch.long, device=device)
