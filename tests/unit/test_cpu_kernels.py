"""kvloom's C kernels (kvloom/backends/cpu) against the PyTorch ops they replace.

Elementwise kernels (RMSNorm + residual, SiLU * up, rotary + cache write) must match bit for bit: they round
where the PyTorch path rounds. Matmul-like kernels (linear, decode attention) sum in another order, so they
are held to fp32 references within bf16 rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kvloom.backends.cpu.kernels import load_cpu_kernels
from kvloom.layers.attention import AttentionMetadata, _gather, _grouped_attention
from kvloom.layers.kv_cache import KVFormat
from kvloom.layers.norm import RMSNorm
from kvloom.layers.rotary import RotaryEmbedding

K = load_cpu_kernels()
pytestmark = pytest.mark.skipif(K is None, reason="CPU kernels need x86-64 with AVX-512 BF16 and a compiler")
BF = torch.bfloat16


@pytest.mark.parametrize(
    ("m", "n", "k"),
    [(1, 960, 576), (3, 49, 64), (5, 577, 100), (33, 128, 1536), (15, 112, 64), (7, 176, 96), (300, 80, 64)],
)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("amx", [False, True], ids=["avx512", "amx"])
def test_linear_matches_fp32_reference(m, n, k, bias, amx):
    """On AVX-512 (vdpbf16ps) and on AMX tiles (tdpbf16ps: K % 32 == 0, tiles of 16 rows, the last one
    zero-padded), within bf16 rounding of fp32, and a row's bits the same whatever the batch."""
    if K.set_amx(amx) != amx:
        K.set_amx(True)
        pytest.skip("no AMX on this CPU")
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(2 * m, k, generator=g).to(BF)[::2]  # strided rows, as views of a wider tensor are
    w = torch.randn(n, k, generator=g).to(BF)
    b = torch.randn(n, generator=g).to(BF) if bias else None
    packed = K.pack_linear_weight(w)
    y = K.linear(x, packed, b, n)
    one = K.linear(x[-1:], packed, b, n)
    K.set_amx(True)  # back to the default
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    assert y.shape == (m, n) and y.dtype == BF
    # The only error allowed is the final rounding to bf16 (2^-8 relative) plus fp32 summation order.
    assert torch.all((y.float() - ref).abs() <= ref.abs() * 2**-8 + 1e-3)
    assert torch.equal(one[0], y[-1])


@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_is_bit_exact(with_residual):
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(7, 576, generator=g).to(BF) * 3 for _ in range(2))
    norm = RMSNorm(576, 1e-5).to(BF)
    norm.weight.data = torch.randn(576, generator=g).to(BF)
    expected = norm(x, r.clone()) if with_residual else norm(x)
    r_kernel = r.clone()
    out = K.rms_norm(x, r_kernel if with_residual else None, norm.weight, 1e-5)
    if with_residual:
        assert torch.equal(out, expected[0]) and torch.equal(r_kernel, expected[1])
    else:
        assert torch.equal(out, expected)


def test_silu_mul_is_bit_exact():
    gate_up = (torch.randn(5, 2 * 1536, generator=torch.Generator().manual_seed(0)) * 4).to(BF)
    expected = F.silu(gate_up[:, :1536]) * gate_up[:, 1536:]
    assert torch.equal(K.act_mul(gate_up), expected)


class _RopeConfig:
    rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}


