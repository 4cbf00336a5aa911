"""A random-weight mixture-of-experts GGUF file for `bench/compare.py --model`: Qwen3-30B-A3B's shape
scaled down to fit this machine (or any shape given), written with the gguf package in f16 and quantized by
llama.cpp's own quantizer (its venv, as bench/compare.py makes it) to the type asked for.

    python bench/moe_gguf.py                      # ~/.cache/kvloom/bench/models/qwen3moe-small-Q4_K_M.gguf
    python bench/compare.py --model <that file> --engines kvloom-q4_1,llamacpp-c-q4_1

The tokenizer is the default model's (SmolLM2, vocabulary 49152), so both engines read the same ids.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the tests' GGUF writer
sys.path.insert(0, str(HERE))

# Qwen3-30B-A3B: hidden 2048, 48 layers, 128 experts (top 8) of 768, 32/4 heads of 128; here a quarter of its
# layers, half its experts and widths: about 1.1B weights, 0.15B active per token
SMALL = dict(
    hidden_size=1024,
    num_hidden_layers=12,
    num_experts=64,
    num_experts_per_tok=8,
    moe_intermediate_size=384,
    intermediate_size=3072,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=64,
    norm_topk_prob=True,
)

QUANTIZE = """
import ctypes, sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
params.nthread = 2
params.allow_requantize = True  # a quantized file in (bench/gguf_types.py requantizes SmolLM2's Q4_1)
rc = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params))
sys.exit(rc)
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--type", default="Q4_K_M", help="llama.cpp's file type (Q4_K_M, Q4_K_S, Q8_0, ...)")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import compare
    import torch
    from transformers import Qwen3MoeConfig

    from tests.models.gguf_writer import random_llama, write_gguf

    out = Path(args.out) if args.out else compare.cache() / "models" / f"qwen3moe-small-{args.type}.gguf"
    if out.exists():
        print(out)
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)
    f16 = out.with_name("qwen3moe-small-f16.gguf")
    if not f16.exists():
        config = Qwen3MoeConfig(
            **SMALL, vocab_size=49152, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2
        )
        torch.set_num_threads(2)
        model = random_llama(config)
        write_gguf(model, f16, "qwen3moe", float_type="f16")
        del model
    python = compare.ensure_venv("llamacpp")
    subprocess.run([str(python), "-c", QUANTIZE, str(f16), str(out), args.type], check=True)
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
