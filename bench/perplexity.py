"""Perplexity of one model in several weight formats, on the fixed English text in tests/data.

    python bench/perplexity.py                       # SmolLM2 Q4_1 GGUF: bf16 / native Q4_1 / int8 / int4
    python bench/perplexity.py --model path --formats none,int8
    python bench/perplexity.py --formats none --kv-cache-dtypes auto,int8,fp8,fp8_e5m2

Formats are kvloom's --quantization values: none (weights dequantized to bf16), auto (a GGUF file's
Q4_0/Q4_1/Q8_0/Q4_K/Q6_K blocks executed as they are), int8 / int4 (round to nearest, groups of 32).
Each runs with each --kv-cache-dtype of --kv-cache-dtypes (auto: the model's dtype; int8 / fp8 / fp8_e5m2:
one byte per value and a scale per token and head) and is printed with its ratio to the first run (none
with auto: the dequantized bf16 weights and a bf16 cache).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys

from kvloom.benchmarks.perplexity import DEFAULT_TEXT, perplexity


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--formats", default="none,auto,int8,int4", help="comma-separated --quantization values")
    p.add_argument("--kv-cache-dtypes", default="auto", help="comma-separated --kv-cache-dtype values")
    p.add_argument("--text", default=str(DEFAULT_TEXT))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()

    from kvloom import LLM

    text = open(args.text, encoding="utf-8").read()
    rows = []
    for fmt in args.formats.split(","):
        for kv in args.kv_cache_dtypes.split(","):
            llm = LLM(
                args.model,
                dtype="bfloat16",
                quantization=fmt,
                kv_cache_dtype=kv,
                num_threads=args.threads,
                show_progress=False,
            )
            ppl, n = perplexity(llm, text)
            rows.append({"quantization": fmt, "kv_cache_dtype": kv, "perplexity": ppl, "tokens": n})
            del llm
            gc.collect()
    base = rows[0]["perplexity"]
    first = f"{rows[0]['quantization']}/{rows[0]['kv_cache_dtype']}"
    print(f"\nperplexity on {args.text} ({rows[0]['tokens']} tokens)")
    print(f"{'quantization':<14}{'kv cache':<10}{'perplexity':>12}{'vs ' + first:>18}")
    for r in rows:
        r["ratio"] = r["perplexity"] / base
        print(f"{r['quantization']:<14}{r['kv_cache_dtype']:<10}{r['perplexity']:>12.4f}{r['ratio']:>18.4f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
