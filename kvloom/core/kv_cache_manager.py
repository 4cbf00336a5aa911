"""Maps requests to KV blocks: allocate slots for new tokens, free a request's blocks."""

from __future__ import annotations

from kvloom.core.block_pool import BlockPool
from kvloom.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Owns each request's block table (``request_id -> [block ids]``)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.block_pool = BlockPool(num_blocks)
        self._blocks: dict[str, list[int]] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def get_block_ids(self, request_id: str) -> list[int]:
        return self._blocks.get(request_id, [])

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Make room for ``num_new_tokens`` tokens after ``request.num_computed_tokens``.

        Returns False (and changes nothing) when the pool has too few free blocks.
        """
        blocks = self._blocks.setdefault(request.request_id, [])
        num_needed = cdiv(request.num_computed_tokens + num_new_tokens, self.block_size) - len(blocks)
        if num_needed <= 0:
            return True
        if not self.block_pool.can_allocate(num_needed):
            if not blocks:
                del self._blocks[request.request_id]
            return False
        blocks.extend(self.block_pool.allocate(num_needed))
        return True

    def share_prefix(self, src: Request, dst: Request, num_tokens: int) -> int:
        """Give ``dst`` the blocks holding ``src``'s first ``num_tokens`` tokens (full blocks only), by
        reference count. Returns the number of tokens shared."""
        if self._blocks.get(dst.request_id):
            raise RuntimeError(f"request {dst.request_id!r} already has blocks")
        shared = self._blocks[src.request_id][: num_tokens // self.block_size]
        self.block_pool.incref(shared)
        self._blocks[dst.request_id] = list(shared)
        return len(shared) * self.block_size

    def free(self, request: Request) -> None:
        """Release all blocks of a request (tail first, so the tail is reused before the prefix)."""
        blocks = self._blocks.pop(request.request_id, [])
        self.block_pool.free(blocks[::-1])
