"""Offline throughput: N requests of fixed prompt/output lengths (random token ids, ignore_eos), kvloom vs
transformers ``generate`` on the same workload in the same run.

    python bench/throughput.py --num-prompts 32 --input-len 128 --output-len 128 --dtype bfloat16 --threads 2

Run it alone on the machine: with 2 cores, any other busy process distorts the numbers badly.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from kvloom.benchmarks.offline import make_workload


def bench_kvloom(args, prompts: list[list[int]]) -> dict:
    from kvloom import LLM
    from kvloom.benchmarks.offline import throughput

    llm = LLM(
        args.model,
        dtype=args.dtype,
        num_threads=args.threads,
        max_model_len=args.max_model_len,
        quantization=args.quantization,
        reserve_kv_cache=True,  # as `kvloom bench throughput`: the KV pool written before the clock starts
    )
    return throughput(llm, prompts, [args.output_len] * len(prompts))


def bench_transformers(args, prompts) -> dict:
    from transformers import AutoModelForCausalLM

    from kvloom.engine_args import resolve_dtype
    from kvloom.loader import resolve_checkpoint

    ckpt = resolve_checkpoint(args.model)
    dtype = resolve_dtype(args.dtype, ckpt.hf_config, ckpt.format, "cpu")
    if ckpt.format == "gguf":
        # transformers would keep GGUF weights packed and run its own quantized kernels; give it the same
        # dense weights kvloom runs, so both sides do the same work.
        model = AutoModelForCausalLM.from_config(ckpt.gguf.transformers_config(), dtype=dtype)
        missing, _ = model.load_state_dict(dict(ckpt.iter_tensors(dtype)), strict=False)
        assert set(missing) <= {"lm_head.weight"}, missing
        model.tie_weights()
        if ckpt.hf_config.tie_word_embeddings:
            assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    else:
        model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype=dtype)
    model.eval()
    bs = args.hf_batch_size or len(prompts)
    kw = dict(max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(
            torch.tensor(prompts[:1]), **{**kw, "max_new_tokens": 4, "min_new_tokens": 4}
        )  # warm-up
        t0 = time.perf_counter()
        for i in range(0, len(prompts), bs):
            batch = torch.tensor(prompts[i : i + bs])
            out = model.generate(batch, attention_mask=torch.ones_like(batch), **kw)
            assert out.shape[1] == args.input_len + args.output_len
        elapsed = time.perf_counter() - t0
    return {"elapsed_s": elapsed, "batch_size": bs}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--quantization",
        default="none",
        help="kvloom's --quantization (default none: the same dense weights transformers gets)",
    )
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument(
        "--hf-batch-size", type=int, default=None, help="transformers batch (default: all prompts)"
    )
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from kvloom.loader import resolve_checkpoint

    vocab = resolve_checkpoint(args.model).hf_config.vocab_size
    prompts, _ = make_workload(args.num_prompts, args.input_len, args.output_len, vocab, seed=args.seed)
    results = {"kvloom": bench_kvloom(args, prompts)}
    if not args.skip_transformers:
        results["transformers"] = bench_transformers(args, prompts)

    n_out = args.num_prompts * args.output_len
    n_all = args.num_prompts * (args.input_len + args.output_len)
    print(
        f"\n{args.num_prompts} requests x ({args.input_len} in, {args.output_len} out), {args.dtype}, "
        f"{args.threads} threads"
    )
    print(f"{'engine':<14}{'time s':>9}{'output tok/s':>15}{'total tok/s':>14}")
    for name, r in results.items():
        r["output_tok_s"] = n_out / r["elapsed_s"]
        r["total_tok_s"] = n_all / r["elapsed_s"]
        print(f"{name:<14}{r['elapsed_s']:>9.2f}{r['output_tok_s']:>15.1f}{r['total_tok_s']:>14.1f}")
    if "transformers" in results:
        ratio = results["kvloom"]["output_tok_s"] / results["transformers"]["output_tok_s"]
        print(f"kvloom / transformers output throughput: {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
