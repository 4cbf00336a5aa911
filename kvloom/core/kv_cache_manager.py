"""Maps requests to KV blocks: prefix-cache lookups, slots for new tokens, caching full blocks, freeing."""

from __future__ import annotations

import hashlib

import numpy as np

from kvloom.core.block_pool import BlockPool
from kvloom.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_hash(parent: bytes | None, token_ids: list[int], extra_key: str | None) -> bytes:
    """sha256 chained over blocks: equal hashes mean equal tokens since the start and equal extra keys."""
    h = hashlib.sha256(parent or b"kvloom")
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    if extra_key is not None:
        h.update(b"\0" + extra_key.encode())
    return h.digest()


class KVCacheManager:
    """Owns each request's block table (``request_id -> [block ids]``) and its full blocks' hashes."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.block_pool = BlockPool(num_blocks)
        self._blocks: dict[str, list[int]] = {}
        self._hashes: dict[str, list[bytes]] = {}  # hashes of the request's full blocks, in order
        self._num_cached_blocks: dict[str, int] = {}  # leading blocks already registered in the cache
        # Prefix-cache statistics: prompt tokens looked up and tokens found.
        self.num_queried_tokens = 0
        self.num_hit_tokens = 0

    @property
    def num_free_blocks(self) -> int:
        return self.block_pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.block_pool.usage

    def get_block_ids(self, request_id: str) -> list[int]:
        return self._blocks.get(request_id, [])

    def _full_block_hashes(self, request: Request, num_tokens: int) -> list[bytes]:
        """Hashes of the request's full blocks within its first ``num_tokens`` tokens (computed once)."""
        hashes = self._hashes.setdefault(request.request_id, [])
        bs = self.block_size
        for i in range(len(hashes), num_tokens // bs):
            extra = request.cache_key if i == 0 else None  # chained: the first block's key reaches all
            hashes.append(
                block_hash(
                    hashes[-1] if hashes else None, request.token_ids_slice(i * bs, (i + 1) * bs), extra
                )
            )
        return hashes[: num_tokens // bs]

    def get_computed_blocks(self, request: Request) -> list[int]:
        """The longest cached prefix of the request's full blocks (not yet referenced).

        NOTE: the last token is always recomputed, so its logits exist: at most (num_tokens - 1) tokens hit.
        """
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return []
        hits = []
        for h in self._full_block_hashes(request, request.num_tokens - 1):
            block_id = self.block_pool.lookup(h)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.num_queried_tokens += num_tokens
        self.num_hit_tokens += num_hit_tokens

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: list[int] | None = None
    ) -> bool:
        """Make room for ``num_new_tokens`` tokens after ``request.num_computed_tokens`` (plus the
        ``computed_blocks`` a new request starts from). Returns False, changing nothing, if blocks run out.
        """
        computed_blocks = computed_blocks or []
        blocks = self._blocks.get(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        num_needed = cdiv(num_computed + num_new_tokens, self.block_size) - len(blocks) - len(computed_blocks)
        # Free blocks that are hit come out of the free queue, so they do not count as free for the rest.
        reclaimed = sum(1 for b in computed_blocks if self.block_pool.ref_cnt[b] == 0)
        if num_needed > self.block_pool.num_free_blocks - reclaimed:
            return False
        self.block_pool.touch(computed_blocks)
        blocks = self._blocks.setdefault(request.request_id, blocks)
        blocks.extend(computed_blocks)
        if num_needed > 0:
            blocks.extend(self.block_pool.allocate(num_needed))
        return True

    def cache_blocks(self, request: Request) -> None:
        """Register the request's full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        blocks = self._blocks.get(request.request_id, [])
        done = self._num_cached_blocks.get(request.request_id, 0)
        hashes = self._full_block_hashes(request, request.num_computed_tokens)
        for i in range(done, len(hashes)):
            self.block_pool.cache(blocks[i], hashes[i])
        self._num_cached_blocks[request.request_id] = len(hashes)

    def share_prefix(self, src: Request, dst: Request, num_tokens: int) -> int:
        """Give ``dst`` the blocks holding ``src``'s first ``num_tokens`` tokens (full blocks only), by
        reference count. Returns the number of tokens shared."""
        if self._blocks.get(dst.request_id):
            raise RuntimeError(f"request {dst.request_id!r} already has blocks")
        shared = self._blocks[src.request_id][: num_tokens // self.block_size]
        self.block_pool.touch(shared)
        self._blocks[dst.request_id] = list(shared)
        return len(shared) * self.block_size

    def truncate(self, request: Request, num_tokens: int) -> None:
        """Keep only the blocks holding the request's first ``num_tokens`` tokens (speculative tokens that
        were rejected roll back this way). Dropped blocks were never cached: only computed, accepted
        tokens' full blocks are."""
        blocks = self._blocks.get(request.request_id)
        keep = cdiv(num_tokens, self.block_size)
        if blocks and len(blocks) > keep:
            self.block_pool.free(blocks[keep:][::-1])
            del blocks[keep:]

    def free(self, request: Request) -> None:
        """Release all blocks of a request (tail first, so the tail is reused before the prefix)."""
        blocks = self._blocks.pop(request.request_id, [])
        self._num_cached_blocks.pop(request.request_id, None)
        self.block_pool.free(blocks[::-1])

    def forget(self, request: Request) -> None:
        """Drop per-request bookkeeping once a request is finished."""
        self.free(request)
        self._hashes.pop(request.request_id, None)
