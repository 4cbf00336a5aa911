"""Quantized weights: GGUF blocks read value for value, round-to-nearest bounds, and the quantized linear
kernel against the dequantized weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from kvloom.backends.cpu.kernels import load_cpu_kernels, pack_quantized
from kvloom.layers.quantization import GGUF_NATIVE, QuantizedWeight, from_gguf, quantize_rtn

K = load_cpu_kernels()
needs_kernels = pytest.mark.skipif(K is None, reason="CPU kernels need x86-64 with AVX-512 BF16")
BF = torch.bfloat16


def _random_blocks(qtype: T, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Random bytes with sane fp16 scale fields: any bit pattern is a valid block otherwise."""
    block, size = GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    scale = rng.uniform(0.001, 0.02, size=(raw.shape[0], 1)).astype(np.float16).view(np.uint8)
    offsets = {
        T.Q4_0: [0],
        T.Q4_1: [0, 2],
        T.Q8_0: [0],
        T.Q4_K: [0, 2],
        T.Q6_K: [208],
        T.Q5_0: [0],
        T.Q5_1: [0, 2],
        T.Q5_K: [0, 2],
        T.Q3_K: [108],
        T.Q2_K: [80, 82],
        T.IQ4_NL: [0],
        T.IQ4_XS: [0],
    }[qtype]
    for off in offsets:
        raw[:, off : off + 2] = scale
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", GGUF_NATIVE, ids=lambda t: t.name)
def test_gguf_blocks_read_exactly(qtype):
    rows, cols = 48, 512
    raw = _random_blocks(qtype, rows, cols)
    qw = from_gguf(qtype, raw, rows, cols)
    expected = dequantize(raw, qtype).reshape(rows, cols)
    assert qw.shape == (rows, cols)
    assert np.array_equal(qw.dequantize().numpy(), expected.astype(np.float32))


@pytest.mark.parametrize("bits", [8, 4])
def test_round_to_nearest_error_is_half_a_step(bits):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(bits))
    qw = quantize_rtn(w, bits)
    err = (qw.dequantize() - w).abs().view(64, 8, 32)
    assert torch.all(err <= qw.scale[..., None] / 2 + 1e-6)
    assert qw.q.dtype == (torch.int8 if bits == 8 else torch.uint8)


def _weights() -> dict[str, QuantizedWeight]:
    g = torch.Generator().manual_seed(0)
    w1, w2 = torch.randn(40, 192, generator=g), torch.randn(24, 192, generator=g)

    def gguf(t: T) -> QuantizedWeight:
        return from_gguf(t, _random_blocks(t, 24, 256), 24, 256)

    return {
        "int4": quantize_rtn(w1, 4),
        "int8": quantize_rtn(w1, 8),
        "q6k-group16": gguf(T.Q6_K),
        "q2k-kind4-group16": gguf(T.Q2_K),
        "q3k-kind4-group16": gguf(T.Q3_K),
        "q5k-kind5-min": gguf(T.Q5_K),
        "q5_0-kind5": gguf(T.Q5_0),
        "iq4xs": gguf(T.IQ4_XS),
        # fused q/k/v of mixed formats (Q4_K_M files do this) meet as the widest kind, smallest group
        "mixed": QuantizedWeight.cat([quantize_rtn(w1, 4, 32), quantize_rtn(w2, 8, 32).as_kind(8, 16)]),
        "mixed-4-5": QuantizedWeight.cat(
            [quantize_rtn(w1, 4, 32), from_gguf(T.Q5_1, _random_blocks(T.Q5_1, 24, 192), 24, 192)]
        ),
    }


