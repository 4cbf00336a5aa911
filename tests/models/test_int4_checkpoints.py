"""GPTQ (v1 and v2 formats, with and without act-order) and AWQ 4-bit checkpoints: the test writes them from
the formats' definitions (its own packing, below), and kvloom's reading must give the same model as the
weights the test dequantized itself: fp32 runs bit for bit, and the CPU kernels run them as kind 4."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig

from kvloom import SamplingParams
from kvloom.backends.cpu.kernels import load_cpu_kernels
from kvloom.engine_args import create_engine_config

from .reference import first_outputs, random_prompts, save_random_model, write_folder_like
from .test_tiny_models import COMMON

GROUP = 32
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # value j of a word holds output 8c + AWQ_PACK_ORDER[j]


def _words(values: np.ndarray) -> np.ndarray:
    """[..., 8] 4-bit values -> int32 words, value j in bits 4j .. 4j + 3."""
    w = np.zeros(values.shape[:-1], dtype=np.uint32)
    for j in range(8):
        w |= values[..., j].astype(np.uint32) << np.uint32(4 * j)
    return w.view(np.int32)


def _awq_words(a: np.ndarray) -> np.ndarray:
    """[rows, n] 4-bit values -> [rows, n / 8] words in AWQ's order."""
    return _words(a.reshape(a.shape[0], a.shape[1] // 8, 8)[:, :, AWQ_PACK_ORDER])


def _quantize(w: np.ndarray, g_idx: np.ndarray, groups: int, min_zero: int):
    """Round to nearest per (row, group), asymmetric: q, zeros [N, groups] and fp16 scales [N, groups]."""
    n = w.shape[0]
    scales = np.zeros((n, groups), np.float16)
    zeros = np.zeros((n, groups), np.int64)
    q = np.zeros(w.shape, np.int64)
    for g in range(groups):
        cols = g_idx == g
        lo, hi = np.minimum(w[:, cols].min(1), 0), np.maximum(w[:, cols].max(1), 0)
        s = ((hi - lo) / 15).astype(np.float16).astype(np.float32)
        z = np.clip(np.round(-lo / s), min_zero, 15)
        q[:, cols] = np.clip(np.round(w[:, cols] / s[:, None]) + z[:, None], 0, 15)
        scales[:, g], zeros[:, g] = s, z
    return q, zeros, scales


def write_int4(src, out, plain, method: str, act_order: bool = False, v1: bool = True) -> None:
    """``src``'s linear layers (not the output layer) as a GPTQ or AWQ folder ``out``, and the weights it
    holds, dequantized by the formats' definition w = (q - zero) scale, as an fp32 folder ``plain``."""
    rng = np.random.default_rng(0)
    tensors = load_file(src / "model.safetensors")
    quant, dense = {}, {}
    orders: dict[str, np.ndarray] = {}  # act-order: layers that share an input share their order (as GPTQ)
    for name, t in tensors.items():
        if not name.endswith("proj.weight"):
            quant[name] = dense[name] = t
            continue
        base = name.removesuffix(".weight")
        w = t.float().numpy()
        n, k = w.shape
        groups = k // GROUP
        shared = base.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
        order = orders.setdefault(shared, rng.permutation(k)) if act_order else np.arange(k)
        g_idx = np.empty(k, np.int64)
        g_idx[order] = np.arange(k) // GROUP  # the i-th input processed goes to group i // GROUP
        q, zeros, scales = _quantize(w, g_idx, groups, min_zero=1 if v1 else 0)
        s = scales.astype(np.float32)
        dense[name] = torch.from_numpy(((q - zeros[:, g_idx]) * s[:, g_idx]).astype(np.float32))
        if method == "gptq":
            quant[base + ".qweight"] = torch.from_numpy(_words(q.T.reshape(k // 8, 8, n).transpose(0, 2, 1)))
            quant[base + ".qzeros"] = torch.from_numpy(
                _words((zeros.T - (1 if v1 else 0)).reshape(groups, n // 8, 8))
            )
            quant[base + ".g_idx"] = torch.from_numpy(g_idx.astype(np.int32))
        else:
            quant[base + ".qweight"] = torch.from_numpy(_awq_words(q.T))
            quant[base + ".qzeros"] = torch.from_numpy(_awq_words(zeros.T))
        quant[base + ".scales"] = torch.from_numpy(scales.T.copy())
    config = json.loads((src / "config.json").read_text())
    if method == "gptq":
        qc = {
            "quant_method": "gptq",
            "bits": 4,
            "group_size": GROUP,
            "desc_act": act_order,
            "sym": False,
            "checkpoint_format": "gptq" if v1 else "gptq_v2",
        }
    else:
        qc = {"quant_method": "awq", "bits": 4, "group_size": GROUP, "zero_point": True, "version": "gemm"}
    write_folder_like(src, out, quant, {**config, "quantization_config": qc})
    write_folder_like(src, plain, dense, config)


CASES = {
    "gptq-v1-act-order": dict(method="gptq", act_order=True, v1=True),
    "gptq-v2": dict(method="gptq", act_order=False, v1=False),
    "awq": dict(method="awq"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_int4_checkpoint_runs_as_its_dequantized_weights(case, tmp_path, stories):
    save_random_model(LlamaConfig(**COMMON), tmp_path / "src", stories)
    out, plain = tmp_path / "q", tmp_path / "plain"
    write_int4(tmp_path / "src", out, plain, **CASES[case])
    prompts = random_prompts(3, [5, 30, 12], 512, seed=2)
    params = SamplingParams(temperature=0, max_tokens=10, logprobs=0, ignore_eos=True)

    def run(folder, **kw):  # noqa: ANN001, ANN202
        return first_outputs(folder, prompts, params, **kw)

    # fp32 on PyTorch ops: kvloom's reading of the packed tensors is the test's dequantization, bit for bit
    _, ref = run(plain, dtype="float32", backend="torch")
    _, got = run(out, dtype="float32", backend="torch")
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]
    assert [g.logprobs for g in got] == [r.logprobs for r in ref]
    if load_cpu_kernels() is None:
        return
    # the kernels: kind 4 (inputs permuted per layer under act-order, then no fused call), near the fp32
    # run (bf16 activations move this sharp random model's logprobs by up to ~0.15; a misread weight moves
    # them by units)
    llm, got = run(out)
    model = llm.engine.runner.model
    layer = model.model.layers[0]
    assert layer.self_attn.qkv_proj.method.weight_format == "q4"
    act_order = CASES[case].get("act_order", False)
    assert (layer.mlp.down_proj.method.perm is not None) == act_order
    assert (model.fused_decode is None) == act_order
    for g, r in zip(got, ref, strict=True):
        t = r.token_ids[0]
        assert g.token_ids[0] == t and abs(g.logprobs[0][t].logprob - r.logprobs[0][t].logprob) < 0.25


@pytest.mark.parametrize("case", ["awq", "gptq-v2"])
def test_int4_checkpoints_under_tensor_parallel(case, tmp_path, stories):
    """Each rank reads its part of the packed tensors (outputs of q/k/v and gate/up: columns, eight to a
    word where packed by outputs; inputs of o and down: rows, whole groups): TP 2 gives TP 1's tokens from
    the same folder (fp32; the sums of o and down over the ranks in another order)."""
    save_random_model(LlamaConfig(**COMMON), tmp_path / "src", stories)
    write_int4(tmp_path / "src", tmp_path / "q", tmp_path / "plain", **CASES[case])
    prompts = random_prompts(3, [5, 30, 12], 512, seed=2)
    params = SamplingParams(temperature=0, max_tokens=10, logprobs=0, ignore_eos=True)
    _, ref = first_outputs(tmp_path / "plain", prompts, params, dtype="float32", backend="torch")
    llm, got = first_outputs(
        tmp_path / "q", prompts, params, dtype="float32", backend="torch", tensor_parallel_size=2
    )
    llm.engine.shutdown()
    assert [g.token_ids for g in got] == [r.token_ids for r in ref]
    for g, r in zip(got, ref, strict=True):
        assert all(
            abs(a[t].logprob - b[t].logprob) < 1e-4
            for a, b, t in zip(g.logprobs, r.logprobs, r.token_ids, strict=True)
        )


def test_gptq_act_order_refuses_tensor_parallel(tmp_path, stories):
    save_random_model(LlamaConfig(**COMMON), tmp_path / "src", stories)
    write_int4(tmp_path / "src", tmp_path / "q", tmp_path / "plain", **CASES["gptq-v1-act-order"])
    with pytest.raises(ValueError, match="tensor_parallel_size: GPTQ act-order"):
        create_engine_config(str(tmp_path / "q"), tensor_parallel_size=2)
