"""Offline benchmarks on the engine itself: throughput (many requests) and latency (one batch)."""

from __future__ import annotations

import random
import time
from typing import Any

from tqdm.auto import tqdm

from kvloom.benchmarks.common import percentiles, random_lengths, random_prompts
from kvloom.llm import LLM
from kvloom.sampling_params import SamplingParams


def make_workload(
    num_prompts: int,
    input_len: int,
    output_len: int,
    vocab_size: int,
    range_ratio: float = 0.0,
    seed: int = 0,
) -> tuple[list[list[int]], list[int]]:
    """(prompts of random token ids, output lengths), fixed or uniform in len x [1 - r, 1 + r]."""
    rng = random.Random(seed)
    in_lens = random_lengths(num_prompts, input_len, range_ratio, rng)
    out_lens = random_lengths(num_prompts, output_len, range_ratio, rng)
    return random_prompts(in_lens, vocab_size, rng), out_lens


def throughput(llm: LLM, prompts: list[list[int]], output_lens: list[int]) -> dict[str, Any]:
    """All requests at once (ignore_eos, greedy); output and total tokens per second."""
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in output_lens]
    # Warm up on a prompt outside the workload, so the prefix cache gives the measured run nothing.
    llm.generate([list(range(1, 100))], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=True)
    elapsed = time.perf_counter() - t0
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert n_out == sum(output_lens)
    n_in = sum(len(p) for p in prompts)
    return {
        "requests": len(prompts),
        "elapsed_s": elapsed,
        "requests_per_s": len(prompts) / elapsed,
        "output_tok_s": n_out / elapsed,
        "total_tok_s": (n_in + n_out) / elapsed,
    }


def latency(
    llm: LLM, batch_size: int, input_len: int, output_len: int, num_iters: int = 5, seed: int = 0
) -> dict[str, Any]:
    """One batch of ``batch_size`` requests, ``num_iters`` times: prefill time (until every request has
    its first token), per-step decode time, and end-to-end time, as percentiles."""
    engine = llm.engine
    rng = random.Random(seed)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    prefill, decode_steps, e2e = [], [], []
    decode_tokens = 0
    for it in tqdm(range(num_iters + 1), desc="latency"):
        prompts = random_prompts([input_len] * batch_size, engine.runner.vocab_size, rng)
        ids = [f"lat-{it}-{i}" for i in range(batch_size)]
        for rid, p in zip(ids, prompts, strict=True):
            engine.add_request(rid, p, params)
        t0 = time.perf_counter()
        t_prefill = None
        steps = []
        while engine.has_unfinished_requests():
            t = time.perf_counter()
            n = engine.num_generation_tokens
            engine.step()
            dt = time.perf_counter() - t
            if t_prefill is not None:
                steps.append(dt)
                if it > 0:
                    decode_tokens += engine.num_generation_tokens - n
            elif all(r.num_output_tokens > 0 for r in engine.scheduler.requests.values()):
                t_prefill = time.perf_counter() - t0  # every request of the batch has its first token
        total = time.perf_counter() - t0
        if it > 0:  # the first iteration warms up
            prefill.append(t_prefill)
            e2e.append(total)
            decode_steps += steps
    return {
        "batch_size": batch_size,
        "prefill_s": percentiles(prefill),
        "decode_step_s": percentiles(decode_steps),
        "e2e_s": percentiles(e2e),
        # NOTE: tokens over time, not batch / step: a speculative step yields several tokens per request.
        "decode_tok_s": decode_tokens / sum(decode_steps),
        "decode_tokens": decode_tokens,
        "decode_steps": len(decode_steps),
    }


def format_result(result: dict[str, Any]) -> str:
    """A readable summary of ``throughput`` or ``latency``'s result (the JSON follows it)."""
    if "output_tok_s" in result:
        return "\n".join(
            [
                f"{'requests':<22}{result['requests']:>12}",
                f"{'elapsed (s)':<22}{result['elapsed_s']:>12.2f}",
                f"{'requests/s':<22}{result['requests_per_s']:>12.2f}",
                f"{'output tokens/s':<22}{result['output_tok_s']:>12.1f}",
                f"{'total tokens/s':<22}{result['total_tok_s']:>12.1f}",
            ]
        )
    lines = [
        f"batch size {result['batch_size']}: decode {result['decode_tok_s']:.1f} tok/s "
        f"({result['decode_tokens']} tokens in {result['decode_steps']} steps)",
        f"{'ms':<14}{'mean':>10}{'p50':>10}{'p90':>10}{'p99':>10}",
    ]
    for name, key in (("prefill", "prefill_s"), ("decode step", "decode_step_s"), ("end to end", "e2e_s")):
        p = result[key]
        lines.append(
            f"{name:<14}{p['mean'] * 1e3:>10.1f}{p['p50'] * 1e3:>10.1f}{p['p90'] * 1e3:>10.1f}"
            f"{p['p99'] * 1e3:>10.1f}"
        )
    return "\n".join(lines)
