import random

from kvloom.request import RequestStatus

from .helpers import fake_step, make_request, make_scheduler


def test_prompt_then_decodes_one_token_per_step():
    sched = make_scheduler()
    r = make_request("a", 10, max_tokens=3)
    sched.add_request(r)
    out = fake_step(sched)
    assert [(s.request_id, s.start, s.num_new_tokens) for s in out.scheduled] == [("a", 0, 10)]
    assert out.scheduled[0].block_ids == [[0, 1, 2]]
    assert r.num_computed_tokens == 10 and r.output_token_ids == [7]
    out = fake_step(sched)
    assert [(s.start, s.num_new_tokens) for s in out.scheduled] == [(10, 1)]
    fake_step(sched)
    assert r.status == RequestStatus.FINISHED_LENGTH and r.output_token_ids == [7, 7, 7]
    assert sched.kv.num_free_blocks == 16 and not sched.has_unfinished_requests()


def test_chunked_prefill_under_budget():
    sched = make_scheduler(budget=8)
    r = make_request("a", 20)
    sched.add_request(r)
    chunks = []
    for _ in range(3):
        out = fake_step(sched)
        chunks.append([(s.start, s.num_new_tokens, s.samples) for s in out.scheduled])
    assert chunks == [[(0, 8, False)], [(8, 8, False)], [(16, 4, True)]]
    assert r.output_token_ids == [7]


def test_decodes_never_starved_by_a_long_prefill():
    sched = make_scheduler(num_blocks=64, budget=8)
    decoders = [make_request(f"d{i}", 2, max_tokens=50) for i in range(3)]
    for d in decoders:
        sched.add_request(d)
    fake_step(sched)  # all three prompts fit in one step
    long = make_request("long", 100, max_tokens=50)
    sched.add_request(long)
    for _ in range(10):
        out = fake_step(sched)
        got = {s.request_id: s.num_new_tokens for s in out.scheduled}
        assert all(got[d.request_id] == 1 for d in decoders)
        assert out.num_scheduled_tokens <= 8
        assert got["long"] == 5  # the rest of the budget


def test_waiting_requests_join_once_a_running_prefill_completes():
    sched = make_scheduler(num_blocks=64, budget=8)
    long = make_request("long", 20, max_tokens=50)
    sched.add_request(long)
    fake_step(sched)  # long is running, mid-prefill
    shorts = [make_request(f"s{i}", 1, max_tokens=50) for i in range(3)]
    for s in shorts:
        sched.add_request(s)
    out = fake_step(sched)  # FCFS: long's chunk takes the whole budget
    assert {s.request_id: s.num_new_tokens for s in out.scheduled} == {"long": 8}
    out = fake_step(sched)  # long's last 4 prompt tokens, and the shorts fill the rest of the budget
    assert {s.request_id: s.num_new_tokens for s in out.scheduled} == {
        "long": 4,
        "s0": 1,
        "s1": 1,
        "s2": 1,
    }
    for _ in range(5):
        out = fake_step(sched)
        assert {s.request_id: s.num_new_tokens for s in out.scheduled} == {
            "long": 1,
            "s0": 1,
            "s1": 1,
            "s2": 1,
        }


def test_budget_and_max_num_seqs_never_exceeded_random():
    rng = random.Random(0)
    sched = make_scheduler(num_blocks=40, block_size=4, budget=24, max_seqs=5, max_model_len=64)
    n = 0
    for _ in range(400):
        if rng.random() < 0.3 and n < 60:
            sched.add_request(make_request(f"r{n}", rng.randint(1, 40), max_tokens=rng.randint(1, 20)))
            n += 1
        if rng.random() < 0.03 and sched.running:
            sched.finish_requests([rng.choice(sched.running).request_id], RequestStatus.FINISHED_ABORTED)
        out = fake_step(sched)
        assert out.num_scheduled_tokens <= 24
        assert len(sched.running) <= 5
        tables = [sched.kv.get_block_ids(r.request_id)[0] for r in sched.running]
        used = {b for t in tables for b in t}  # prompts share prefixes, so the cache shares blocks
        assert len(used) + sched.kv.num_free_blocks == 40
        assert sum(sched.kv.block_pool.ref_cnt) == sum(len(t) for t in tables)
    while sched.has_unfinished_requests():
        fake_step(sched)
    assert sched.kv.num_free_blocks == 40
    assert all(c == 0 for c in sched.kv.block_pool.ref_cnt)