def test_rope_and_cache_write_are_bit_exact():
    heads, kv_heads, d, tokens = 9, 3, 64, 6
    rotary = RotaryEmbedding(_RopeConfig(), d, 512, BF)
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * d, generator=g).to(BF)
    positions = torch.tensor([0, 5, 17, 100, 301, 511])
    slots = torch.tensor([3, 40, 41, 7, 0, 63])
    k_cache, v_cache = torch.zeros(2, kv_heads, 4, 16, d, dtype=BF)
    q, k, v = qkv.split([heads * d, kv_heads * d, kv_heads * d], dim=-1)
    q_ref, k_ref = rotary(positions, q.reshape(tokens, heads, d), k.reshape(tokens, kv_heads, d))
    v_ref = v.reshape(tokens, kv_heads, d).clone()
    K.rope_and_cache(qkv, heads, kv_heads, d, positions, rotary.cos, rotary.sin, k_cache, v_cache, slots)
    assert torch.equal(q.reshape(tokens, heads, d), q_ref)
    assert torch.equal(k.reshape(tokens, kv_heads, d), k_ref)
    k_std, v_std = K.from_kernel_layout(k_cache, v_cache)
    assert torch.equal(k_std.view(kv_heads, -1, d)[:, slots].transpose(0, 1), k_ref)
    assert torch.equal(v_std.view(kv_heads, -1, d)[:, slots].transpose(0, 1), v_ref)
    # Nothing but the six slots was written.
    written = torch.zeros(kv_heads, 64, dtype=torch.bool)
    written[:, slots] = True
    assert not k_std.view(kv_heads, 64, d)[~written].any() and not v_std.view(kv_heads, 64, d)[~written].any()


