from __future__ import annotations

from kvloom.core.kv_cache_manager import KVCacheManager
from kvloom.core.scheduler import Scheduler, SchedulerOutput
from kvloom.request import Request
from kvloom.sampling_params import SamplingParams


def make_request(rid: str, prompt_len: int, max_tokens: int = 8, **kw) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=max_tokens, **kw))


def make_scheduler(num_blocks=16, block_size=4, budget=64, max_seqs=8, max_model_len=64) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, block_size), budget, max_seqs, max_model_len)


def fake_step(sched: Scheduler, token: int = 7) -> SchedulerOutput:
    """One scheduler step with a stand-in model that samples ``token`` for every finished catch-up."""
    out = sched.schedule()
    sampled = {s.request_id: [token] for s in out.scheduled if s.samples}
    sched.update_from_output(out, sampled)
    return out
