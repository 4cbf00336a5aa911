"""A/B of CPU-kernel builds inside one engine, step by step: the fair comparison on a noisy machine.

Whole-run timings here drift 20-30% within minutes (a shared host), so two builds run in separate
processes cannot be told apart by less than that. This script loads one engine and swaps the compiled
kernels of its decoder layers (`FusedDecodeLayers`) every decode step, so the variants see the same
requests, contexts and machine state. Each build has -DKV_PROFILE: thread 0 times every phase of every
layer (norm, qkv, rope + cache write, attention, o, norm, gate/up, silu, down; one barrier per phase).

    python bench/kernel_ab.py                                         # this tree, twice (the noise floor)
    python bench/kernel_ab.py --variant base=kvloom/backends/cpu/cpu_kernels.c \\
                              --variant try=/tmp/cpu_kernels_try.c
    python bench/kernel_ab.py --variant a=kvloom/backends/cpu/cpu_kernels.c:-DLIN_GROUP=2

`--prefill` times the prefill steps instead (one output token per request).
A variant is NAME=SOURCE[:EXTRA CFLAGS]; every source must keep this tree's C interface (ctypes
signatures in kvloom/backends/cpu/kernels.py). The workload: 32 requests x (128 prompt, 128 output tokens) of
random ids, greedy, the bf16 copy of the default model that bench/compare.py writes (made if missing).
Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

PHASES = ["norm", "qkv", "rope", "attn", "o", "norm2", "gate_up", "silu", "down"]


def build(source: str, flags: list[str], out: Path) -> Path:
    cmd = ["cc", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-DKV_PROFILE", *flags]
    subprocess.run([*cmd, source, "-o", str(out), "-lm"], check=True)
    return out


def tsc_hz() -> float:
    """Ticks per second of the time-stamp counter (the profile's unit), against the wall clock."""
    from compare import c_library

    src = "#include <x86intrin.h>\nunsigned long long kv_tsc(void) { return __rdtsc(); }\n"
    fn = c_library("tsc", src, ["-O2"]).kv_tsc
    fn.restype = ctypes.c_ulonglong
    t0, c0 = time.perf_counter(), fn()
    time.sleep(0.2)
    return (fn() - c0) / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", action="append", default=[], help="NAME=SOURCE[:CFLAGS] (repeatable)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2, help="workload repetitions (fresh prompts each)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quantization", default="none", help="the weights: none (bf16), w8a8, int8, int4")
    p.add_argument(
        "--prefill",
        action="store_true",
        help="time the prefill steps instead (one output token per request, every step counted)",
    )
    args = p.parse_args()
    src = str(HERE.parent / "kvloom" / "backends" / "cpu" / "cpu_kernels.c")
    specs = args.variant or [f"a={src}", f"b={src}"]

    import random

    from compare import hf_bf16_folder

    from kvloom import LLM, SamplingParams
    from kvloom.backends.cpu.kernels import CpuKernels, FusedDecodeLayers
    from kvloom.loader.checkpoint import default_model_path

    tmp = Path(tempfile.mkdtemp(prefix="kvloom-ab-"))
    variants = {}
    for spec in specs:
        name, _, rest = spec.partition("=")
        source, _, flags = rest.partition(":")
        variants[name] = build(source, flags.split(), tmp / f"{name}.so")
    hz = tsc_hz()

    model = hf_bf16_folder(default_model_path())
    llm = LLM(  # the pool written up front: first-write page faults would land in the attention phases
        str(model),
        dtype="bfloat16",
        quantization=args.quantization,
        num_threads=args.threads,
        show_progress=False,
        reserve_kv_cache=True,
    )
    engine, net = llm.engine, llm.engine.runner.model
    if net.fused_decode is None:
        print("this model/machine does not run the fused kernel layers", file=sys.stderr)
        return 1
    kernels = {n: CpuKernels(path) for n, path in variants.items()}
    fused = {n: FusedDecodeLayers(k, net) for n, k in kernels.items()}
    prof = {n: (ctypes.c_uint64 * 16).in_dll(k._lib, "kv_prof") for n, k in kernels.items()}
    names = list(fused)
    ticks = {n: [0] * len(PHASES) for n in names}
    steps: dict[str, list[float]] = {n: [] for n in names}
    layer_steps: dict[str, list[float]] = {n: [] for n in names}
    rng = random.Random(0)
    out_len = 1 if args.prefill else args.output_len
    params = SamplingParams(max_tokens=out_len, min_tokens=out_len, ignore_eos=True, temperature=0)
    print(f"model: {model}; variants: {', '.join(specs)}")
    k = 0
    for rep in range(args.repeats):
        for i in range(args.num_prompts):
            ids = [rng.randrange(100, 40000) for _ in range(args.input_len)]
            engine.add_request(f"ab-{rep}-{i}", ids, params)
        while engine.has_unfinished_requests():
            name = names[k % len(names)]
            k += 1
            net.fused_decode = fused[name]
            counters = prof[name]
            for i in range(16):
                counters[i] = 0
            t = time.perf_counter()
            engine.step()
            elapsed = time.perf_counter() - t
            running = engine.scheduler.running
            # Full decode steps only: every request past its prompt, none finished yet.
            if (
                args.prefill
                or len(running) == args.num_prompts
                and all(r.num_computed_tokens > r.num_prompt_tokens for r in running)
            ):
                steps[name].append(elapsed)
                layer_steps[name].append(sum(counters[i] for i in range(len(PHASES))) / hz)
                for i in range(len(PHASES)):
                    ticks[name][i] += counters[i]
    what = "prefill step" if args.prefill else f"decode step of {args.num_prompts} rows"
    print(f"\nms per {what} (thread 0's view, up to each phase's barrier)")
    print("phase     " + "".join(f"{n:>12s}" for n in names))
    for i, phase in enumerate(PHASES):
        print(f"{phase:9s} " + "".join(f"{ticks[n][i] / hz * 1e3 / len(steps[n]):12.2f}" for n in names))
    print("layers    " + "".join(f"{sum(ticks[n]) / hz * 1e3 / len(steps[n]):12.2f}" for n in names))
    print("layers p50" + "".join(f"{statistics.median(layer_steps[n]) * 1e3:12.2f}" for n in names))
    print("step p50  " + "".join(f"{statistics.median(steps[n]) * 1e3:12.2f}" for n in names))
    print("step mean " + "".join(f"{statistics.mean(steps[n]) * 1e3:12.2f}" for n in names))
    print("steps     " + "".join(f"{len(steps[n]):12d}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
