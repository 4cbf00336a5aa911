"""Scheduling policies on real weights (stories260K): priority preemption and VTC fairness."""

from __future__ import annotations

import random
from collections import Counter

from kvloom import LLM, SamplingParams

LONG = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)


def first_token_step_of_urgent(stories, policy: str) -> tuple[int, int]:
    """30 long low-priority requests, then an urgent one. Returns (step of the urgent request's first
    token, low-priority requests finished by then)."""
    llm = LLM(str(stories), dtype="float32", max_num_seqs=8, scheduling_policy=policy, show_progress=False)
    engine = llm.engine
    rng = random.Random(0)
    for i in range(30):
        engine.add_request(f"low-{i}", [1] + [rng.randrange(3, 512) for _ in range(20)], LONG, priority=1)
    for _ in range(3):
        engine.step()
    engine.add_request("urgent", "Once upon a time", SamplingParams(temperature=0, max_tokens=5), priority=0)
    finished_low = 0
    step = 0
    while True:
        step += 1
        outs = engine.step()
        finished_low += sum(1 for o in outs if o.finished and o.request_id.startswith("low"))
        if any(o.request_id == "urgent" for o in outs):
            return step, finished_low


def test_high_priority_request_gets_its_first_token_before_any_low_priority_one_finishes(stories):
    step, finished = first_token_step_of_urgent(stories, "priority")
    assert finished == 0 and step == 1
    # The same workload under fcfs makes it wait for a free seat: some low-priority requests finish first.
    step, finished = first_token_step_of_urgent(stories, "fcfs")
    assert finished > 0 and step > 100


def light_user_share(stories, policy: str) -> float:
    """Heavy sends 10 requests for each of the light user's; both backlogged from the start. Returns the
    light user's share of tokens generated while both still had requests."""
    llm = LLM(str(stories), dtype="float32", max_num_seqs=4, scheduling_policy=policy, show_progress=False)
    engine = llm.engine
    rng = random.Random(1)
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    n = 0
    for _ in range(10):
        for user, count in (("heavy", 10), ("light", 1)):
            for _ in range(count):
                prompt = [1] + [rng.randrange(3, 512) for _ in range(8)]
                engine.add_request(f"{user}-{n}", prompt, params, user=user)
                n += 1
    served = Counter()
    seen = {}
    while True:
        users = {r.user for r in engine.scheduler.requests.values()}
        if users != {"heavy", "light"}:
            break
        for out in engine.step():
            new = len(out.outputs[0].token_ids) - seen.get(out.request_id, 0)
            seen[out.request_id] = len(out.outputs[0].token_ids)
            served[out.request_id.split("-")[0]] += new
    return served["light"] / (served["light"] + served["heavy"])


def test_fair_policy_gives_the_light_user_its_share(stories):
    fair = light_user_share(stories, "fair")
    fcfs = light_user_share(stories, "fcfs")
    assert fair >= 0.40, fair
    assert fcfs < 0.40, fcfs
