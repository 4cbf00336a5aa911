"""The CUDA backend's Triton paged attention against TorchAttention (the reference), on the same cache and
step: decodes, whole and chunked prefills, GQA and MQA, sliding windows, block boundaries, fp32 and bf16.
Without a GPU the kernel runs under Triton's interpreter on CPU tensors (shapes kept small)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernel module is imported (triton.jit reads it)
pytest.importorskip("triton")

import kvloom.backends.cuda.attention as triton_module  # noqa: E402
from kvloom.backends.cuda.attention import BLOCK_M, TritonAttention, build_tiles, decode_splits  # noqa: E402
from kvloom.backends.cuda.attention import paged_attention as triton_attention  # noqa: E402
from kvloom.layers.attention import TorchAttention, paged_attention  # noqa: E402
from kvloom.worker.model_runner import ModelInput  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# (cached tokens before the step, rows this step): decodes first, as the runner orders them
SEQS = [(37, 1), (15, 1), (0, 1), (64, 1), (0, 40), (48, 33), (5, 17)]


def _step(bs: int, num_blocks: int, seed: int) -> ModelInput:
    """A step over SEQS with random, disjoint block tables."""
    rng = np.random.default_rng(seed)
    free = list(rng.permutation(num_blocks))
    positions, slots, tables, lens = [], [], [], []
    for start, n in SEQS:
        blocks = [int(free.pop()) for _ in range(-(-(start + n) // bs))]
        tables.append(blocks)
        positions += range(start, start + n)
        slots += [blocks[p // bs] * bs + p % bs for p in range(start, start + n)]
        lens.append(n)
    rows = len(positions)
    return ModelInput(
        np.zeros(rows, dtype=np.int64),
        np.array(positions, dtype=np.int64),
        np.array([slots], dtype=np.int64),
        lens,
        [tables],
        None,
        [],
    )


def test_tiles_cover_every_row_once_and_splits_cover_every_block():
    inp = _step(16, 64, 0)
    seq, row, pos, n = build_tiles(inp.query_lens, inp.positions)
    covered = [r for r0, k in zip(row, n, strict=True) for r in range(r0, r0 + k)]
    assert sorted(covered) == list(range(len(inp.positions)))
    assert n.max() <= BLOCK_M and all(inp.positions[r] == p for r, p in zip(row, pos, strict=True))
    assert list(seq[:4]) == [0, 1, 2, 3]  # one tile per decode
    seq, row, _, _ = build_tiles(inp.query_lens, inp.positions, skip=4)  # the decode kernel's rows left out
    assert seq.min() == 4 and row.min() == 4
    for blocks in (1, 31, 32, 64, 100, 1000):
        per, splits = decode_splits(blocks)
        assert per * splits >= blocks > per * (splits - 1) and splits <= 16


@pytest.mark.parametrize("split_blocks", [32, 2], ids=["one-split", "splits-of-2-blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "window", "bs"),
    [
        (4, 4, 32, None, 16),
        (6, 2, 64, None, 32),  # GQA
        (4, 1, 16, 20, 16),  # MQA, a window across block edges
        (4, 2, 48, 33, 16),  # head_dim not a power of two
    ],
)
def test_triton_paged_attention_matches_reference(
    dtype, heads, kv_heads, head_dim, window, bs, split_blocks, monkeypatch
):
    """split_blocks 2: the decode rows' contexts (up to 65 positions) in splits of 2 blocks, combined."""
    monkeypatch.setattr(triton_module, "SPLIT_BLOCKS", split_blocks)
    g = torch.Generator().manual_seed(heads * head_dim + bs)
    num_blocks = 40
    inp = _step(bs, num_blocks, seed=bs)
    rows = len(inp.positions)
    # the blocks hold earlier tokens' K/V already (random), this step's rows write their own
    k_cache = torch.randn(kv_heads, num_blocks, bs, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(kv_heads, num_blocks, bs, head_dim, generator=g).to(dtype)
    q = torch.randn(rows, heads, head_dim, generator=g).to(dtype)
    k = torch.randn(rows, kv_heads, head_dim, generator=g).to(dtype)
    v = torch.randn(rows, kv_heads, head_dim, generator=g).to(dtype)
    scale = head_dim**-0.5
    ref_meta = TorchAttention().build_metadata(inp, 0, bs, torch.device("cpu"))
    kr, vr = k_cache.clone(), v_cache.clone()
    ref = paged_attention(q, k, v, kr, vr, ref_meta, scale, window).float()
    meta = TritonAttention().build_metadata(inp, 0, bs, DEVICE)
    assert meta.num_decodes == 4 and (meta.num_splits > 1) == (split_blocks == 2 and bs == 16)
    kt, vt = k_cache.to(DEVICE), v_cache.to(DEVICE)
    got = triton_attention(q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), kt, vt, meta, scale, window)
    assert torch.equal(kt.cpu(), kr) and torch.equal(vt.cpu(), vr)  # the same K/V written
    tol = 1e-3 if dtype == torch.float32 else 2e-2
    assert (got.float().cpu() - ref).abs().max() < tol