@needs_kernels
@pytest.mark.parametrize(
    "name",
    [
        "int4",
        "int8",
        "q6k-group16",
        "q2k-kind4-group16",
        "q3k-kind4-group16",
        "q5k-kind5-min",
        "q5_0-kind5",
        "iq4xs",
        "mixed",
        "mixed-4-5",
    ],
)
@pytest.mark.parametrize("m", [1, 3, 5, 33, 300])  # above 4: the panel (AVX-512) or AMX; 300: 2 chunks
def test_quantized_linear_matches_dequantized(name, m):
    qw = _weights()[name]
    kinds = {"q3k": 4, "q2k": 4, "q5k": 5, "q5_0": 5, "mixed-4-5": 5}
    assert qw.kind == kinds.get(name.split("-kind")[0], qw.kind)
    n, k = qw.shape
    g = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=g).to(BF)
    bias = torch.randn(n, generator=g).to(BF)
    packed = pack_quantized(qw)
    desc = K.linear_desc(packed, bias, qw.kind, qw.group)
    ref = F.linear(x.float(), qw.dequantize(), bias.float())
    try:
        for invariant in (False, True):
            K.set_batch_invariant(invariant)
            y = K.run_linear(desc, x, k, n)
            assert y.shape == (m, n)
            assert torch.all((y.float() - ref).abs() <= ref.abs() * 2**-8 + 2e-3 * ref.abs().max())
            # A row's bits do not depend on the other rows of its call: with batch invariance whatever
            # the batch; without (AMX above 4 rows), among calls of more than 4 rows.
            if invariant or m <= 4 or not K.amx:
                one = K.run_linear(desc, x[-1:], k, n)
            else:
                one = K.run_linear(desc, torch.cat([x[:1].repeat(4, 1), x[-1:]]), k, n)[-1:]
            assert torch.equal(one[0], y[-1])
    finally:
        K.set_batch_invariant(False)


