"""kvloom on a GPU against transformers on the same GPU (bench/gpu_check.sh runs it on the device machine):
throughput of N x (input, output) requests and batch-1 decode, for random-weight models of SmolLM2-135M's and
Llama-3.2-1B's configs (kvloom's batch-1 decode also without CUDA graphs: --enforce-eager), and batch-1
decode against the HBM roofline (the weights' bytes per token over
the card's bandwidth).

    python bench/gpu_bench.py                            # both models, 256 x (128, 128), bf16
    python bench/gpu_bench.py --models smollm2 --num-prompts 32 --device cpu --tiny   # a smoke run here

Random weights and a word-level tokenizer written beside them: no hub, the same token ids for both
engines. transformers runs its generate() with a static cache (and torch.compile where that works), one
batch of all prompts, greedy, no early stop.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "smollm2": dict(
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        vocab_size=49152,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    ),
    "llama-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
}
HBM_GBS = {"H100": 3350.0, "H200": 4800.0}  # the cards' memory bandwidth (GB/s), SXM


def write_model(name: str, folder: Path, tiny: bool, dtype) -> Path:  # noqa: ANN001 - torch.dtype
    import torch
    from tokenizers import Tokenizer, models
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = dict(CONFIGS[name], bos_token_id=1, eos_token_id=2)
    if tiny:
        cfg.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, head_dim=16, vocab_size=512)
        cfg.update(num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**cfg), dtype=dtype)
    model.save_pretrained(folder)
    vocab = {f"t{i}": i for i in range(cfg["vocab_size"])}
    Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "t1", "eos_token": "t2"})
    )
    return folder


def kvloom_run(
    folder: Path, prompts: list[list[int]], out_len: int, device: str, dtype: str, eager: bool = False
) -> float:
    """Output tokens per second of one generate() over all prompts (after a warm-up); ``eager``: without
    CUDA graphs."""
    from kvloom import LLM, SamplingParams

    llm = LLM(
        str(folder),
        dtype=dtype,
        device=device,
        max_num_seqs=max(len(prompts), 1),
        enforce_eager=eager,
        show_progress=False,
    )
    params = SamplingParams(temperature=0, max_tokens=out_len, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    _sync(device)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    _sync(device)
    return sum(len(o.outputs[0].token_ids) for o in outs) / (time.perf_counter() - t0)


def hf_run(folder: Path, prompts: list[list[int]], out_len: int, device: str, dtype) -> float:  # noqa: ANN001
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    ids = torch.tensor(prompts, device=device)  # equal lengths: no padding
    kw = dict(max_new_tokens=out_len, min_new_tokens=out_len, do_sample=False, cache_implementation="static")
    kw["attention_mask"] = torch.ones_like(ids)
    kw["pad_token_id"] = 0
    with torch.no_grad():
        warm = {**kw, "max_new_tokens": 4, "min_new_tokens": 4, "attention_mask": kw["attention_mask"][:, :8]}
        model.generate(ids[:, :8], **warm)
        _sync(device)
        t0 = time.perf_counter()
        out = model.generate(ids, **kw)
        _sync(device)
    return (out.shape[1] - ids.shape[1]) * ids.shape[0] / (time.perf_counter() - t0)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,llama-1b")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke run of this script)")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import random

    import torch

    dtype = getattr(torch, args.dtype)
    card = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    bandwidth = next((v for k, v in HBM_GBS.items() if k in card), None)
    rows = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_model(name, Path(tmp), args.tiny, dtype)
            vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
            rng = random.Random(0)
            n, length = args.num_prompts, args.input_len
            prompts = [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]
            weight_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
            row = {"model": name, "device": card, "weight_bytes": weight_bytes}
            for engine, run in (("kvloom", kvloom_run), ("transformers", hf_run)):
                d = args.dtype if engine == "kvloom" else dtype
                row[f"{engine}_throughput"] = run(folder, prompts, args.output_len, args.device, d)
                row[f"{engine}_decode"] = run(folder, prompts[:1], args.output_len, args.device, d)
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
            row["kvloom_decode_eager"] = kvloom_run(
                folder, prompts[:1], args.output_len, args.device, args.dtype, True
            )
            if bandwidth:  # tokens per second if every decode step read the weights once at full bandwidth
                row["roofline_decode"] = bandwidth * 1e9 / weight_bytes
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{args.num_prompts} x ({args.input_len}, {args.output_len}), {args.dtype}, {rows[0]['device']}")
    print(
        f"{'model':<10}{'kvloom':>10}{'hf':>10}{'ratio':>8}{'decode':>10}{'eager':>8}{'hf':>8}{'roofline':>10}"
    )
    for r in rows:
        roof = r.get("roofline_decode")
        print(
            f"{r['model']:<10}{r['kvloom_throughput']:>10.1f}{r['transformers_throughput']:>10.1f}"
            f"{r['kvloom_throughput'] / r['transformers_throughput']:>8.2f}{r['kvloom_decode']:>10.1f}"
            f"{r['kvloom_decode_eager']:>8.1f}{r['transformers_decode']:>8.1f}"
            + (f"{r['kvloom_decode'] / roof:>9.0%}" if roof else f"{'-':>10}")
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
