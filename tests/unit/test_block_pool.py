import pytest

from kvloom.core.block_pool import BlockPool
from kvloom.core.kv_cache_manager import KVCacheManager

from .helpers import make_request


def test_allocate_takes_blocks_in_order_and_free_goes_to_the_back():
    pool = BlockPool(6)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(3) == [2, 3, 4]
    pool.free([1, 0])
    # 5 was never used, then the freed blocks in the order they were freed (LRU).
    assert pool.allocate(3) == [5, 1, 0]
    assert pool.num_free_blocks == 0
    with pytest.raises(RuntimeError):
        pool.allocate(1)


def test_ref_counts_share_and_free():
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    pool.touch(blocks)
    assert pool.ref_cnt[:2] == [2, 2]
    pool.free(blocks)
    assert pool.num_free_blocks == 2  # still referenced once
    pool.free(blocks)
    assert pool.num_free_blocks == 4
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([0])
    pool.touch([1])  # a free block taken back (a cache hit) leaves the free queue
    assert pool.ref_cnt[1] == 1 and pool.num_free_blocks == 3
    assert pool.allocate(3) == [2, 3, 0]


def test_freed_blocks_stay_cached_until_reused_in_lru_order():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    pool.cache(a, b"ha")
    pool.cache(b, b"hb")
    pool.cache(c, b"ha")  # a hash already cached keeps its first block
    assert pool.lookup(b"ha") == a and pool.block_hash[c] is None
    pool.free([b, a])
    assert pool.lookup(b"ha") == a and pool.lookup(b"hb") == b  # still hit-able while free
    assert pool.allocate(1) == [b]  # LRU: b was freed first, so it is evicted first
    assert pool.lookup(b"hb") is None and pool.lookup(b"ha") == a


def test_kv_manager_allocates_exact_block_ids():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a, b = make_request("a", 10), make_request("b", 3)
    assert kv.allocate_slots(a, 10)
    assert kv.get_block_ids("a")[0] == [0, 1, 2]
    assert kv.allocate_slots(b, 3)
    assert kv.get_block_ids("b")[0] == [3]
    a.num_computed_tokens = 10
    assert kv.allocate_slots(a, 2)  # slots 10, 11 fit in block 2
    assert kv.get_block_ids("a")[0] == [0, 1, 2]
    assert kv.allocate_slots(a, 3)  # 12..14 need a fourth block
    assert kv.get_block_ids("a")[0] == [0, 1, 2, 4]
    assert kv.num_free_blocks == 3


def test_kv_manager_refuses_without_side_effects_and_frees_tail_first():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a, b = make_request("a", 12), make_request("b", 8)
    assert kv.allocate_slots(a, 12)
    assert not kv.allocate_slots(b, 8)
    assert kv.get_block_ids("b") == [] and kv.num_free_blocks == 1
    kv.free(a)
    assert kv.num_free_blocks == 4
    assert kv.allocate_slots(b, 8)
    # block 3 was never used; then a's blocks come back tail first.
    assert kv.get_block_ids("b")[0] == [3, 2]


def test_prefix_hits_share_blocks_and_different_salts_never_do():
    bs = 4
    kv = KVCacheManager(num_blocks=16, block_size=bs)
    a = make_request("a", 10)  # tokens 1..10: blocks [1-4] [5-8] are full
    assert kv.get_computed_blocks(a) == [[]] and kv.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    kv.cache_blocks(a)
    b = make_request("b", 12)  # same first 10 tokens, longer
    hits = kv.get_computed_blocks(b)
    assert hits == [kv.get_block_ids("a")[0][:2]]
    assert kv.allocate_slots(b, 12 - 8, hits)
    assert kv.get_block_ids("b")[0][:2] == hits[0] and [kv.block_pool.ref_cnt[x] for x in hits[0]] == [2, 2]
    salted = make_request("c", 12)
    salted.cache_salt = "tenant-2"
    assert kv.get_computed_blocks(salted) == [[]]
    # The last token is always recomputed: a prompt of exactly 8 tokens hits only one block.
    assert len(kv.get_computed_blocks(make_request("d", 8))[0]) == 1
    # Freed blocks stay hit-able.
    kv.forget(a)
    kv.forget(b)
    assert kv.get_computed_blocks(make_request("e", 12)) == hits


def test_prefix_caching_off_never_hits():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = make_request("a", 10)
    assert kv.allocate_slots(a, 10)
    a.num_computed_tokens = 10
    kv.cache_blocks(a)
    assert kv.get_computed_blocks(make_request("b", 10)) == [[]]