@needs_kernels
@pytest.mark.parametrize(
    "qtype",
    [
        T.Q4_K,
        T.Q5_K,
        T.Q6_K,
        T.Q3_K,
        T.Q2_K,
        T.IQ4_XS,
        "mixed",
        T.Q4_0,
        T.Q4_1,
        T.Q5_1,
        T.Q8_0,
        T.IQ4_NL,
        "int4",
    ],
    ids=str,
)
@pytest.mark.parametrize("m", [1, 7])
def test_compact_scales_give_the_same_bits(qtype, m):
    """K-quant scales stored as a d per 256 inputs times int8 codes, the other files' as the fp16 they
    are: the kernel rebuilds the same fp32 scales and mins, so every output bit equals the fp32 layout's,
    in fewer bytes. Round-to-nearest int4 has fp32 scales of its own: it keeps the fp32 layout."""
    n, k = 72, 512
    if qtype == "mixed":  # fused q/k/v of Q4_K (with mins) and Q6_K (groups of 16): kind 6, group 16
        qw = QuantizedWeight.cat(
            [
                from_gguf(T.Q4_K, _random_blocks(T.Q4_K, 40, k), 40, k),
                from_gguf(T.Q6_K, _random_blocks(T.Q6_K, 32, k), 32, k),
            ]
        )
    elif qtype == "int4":
        qw = quantize_rtn(torch.randn(n, k, generator=torch.Generator().manual_seed(1)), 4)
    else:
        qw = from_gguf(qtype, _random_blocks(qtype, n, k), n, k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(BF)
    one, two = pack_quantized(qw, compact=False), pack_quantized(qw)
    layout = {T.Q4_0: 2, T.Q4_1: 2, T.Q5_1: 2, T.Q8_0: 2, T.IQ4_NL: 2, "int4": 0}.get(qtype, 1)
    assert one[2] == 0 and two[2] == layout
    if layout:
        assert two[0].numel() < one[0].numel()
    y1 = K.run_linear(K.linear_desc(one, None, qw.kind, qw.group), x, k, qw.shape[0])
    y2 = K.run_linear(K.linear_desc(two, None, qw.kind, qw.group), x, k, qw.shape[0])
    assert torch.equal(y1, y2)
    ref = F.linear(x.float(), qw.dequantize())
    assert torch.all((y2.float() - ref).abs() <= ref.abs() * 2**-8 + 2e-3 * ref.abs().max())


@needs_kernels
def test_batch_invariance_switch_keeps_quantized_rows_on_one_path():
    """With AMX, steps above 4 rows take the tiles (other bits than AVX-512); set_batch_invariant(True)
    keeps every row on AVX-512. Enough outputs (4096) that the two paths' fp32 sums round to different
    bf16 somewhere, so the comparison can tell the paths apart."""
    qw = from_gguf(T.Q4_K, _random_blocks(T.Q4_K, 256, 1024, seed=3), 256, 1024)
    packed = pack_quantized(qw)
    desc = K.linear_desc(packed, None, qw.kind, qw.group)
    x = torch.randn(16, 1024, generator=torch.Generator().manual_seed(3)).to(BF)
    try:
        K.set_batch_invariant(True)
        alone = torch.cat([K.run_linear(desc, x[i : i + 1], 1024, 256) for i in range(16)])
        assert torch.equal(K.run_linear(desc, x, 1024, 256), alone)
        K.set_batch_invariant(False)
        batched = K.run_linear(desc, x, 1024, 256)
        assert torch.equal(batched[11:], K.run_linear(desc, x[11:], 1024, 256))  # 5 rows: tiles too
        if K.amx:
            assert not torch.equal(batched, alone)
        else:
            assert torch.equal(batched, alone)
    finally:
        K.set_batch_invariant(False)


@pytest.mark.parametrize(
    ("m", "n", "k"), [(1, 96, 64), (3, 72, 100), (8, 32, 576), (13, 130, 68), (40, 64, 1536), (21, 96, 128)]
)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("amx", [False, True], ids=["vnni", "amx"])
def test_w8a8_kernel_equals_its_integer_reference(m, n, k, bias, amx):
    """The kernel's W8A8 (per-token int8 activations quantized on the fly, per-channel int8 weights) gives
    the reference's bits, on VNNI and on AMX tiles: the integer sums are exact; tails of K % 16 and N % 32,
    row tiles of 8 (VNNI) and 16 with zero padding rows (AMX: K % 64 == 0, more than 4 rows)."""
    from kvloom.layers.quantization import quantize_w8a8, w8a8_reference

    if K is None:
        pytest.skip("CPU kernels need x86-64 with AVX-512 BF16 and a compiler")
    if K.set_amx(amx) != amx:
        K.set_amx(True)
        pytest.skip("no AMX on this CPU")
    g = torch.Generator().manual_seed(m * n + k)
    w = torch.randn(n, k, generator=g)
    w[:, 3] *= 20  # an outlier input channel
    qw = quantize_w8a8(w)
    assert qw.kind == 9 and qw.scale.shape == (n, 1)
    x = (torch.randn(2 * m, k, generator=g) * 3).to(BF)[::2]  # strided rows
    x[0, :] = 0  # a row of zeros: scale 0
    b = torch.randn(n, generator=g).to(BF) if bias else None
    packed = pack_quantized(qw)  # NOTE: kept alive: the descriptor holds its address
    y = K.run_linear(K.linear_desc(packed, b, 9, k), x, k, n)
    ref = w8a8_reference(x, qw, b)
    K.set_amx(True)  # back to the default
    assert y.shape == (m, n) and torch.equal(y, ref)
    # near the exact product: an int8 step per token on x, per output channel on w (the outlier input
    # channel coarsens every row of w: what SmoothQuant moves)
    exact = F.linear(x.float(), w, None if b is None else b.float())
    assert (y.float() - exact).norm() <= 0.05 * exact.norm() + 1e-3


@needs_kernels
@pytest.mark.parametrize(("m", "n", "k"), [(1, 96, 64), (3, 40, 48), (21, 72, 576), (40, 64, 1536)])
@pytest.mark.parametrize("amx", [False, True], ids=["vnni", "amx"])
def test_ternary_weights_in_two_bits_give_their_int8_bits(m, n, k, amx):
    """BitNet's ternary kind-9 weights packed 2 bits a weight give the int8 packing's bits (and so the
    integer reference's), on VNNI and AMX, with LLM.int8's outlier columns too."""
    from kvloom.layers.quantization import w8a8_reference

    if K.set_amx(amx) != amx:
        K.set_amx(True)
        pytest.skip("no AMX on this CPU")
    g = torch.Generator().manual_seed(m + n + k)
    q = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    qw = QuantizedWeight(9, q, torch.full((n, 1), 0.03), None, k)
    x = (torch.randn(m, k, generator=g) * 2).to(BF)
    x[:, 5] *= 8
    two, eight = pack_quantized(qw), pack_quantized(qw, compact=False)
    assert two[2] == 1 and eight[2] == 0 and two[0].numel() * 2 < eight[0].numel()
    try:
        for outlier in (0.0, 6.0):
            ys = []
            for packed in (two, eight):
                desc = K.linear_desc(packed, None, 9, k)
                desc.outlier = outlier
                ys.append(K.run_linear(desc, x, k, n))
            assert torch.equal(ys[0], ys[1])
            assert torch.equal(ys[0], w8a8_reference(x, qw, None, outlier or None))
    finally:
        K.set_amx(True)


@pytest.mark.parametrize(("m", "n", "k"), [(1, 96, 64), (7, 72, 100), (40, 64, 576), (70, 96, 128)])
@pytest.mark.parametrize("amx", [False, True], ids=["vnni", "amx"])
def test_llm_int8_decomposition_equals_its_reference(m, n, k, amx):
    """LLM.int8 (a threshold in the descriptor): columns above it in any row leave the int8 product and come
    back in fp32 from the int8 weights; the kernel gives the reference's bits, and with outliers far above
    the rest it is much closer to the exact product than plain W8A8. No column above it: plain W8A8's bits."""
    from kvloom.layers.quantization import quantize_w8a8, w8a8_reference

    if K is None:
        pytest.skip("CPU kernels need x86-64 with AVX-512 BF16 and a compiler")
    if K.set_amx(amx) != amx:
        K.set_amx(True)
        pytest.skip("no AMX on this CPU")
    g = torch.Generator().manual_seed(m + n + k)
    w = torch.randn(n, k, generator=g)
    qw = quantize_w8a8(w)
    x = torch.randn(m, k, generator=g).to(BF)
    x[:, [5, k // 2, k - 3]] *= 60  # three outlier features
    x[-1, 7] = -30  # and one in a single row
    b = torch.randn(n, generator=g).to(BF)
    packed = pack_quantized(qw)
    desc = K.linear_desc(packed, b, 9, k)
    plain = K.run_linear(desc, x, k, n)
    desc.outlier = 6.0
    y = K.run_linear(desc, x, k, n)
    desc.outlier = 1000.0  # above every value: nothing decomposed
    y_high = K.run_linear(desc, x, k, n)
    K.set_amx(True)
    assert torch.equal(y, w8a8_reference(x, qw, b, 6.0))
    assert torch.equal(y_high, plain) and torch.equal(plain, w8a8_reference(x, qw, b))
    exact = F.linear(x.float(), qw.dequantize(torch.float32), b.float())
    assert (y.float() - exact).norm() < 0.3 * (plain.float() - exact).norm()


@pytest.mark.parametrize(("m", "group"), [(1, 128), (3, 128), (5, 32), (33, 128)])  # 5, 33: the panel path
def test_fp8_kernel_widens_every_byte_exactly(m, group):
    """Kind 10 (FP8 E4M3 weights, bf16 activations): every byte but NaN, subnormals and negatives included,
    widened in registers as torch's float8_e4m3fn reads it (the reference's dequantization)."""
    if K is None:
        pytest.skip("CPU kernels need x86-64 with AVX-512 BF16 and a compiler")
    n, k = 70, 128
    g = torch.Generator().manual_seed(m)
    codes = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    q = codes[torch.randint(len(codes), (n, k), generator=g)]
    q[0, : len(codes[:k])] = codes[:k]  # the first row: the codes in order (zero, subnormals, normals)
    scale = torch.rand(n, k // group, generator=g) + 0.5
    qw = QuantizedWeight(10, q, scale, None, group)
    w = qw.dequantize()
    assert torch.equal(w[0, :8], torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]) * 2.0**-9 * scale[0, 0])
    x = torch.randn(m, k, generator=g).to(BF)
    packed = pack_quantized(qw)
    y = K.run_linear(K.linear_desc(packed, None, 10, group), x, k, n)
    ref = F.linear(x.float(), w)
    assert torch.all((y.float() - ref).abs() <= ref.abs() * 2**-8 + 1e-4 * ref.abs().max())
    # one-hot rows read single weights: every code of row 0 exactly (then rounded to bf16 once)
    for rows in ([1, 2, 3, 4], list(range(k))):  # streamed (<= 4 rows) and panel paths
        eye = torch.eye(k)[rows].to(BF)
        got = K.run_linear(K.linear_desc(packed, None, 10, group), eye, k, n)
        assert torch.equal(got[:, 0], w[0, rows].to(BF))


def test_gather_parts_holds_a_layers_parts_together_and_names_what_is_missing():
    from kvloom.quantization import gather_parts

    t = torch.zeros(1)

    def split(name, _t):
        base, _, part = name.rpartition(".")
        return (base, part) if part in ("qweight", "scales") else None

    stream = [("a.qweight", t), ("norm.weight", t), ("b.scales", t), ("a.scales", t), ("b.qweight", t)]
    out = list(gather_parts(iter(stream), split, {"qweight", "scales"}))
    assert [name for name, _ in out] == ["norm.weight", "a", "b"]
    assert set(out[1][1]) == {"qweight", "scales"}
    with pytest.raises(ValueError, match="model: c has no scales"):
        list(gather_parts(iter([("c.qweight", t)]), split, {"qweight", "scales"}))