@pytest.mark.parametrize("bs", [16, 32])
def test_write_cache_and_layout_round_trip(bs):
    """K/V rows from separate (strided) tensors land in their slots; the layout helpers invert each other."""
    kv_heads, d, tokens, num_blocks = 2, 64, 9, 3
    g = torch.Generator().manual_seed(bs)
    k = torch.randn(tokens, kv_heads, 2 * d, generator=g).to(BF)[:, :, :d]  # heads strided
    v = torch.randn(tokens, kv_heads, d, generator=g).to(BF)
    slots = torch.randperm(num_blocks * bs, generator=g)[:tokens]
    k_cache, v_cache = torch.zeros(2, kv_heads, num_blocks, bs, d, dtype=BF)
    K.write_cache(k, v, k_cache, v_cache, slots)
    k_std, v_std = K.from_kernel_layout(k_cache, v_cache)
    assert torch.equal(k_std.view(kv_heads, -1, d)[:, slots].transpose(0, 1), k)
    assert torch.equal(v_std.view(kv_heads, -1, d)[:, slots].transpose(0, 1), v)
    again = K.to_kernel_layout(k_std, v_std)
    assert torch.equal(again[0], k_cache) and torch.equal(again[1], v_cache)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "d", "window"),
    [(9, 3, 64, None), (8, 2, 128, None), (9, 3, 64, 20), (10, 2, 32, None), (4, 4, 64, 33)],
)  # (10, 2, 32): the generic path; (4, 4, 64, 33): one head per KV head, a window not a multiple of 16
@pytest.mark.parametrize("bs", [16, 32])
@pytest.mark.parametrize("amx", [False, True], ids=["avx512", "amx"])
def test_decode_attention_matches_reference(heads, kv_heads, d, window, bs, amx):
    """On AVX-512 (vdpbf16ps) and on AMX tiles (tdpbf16ps over the same layout: D % 32 == 0)."""
    if K.set_amx(amx) != amx:
        K.set_amx(True)
        pytest.skip("no AMX on this CPU")
    g = torch.Generator().manual_seed(heads * d)
    num_blocks = 40
    k_cache = torch.randn(kv_heads, num_blocks, bs, d, generator=g).to(BF)
    v_cache = torch.randn(kv_heads, num_blocks, bs, d, generator=g).to(BF)
    lens = torch.tensor([1, 16, 17, 200, 77])
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[: -(-200 // bs)] for _ in lens])
    q = torch.randn(len(lens), heads, d, generator=g).to(BF)
    out = torch.empty_like(q)
    K.decode_attention(q, *K.to_kernel_layout(k_cache, v_cache), tables, lens, out, d**-0.5, window)
    K.set_amx(True)  # back to the default
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(1, dtype=torch.long),
        num_decodes=len(lens),
        decode_block_tables=tables,
        decode_context_lens=lens,
        prefills=[],
        block_size=bs,
    )
    kd = _gather(k_cache.float(), tables.flatten()).view(kv_heads, len(lens), -1, d)
    vd = _gather(v_cache.float(), tables.flatten()).view(kv_heads, len(lens), -1, d)
    ref = _grouped_attention(q.float()[:, None], kd, vd, meta.decode_mask(window), d**-0.5)[:, 0]
    assert (out.float() - ref).abs().max() < 2e-2


@pytest.mark.parametrize("name", ["int8", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize("bs", [16, 32])
def test_quantized_cache_write_is_bit_exact(name, bs):
    """A one-byte cache (--kv-cache-dtype): the kernels' bytes and scales are KVFormat.quantize's, bit for
    bit, over 12 decades of magnitude (FP8 subnormals, rounding up into the normals) and all-zero rows;
    nothing else is written; the layout helpers invert each other on it."""
    fmt = KVFormat.of(name)
    kv_heads, d, tokens, num_blocks = 3, 64, 40, 4
    g = torch.Generator().manual_seed(bs)
    mags = torch.logspace(-8, 4, tokens)[:, None, None]
    k = (torch.randn(tokens, kv_heads, d, generator=g) * mags).to(BF)
    v = (torch.randn(tokens, kv_heads, d, generator=g) * mags.flip(0)).to(BF)
    k[3], v[5, 1] = 0, 0
    slots = torch.randperm(num_blocks * bs, generator=g)[:tokens]
    k_cache, v_cache = torch.zeros(2, kv_heads, num_blocks, bs, d + 2, dtype=torch.uint8)
    K.write_cache(k, v, k_cache, v_cache, slots, fmt.kind)
    k_std, v_std = K.from_kernel_layout(k_cache, v_cache)
    assert torch.equal(k_std.view(kv_heads, -1, d + 2)[:, slots].transpose(0, 1), fmt.quantize(k))
    assert torch.equal(v_std.view(kv_heads, -1, d + 2)[:, slots].transpose(0, 1), fmt.quantize(v))
    written = torch.zeros(kv_heads, num_blocks * bs, dtype=torch.bool)
    written[:, slots] = True
    assert not k_std.view(kv_heads, -1, d + 2)[~written].any()
    again = K.to_kernel_layout(k_std, v_std)
    assert torch.equal(again[0], k_cache) and torch.equal(again[1], v_cache)
    # the scale is amax / QMAX rounded up to a bf16; each value within half a step of it (int8) / FP8's
    # relative precision of what it stored
    amax = k.float().abs().amax(-1, keepdim=True)
    step = fmt.quantize(k)[..., -2:].contiguous().view(BF).float()
    live = amax > 0
    fit = amax[live] / step[live]
    assert torch.all(fit <= fmt.qmax) and torch.all(fit > fmt.qmax / (1 + 2**-7))
    assert torch.all(step[~live] == 1)
    back = fmt.dequantize(fmt.quantize(k), torch.float32)
    rel = {1: 0.5 / fmt.qmax * fmt.qmax, 2: 2**-4, 3: 2**-3}[fmt.kind]
    assert torch.all((back - k.float()).abs() <= rel * torch.maximum(k.float().abs(), step) + 1e-30)


@pytest.mark.parametrize("name", ["int8", "fp8_e4m3", "fp8_e5m2"])
@pytest.mark.parametrize(
    ("heads", "kv_heads", "d", "window"),
    [(9, 3, 64, None), (8, 2, 128, 50), (10, 2, 32, None), (4, 2, 48, None)],
)
@pytest.mark.parametrize("amx", [False, True], ids=["avx512", "amx"])
def test_decode_attention_on_a_quantized_cache(name, heads, kv_heads, d, window, amx):
    """Attention over a one-byte cache: the fp32 attention of its dequantized K/V (each position's K scale
    on its score, V scale on its probability), with row tables (prefill rows) and windows; on AVX-512 and on
    AMX tiles (the bytes widened to bf16 tiles first: D % 32 == 0; 48 stays on AVX-512)."""
    if K.set_amx(amx) != amx:
        K.set_amx(True)
        pytest.skip("no AMX on this CPU")
    fmt = KVFormat.of(name)
    bs, num_blocks = 16, 40
    g = torch.Generator().manual_seed(heads * d)
    k_rows = fmt.quantize(torch.randn(kv_heads, num_blocks, bs, d, generator=g) * 3)
    v_rows = fmt.quantize(torch.randn(kv_heads, num_blocks, bs, d, generator=g))
    lens = torch.tensor([1, 16, 17, 200, 77, 78])
    tables = torch.stack([torch.randperm(num_blocks, generator=g)[: -(-200 // bs)] for _ in range(5)])
    row_table = torch.tensor([0, 1, 2, 3, 4, 4])  # the last two rows: one sequence's prefill rows
    q = torch.randn(len(lens), heads, d, generator=g).to(BF)
    out = torch.empty_like(q)
    caches = K.to_kernel_layout(k_rows, v_rows)
    K.decode_attention(q, *caches, tables, lens, out, d**-0.5, window, row_table=row_table, kv_kind=fmt.kind)
    K.set_amx(True)  # back to the default
    k_deq, v_deq = fmt.dequantize(k_rows, torch.float32), fmt.dequantize(v_rows, torch.float32)
    for row in range(len(lens)):
        n, lo = int(lens[row]), 0 if window is None else max(0, int(lens[row]) - window)
        kp = _gather(k_deq, tables[row_table[row]])[:, None, lo:n]
        vp = _gather(v_deq, tables[row_table[row]])[:, None, lo:n]
        mask = torch.ones(1, 1, n - lo, dtype=torch.bool)
        ref = _grouped_attention(q[row : row + 1].float()[None], kp, vp, mask, d**-0.5)[0, 0]
        # bf16 probabilities (times V's scales) and output: within a few bf16 roundings
        assert torch.all((out[row].float() - ref).abs() <= 1e-2 + 1e-2 * ref.abs())


@pytest.mark.parametrize("name", ["int8", "fp8_e4m3", "fp8_e5m2"])
def test_every_cache_byte_widens_exactly(name):
    """Attention over one position returns its V row: all 256 bytes of each format (but FP8's NaN and
    infinities) widened to bf16 exactly, as torch reads them (scale 1, probability 1)."""
    fmt = KVFormat.of(name)
    d, bs = 64, 16
    v_rows = torch.zeros(1, 4, bs, d + 2, dtype=torch.uint8)
    v_rows[0, :, 0, :d] = torch.arange(256, dtype=torch.uint8).view(4, d)
    v_rows[..., d:] = torch.tensor([1.0], dtype=BF).view(torch.uint8)  # every scale 1.0
    k_rows = v_rows.clone()
    q = torch.ones(4, 1, d, dtype=BF)
    out = torch.empty_like(q)
    caches = K.to_kernel_layout(k_rows, v_rows)
    tables = torch.arange(4).view(4, 1)
    K.decode_attention(
        q, *caches, tables, torch.ones(4, dtype=torch.long), out, 0.125, None, kv_kind=fmt.kind
    )
    expected = v_rows[0, :, 0, :d].contiguous().view(fmt.dtype).float().flatten()
    finite = expected.isfinite()
    assert finite.sum() >= 248
    assert torch.equal(out.float().flatten()[finite], expected[finite])


def test_kernels_off_by_config(stories):
    from kvloom import LLM

    on = LLM(str(stories), dtype="bfloat16", show_progress=False)
    off = LLM(str(stories), dtype="bfloat16", backend="torch", show_progress=False)
    assert on.engine.runner.backend.kernels is not None and off.engine.runner.backend.kernels is None
    assert on.engine.runner.model.lm_head.weight is None  # packed in place, no second copy


@pytest.mark.parametrize(("d", "amx"), [(64, False), (64, True), (128, True)])
def test_prefill_rows_attend_causally_through_row_tables(d, amx):
    """A chunk of 20 query rows at positions 30..49 of one sequence plus one decode of another, each row a
    query over the paged cache (row_table picks the sequence's blocks): causal attention per row."""
    if K.set_amx(amx) != amx:
        K.set_amx(True)
        pytest.skip("no AMX on this CPU")
    heads, kv_heads, bs = 9, 3, 16
    g = torch.Generator().manual_seed(7)
    k_cache = torch.randn(kv_heads, 12, bs, d, generator=g).to(BF)
    v_cache = torch.randn(kv_heads, 12, bs, d, generator=g).to(BF)
    tables = torch.tensor([[5, 2, 9, 0], [7, 1, 3, 11]])
    row_table = torch.tensor([0] + [1] * 20)
    lens = torch.tensor([40] + list(range(31, 51)))
    q = torch.randn(21, heads, d, generator=g).to(BF)
    out = torch.empty_like(q)
    K.decode_attention(
        q, *K.to_kernel_layout(k_cache, v_cache), tables, lens, out, d**-0.5, None, row_table=row_table
    )
    K.set_amx(True)
    for row in range(21):
        seq, n = int(row_table[row]), int(lens[row])
        kp = _gather(k_cache.float(), tables[seq])[:, None, :n]
        vp = _gather(v_cache.float(), tables[seq])[:, None, :n]
        ref = _grouped_attention(
            q[row : row + 1].float()[None], kp, vp, torch.ones(1, 1, n, dtype=torch.bool), d**-0.5
        )
        assert (out[row].float() - ref[0, 0]).abs().max() < 2e-2


def test_argmax_matches_torch_with_ties_nan_and_inf():
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(9, 1003, generator=g) * 4).round().to(BF)  # rounded: many ties
    x[1, 500] = x[1, 7] = 99.0  # a tie between lanes: the first index wins
    x[2, 1001] = 99.0  # the max in the tail past the last 16
    x[3] = float("-inf")  # all -inf: index 0
    x[4, 600] = float("nan")
    x[4, 900] = float("nan")  # the first NaN wins
    x[5, 2] = float("inf")
    x[5, 40] = float("inf")
    wide = torch.zeros(9, 1100, dtype=BF)
    wide[:, :1003] = x
    for t in (x, wide[:, :1003]):  # contiguous and strided rows
        assert torch.equal(K.argmax(t), t.float().argmax(dim=-1))


def test_profile_build_compiles(tmp_path):
    """bench/kernel_ab.py builds the kernels with -DKV_PROFILE: that variant must keep compiling."""
    import ctypes
    import subprocess

    from kvloom.backends.cpu.build import _SOURCE

    out = tmp_path / "profile.so"
    cmd = ["cc", "-O1", "-march=native", "-fopenmp", "-shared", "-fPIC", "-DKV_PROFILE", str(_SOURCE)]
    subprocess.run([*cmd, "-o", str(out), "-lm"], check=True)
    assert (ctypes.c_uint64 * 16).in_dll(ctypes.CDLL(str(out)), "kv_prof")[0] == 0


def test_install_time_build_is_found_before_the_cache(tmp_path, monkeypatch):
    """setup.py's build (build_for_install, beside the source) is what a start loads: nothing is built
    into the cache; a changed source (or compiler, or CPU) names another file, which then is built there."""
    from kvloom.backends.cpu import build as kernel_build

    src = tmp_path / "pkg" / "cpu_kernels.c"
    src.parent.mkdir()
    src.write_bytes(kernel_build._SOURCE.read_bytes())
    monkeypatch.setattr(kernel_build, "_SOURCE", src)
    monkeypatch.setenv("KVLOOM_CACHE_DIR", str(tmp_path / "cache"))
    installed = kernel_build.build_for_install(src.parent)
    assert installed is not None and installed.parent == src.parent
    assert kernel_build._build() == installed and not (tmp_path / "cache").exists()
    src.write_text(src.read_text() + "\n/* changed */\n")
    rebuilt = kernel_build._build()
    assert rebuilt.parent == tmp_path / "cache" and rebuilt.name != installed.name


def test_gelu_tanh_mul_within_one_bf16_step():
    """Gemma's GeGLU: gelu (tanh approximation) rounded to bf16, times up, as PyTorch computes it in bf16;
    the kernel's tanh comes from its exp, so a value may land one bf16 step away (or, where 1 + tanh
    cancels, a few 1e-6 from PyTorch's 0)."""
    gate_up = (torch.randn(7, 2 * 1024, generator=torch.Generator().manual_seed(1)) * 4).to(BF)
    expected = (F.gelu(gate_up[:, :1024], approximate="tanh") * gate_up[:, 1024:]).float()
    got = K.act_mul(gate_up, "gelu_pytorch_tanh").float()
    step = expected.abs() * 2**-7 + 1e-5
    assert torch.all((got - expected).abs() <= step)
    assert (got == expected).float().mean() > 0.9
