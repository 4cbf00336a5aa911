"""Tensor parallel on one host: TP = N with T / N threads per rank against TP = 1 with T threads, same
model, same token ids, one run; each configuration in its own process, alternated (A B A B ...), best of
each reported with their ratio.

    python bench/tensor_parallel.py                      # Qwen2.5-0.5B's shapes, 32 x (128 in, 128 out)
    python bench/tensor_parallel.py --tp 2 --rounds 3 --threads 2

The model is random-weight bf16 with Qwen2.5-0.5B's config (14 heads, 2 KV heads, 24 layers, vocab
151936, tied embeddings), written once under $KVLOOM_CACHE_DIR/bench. Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
STORIES = HERE.parents[1] / "shared" / "models" / "stories260K"

QWEN25_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rope_theta=1000000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)


def model_folder() -> Path:
    from kvloom.backends.cpu.build import cache_dir

    folder = cache_dir() / "bench" / "qwen2.5-0.5b-random-bf16"
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    print(f"writing a random-weight Qwen2.5-0.5B-shaped model to {folder}", flush=True)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B)).to(torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(STORIES).save_pretrained(folder)  # token ids are given, never text
    return folder


def run_one(folder: str, tp: int, threads: int, num_prompts: int, input_len: int, output_len: int) -> dict:
    """In a fresh process: load, warm up, then one timed generate of the whole workload."""
    import random

    from kvloom import LLM, SamplingParams

    llm = LLM(
        folder,
        dtype="bfloat16",
        tensor_parallel_size=tp,
        num_threads=threads,
        max_model_len=input_len + output_len + 16,
        show_progress=False,
    )
    rng = random.Random(tp * 1000 + threads)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    warm = [[rng.randrange(3, 151936) for _ in range(input_len)] for _ in range(4)]
    llm.generate(warm, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    prompts = [[rng.randrange(3, 151936) for _ in range(input_len)] for _ in range(num_prompts)]
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t
    generated = sum(len(o.outputs[0].token_ids) for o in outs)
    llm.engine.shutdown()
    return {"tp": tp, "threads": threads, "seconds": elapsed, "tok_s": generated / elapsed}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="threads in all (TP = N: threads / N per rank)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: "tp,threads" in this process
    args = p.parse_args()
    folder = str(model_folder())
    if args.one is not None:
        tp, threads = map(int, args.one.split(","))
        print(json.dumps(run_one(folder, tp, threads, args.num_prompts, args.input_len, args.output_len)))
        return 0
    configs = [(1, args.threads), (args.tp, max(1, args.threads // args.tp))]
    best: dict[tuple[int, int], float] = {}
    for r in range(args.rounds):
        for tp, threads in configs:
            cmd = [sys.executable, __file__, "--one", f"{tp},{threads}"]
            cmd += ["--num-prompts", str(args.num_prompts), "--input-len", str(args.input_len)]
            cmd += ["--output-len", str(args.output_len)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            res = json.loads(out.strip().splitlines()[-1])
            print(f"round {r + 1}: TP={tp} x {threads} threads: {res['tok_s']:.1f} tok/s", flush=True)
            best[tp, threads] = max(best.get((tp, threads), 0.0), res["tok_s"])
    (tp1, tpn) = (best[configs[0]], best[configs[1]])
    print(
        f"\n{args.num_prompts} x ({args.input_len}, {args.output_len}), best of {args.rounds}: "
        f"TP=1 x {configs[0][1]} threads {tp1:.1f} tok/s, TP={args.tp} x {configs[1][1]} threads "
        f"{tpn:.1f} tok/s: ratio {tpn / tp1:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
