"""ThreadGovernor: steps use fewer threads while other processes keep the CPUs busy, and the same
tokens come out whatever the count."""

from __future__ import annotations

import pytest
import torch

import kvloom.worker.cpu_threads as ct


@pytest.fixture
def machine(monkeypatch):
    """A fake clock and /proc/stat: advance(seconds, others=cores' worth of other processes' CPU)."""
    state = {"now": 100.0, "busy": 0.0, "own": 0.0}
    monkeypatch.setattr(ct.time, "monotonic", lambda: state["now"])
    monkeypatch.setattr(ct, "_cpu_busy_seconds", lambda cpus, tick: state["busy"])
    monkeypatch.setattr(ct, "_own_seconds", lambda: state["own"])
    calls: list[int] = []
    monkeypatch.setattr(ct.torch, "set_num_threads", calls.append)

    def advance(seconds: float, others: float, own: float = 1.0) -> None:
        state["now"] += seconds
        state["own"] += own * seconds
        state["busy"] += (own + others) * seconds

    return advance, calls


def test_governor_follows_the_cpu_other_processes_use(machine):
    advance, calls = machine
    gov = ct.ThreadGovernor(2)
    gov.cpus = {0, 1}
    gov.step()  # the first reading only
    advance(1.0, others=1.2)
    gov.step()
    assert gov.threads == 1 and calls == [1] and gov.others == pytest.approx(1.2)
    advance(0.2, others=0.0)
    gov.step()  # within the window: no new reading
    assert calls == [1]
    advance(1.0, others=1.3)  # kvloom on one thread, the other job on the rest: stays
    gov.step()
    assert calls == [1]
    advance(1.0, others=0.1)  # the other job ended
    gov.step()
    assert gov.threads == 2 and calls == [1, 2]


def test_wanted_threads():
    gov = ct.ThreadGovernor(16)
    gov.cpus = set(range(16))
    assert [gov.wanted(x) for x in (0.0, 0.4, 3.2, 15.6, 40.0)] == [16, 16, 13, 1, 1]
    gov = ct.ThreadGovernor(8)  # configured below the CPUs: never above it
    gov.cpus = set(range(16))
    assert gov.wanted(2.0) == 8 and gov.wanted(12.0) == 4


def test_an_explicit_thread_count_or_another_device_has_no_governor():
    assert ct.ThreadGovernor.create("cpu", 2) is None
    assert ct.ThreadGovernor.create("cuda", None) is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_same_tokens_on_one_thread_as_on_two(stories, dtype):
    """On/off: a step on the governor's one thread gives the tokens of the full count."""
    from kvloom import LLM, SamplingParams

    llm = LLM(str(stories), dtype=dtype, show_progress=False, num_threads=2)
    prompts = ["Once upon a time", "Lily and Tom", "The big red ball", "One day"]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    gov = ct.ThreadGovernor(2)
    try:
        two = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
        gov._set(1)
        assert torch.get_num_threads() == 1
        one = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    finally:
        torch.set_num_threads(2)
    assert one == two
