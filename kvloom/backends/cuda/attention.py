"""Paged attention in Triton for the CUDA backend: every query row of a step (decodes, prefill chunks) over
its sequence's blocks, in the usual cache layout ([KV heads, blocks, block_size, head_dim] per layer, as
TorchAttention keeps it; K/V written by slot as there).

One kernel for all rows (FlashAttention-2's loop over a paged cache): a program takes a tile of up to
BLOCK_M consecutive query rows of one sequence and one query head, and walks that sequence's blocks from the
first one its window reaches to its last row's position, with an online softmax in fp32. The mask is
causal and within the sliding window; the null entries of a sliding-window table lie before the first
block read. fp32 models multiply in IEEE fp32 (no TF32), bf16/fp16 ones in their dtype with fp32 sums
(under the interpreter in fp32: its tl.dot mistakes bf16 operands).

Tests run the kernel under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) against TorchAttention.
NOTE: a decode row fills one row of a 16-row tile (tl.dot's least M on GPUs); a decode kernel that puts a
KV head's query heads in those rows, and split-K over long contexts (flash-decoding), are not written yet.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from kvloom.layers.attention import output_rows, padded_tables

BLOCK_M = 16
NO_WINDOW = 1 << 30


@triton.jit
def _paged_attention(
    q_ptr,
    k_ptr,
    v_ptr,
    o_ptr,
    tables_ptr,
    tile_seq_ptr,
    tile_row_ptr,
    tile_pos_ptr,
    tile_len_ptr,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kh,
    stride_kb,
    stride_kp,
    stride_bt,
    scale,
    window_ptr,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BS: tl.constexpr,
    IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // G
    seq = tl.load(tile_seq_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)
    pos0 = tl.load(tile_pos_ptr + tile)
    n = tl.load(tile_len_ptr + tile)
    window = tl.load(window_ptr)
    m_offs = tl.arange(0, BLOCK_M)
    d_offs = tl.arange(0, BLOCK_D)
    p_offs = tl.arange(0, BS)
    m_mask = m_offs < n
    d_mask = d_offs < D
    q = tl.load(
        q_ptr + (row0 + m_offs)[:, None] * stride_qt + h * stride_qh + d_offs[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    q_pos = pos0 + m_offs
    lo = tl.maximum(pos0 + 1 - window, 0)  # the first key any row of the tile reads
    hi = pos0 + n  # keys below this
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # NOTE: a while loop: under the interpreter (numpy 2) a range over loaded bounds fails to convert them
    p0 = (lo // BS) * BS
    while p0 < hi:
        block = tl.load(tables_ptr + seq * stride_bt + p0 // BS)
        kv = kvh * stride_kh + block * stride_kb + p_offs[:, None] * stride_kp + d_offs[None, :]
        k = tl.load(k_ptr + kv, mask=d_mask[None, :], other=0.0)
        v = tl.load(v_ptr + kv, mask=d_mask[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale
        k_pos = p0 + p_offs
        valid = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - window)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet (padding rows)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
        p0 += BS
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        o_ptr + (row0 + m_offs)[:, None] * stride_ot + h * stride_oh + d_offs[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


@dataclass
class TritonAttentionMetadata:
    """One KV group's step data on the device: slots, padded block tables, and the query tiles (a tile: up
    to BLOCK_M consecutive rows of one sequence)."""

    slot_mapping: torch.Tensor  # [rows] long
    block_tables: torch.Tensor  # [seqs, max_blocks] int32
    tile_seq: torch.Tensor  # [tiles] int32: the tile's sequence (row of block_tables)
    tile_row: torch.Tensor  # [tiles] int32: its first row in the step
    tile_pos: torch.Tensor  # [tiles] int32: that row's position
    tile_len: torch.Tensor  # [tiles] int32: its rows
    output_rows: torch.Tensor | None


def build_tiles(query_lens: list[int], positions: np.ndarray) -> np.ndarray:
    """[4, tiles] int32: (sequence, first row, its position, rows) of each tile of BLOCK_M rows."""
    tiles = []
    row = 0
    for seq, n in enumerate(query_lens):
        for first in range(0, n, BLOCK_M):
            tiles.append((seq, row + first, int(positions[row + first]), min(BLOCK_M, n - first)))
        row += n
    return np.array(tiles, dtype=np.int32).reshape(-1, 4).T.copy()


class TritonAttention:
    """Paged attention on Triton kernels (the CUDA backend; CPU tensors under TRITON_INTERPRET=1)."""

    name = "kvloom Triton kernels"

    @staticmethod
    def supports(block_size: int, head_dim: int) -> bool:
        """Block sizes the kernel tiles by (a power of two, at least tl.dot's 16) and heads up to 256."""
        return block_size >= 16 and block_size & (block_size - 1) == 0 and head_dim <= 256

    def build_metadata(  # noqa: ANN001 - ModelInput
        self, inp, group: int, block_size: int, device: torch.device
    ) -> TritonAttentionMetadata:
        """KV group ``group``'s metadata."""
        tiles = torch.from_numpy(build_tiles(inp.query_lens, inp.positions)).to(device)
        tables = padded_tables(inp.block_tables[group]).astype(np.int32)
        return TritonAttentionMetadata(
            slot_mapping=torch.from_numpy(inp.slots[group]).to(device),
            block_tables=torch.from_numpy(tables).to(device),
            tile_seq=tiles[0],
            tile_row=tiles[1],
            tile_pos=tiles[2],
            tile_len=tiles[3],
            output_rows=output_rows(inp, device),
        )

    def forward(
        self,
        layer,
        positions: torch.Tensor,
        qkv: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: TritonAttentionMetadata,  # noqa: ANN001 - models' Attention
    ) -> torch.Tensor:
        q, k, v = layer.split_qkv(positions, qkv)
        o = paged_attention(q, k, v, kv_cache[0], kv_cache[1], meta, layer.scale, layer.window)
        return o.reshape(qkv.shape[0], layer.q_size)


@functools.cache
def _window(window: int, device: torch.device) -> torch.Tensor:
    return torch.tensor([window], dtype=torch.int32, device=device)


def paged_attention(
    q: torch.Tensor,  # [rows, heads, head_dim]
    k: torch.Tensor,  # [rows, kv_heads, head_dim]
    v: torch.Tensor,
    k_cache: torch.Tensor,  # [kv_heads, num_blocks, block_size, head_dim]
    v_cache: torch.Tensor,
    meta: TritonAttentionMetadata,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Write the rows' K/V to their slots, then attend every row over its sequence's cache: [rows, heads,
    head_dim]."""
    kv_heads, _, block_size, head_dim = k_cache.shape
    k_cache.view(kv_heads, -1, head_dim).index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
    v_cache.view(kv_heads, -1, head_dim).index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
    q = q.contiguous()
    heads = q.shape[1]
    out = torch.empty_like(q)
    grid = (meta.tile_seq.shape[0], heads)
    _paged_attention[grid](
        q,
        k_cache,
        v_cache,
        out,
        meta.block_tables,
        meta.tile_seq,
        meta.tile_row,
        meta.tile_pos,
        meta.tile_len,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        meta.block_tables.stride(0),
        scale,
        _window(window or NO_WINDOW, q.device),  # NOTE: a tensor: see the loop's note
        G=heads // kv_heads,
        D=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),  # tl.dot's least K on GPUs
        BLOCK_M=BLOCK_M,
        BS=block_size,
        # NOTE: the interpreter's tl.dot gets bf16 operands wrong (numpy has no bf16): it multiplies in fp32
        IEEE=q.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1",
    )
    return out
