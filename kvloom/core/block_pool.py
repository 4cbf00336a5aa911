"""Physical KV blocks: a free queue and reference counts.

Blocks are identified by integers in [0, num_blocks). A block is free when its reference count is 0.
Freed blocks go to the back of the free queue and allocation takes from the front, so the queue is
LRU-ordered; prefix caching (block hashes that survive in the queue) builds on this order.
"""

from __future__ import annotations

from collections import OrderedDict


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.ref_cnt = [0] * num_blocks
        # NOTE: an OrderedDict gives O(1) pop-front, push-back and removal from the middle (needed once
        # cached blocks can be taken back out of the queue).
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use."""
        return 1.0 - len(self._free) / self.num_blocks

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks from the front of the free queue, each with reference count 1."""
        if n > len(self._free):
            raise RuntimeError(f"cannot allocate {n} blocks, only {len(self._free)} free")
        blocks = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            self.ref_cnt[block_id] = 1
            blocks.append(block_id)
        return blocks

    def incref(self, block_ids: list[int]) -> None:
        """Share blocks that are already in use (e.g. a prompt shared by several samples)."""
        for block_id in block_ids:
            if self.ref_cnt[block_id] == 0:
                raise RuntimeError(f"block {block_id} is free and cannot be shared")
            self.ref_cnt[block_id] += 1

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference of each block; blocks reaching 0 go to the back of the free queue in order."""
        for block_id in block_ids:
            if self.ref_cnt[block_id] <= 0:
                raise RuntimeError(f"double free of block {block_id}")
            self.ref_cnt[block_id] -= 1
            if self.ref_cnt[block_id] == 0:
                self._free[block_id] = None
