"""Prefix caching on shared-prefix workloads: TTFT and throughput with the cache on and off, same run.

    python bench/prefix_cache.py --threads 2

Workloads (random token ids, ignore_eos):
- shared: N requests, all sent at once, sharing a long prefix (a system prompt) + a few distinct tokens;
- chat: C conversations of T turns; each turn resends the whole history plus a new user message, and a
  conversation's next turn is sent when its previous reply is done.
Run it alone on the machine: with 2 cores, any other busy process distorts the numbers badly.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time

from tqdm.auto import tqdm

from kvloom import LLMEngine, SamplingParams


def run_shared(engine: LLMEngine, args, rng: random.Random) -> dict:
    vocab = engine.runner.vocab_size
    prefix = [rng.randrange(10, vocab) for _ in range(args.prefix_len)]
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    t0 = time.perf_counter()
    for i in range(args.num_requests):
        engine.add_request(
            f"s{i}", prefix + [rng.randrange(10, vocab) for _ in range(args.suffix_len)], params
        )
    done = drain(engine, args.num_requests, "shared prefix")
    elapsed = time.perf_counter() - t0
    return summarize(done, elapsed)


def run_chat(engine: LLMEngine, args, rng: random.Random) -> dict:
    vocab = engine.runner.vocab_size
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    system = [rng.randrange(10, vocab) for _ in range(args.chat_system_len)]
    history = {c: list(system) for c in range(args.conversations)}
    turn = dict.fromkeys(history, 0)
    t0 = time.perf_counter()

    def send(c: int) -> None:
        history[c] += [rng.randrange(10, vocab) for _ in range(args.suffix_len)]
        engine.add_request(f"c{c}-t{turn[c]}", list(history[c]), params)

    for c in history:
        send(c)
    done = []
    total = args.conversations * args.turns
    with tqdm(total=total, desc="multi-turn chat", leave=False) as bar:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done.append(out)
                    bar.update(1)
                    c = int(out.request_id[1:].split("-")[0])
                    history[c] += out.outputs[0].token_ids
                    turn[c] += 1
                    if turn[c] < args.turns:
                        send(c)
    return summarize(done, time.perf_counter() - t0)


def drain(engine: LLMEngine, n: int, desc: str) -> list:
    done = []
    with tqdm(total=n, desc=desc, leave=False) as bar:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done.append(out)
                    bar.update(1)
    return done


def summarize(done: list, elapsed: float) -> dict:
    ttfts = [o.metrics.first_token_time - o.metrics.arrival_time for o in done]
    prompt = sum(len(o.prompt_token_ids) for o in done)
    output = sum(len(o.outputs[0].token_ids) for o in done)
    return {
        "requests": len(done),
        "mean_ttft_s": statistics.mean(ttfts),
        "p50_ttft_s": statistics.median(ttfts),
        "elapsed_s": elapsed,
        "output_tok_s": output / elapsed,
        "total_tok_s": (prompt + output) / elapsed,
        "cached_prompt_tokens": sum(o.num_cached_tokens for o in done),
        "prompt_tokens": prompt,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prefix-len", type=int, default=1024)
    p.add_argument("--suffix-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--conversations", type=int, default=8)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--chat-system-len", type=int, default=256)
    p.add_argument("--skip-chat", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    results: dict[str, dict] = {}
    for cache in (True, False):
        engine = LLMEngine.from_args(
            args.model,
            dtype=args.dtype,
            num_threads=args.threads,
            enable_prefix_caching=cache,
            max_model_len=4096,
        )
        warm = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        engine.add_request("warm-up", list(range(100, 400)), warm)  # first forwards are slower
        drain(engine, 1, "warm-up")
        name = "cache on" if cache else "cache off"
        results[f"shared, {name}"] = run_shared(engine, args, random.Random(0))
        if not args.skip_chat:
            results[f"chat, {name}"] = run_chat(engine, args, random.Random(1))
        del engine
        gc.collect()

    print(
        f"\nshared: {args.num_requests} x ({args.prefix_len} shared + {args.suffix_len} own, "
        f"{args.output_len} out); chat: {args.conversations} conversations x {args.turns} turns; "
        f"{args.dtype}, {args.threads} threads"
    )
    print(
        f"{'workload':<20}{'mean TTFT s':>12}{'p50 TTFT s':>12}{'output tok/s':>14}{'total tok/s':>13}"
        f"{'cached':>9}"
    )
    for name, r in results.items():
        print(
            f"{name:<20}{r['mean_ttft_s']:>12.2f}{r['p50_ttft_s']:>12.2f}{r['output_tok_s']:>14.1f}"
            f"{r['total_tok_s']:>13.1f}{r['cached_prompt_tokens'] / r['prompt_tokens']:>9.0%}"
        )
    for w in ("shared",) + (() if args.skip_chat else ("chat",)):
        on, off = results[f"{w}, cache on"], results[f"{w}, cache off"]
        print(
            f"{w}: mean TTFT {off['mean_ttft_s'] / on['mean_ttft_s']:.1f}x lower with the cache, "
            f"throughput {on['output_tok_s'] / off['output_tok_s']:.2f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
