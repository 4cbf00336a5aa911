"""Decode at a long context with each --kv-cache-dtype, alternated in one run: what a one-byte cache buys.

    python bench/kv_cache.py                    # SmolLM2 bf16, 4096-token context, batch 1 and 8
    python bench/kv_cache.py --dtypes auto,int8 --batch 1 --context 4096 --rounds 5

One engine per cache format in this process (the same weights: the bf16 copy of the default model that
bench/compare.py writes, or --model). Each engine prefills the same random prompts once; the prefix cache
keeps them, so every round after that is decode alone: `--output` tokens per request, greedy, at a context
of `--context` tokens and more. Rounds alternate the engines, and each round's decode rate is the tokens
after the first over the time from the first token to the last (request metrics). Printed: the median
rate per format and its ratio to the first format, with the KV bytes per token and the tokens per GiB.
Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))


def decode_rate(llm, prompts: list[list[int]], output: int) -> float:  # noqa: ANN001 - kvloom.LLM
    """Tokens per second of the decode steps of one batch (first token to last, all requests)."""
    from kvloom import SamplingParams

    sp = SamplingParams(max_tokens=output, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    first = min(o.metrics.first_token_time for o in outs)
    last = max(o.metrics.finished_time for o in outs)
    return len(prompts) * (output - 1) / (last - first)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2's bf16 copy)")
    p.add_argument("--dtypes", default="auto,int8,fp8", help="comma-separated --kv-cache-dtype values")
    p.add_argument("--quantization", default="none", help="the weights' --quantization (default: none)")
    p.add_argument("--context", type=int, default=4096, help="prompt tokens per request (default: 4096)")
    p.add_argument("--batch", default="1,8", help="comma-separated batch sizes (default: 1,8)")
    p.add_argument("--output", type=int, default=64, help="tokens decoded per request and round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    from kvloom import LLM
    from kvloom.layers.kv_cache import kv_cache_density
    from kvloom.loader.checkpoint import default_model_path

    model = args.model
    if model is None:
        from compare import hf_bf16_folder

        model = str(hf_bf16_folder(default_model_path()))
    dtypes = args.dtypes.split(",")
    batches = [int(b) for b in args.batch.split(",")]
    rng = random.Random(0)
    engines = {}
    for dt in dtypes:
        engines[dt] = LLM(
            model,
            dtype="bfloat16",
            quantization=args.quantization,
            kv_cache_dtype=dt,
            max_model_len=args.context + args.output + 16,
            max_num_seqs=max(batches),
            kv_cache_memory=(max(batches) * (args.context + args.output + 32))
            * engines_bytes_per_token(model, dt),
            num_threads=args.threads,
            show_progress=False,
        )
        print(f"{dt}: {kv_cache_density(engines[dt].engine.config)}", flush=True)
    vocab = engines[dtypes[0]].engine.config.hf_config.vocab_size
    for batch in batches:
        prompts = [[rng.randrange(100, vocab) for _ in range(args.context)] for _ in range(batch)]
        for llm in engines.values():  # the prompts' KV into each engine's prefix cache
            decode_rate(llm, prompts, 2)
        rates: dict[str, list[float]] = {dt: [] for dt in dtypes}
        for _ in range(args.rounds):
            for dt, llm in engines.items():
                rates[dt].append(decode_rate(llm, prompts, args.output))
        base = statistics.median(rates[dtypes[0]])
        print(f"\nbatch {batch}, context {args.context}, {args.output} tokens each, {args.rounds} rounds")
        print(f"{'kv cache':<10}{'decode tok/s':>14}{'vs ' + dtypes[0]:>10}   rounds")
        for dt in dtypes:
            med = statistics.median(rates[dt])
            runs = " ".join(f"{r:.1f}" for r in rates[dt])
            print(f"{dt:<10}{med:>14.1f}{med / base:>10.2f}   {runs}")
    del engines
    gc.collect()
    return 0


def engines_bytes_per_token(model: str, dtype: str) -> int:
    """KV bytes per token of ``model`` with cache format ``dtype`` (for a pool that fits the run)."""
    from kvloom.engine_args import create_engine_config

    return create_engine_config(model=model, dtype="bfloat16", kv_cache_dtype=dtype).kv_bytes_per_token


if __name__ == "__main__":
    sys.exit(main())
