"""Paged attention on PyTorch ops (CPU and CUDA alike).

K/V of every scheduled token are written into their cache slots, then each sequence attends over the
blocks of its block table. Single-token queries (decodes) are batched into one call over padded block
tables; longer queries (prefill chunks) get one call each, in slices of query rows when long. Every call
is `_grouped_attention`: two batched matmuls with a boolean mask and an fp32 softmax, which on CPU
measured faster than SDPA's kernels for every shape we run (see its NOTE).

With kvloom's CPU kernels (bf16, shapes they take, block size a multiple of 16: the model runner decides
once, `CpuKernels.kernel_attention_ok`), the cache is kept in the kernels' own layout, written by them (in
the fused rope kernel when there is one), and every row, decode or prefill, is one query over its
sequence's blocks in the C attention kernel (`meta.token_*` tables). The PyTorch path below serves
everything else (fp32/fp16, CUDA, other shapes) with the usual [KVH, num_blocks, block_size, D] layout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
    """Built once per step by the model runner and shared by all layers.

    NOTE: the flat token batch holds the ``num_decodes`` single-token queries first, then the prefills.
    """

    slot_mapping: torch.Tensor  # [num_tokens] long
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] long
    decode_context_lens: torch.Tensor | None  # [num_decodes] long
    prefills: list[PrefillSeq]
    block_size: int
    # With the CPU kernels' attention, every row of the step as one query over the paged cache (its K/V
    # written first): block tables of all scheduled sequences, each row's table index and context length
    # (position + 1). Set by the model runner when the cache is in the kernels' layout; None otherwise.
    token_block_tables: torch.Tensor | None = None  # [num_seqs, max_blocks] long
    token_table_index: torch.Tensor | None = None  # [num_tokens] long
    token_context_lens: torch.Tensor | None = None  # [num_tokens] long
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


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [num_kv_heads, num_blocks, block_size, head_dim]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    window: int | None = None,
    kernels=None,  # backends.cpu.kernels.CpuKernels: needed when meta has token tables (their cache layout)
    cache_written: bool = False,  # K/V of this step are in the cache already (the fused rope kernel)
) -> torch.Tensor:
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if meta.token_context_lens is not None:
        # The kernels' path: the cache is in their layout (the runner chose it), every row reads it in place.
        if not cache_written:
            kernels.write_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        kernels.decode_attention(
            q,
            k_cache,
            v_cache,
            meta.token_block_tables,
            meta.token_context_lens,
            out,
            scale,
            window,
            row_table=meta.token_table_index,
        )
        return out
    if not cache_written:
        k_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        v_cache.view(num_kv_heads, -1, head_dim).index_copy_(1, meta.slot_mapping, v.transpose(0, 1))

    nd = meta.num_decodes
    if nd:
        # [num_kv_heads, num_decodes, max_blocks * block_size, head_dim]
        tables = meta.decode_block_tables
        kd = _gather(k_cache, tables.flatten()).view(num_kv_heads, nd, -1, head_dim)
        vd = _gather(v_cache, tables.flatten()).view(num_kv_heads, nd, -1, head_dim)
        out[:nd] = _grouped_attention(q[:nd, None], kd, vd, meta.decode_mask(window), scale)[:, 0]

    for i, p in enumerate(meta.prefills):
        rows = slice(p.q_start, p.q_start + p.q_len)
        if p.start == 0:
            # The whole context is this step's tokens: read them directly instead of from the cache.
            kp, vp = k[rows].transpose(0, 1), v[rows].transpose(0, 1)  # [num_kv_heads, q_len, head_dim]
        else:
            kp = _gather(k_cache, p.block_ids)[:, : p.context_len]  # [num_kv_heads, context_len, head_dim]
            vp = _gather(v_cache, p.block_ids)[:, : p.context_len]
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
