"""FP8 (E4M3) weight checkpoints in the compressed-tensors format: loaded and run as the same model from its
dequantized weights (fp32: bit for bit), natively on the CPU kernels (kind 10, widened in registers)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig

from kvloom import SamplingParams
from kvloom.backends.cpu.kernels import load_cpu_kernels

from .reference import first_outputs, random_prompts, save_random_model, write_folder_like
from .test_tiny_models import COMMON

FP8_MAX = 448.0


def write_fp8(src, fp8, dequantized, strategy: str, activations: dict | None) -> None:
    """``src`` (a random Llama folder) as an FP8 checkpoint (every linear but the output layer, scales per
    channel or per tensor) and as a folder of those FP8 weights dequantized to fp32 (torch's reading)."""
    tensors = load_file(src / "model.safetensors")
    quant, plain = {}, {}
    for name, w in tensors.items():
        if name.endswith("proj.weight"):
            amax = w.abs().amax(1, keepdim=True) if strategy == "channel" else w.abs().amax().reshape(1)
            scale = amax / FP8_MAX
            q = (w / (scale if strategy == "channel" else scale[0])).to(torch.float8_e4m3fn)
            quant[name], quant[name + "_scale"] = q, scale.to(torch.bfloat16)
            if activations is not None and not activations["dynamic"]:
                quant[name.removesuffix("weight") + "input_scale"] = torch.ones(1)
            plain[name] = q.float() * scale.to(torch.bfloat16).float().reshape(-1, 1)
        else:
            quant[name] = plain[name] = w
    config = json.loads((src / "config.json").read_text())
    group = {
        "targets": ["Linear"],
        "weights": dict(num_bits=8, type="float", symmetric=True, strategy=strategy, dynamic=False),
        "input_activations": activations,
    }
    qc = {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"g": group}}
    write_folder_like(src, fp8, quant, {**config, "quantization_config": qc, "ignore": ["lm_head"]})
    write_folder_like(src, dequantized, plain, config)


FP8_DYNAMIC = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token", "dynamic": True}
FP8_STATIC = {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "tensor", "dynamic": False}


@pytest.mark.parametrize(
    ("strategy", "activations"),
    [("channel", FP8_DYNAMIC), ("tensor", FP8_STATIC), ("channel", None)],
    ids=["channel-dynamic", "tensor-static", "weights-only"],
)
def test_fp8_checkpoint_runs_as_its_dequantized_weights(strategy, activations, tmp_path, stories):
    save_random_model(LlamaConfig(**COMMON), tmp_path / "src", stories)
    fp8, plain = tmp_path / "fp8", tmp_path / "plain"
    write_fp8(tmp_path / "src", fp8, plain, strategy, activations)
    prompts = random_prompts(3, [5, 30, 12], 512, seed=2)
    params = SamplingParams(temperature=0, max_tokens=10, logprobs=0, ignore_eos=True)

    def run(folder, **kw):  # noqa: ANN001, ANN202
        return first_outputs(folder, prompts, params, **kw)

    # fp32 on PyTorch ops: the loader's dequantization is the reference's, bit for bit (TP 2 too)
    _, ref = run(plain, dtype="float32", backend="torch")
    for tp in (1, 2):
        llm, got = run(fp8, dtype="float32", backend="torch", tensor_parallel_size=tp)
        assert [g.token_ids for g in got] == [r.token_ids for r in ref]
        if tp == 1:  # NOTE: TP 2 sums o and down over the ranks: another order, the same tokens
            assert [g.logprobs for g in got] == [r.logprobs for r in ref]
        llm.engine.shutdown()
    if load_cpu_kernels() is None:
        return
    # bf16 on the kernels: kind 10 run natively, close to the dequantized weights' fp32 run (its first
    # token, whose logprob moves by bf16 activations alone)
    llm, got = run(fp8)  # dtype auto: bf16 for a quantized checkpoint
    formats = {m.method.weight_format for m in llm.engine.runner.model.modules() if hasattr(m, "method")}
    assert "q10" in formats
    for g, r in zip(got, ref, strict=True):
        t = r.token_ids[0]
        assert g.token_ids[0] == t and abs(g.logprobs[0][t].logprob - r.logprobs[0][t].logprob) < 0.25
