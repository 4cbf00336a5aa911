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
    pool.incref(blocks)
    assert pool.ref_cnt[:2] == [2, 2]
    pool.free(blocks)
    assert pool.num_free_blocks == 2  # still referenced once
    pool.free(blocks)
    assert pool.num_free_blocks == 4
    with pytest.raises(RuntimeError, match="double free"):
        pool.free([0])
    with pytest.raises(RuntimeError, match="is free"):
        pool.incref([0])


def test_kv_manager_allocates_exact_block_ids():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a, b = make_request("a", 10), make_request("b", 3)
    assert kv.allocate_slots(a, 10)
    assert kv.get_block_ids("a") == [0, 1, 2]
    assert kv.allocate_slots(b, 3)
    assert kv.get_block_ids("b") == [3]
    a.num_computed_tokens = 10
    assert kv.allocate_slots(a, 2)  # slots 10, 11 fit in block 2
    assert kv.get_block_ids("a") == [0, 1, 2]
    assert kv.allocate_slots(a, 3)  # 12..14 need a fourth block
    assert kv.get_block_ids("a") == [0, 1, 2, 4]
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
    assert kv.get_block_ids("b") == [3, 2]
