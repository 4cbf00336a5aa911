"""Every GGUF type kvloom runs natively, against the same file dequantized: the perplexity of tests/data
and the greedy text of 8 prompts, per file.

    python bench/gguf_types.py                   # SmolLM2 requantized by llama.cpp to each type below
    python bench/gguf_types.py --types Q3_K_M,IQ4_XS
    python bench/gguf_types.py --source ~/.cache/kvloom/bench/models/qwen3moe-small-f16.gguf --types Q2_K

The files are made by llama.cpp's own quantizer (its venv, as bench/compare.py makes it) from the default
model's Q4_1 file. NOTE: llama.cpp gives a matrix whose rows are not a multiple of 256 values (SmolLM2's
hidden size is 576) a fallback type: a Q3_K file has Q3_K MLP down matrices (1536 wide) and IQ4_NL
elsewhere, so each file's own mix of types is printed beside its numbers; a Q2_K file of it has no Q2_K
matrix at all. `--source` takes another file (bench/moe_gguf.py's f16 file is 1024 wide: random weights, but
the comparison of a file with itself holds).
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TYPES = "Q2_K,Q3_K_M,Q4_0,Q4_1,Q4_K_M,Q5_0,Q5_1,Q5_K_M,Q6_K,Q8_0,IQ4_NL,IQ4_XS"


def tensor_types(path: Path) -> str:
    from gguf import GGUFReader

    counts = Counter(t.tensor_type.name for t in GGUFReader(str(path)).tensors if len(t.shape) == 2)
    return " ".join(f"{k}:{n}" for k, n in counts.most_common())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--types", default=TYPES, help="llama.cpp file types, comma-separated")
    p.add_argument("--source", default=None, help="the file to quantize (default: SmolLM2's Q4_1)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import compare
    from moe_gguf import QUANTIZE

    from kvloom import LLM, SamplingParams
    from kvloom.benchmarks.perplexity import DEFAULT_TEXT, GREEDY_PROMPTS, perplexity
    from kvloom.loader.checkpoint import default_model_path

    text = DEFAULT_TEXT.read_text()
    python = compare.ensure_venv("llamacpp")
    source = Path(args.source) if args.source else default_model_path()
    stem = "smollm2" if args.source is None else source.stem.removesuffix("-f16")
    rows = []
    for ftype in args.types.split(","):
        path = compare.cache() / "models" / f"{stem}-{ftype}.gguf"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            subprocess.run(
                [str(python), "-c", QUANTIZE, str(source), str(path), ftype], check=True, capture_output=True
            )
        runs = {}
        for how in ("auto", "none"):
            llm = LLM(
                str(path),
                dtype="bfloat16",
                quantization=how,
                max_model_len=1024,
                num_threads=args.threads,
                show_progress=False,
            )
            ppl, n = perplexity(llm, text)
            outs = llm.generate(GREEDY_PROMPTS, SamplingParams(temperature=0, max_tokens=24))
            runs[how] = ppl, n, [o.outputs[0].text for o in outs]
            del llm
            gc.collect()
        same = sum(a == b for a, b in zip(runs["auto"][2], runs["none"][2], strict=True))
        rows.append((ftype, tensor_types(path), runs["auto"][0], runs["none"][0], same, runs["auto"][1]))
        print(f"{ftype}: native {runs['auto'][0]:.3f}, dequantized {runs['none'][0]:.3f}", flush=True)
    print(f"\nperplexity on {DEFAULT_TEXT.name} ({rows[0][5]} tokens): native vs dequantized (bf16)")
    print(f"{'file':<8}{'native':>9}{'dequant':>9}{'ratio':>8}{'greedy':>8}  matrices")
    for ftype, types, native, dense, same, _ in rows:
        print(f"{ftype:<8}{native:>9.3f}{dense:>9.3f}{native / dense:>8.4f}{same:>6}/8  {types}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
