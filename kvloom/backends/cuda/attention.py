"""Paged attention in Triton for the CUDA backend: every query row of a step (decodes, prefill chunks) over
its sequence's blocks, in the usual cache layout ([KV heads, blocks, block_size, head_dim] per layer, as
TorchAttention keeps it; K/V written by slot as there).

Two kernels (FlashAttention-2's loop over a paged cache, online softmax in fp32):
- decode rows (a sequence's only query, the step's first rows): a program takes one row and one KV head,
  the G query heads that share its K/V as the rows of one tile, over one split of the row's blocks; long
  contexts are cut into splits whose partial results a second kernel combines (flash-decoding);
- every other row: a program takes a tile of up to BLOCK_M consecutive query rows of one sequence and one
  query head.
Both walk the sequence's blocks from the first one its window reaches; the mask is causal and within the
sliding window; the null entries of a sliding-window table lie before the first block read. fp32 models
multiply in IEEE fp32 (no TF32), bf16/fp16 ones in their dtype with fp32 sums (under the interpreter in
fp32: its tl.dot mistakes bf16 operands).

Tests run the kernels under Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) against TorchAttention.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import torch
import triton
import triton.language as tl

from kvloom.layers.attention import TorchAttention, output_rows, padded_tables, write_cache

BLOCK_M = 16
NO_WINDOW = 1 << 30


@triton.jit
def _block_step(q, k_ptr, v_ptr, kv, d_mask, valid, m_i, l_i, acc, scale, IEEE: tl.constexpr):
    """One block of keys for a tile of queries: scores, the mask ``valid`` ([rows, BS]), and the online
    softmax's running max, sum and output updated. Returns (m_i, l_i, acc)."""
    k = tl.load(k_ptr + kv, mask=d_mask[None, :], other=0.0)
    v = tl.load(v_ptr + kv, mask=d_mask[None, :], other=0.0)
    if IEEE:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = tl.where(valid, s * scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing yet (padding rows)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


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
        k_pos = p0 + p_offs
        valid = (k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] > q_pos[:, None] - window)
        m_i, l_i, acc = _block_step(q, k_ptr, v_ptr, kv, d_mask, valid, m_i, l_i, acc, scale, IEEE)
        p0 += BS
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        o_ptr + (row0 + m_offs)[:, None] * stride_ot + h * stride_oh + d_offs[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


@triton.jit
def _paged_decode(
    q_ptr,
    k_ptr,
    v_ptr,
    part_o_ptr,
    part_ml_ptr,
    tables_ptr,
    ctx_ptr,
    stride_qt,
    stride_qh,
    stride_kh,
    stride_kb,
    stride_kp,
    stride_bt,
    scale,
    window_ptr,
    blocks_per_split,
    num_splits,
    G: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BS: tl.constexpr,
    IEEE: tl.constexpr,
):
    """One decode row (a sequence's only query) and one KV head: the G query heads that share the head's
    K/V as the rows of one tile, over one split of the row's blocks (flash-decoding); the split's partial
    output, max and sum go to part_o [rows, H, splits, D] and part_ml [rows, H, splits, 2]."""
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(ctx_ptr + row)  # positions 0 .. ctx - 1; the query is at ctx - 1
    window = tl.load(window_ptr)
    g_offs = tl.arange(0, BLOCK_G)
    d_offs = tl.arange(0, BLOCK_D)
    p_offs = tl.arange(0, BS)
    g_mask = g_offs < G
    d_mask = d_offs < D
    h = kvh * G + g_offs
    q = tl.load(
        q_ptr + row * stride_qt + h[:, None] * stride_qh + d_offs[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    lo = tl.maximum(ctx - window, 0)
    first = lo // BS + split * blocks_per_split
    last = tl.minimum(first + blocks_per_split, (ctx + BS - 1) // BS)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    b = first
    while b < last:  # NOTE: a while loop, as in _paged_attention
        block = tl.load(tables_ptr + row * stride_bt + b)
        kv = kvh * stride_kh + block * stride_kb + p_offs[:, None] * stride_kp + d_offs[None, :]
        k_pos = b * BS + p_offs
        valid = ((k_pos < ctx) & (k_pos >= lo))[None, :] & g_mask[:, None]
        m_i, l_i, acc = _block_step(q, k_ptr, v_ptr, kv, d_mask, valid, m_i, l_i, acc, scale, IEEE)
        b += 1
    heads = tl.num_programs(1) * G
    base = (row * heads + h) * num_splits + split  # (row, head, split)
    tl.store(part_o_ptr + base[:, None] * BLOCK_D + d_offs[None, :], acc, mask=g_mask[:, None])
    tl.store(part_ml_ptr + base * 2, m_i, mask=g_mask)
    tl.store(part_ml_ptr + base * 2 + 1, l_i, mask=g_mask)


@triton.jit
def _decode_reduce(
    part_o_ptr,
    part_ml_ptr,
    o_ptr,
    stride_ot,
    stride_oh,
    num_splits,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Combine one (row, head)'s splits: rescale each partial output to the common max and divide by the
    summed softmax denominators."""
    row = tl.program_id(0)
    h = tl.program_id(1)
    s_offs = tl.arange(0, BLOCK_S)
    d_offs = tl.arange(0, BLOCK_D)
    s_mask = s_offs < num_splits
    base = (row * tl.num_programs(1) + h) * num_splits + s_offs
    m = tl.load(part_ml_ptr + base * 2, mask=s_mask, other=float("-inf"))
    sums = tl.load(part_ml_ptr + base * 2 + 1, mask=s_mask, other=0.0)
    m_all = tl.max(m, 0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - m_all))
    acc = tl.load(part_o_ptr + base[:, None] * BLOCK_D + d_offs[None, :], mask=s_mask[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.sum(sums * w, 0)
    out_ptr = o_ptr + row * stride_ot + h * stride_oh + d_offs
    tl.store(out_ptr, out.to(o_ptr.dtype.element_ty), mask=d_offs < D)


@triton.jit
def _rope_cache(
    q_ptr,
    k_ptr,
    v_ptr,
    q_out_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slots_ptr,
    stride_q,
    stride_k,
    stride_v,
    stride_kh,
    H,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """One row, one head: q heads rotated into q_out [rows, H, 2 HALF]; a KV head's k rotated and written
    with its v to the row's slot of the caches ([KVH, blocks x block_size, 2 HALF]). The rotation in fp32
    (q cos + rotate_half(q) sin), rounded once."""
    t = tl.program_id(0)
    j = tl.program_id(1)
    pos = tl.load(pos_ptr + t)
    offs = tl.arange(0, BLOCK_H)
    m = offs < HALF
    c1 = tl.load(cos_ptr + pos * 2 * HALF + offs, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + pos * 2 * HALF + HALF + offs, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + pos * 2 * HALF + offs, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + pos * 2 * HALF + HALF + offs, mask=m, other=0.0).to(tl.float32)
    if j < H:
        src = q_ptr + t * stride_q + j * 2 * HALF
        dst = q_out_ptr + (t * H + j) * 2 * HALF
    else:
        kvh = j - H
        src = k_ptr + t * stride_k + kvh * 2 * HALF
        slot = tl.load(slots_ptr + t)
        dst = k_cache_ptr + kvh * stride_kh + slot * 2 * HALF
        v1 = tl.load(v_ptr + t * stride_v + kvh * 2 * HALF + offs, mask=m)
        v2 = tl.load(v_ptr + t * stride_v + kvh * 2 * HALF + HALF + offs, mask=m)
        tl.store(v_cache_ptr + kvh * stride_kh + slot * 2 * HALF + offs, v1, mask=m)
        tl.store(v_cache_ptr + kvh * stride_kh + slot * 2 * HALF + HALF + offs, v2, mask=m)
    x1 = tl.load(src + offs, mask=m, other=0.0)
    x2 = tl.load(src + HALF + offs, mask=m, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(dst + offs, (a * c1 - b * s1).to(x1.dtype), mask=m)
    tl.store(dst + HALF + offs, (b * c2 + a * s2).to(x1.dtype), mask=m)


@dataclass
class TritonAttentionMetadata:
    """One KV group's step data on the device: slots, padded block tables, the decode rows (the first
    ``num_decodes`` rows, one per sequence, each the sequence's table row) and the query tiles of the rest
    (a tile: up to BLOCK_M consecutive rows of one sequence)."""

    slot_mapping: torch.Tensor  # [rows] long
    block_tables: torch.Tensor  # [seqs, max_blocks] int32
    num_decodes: int
    decode_ctx: torch.Tensor  # [num_decodes] int32: context length (position + 1)
    blocks_per_split: int  # flash-decoding: each decode row's blocks in splits of this many
    num_splits: int
    tile_seq: torch.Tensor  # [tiles] int32: the tile's sequence (row of block_tables)
    tile_row: torch.Tensor  # [tiles] int32: its first row in the step
    tile_pos: torch.Tensor  # [tiles] int32: that row's position
    tile_len: torch.Tensor  # [tiles] int32: its rows
    output_rows: torch.Tensor | None


SPLIT_BLOCKS = 32  # blocks a decode split covers at least (512 tokens of 16)
MAX_SPLITS = 16


def build_tiles(query_lens: list[int], positions: np.ndarray, skip: int = 0) -> np.ndarray:
    """[4, tiles] int32: (sequence, first row, its position, rows) of each tile of BLOCK_M rows, for the
    sequences after the first ``skip``."""
    tiles = []
    row = sum(query_lens[:skip])
    for seq, n in enumerate(query_lens[skip:], start=skip):
        for first in range(0, n, BLOCK_M):
            tiles.append((seq, row + first, int(positions[row + first]), min(BLOCK_M, n - first)))
        row += n
    return np.array(tiles, dtype=np.int32).reshape(-1, 4).T.copy()


def decode_splits(max_blocks: int) -> tuple[int, int]:
    """(blocks per split, splits) for decode rows of up to ``max_blocks`` blocks: one split up to
    SPLIT_BLOCKS, then as many as keep the splits at least that long, MAX_SPLITS at most."""
    splits = max(1, min(MAX_SPLITS, max_blocks // SPLIT_BLOCKS))
    return -(-max_blocks // splits), splits


class TritonAttention(TorchAttention):
    """Paged attention on Triton kernels (the CUDA backend; CPU tensors under TRITON_INTERPRET=1): the
    reference's forward, with its own metadata and kernels."""

    name = "kvloom Triton kernels"

    @staticmethod
    def supports(block_size: int, head_dim: int) -> bool:
        """Block sizes the kernel tiles by (a power of two, at least tl.dot's 16) and heads up to 256."""
        return block_size >= 16 and block_size & (block_size - 1) == 0 and head_dim <= 256

    def build_metadata(  # noqa: ANN001 - ModelInput
        self, inp, group: int, block_size: int, device: torch.device
    ) -> TritonAttentionMetadata:
        """KV group ``group``'s metadata."""
        lens = inp.query_lens
        nd = next((i for i, n in enumerate(lens) if n != 1), len(lens))  # decodes come first
        tiles = torch.from_numpy(build_tiles(lens, inp.positions, skip=nd)).to(device)
        tables = padded_tables(inp.block_tables[group]).astype(np.int32)
        ctx = (inp.positions[:nd] + 1).astype(np.int32)
        per_split, splits = decode_splits(-(-int(ctx.max()) // block_size) if nd else 1)
        return TritonAttentionMetadata(
            slot_mapping=torch.from_numpy(inp.slots[group]).to(device),
            block_tables=torch.from_numpy(tables).to(device),
            num_decodes=nd,
            decode_ctx=torch.from_numpy(ctx).to(device),
            blocks_per_split=per_split,
            num_splits=splits,
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
        """Standard q/k handling (per-head norms, then a full rotary): q and k rotated and K/V written in
        one kernel (_rope_cache), then attention. Other layers: the reference's split, then the kernels."""
        d = layer.head_dim
        if not layer.standard_qk or layer.rotary.rotary_dim != d or d % 2:
            return super().forward(layer, positions, qkv, kv_cache, meta)
        n, heads, kv_heads = qkv.shape[0], layer.num_heads, layer.num_kv_heads
        q, k, v = layer.split_normed(qkv)  # heads contiguous within each row
        q_rot = torch.empty(n, heads, d, dtype=qkv.dtype, device=qkv.device)
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        if n:
            _rope_cache[(n, heads + kv_heads)](
                q,
                k,
                v,
                q_rot,
                positions,
                layer.rotary.cos,
                layer.rotary.sin,
                k_cache,
                v_cache,
                meta.slot_mapping,
                q.stride(0),
                k.stride(0),
                v.stride(0),
                k_cache.stride(0),
                heads,
                HALF=d // 2,
                BLOCK_H=triton.next_power_of_2(d // 2),
            )
        o = attend(q_rot, k_cache, v_cache, meta, layer.scale, layer.window)
        return o.reshape(n, layer.q_size)

    @staticmethod
    def paged(q, k, v, k_cache, v_cache, meta, scale, window):  # noqa: ANN001, ANN205 - paged_attention's
        return paged_attention(q, k, v, k_cache, v_cache, meta, scale, window)


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
    write_cache(k, v, k_cache, v_cache, meta.slot_mapping)
    return attend(q, k_cache, v_cache, meta, scale, window)


def attend(
    q: torch.Tensor,  # [rows, heads, head_dim]
    k_cache: torch.Tensor,  # [kv_heads, num_blocks, block_size, head_dim], this step's K/V in it
    v_cache: torch.Tensor,
    meta: TritonAttentionMetadata,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Every row over its sequence's cache: [rows, heads, head_dim]."""
    kv_heads, _, block_size, head_dim = k_cache.shape
    q = q.contiguous()
    heads = q.shape[1]
    out = torch.empty_like(q)
    # NOTE: the interpreter's tl.dot gets bf16 operands wrong (numpy has no bf16): it multiplies in fp32
    ieee = q.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"
    win = _window(window or NO_WINDOW, q.device)  # NOTE: a tensor: see the loops' note
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot's least K on GPUs
    nd, splits = meta.num_decodes, meta.num_splits
    if nd:
        part_o = torch.empty(nd, heads, splits, block_d, dtype=torch.float32, device=q.device)
        part_ml = torch.empty(nd, heads, splits, 2, dtype=torch.float32, device=q.device)
        _paged_decode[(nd, kv_heads, splits)](
            q,
            k_cache,
            v_cache,
            part_o,
            part_ml,
            meta.block_tables,
            meta.decode_ctx,
            q.stride(0),
            q.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            meta.block_tables.stride(0),
            scale,
            win,
            meta.blocks_per_split,
            splits,
            G=heads // kv_heads,
            D=head_dim,
            BLOCK_D=block_d,
            BLOCK_G=max(16, triton.next_power_of_2(heads // kv_heads)),  # tl.dot's least M on GPUs
            BS=block_size,
            IEEE=ieee,
        )
        _decode_reduce[(nd, heads)](
            part_o,
            part_ml,
            out,
            out.stride(0),
            out.stride(1),
            splits,
            D=head_dim,
            BLOCK_D=block_d,
            BLOCK_S=triton.next_power_of_2(splits),
        )
    if meta.tile_seq.shape[0] == 0:
        return out
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
        win,
        G=heads // kv_heads,
        D=head_dim,
        BLOCK_D=block_d,
        BLOCK_M=BLOCK_M,
        BS=block_size,
        IEEE=ieee,
    )
    return out
