"""Maps requests to KV blocks: prefix-cache lookups, slots for new tokens, caching full blocks, freeing.

The layers share one pool of blocks in groups (``KVLayout``): every group holds as many layers, and each
request has one block table per group. A model whose layers all attend alike has one group; a model with
sliding-window layers beside full-attention ones (Gemma 3) has several, and a sliding-window group frees
the blocks that fell out of its window (their table entries point at the null block, which no one
writes), so a long request holds on those layers about a window's worth of blocks.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass

import numpy as np

from kvloom.core.block_pool import BlockPool
from kvloom.request import Request

NULL_BLOCK = 0  # with sliding-window groups: the block their freed table entries point at (never written)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_hash(parent: bytes | None, token_ids: list[int], extra_key: str | None) -> bytes:
    """sha256 chained over blocks: equal hashes mean equal tokens since the start and equal extra keys."""
    h = hashlib.sha256(parent or b"kvloom")
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    if extra_key is not None:
        h.update(b"\0" + extra_key.encode())
    return h.digest()


@dataclass(frozen=True)
class KVLayout:
    """Which layers share block tables. The pool holds ``group_size`` layers per block: layer ``i`` keeps its
    K/V in slot ``layer_slot[i]`` of the blocks of group ``layer_group[i]``'s tables."""

    windows: tuple[int | None, ...]  # per group: its sliding window (None: full attention)
    layer_group: tuple[int, ...]
    layer_slot: tuple[int, ...]
    group_size: int

    @classmethod
    def of(cls, layer_windows: list[int | None], max_model_len: int, hybrid: bool = True) -> KVLayout:
        """Layers grouped by window (full attention first), as many per group as the rarest kind has (as
        vLLM does; a kind's last group may leave a slot unused). A window as long as max_model_len is full
        attention. Not ``hybrid``: one group of all layers that keeps every block (the layers still mask
        their windows)."""
        windows = [None if w is None or w >= max_model_len or not hybrid else int(w) for w in layer_windows]
        kinds = sorted(set(windows), key=lambda w: (w is not None, w or 0))
        size = min(windows.count(w) for w in kinds)
        group_windows, layer_group, layer_slot = [], [0] * len(windows), [0] * len(windows)
        for w in kinds:
            layers = [i for i, lw in enumerate(windows) if lw == w]
            for start in range(0, len(layers), size):
                for slot, i in enumerate(layers[start : start + size]):
                    layer_group[i], layer_slot[i] = len(group_windows), slot
                group_windows.append(w)
        return cls(tuple(group_windows), tuple(layer_group), tuple(layer_slot), size)

    @property
    def num_groups(self) -> int:
        return len(self.windows)

    @property
    def frees_blocks(self) -> bool:
        return any(w is not None for w in self.windows)

    def blocks_per_seq(self, num_tokens: int, block_size: int, chunk: int) -> int:
        """The most blocks one sequence of ``num_tokens`` holds (prefill chunks of ``chunk`` tokens)."""
        full = cdiv(num_tokens, block_size)
        return sum(
            full if w is None else min(full, cdiv(w - 1 + chunk, block_size) + 1) for w in self.windows
        )

    def describe(self) -> str:
        counts = collections.Counter(self.windows)
        kinds = ", ".join(
            f"{n} {'full-attention' if w is None else f'sliding-window {w}'}" for w, n in counts.items()
        )
        return f"{self.num_groups} block tables of {self.group_size} layers each ({kinds})"