def test_preempts_newest_running_request_and_recomputes():
    # 6 blocks of 4 tokens. a and b each take 2 blocks for their prompt; growth runs the pool dry.
    sched = make_scheduler(num_blocks=6, block_size=4, budget=64, max_model_len=24)
    a, b = make_request("a", 8, max_tokens=12), make_request("b", 8, max_tokens=12)
    sched.add_request(a)
    sched.add_request(b)
    fake_step(sched)
    assert sched.kv.get_block_ids("a") == [[0, 1]] and sched.kv.get_block_ids("b") == [[2, 3]]
    preempted = []
    while not preempted:
        out = fake_step(sched)
        preempted = out.preempted_request_ids
    assert preempted == ["b"]  # the newest
    assert b.status == RequestStatus.PREEMPTED and b.num_computed_tokens == 0
    assert sched.waiting[0] is b
    while sched.has_unfinished_requests():
        fake_step(sched)
    assert len(a.output_token_ids) == 12 and len(b.output_token_ids) == 12
    assert b.metrics.num_preemptions >= 1
    assert sched.kv.num_free_blocks == 6


def test_stop_conditions():
    sched = make_scheduler()
    eos = make_request("eos", 4, max_tokens=10)
    eos.eos_token_ids = frozenset({7})
    ign = make_request("ign", 4, max_tokens=3, ignore_eos=True)
    ign.eos_token_ids = frozenset({7})
    stop = make_request("stop", 4, max_tokens=10, stop_token_ids=[7])
    for r in (eos, ign, stop):
        sched.add_request(r)
    fake_step(sched)
    assert eos.status == RequestStatus.FINISHED_STOPPED and eos.output_token_ids == [7]
    assert stop.status == RequestStatus.FINISHED_STOPPED
    assert ign.status == RequestStatus.RUNNING
    fake_step(sched)
    fake_step(sched)
    assert ign.status == RequestStatus.FINISHED_LENGTH and len(ign.output_token_ids) == 3


def test_max_model_len_ends_request():
    sched = make_scheduler(max_model_len=12)
    r = make_request("a", 10, max_tokens=100)
    sched.add_request(r)
    while sched.has_unfinished_requests():
        fake_step(sched)
    assert r.num_tokens == 12 and r.status == RequestStatus.FINISHED_LENGTH


def test_abort_waiting_and_running_frees_blocks():
    sched = make_scheduler(num_blocks=8, max_seqs=1)
    a, b = make_request("a", 10), make_request("b", 10)
    sched.add_request(a)
    sched.add_request(b)
    fake_step(sched)
    assert a.status == RequestStatus.RUNNING and b.status == RequestStatus.WAITING
    sched.finish_requests(["a", "b", "unknown"], RequestStatus.FINISHED_ABORTED)
    assert a.status == b.status == RequestStatus.FINISHED_ABORTED
    assert sched.kv.num_free_blocks == 8 and not sched.has_unfinished_requests()


def test_waiting_head_blocks_until_memory_frees():
    sched = make_scheduler(num_blocks=4, block_size=4, max_model_len=16)
    a, b = make_request("a", 12, max_tokens=2), make_request("b", 8, max_tokens=1)
    sched.add_request(a)
    sched.add_request(b)
    out = fake_step(sched)
    assert [s.request_id for s in out.scheduled] == ["a"]  # b does not fit yet
    fake_step(sched)  # a finishes
    out = fake_step(sched)
    assert [s.request_id for s in out.scheduled] == ["b"]
