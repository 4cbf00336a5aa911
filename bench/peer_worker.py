"""One engine, one workload, one JSON line on stdout. Run by bench/compare.py with the Python of the engine's
own virtual environment, so it imports only that engine (never kvloom, unless it is the engine).

Workloads (token ids come from the driver, identical for every engine; EOS ignored, fixed output length):
- throughput: all prompts at once, output tokens per second over the whole run; then once more for each
  further prompt set in `more_prompts` (fresh ids: no prefix-cache hits), reporting the best run;
- decode: one prompt, generated twice (1 token, then N + 1); decode tokens per second is N over the time
  difference, so prefill and start-up cost cancel out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def run_kvloom(model: str, dtype: str, quantization: str, threads: int, max_len: int, kv_cache_dtype: str):
    from kvloom import LLM, SamplingParams

    # KV pool written at start-up, as vLLM and llama.cpp write theirs (steady state, no page faults timed)
    llm = LLM(
        model,
        dtype=dtype,
        quantization=quantization,
        num_threads=threads,
        max_model_len=max_len,
        reserve_kv_cache=True,
        kv_cache_dtype=kv_cache_dtype,
    )

    def generate(prompts: list[list[int]], n: int) -> None:
        params = SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == n for o in outs)

    return generate


def run_vllm(model: str, dtype: str, threads: int, max_len: int):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{threads - 1}")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model, dtype=dtype, max_model_len=max_len, seed=0)

    def generate(prompts: list[list[int]], n: int) -> None:
        params = SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == n for o in outs)

    return generate


def run_llamacpp(model: str, threads: int, max_len: int, max_seqs: int):
    """llama.cpp through llama-cpp-python's low-level API: one llama_batch per step holding every running
    sequence's token (how llama.cpp's own batched examples run many sequences), greedy sampling."""
    import ctypes

    import llama_cpp as lc
    import numpy as np

    lc.llama_backend_init()
    mparams = lc.llama_model_default_params()
    model_p = lc.llama_model_load_from_file(model.encode(), mparams)
    vocab = lc.llama_model_get_vocab(model_p)
    n_vocab = lc.llama_vocab_n_tokens(vocab)

    def generate(prompts: list[list[int]], n: int) -> None:
        cparams = lc.llama_context_default_params()
        cparams.n_ctx = max_len * len(prompts)
        cparams.n_batch = max(512, len(prompts))
        cparams.n_ubatch = max(512, len(prompts))
        cparams.n_seq_max = max(len(prompts), 1)
        cparams.n_threads = cparams.n_threads_batch = threads
        ctx = lc.llama_init_from_model(model_p, cparams)
        batch = lc.llama_batch_init(max(512, len(prompts)), 0, len(prompts))

        def decode(items: list[tuple[int, int, int, bool]]) -> None:  # (token, pos, seq, wants logits)
            batch.n_tokens = len(items)
            for i, (tok, pos, seq, logits) in enumerate(items):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
                batch.seq_id[i][0], batch.logits[i] = seq, logits
            assert lc.llama_decode(ctx, batch) == 0

        def argmax(i: int) -> int:
            row = lc.llama_get_logits_ith(ctx, i)
            return int(
                np.ctypeslib.as_array(ctypes.cast(row, ctypes.POINTER(ctypes.c_float)), (n_vocab,)).argmax()
            )

        last = []
        for s, p in enumerate(prompts):  # prefill, in chunks of the batch size
            for a in range(0, len(p), 512):
                chunk = p[a : a + 512]
                decode([(t, a + j, s, a + j == len(p) - 1) for j, t in enumerate(chunk)])
            last.append(argmax(len(p) - 1 - (len(p) - 1) // 512 * 512))
        for step in range(1, n):
            decode([(last[s], len(p) + step - 1, s, True) for s, p in enumerate(prompts)])
            last = [argmax(s) for s in range(len(prompts))]
        lc.llama_batch_free(batch)
        lc.llama_free(ctx)

    return generate


def run_transformers(model: str, dtype: str, threads: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval()

    def generate(prompts: list[list[int]], n: int) -> None:
        with torch.inference_mode():
            ids = torch.tensor(prompts)
            out = m.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False
            )
            assert out.shape[1] == ids.shape[1] + n

    return generate


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--engine", required=True, choices=["kvloom", "vllm", "llamacpp", "transformers"])
    p.add_argument("--model", required=True)
    p.add_argument("--workload", required=True, help="JSON file: {kind, prompts, output_len}")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--quantization", default="none", help="kvloom only")
    p.add_argument("--kv-cache-dtype", default="auto", help="kvloom only")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-model-len", type=int, default=1024)
    args = p.parse_args()
    with open(args.workload) as f:
        w = json.load(f)
    prompts, n = w["prompts"], w["output_len"]

    t0 = time.perf_counter()
    if args.engine == "kvloom":
        generate = run_kvloom(
            args.model, args.dtype, args.quantization, args.threads, args.max_model_len, args.kv_cache_dtype
        )
    elif args.engine == "vllm":
        generate = run_vllm(args.model, args.dtype, args.threads, args.max_model_len)
    elif args.engine == "llamacpp":
        generate = run_llamacpp(args.model, args.threads, args.max_model_len, len(prompts))
    else:
        generate = run_transformers(args.model, args.dtype, args.threads)
    load_s = time.perf_counter() - t0
    generate(prompts[:1], 4)  # warm-up (compilation, first-touch allocation)

    result = {"engine": args.engine, "load_s": load_s}
    if w["kind"] == "throughput":
        runs = []
        for batch in [prompts, *w.get("more_prompts", [])]:
            t = time.perf_counter()
            generate(batch, n)
            runs.append(len(batch) * n / (time.perf_counter() - t))
        best = max(runs)
        result.update(elapsed_s=len(prompts) * n / best, output_tok_s=best)
        result["runs_tok_s"] = [round(r, 1) for r in runs]
    else:
        times = {}
        for m in (1, n + 1):
            best = float("inf")
            for _ in range(w.get("repeats", 3)):
                t = time.perf_counter()
                generate(prompts[:1], m)
                best = min(best, time.perf_counter() - t)
            times[m] = best
        per_token = (times[n + 1] - times[1]) / n
        result.update(decode_ms=per_token * 1e3, decode_tok_s=1 / per_token)
    print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
