"""Speculative decoding: batch-1 decode tokens/s with and without it, on the same model in one run.

    python bench/speculative.py                      # SmolLM2-135M-Instruct as bf16, 2 threads
    python bench/speculative.py --quantization auto  # the GGUF's Q4_1 blocks as the target

Two workloads, each prompt run alone (batch 1), greedy:
- copy: edits of a given text, code refactoring and list rewriting (the output repeats the input);
- chat: open questions (little to copy).
Variants: no speculation; ngram (prompt lookup); draft-int4 = the target itself with int4 weights;
draft-random = a tiny random-weight model with the target's vocabulary (acceptance near zero: the floor
that adaptive k must keep above 0.95x). k adapts per request unless --fixed-k; a "-fixed" suffix on a
variant (draft-random-fixed) turns adaptation off for that variant only. Decode tok/s is
(tokens - 1) / (finish - first token), so prefill is left out. Greedy outputs must be equal across
variants: the script checks it.
Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys

COPY_PROMPTS = [
    "Fix the spelling mistakes in this paragraph and write out the whole corrected paragraph:\n\n"
    "The old lighthuose stood at the edge of the cliff for more then two hundred years. Every nigth its "
    "lamp turned slowly, sending a beam of light acros the dark water so that ships could find there way "
    "home. The keeper, a quiet man named Elias, climbed the ninety steps each evning to clean the glass "
    "and check the oil. He never complained about the wind or the cold, becuase he knew that somewhere "
    "out on the sea a captain was looking for his light.",
    "Rename the variable `tmp` to `total` in this Python function and return the full function:\n\n"
    "```python\ndef sum_prices(items):\n    tmp = 0\n    for item in items:\n        if item.price > 0:\n"
    "            tmp = tmp + item.price * item.quantity\n        else:\n"
    "            print('skipping', item.name)\n"
    "    if tmp > 1000:\n        tmp = tmp * 0.9\n    return round(tmp, 2)\n```",
    "Rewrite this shopping list with every item in capital letters, one item per line:\n\n"
    "apples\nbread\nmilk\ntwo dozen eggs\norange juice\nbutter\nrice\nfresh basil\ntomatoes\nolive oil\n"
    "black pepper\nlemons",
    "Add a comment above each line of this JavaScript function explaining what it does, and return the "
    "whole function:\n\n```javascript\nfunction countWords(text) {\n  const words = text.split(' ');\n"
    "  const counts = {};\n  for (const word of words) {\n    counts[word] = (counts[word] || 0) + 1;\n"
    "  }\n  return counts;\n}\n```",
]
CHAT_PROMPTS = [
    "What are three good habits for staying healthy?",
    "Explain how a bicycle works to a ten-year-old.",
    "Write a short poem about the sea at night.",
    "What should I pack for a weekend hiking trip?",
]
WORKLOADS = {"copy": (COPY_PROMPTS, 256), "chat": (CHAT_PROMPTS, 160)}


def random_draft(model: str | None) -> str:
    """A 1-layer random-weight Llama with the target's vocabulary, saved once under the cache dir."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from kvloom.backends.cpu.build import cache_dir
    from kvloom.loader import resolve_checkpoint

    vocab = resolve_checkpoint(model).hf_config.vocab_size
    folder = cache_dir() / "bench" / "models" / f"random-draft-{vocab}"
    if not (folder / "config.json").is_file():
        cfg = LlamaConfig(
            vocab_size=vocab,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=8192,
        )
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(folder)
    return str(folder)


def run_variant(args, name: str, spec: dict) -> dict:
    from kvloom import LLM, SamplingParams
    from kvloom.spec.proposers import SpecStats

    llm = LLM(
        args.model,
        dtype="bfloat16",
        quantization=args.quantization,
        num_threads=args.threads,
        show_progress=False,
        adaptive_speculation=not (args.fixed_k or name.endswith("-fixed")),
        **spec,
    )
    llm.generate("Hello", SamplingParams(max_tokens=8, temperature=0))  # warm-up
    proposer = llm.engine.proposer
    results = {}
    for workload, (prompts, max_tokens) in WORKLOADS.items():
        if proposer is not None:  # counters per workload
            proposer.stats = SpecStats.empty(len(proposer.stats.accepted_per_position))
        params = SamplingParams(temperature=0, max_tokens=max_tokens)
        tokens, seconds, outputs = 0, 0.0, []
        for text in prompts:
            (out,) = llm.chat([{"role": "user", "content": text}], params)
            m = out.metrics
            n = len(out.outputs[0].token_ids)
            tokens += n - 1
            seconds += m.finished_time - m.first_token_time
            outputs.append(out.outputs[0].token_ids)
        row = {"decode_tok_s": tokens / seconds, "tokens": tokens, "outputs": outputs}
        if proposer is not None:
            row["speculation"] = proposer.stats.summary()
        results[workload] = row
    del llm
    gc.collect()
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument(
        "--quantization", default="none", help="the target's weights (default: none, i.e. dense bf16)"
    )
    p.add_argument("--k", type=int, default=5, help="most tokens proposed per step (default: 5)")
    p.add_argument("--fixed-k", action="store_true", help="always propose k (no adaptation)")
    p.add_argument("--variants", default="none,ngram,draft-int4")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()

    specs = {
        "none": {},
        "ngram": dict(speculative_method="ngram", num_speculative_tokens=args.k),
        "draft-int4": dict(
            speculative_method="draft", num_speculative_tokens=args.k, speculative_quantization="int4"
        ),
    }
    variants = args.variants.split(",")
    if any(v.startswith("draft-random") for v in variants):
        specs["draft-random"] = dict(
            speculative_method="draft",
            num_speculative_tokens=args.k,
            speculative_model=random_draft(args.model),
            speculative_quantization="none",
        )
    results = {v: run_variant(args, v, specs[v.removesuffix("-fixed")]) for v in variants}

    base = results[variants[0]]
    print(f"\nbatch-1 decode tok/s, target {args.quantization}, {args.threads} threads, k <= {args.k}")
    vs = "vs " + variants[0]
    print(f"{'workload':<8} {'variant':<12} {'tok/s':>8} {vs:>9} {'accepted':>9}  per position")
    ok = True
    for workload in WORKLOADS:
        for v in variants:
            r = results[v][workload]
            same = r["outputs"] == base[workload]["outputs"]
            ok &= same
            spec = r.get("speculation")
            acc = f"{spec['acceptance_rate']:.1%}" if spec else "-"
            pos = " ".join(f"{x:.2f}" for x in spec["acceptance_per_position"]) if spec else ""
            ratio = r["decode_tok_s"] / base[workload]["decode_tok_s"]
            flag = "" if same else "  OUTPUT DIFFERS"
            print(f"{workload:<8} {v:<12} {r['decode_tok_s']:8.1f} {ratio:8.2f}x {acc:>9}  {pos}{flag}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print("greedy outputs equal across variants:", ok)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
