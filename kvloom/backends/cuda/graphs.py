"""CUDA graphs for decode steps (vLLM's FULL_DECODE_ONLY): the whole forward of a step whose rows are all
decodes, captured at start-up for a few batch sizes and replayed, so a decode step costs one launch instead
of one per kernel (hundreds: a small model's decode is bound by them).

A step of ``n`` decodes replays the graph of the least captured size ``B >= n``. Its inputs are copied
into static buffers that every graph reads (slices of the largest): token ids, positions, slots, block
tables per KV group and context lengths; rows ``n .. B - 1`` are padding: token 0 at position 0, its K/V
written to a spare block of the pool (the backend allocates it; no request owns it) that only padding
reads. The graph's attention metadata is fixed, so the decode kernel's split count is too: the splits of
a ``max_model_len`` context (``decode_splits``); a shorter row's surplus splits are empty and skip their
blocks. Other steps (prefill chunks, speculation, more rows than the largest size) run eagerly.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable

import torch

from kvloom.backends.cuda.attention import TritonAttentionMetadata, decode_splits
from kvloom.layers.attention import padded_tables
from kvloom.logger import init_logger

logger = init_logger(__name__)


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The batch sizes captured: 1, 2, 4, then every multiple of 8 up to max_num_seqs (512 at most), as
    vLLM's defaults."""
    top = min(max_num_seqs, 512)
    sizes = [s for s in (1, 2, 4) if s <= top] + list(range(8, top + 1, 8))
    if sizes[-1] < top:
        sizes.append(top)
    return sizes


class CudaGraph:
    """One captured forward (torch.cuda.CUDAGraph): ``capture(fn, pool)`` records fn once, ``replay()``
    runs it again on whatever the static buffers hold and returns the output tensor the capture made."""

    @staticmethod
    def new_pool() -> object:
        """Memory the graphs of one runner share (captured largest first, the smaller ones reuse it; one
        replays at a time, and its output is used before the next)."""
        return torch.cuda.graph_pool_handle()

    def capture(self, fn: Callable[[], torch.Tensor], pool: object) -> torch.Tensor:
        fn()  # warm-up: Triton compiles, NCCL connects and the caches fill outside the capture
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = fn()
        return self.out

    def replay(self) -> torch.Tensor:
        self.graph.replay()
        return self.out


class DecodeGraphs:
    """The decode graphs of one model runner: ``run(inp)`` replays the one that fits a decode step and
    returns the step's hidden states, or None for a step it does not take."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[torch.Tensor],  # per layer [2, KVH, blocks, block_size, head_dim]
        layer_group: list[int],  # each layer's KV group
        block_size: int,
        max_model_len: int,
        sizes: list[int],
        graph_type: type = CudaGraph,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.layer_group = layer_group
        self.sizes = sizes
        dev = kv_caches[0].device
        groups = max(layer_group) + 1
        top = sizes[-1]
        self.width = -(-max_model_len // block_size)  # table entries of the longest sequence
        self.pad_block = kv_caches[0].shape[2] - 1  # the spare block
        self.pad_slot = self.pad_block * block_size
        self.input_ids = torch.zeros(top, dtype=torch.long, device=dev)
        self.positions = torch.zeros(top, dtype=torch.long, device=dev)
        self.slots = torch.full((groups, top), self.pad_slot, dtype=torch.long, device=dev)
        self.tables = torch.full((groups, top, self.width), self.pad_block, dtype=torch.int32, device=dev)
        self.ctx = torch.ones(top, dtype=torch.int32, device=dev)
        self.per_split, self.splits = decode_splits(self.width)
        no_tiles = torch.zeros(0, dtype=torch.int32, device=dev)
        self.graphs: dict[int, object] = {}
        pool = graph_type.new_pool()
        start = time.perf_counter()
        for size in reversed(sizes):  # largest first: the others fit in its memory
            metas = [
                TritonAttentionMetadata(
                    slot_mapping=self.slots[g, :size],
                    block_tables=self.tables[g, :size],
                    num_decodes=size,
                    decode_ctx=self.ctx[:size],
                    blocks_per_split=self.per_split,
                    num_splits=self.splits,
                    tile_seq=no_tiles,
                    tile_row=no_tiles,
                    tile_pos=no_tiles,
                    tile_len=no_tiles,
                    output_rows=None,
                )
                for g in range(groups)
            ]
            layer_metas = [metas[g] for g in layer_group]
            ids, pos = self.input_ids[:size], self.positions[:size]
            graph = graph_type()
            with torch.inference_mode():  # as the eager steps run
                graph.capture(lambda ids=ids, pos=pos, m=layer_metas: model(ids, pos, kv_caches, m), pool)
            self.graphs[size] = graph
        logger.info(
            "CUDA graphs: decode steps of %s sequences captured in %.1f s (%d decode splits of %d blocks)",
            _ranges(sizes),
            time.perf_counter() - start,
            self.splits,
            self.per_split,
        )

    def takes(self, inp) -> bool:  # noqa: ANN001 - ModelInput
        """A step of decodes alone (every row a sequence's one query, every row's hidden state wanted)."""
        n = len(inp.query_lens)
        return (
            0 < n <= self.sizes[-1] and inp.output_rows is None and len(inp.input_ids) == n
            # NOTE: a row per sequence already means every query is one token long
        )

    def run(self, inp) -> torch.Tensor | None:  # noqa: ANN001 - ModelInput
        """The hidden states [rows, hidden] of a decode step, from its graph; None: not a step it takes."""
        if not self.takes(inp):
            return None
        n = len(inp.query_lens)
        size = self.sizes[bisect.bisect_left(self.sizes, n)]
        self.input_ids[:n].copy_(torch.from_numpy(inp.input_ids))
        self.positions[:n].copy_(torch.from_numpy(inp.positions))
        self.ctx[:n].copy_(torch.from_numpy(inp.positions + 1))
        self.slots[:, :n].copy_(torch.from_numpy(inp.slots))
        for g, rows in enumerate(inp.block_tables):
            # NOTE: the columns the step's longest row uses, no more: a row reads only its context's
            # blocks, so what the buffer holds past them (an earlier step's entries) is never read
            table = torch.from_numpy(padded_tables(rows))
            self.tables[g, :n, : table.shape[1]].copy_(table)
        if size > n:  # padding rows: token 0 at position 0 in the spare block
            self.input_ids[n:size] = 0
            self.positions[n:size] = 0
            self.ctx[n:size] = 1
            self.slots[:, n:size] = self.pad_slot
            self.tables[:, n:size, 0] = self.pad_block
        return self.graphs[size].replay()[:n]


def _ranges(sizes: list[int]) -> str:
    return f"{sizes[0]}" if len(sizes) == 1 else f"{len(sizes)} sizes, {sizes[0]}..{sizes[-1]}"
