"""KV groups: which layers share block tables, and sliding-window tables freeing what left their window."""

from __future__ import annotations

from kvloom.core.kv_cache_manager import NULL_BLOCK, KVCacheManager, KVLayout

from .helpers import make_request

GEMMA = [None if (i + 1) % 6 == 0 else 512 for i in range(18)]  # Gemma 3 270M: 3 global, 15 local


def test_layout_groups_layers_by_window():
    layout = KVLayout.of(GEMMA, max_model_len=32768)
    assert layout.group_size == 3 and layout.windows == (None,) + (512,) * 5
    assert [layout.layer_group[i] for i in (5, 11, 17)] == [0, 0, 0]
    assert [layout.layer_slot[i] for i in (5, 11, 17)] == [0, 1, 2]
    assert layout.layer_group[:5] == (1, 1, 1, 2, 2) and layout.layer_slot[:5] == (0, 1, 2, 0, 1)
    # each (group, slot) is one layer's
    assert len(set(zip(layout.layer_group, layout.layer_slot, strict=True))) == 18
    # one group: full attention (all blocks kept), all-sliding (frees), windows past the context, or off
    assert KVLayout.of([None] * 4, 100) == KVLayout((None,), (0,) * 4, (0, 1, 2, 3), 4)
    assert KVLayout.of([8] * 4, 100).windows == (8,)
    assert KVLayout.of(GEMMA, max_model_len=512).windows == (None,)
    assert KVLayout.of(GEMMA, 32768, hybrid=False).windows == (None,)
    # 34 layers, 5 global (Gemma 3 4B): groups of 5, the last local one with a slot unused
    layout = KVLayout.of([None if (i + 1) % 6 == 0 else 1024 for i in range(34)], 32768)
    assert layout.group_size == 5 and layout.windows == (None,) + (1024,) * 6
    assert layout.layer_group.count(6) == 4


def test_sliding_tables_hold_a_window_of_blocks():
    bs, window, chunk = 4, 10, 8
    kv = KVCacheManager(num_blocks=64, block_size=bs, windows=(None, window))
    assert kv.num_free_blocks == 63  # the null block
    r = make_request("a", 100)
    most = 0
    while r.num_computed_tokens < 100:
        n = min(chunk, 100 - r.num_computed_tokens)
        assert kv.allocate_slots(r, n)
        full, local = kv.get_block_ids("a")
        assert len(full) == len(local) and NULL_BLOCK not in full
        # every position a query of this step reads is in a real block
        first_read = max(0, r.num_computed_tokens + 1 - window)
        assert NULL_BLOCK not in local[first_read // bs :]
        most = max(most, sum(b != NULL_BLOCK for b in local))
        r.num_computed_tokens += n
    assert most <= -(-(window - 1 + chunk) // bs) + 1  # KVLayout.blocks_per_seq's bound
    assert kv.num_held_blocks("a") == 25 + sum(b != NULL_BLOCK for b in kv.get_block_ids("a")[1])
    kv.free(r)
    assert kv.num_free_blocks == 63 and kv.block_pool.ref_cnt[NULL_BLOCK] == 1


def test_sliding_prefix_hits_need_the_window_before_them():
    bs, window = 4, 6
    kv = KVCacheManager(num_blocks=64, block_size=bs, windows=(None, window))
    a = make_request("a", 30)
    for n in (8, 8, 8, 6):
        assert kv.allocate_slots(a, n)
        a.num_computed_tokens += n
        kv.cache_blocks(a)
    kv.forget(a)  # its blocks are free but still hit-able, the freed sliding ones too
    b = make_request("b", 30)  # same tokens
    full, local = kv.get_computed_blocks(b)
    assert len(full) == len(local) == 7  # 29 tokens at most hit: 7 full blocks
    first = (7 * bs + 1 - window) // bs
    assert local[:first] == [NULL_BLOCK] * first and NULL_BLOCK not in local[first:]
    assert kv.allocate_slots(b, 30 - 28, [full, local])
    # a sliding block evicted from the cache shortens the hit to where the window is whole again
    c = make_request("c", 30)
    kv.free(b)
    kv.block_pool._evict(local[6])
    full, local = kv.get_computed_blocks(c)
    assert len(full) == len(local) == 6


def test_truncate_share_and_free_with_null_entries():
    bs = 4
    kv = KVCacheManager(num_blocks=32, block_size=bs, windows=(None, 5))
    a = make_request("a", 40)
    assert kv.allocate_slots(a, 20)
    a.num_computed_tokens = 20
    assert kv.allocate_slots(a, 8)  # frees local blocks below position 16
    held = kv.num_held_blocks("a")
    b = make_request("b", 40)
    assert kv.share_prefix(a, b, 20) == 20
    assert kv.get_block_ids("b") == [t[:5] for t in kv.get_block_ids("a")]
    kv.truncate(a, 21)
    assert [len(t) for t in kv.get_block_ids("a")] == [6, 6]
    kv.forget(a)
    kv.forget(b)
    assert held > 0 and kv.num_free_blocks == 31