class KVCacheManager:
    """Owns each request's block tables (``request_id -> one [block ids] per group``) and its full blocks'
    hashes. A request's tables all have one entry per block of its tokens."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        windows: tuple[int | None, ...] = (None,),
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.windows = tuple(windows)
        self.block_pool = BlockPool(num_blocks)
        self._has_null = any(w is not None for w in self.windows)
        if self._has_null:
            self.block_pool.allocate(1)  # NULL_BLOCK, held forever: never written, never freed
        self._blocks: dict[str, list[list[int]]] = {}
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

    def get_block_ids(self, request_id: str) -> list[list[int]]:
        """The request's block table of each group ([] when it holds none)."""
        return self._blocks.get(request_id, [])

    def num_blocks_for(self, num_tokens: int) -> int:
        """Blocks a request of ``num_tokens`` tokens holds in all its tables at most."""
        return cdiv(num_tokens, self.block_size) * len(self.windows)

    def num_held_blocks(self, request_id: str) -> int:
        """Blocks the request references (null entries not counted)."""
        return sum(len(self._real(table)) for table in self.get_block_ids(request_id))

    def _real(self, blocks: list[int]) -> list[int]:
        return [b for b in blocks if b != NULL_BLOCK] if self._has_null else blocks

    def _key(self, group: int, h: bytes) -> bytes:
        # each group caches its own blocks: group 0 under the hash itself, the others under hash + group
        return h if group == 0 else h + group.to_bytes(2, "little")

    def _first_needed(self, group: int, num_computed: int) -> int:
        """The first table entry a query at position ``num_computed`` (and later) still reads."""
        w = self.windows[group]
        return 0 if w is None else max(0, num_computed + 1 - w) // self.block_size

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

    def get_computed_blocks(self, request: Request) -> list[list[int]]:
        """The longest cached prefix of the request's full blocks (not yet referenced), per group: all
        blocks of a full-attention group, the blocks within the window of a sliding-window group (null
        before them). Empty lists: no hit.

        NOTE: the last token is always recomputed, so its logits exist: at most (num_tokens - 1) tokens hit.
        """
        groups = range(len(self.windows))
        if not self.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return [[] for _ in groups]
        hashes = self._full_block_hashes(request, request.num_tokens - 1)
        found = [[self.block_pool.lookup(self._key(g, h)) for h in hashes] for g in groups]
        # The longest prefix every group can serve: a full-attention group needs all its blocks up to it,
        # a sliding-window group those within the window before it. Shrink until all groups agree.
        n = len(hashes)
        while n > 0:
            m = n
            for g in groups:
                while m > 0 and None in found[g][self._first_needed(g, m * self.block_size) : m]:
                    m -= 1
            if m == n:
                break
            n = m
        return [
            [NULL_BLOCK] * (lo := self._first_needed(g, n * self.block_size)) + found[g][lo:n] for g in groups
        ]

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.num_queried_tokens += num_tokens
        self.num_hit_tokens += num_hit_tokens

    def _free_outside_windows(self, tables: list[list[int]], num_computed: int) -> None:
        """Free the blocks of sliding-window groups that no query from position ``num_computed`` on reads."""
        for g, table in enumerate(tables):
            i = min(self._first_needed(g, num_computed), len(table)) - 1
            while i >= 0 and table[i] != NULL_BLOCK:  # the null entries are a prefix
                self.block_pool.free([table[i]])
                table[i] = NULL_BLOCK
                i -= 1

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: list[list[int]] | None = None
    ) -> bool:
        """Make room for ``num_new_tokens`` tokens after ``request.num_computed_tokens`` (plus the
        ``computed_blocks`` a new request starts from). Returns False if blocks run out, changing nothing
        but freeing blocks that fell out of sliding windows.
        """
        computed = computed_blocks or [[] for _ in self.windows]
        tables = self._blocks.get(request.request_id)
        if tables is not None and self._has_null:
            self._free_outside_windows(tables, request.num_computed_tokens)
        held = len(tables[0]) if tables else 0
        num_computed = request.num_computed_tokens + len(computed[0]) * self.block_size
        per_group = cdiv(num_computed + num_new_tokens, self.block_size) - held - len(computed[0])
        num_needed = max(per_group, 0) * len(self.windows)
        # Free blocks that are hit come out of the free queue, so they do not count as free for the rest.
        reclaimed = sum(1 for table in computed for b in self._real(table) if self.block_pool.ref_cnt[b] == 0)
        if num_needed > self.block_pool.num_free_blocks - reclaimed:
            return False
        if tables is None:
            tables = self._blocks[request.request_id] = [[] for _ in self.windows]
        for table, hits in zip(tables, computed, strict=True):
            self.block_pool.touch(self._real(hits))
            table.extend(hits)
            if per_group > 0:
                table.extend(self.block_pool.allocate(per_group))
        return True

    def cache_blocks(self, request: Request) -> None:
        """Register the request's full, computed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        tables = self._blocks.get(request.request_id)
        if not tables:
            return
        done = self._num_cached_blocks.get(request.request_id, 0)
        hashes = self._full_block_hashes(request, request.num_computed_tokens)
        for g, table in enumerate(tables):
            for i in range(done, len(hashes)):
                if not (self._has_null and table[i] == NULL_BLOCK):
                    self.block_pool.cache(table[i], self._key(g, hashes[i]))
        self._num_cached_blocks[request.request_id] = len(hashes)

    def share_prefix(self, src: Request, dst: Request, num_tokens: int) -> int:
        """Give ``dst`` the blocks holding ``src``'s first ``num_tokens`` tokens (full blocks only), by
        reference count. Returns the number of tokens shared."""
        if any(self.get_block_ids(dst.request_id)):
            raise RuntimeError(f"request {dst.request_id!r} already has blocks")
        n = num_tokens // self.block_size
        shared = [list(table[:n]) for table in self._blocks[src.request_id]]
        for table in shared:
            self.block_pool.touch(self._real(table))
        self._blocks[dst.request_id] = shared
        return n * self.block_size

    def truncate(self, request: Request, num_tokens: int) -> None:
        """Keep only the blocks holding the request's first ``num_tokens`` tokens (speculative tokens that
        were rejected roll back this way). Dropped blocks were never cached: only computed, accepted
        tokens' full blocks are."""
        keep = cdiv(num_tokens, self.block_size)
        for table in self._blocks.get(request.request_id, []):
            if len(table) > keep:
                self._release(table[keep:][::-1])
                del table[keep:]

    def free(self, request: Request) -> None:
        """Release all blocks of a request (tail first, so the tail is reused before the prefix)."""
        tables = self._blocks.pop(request.request_id, [])
        self._num_cached_blocks.pop(request.request_id, None)
        for table in tables:
            self._release(table[::-1])

    def _release(self, blocks: list[int]) -> None:
        self.block_pool.free(self._real(blocks))

    def forget(self, request: Request) -> None:
        """Drop per-request bookkeeping once a request is finished."""
        self.free(request)
        self._hashes.pop(request.request_id, None)
