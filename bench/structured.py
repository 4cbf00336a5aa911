"""Structured outputs' cost, same engine, same run: 32 requests under a JSON schema against the same 32
unconstrained (throughput, alternated A B A B), and time to first token of one request with a new schema
(compiled then), a cached schema and none.

    python bench/structured.py                 # the default model (SmolLM2 Q4_1), 32 x (chat prompt, 128)
    python bench/structured.py --rounds 3

The schema ends in a string of at least 2000 characters, so constrained requests run to max_tokens like
the unconstrained ones (ignore_eos): both runs produce the same number of tokens in the same batches.
Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from kvloom import LLM, SamplingParams


def schema(n: int) -> dict:
    """A schema whose text differs with n (a cache miss each time), all alike to compile."""
    return {
        "type": "object",
        "properties": {
            "title": {"type": "string", "maxLength": 40 + n},
            "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
            "story": {"type": "string", "minLength": 2000},  # outlasts max_tokens
        },
        "required": ["title", "year", "story"],
        "additionalProperties": False,
    }


def throughput(llm: LLM, prompts: list[str], params: SamplingParams) -> float:
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t)


def ttft(llm: LLM, prompt: str, params: SamplingParams) -> float:
    """Seconds from add_request (which compiles a new schema) to the first output token."""
    engine = llm.engine
    t = time.perf_counter()
    engine.add_request("ttft", prompt, params)
    while True:
        for out in engine.step():
            if out.outputs[0].token_ids:
                elapsed = time.perf_counter() - t
                engine.abort("ttft")
                return elapsed


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--ttft-trials", type=int, default=5)
    args = p.parse_args()
    llm = LLM(args.model, show_progress=False)
    tok = llm.get_tokenizer()
    topics = ["a dragon", "the sea", "a robot", "a city", "winter", "a detective", "music", "a garden"]
    prompts = [
        tok.apply_chat_template(
            [{"role": "user", "content": f"Write a story about {topics[i % len(topics)]} as JSON ({i})."}],
            tokenize=False,
            add_generation_prompt=True,
        )
        for i in range(args.num_prompts)
    ]
    base = dict(temperature=0.8, seed=1, max_tokens=args.output_len, ignore_eos=True)
    free = SamplingParams(**base)
    fixed = SamplingParams(**base, structured_outputs={"json": schema(0)})
    llm.generate(prompts[:2], fixed, use_tqdm=False)  # warm-up: xgrammar's import, the compiler, kernels
    runs: dict[str, list[float]] = {"unconstrained": [], "json schema": []}
    for _ in range(args.rounds):
        runs["unconstrained"].append(throughput(llm, prompts, free))
        runs["json schema"].append(throughput(llm, prompts, fixed))
    for name, values in runs.items():
        print(f"{name:14s} " + " ".join(f"{v:7.1f}" for v in values) + " tok/s")
    best_free, best_fixed = max(runs["unconstrained"]), max(runs["json schema"])
    print(f"throughput, best of {args.rounds}: json schema / unconstrained = {best_fixed / best_free:.3f}")

    times: dict[str, list[float]] = {"unconstrained": [], "cached schema": [], "new schema": []}
    one = dict(temperature=0.8, seed=1, max_tokens=4)
    for i in range(args.ttft_trials):
        times["unconstrained"].append(ttft(llm, prompts[0], SamplingParams(**one)))
        times["cached schema"].append(
            ttft(llm, prompts[0], SamplingParams(**one, structured_outputs={"json": schema(0)}))
        )
        new = SamplingParams(**one, structured_outputs={"json": schema(1000 + i)})
        times["new schema"].append(ttft(llm, prompts[0], new))
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(
            f"TTFT {k:14s} median {v * 1e3:7.1f} ms  (runs: "
            + ", ".join(f"{x * 1e3:.1f}" for x in times[k])
            + ")"
        )
    print(
        f"TTFT overhead: cached schema {med['cached schema'] / med['unconstrained'] - 1:+.1%}, "
        f"new schema {med['new schema'] / med['unconstrained'] - 1:+.1%}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
