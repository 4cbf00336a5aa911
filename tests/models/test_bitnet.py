"""BitNet b1.58: the architecture (sub-norms, relu^2) and its ternary linear layers with int8 activations,
greedy equal to transformers' own BitNet (online quantization) on a tiny random config; the packed
BitLinear form reads to the same weights; the CPU kernels run them as kind 9."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, BitNetConfig

from kvloom import LLM, SamplingParams
from kvloom.backends.cpu.kernels import load_cpu_kernels
from kvloom.quantization.bitnet import online, unpack_bitlinear

from .reference import hf_greedy, random_prompts, save_random_model
from .test_tiny_models import COMMON

ONLINE = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "online"}


def _bitnet_folder(tmp_path, stories):  # noqa: ANN001, ANN202
    save_random_model(BitNetConfig(**COMMON), tmp_path, stories)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "quantization_config": ONLINE}))
    return tmp_path


def _fp32_run_gaps(hf, source: str, prompts: list[list[int]], n: int) -> list[float]:  # noqa: ANN001
    """kvloom's fp32 run of ``source`` (PyTorch ops): greedy equal to transformers' ``hf``; returns each
    generated token's logprob gap to transformers'."""
    expected = hf_greedy(hf, prompts, n)
    llm = LLM(source, dtype="float32", backend="torch", show_progress=False)
    assert llm.engine.runner.model.model.layers[0].self_attn.qkv_proj.quant == "q9"
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, logprobs=0), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    gaps = []
    for p, o in zip(prompts, outs, strict=True):
        out = o.outputs[0]
        with torch.no_grad():
            lp = hf(torch.tensor([p + out.token_ids])).logits[0].float().log_softmax(-1)
        gaps += [
            abs(lp[len(p) - 1 + j, t].item() - out.logprobs[j][t].logprob)
            for j, t in enumerate(out.token_ids)
        ]
    return gaps


def test_bitnet_greedy_equals_transformers(tmp_path, stories):
    folder = _bitnet_folder(tmp_path, stories)
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(hf.model.layers[0].self_attn.q_proj).__name__ == "AutoBitLinear"
    prompts = random_prompts(4, [3, 17, 40, 9], 512, seed=1)
    # logprobs within 1e-4 of transformers' (without the int8 activations they move by ~0.1)
    assert max(_fp32_run_gaps(hf, str(folder), prompts, 16)) < 1e-4
    if load_cpu_kernels() is None:
        return
    # bf16 on the kernels: the same integer products (kind 9) as the PyTorch ops' bf16 run
    runs = []
    for backend in ("torch", "auto"):
        llm = LLM(str(folder), dtype="bfloat16", backend=backend, show_progress=False)
        down = llm.engine.runner.model.model.layers[0].mlp.down_proj
        assert down.quant == "q9"
        if backend == "auto":
            assert down.method.desc.sub == 1  # the kernels keep the ternary weights in 2 bits
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
        runs.append([o.outputs[0].token_ids for o in outs])
    assert sum(a[:4] == b[:4] for a, b in zip(*runs, strict=True)) >= 3


@pytest.mark.parametrize("qtype", ["TQ2_0", "TQ1_0"])
def test_bitnet_gguf_equals_transformers_on_its_weights(tmp_path, qtype):
    """A BitNet GGUF as llama.cpp's converter writes it (arch bitnet: SiLU, sub-norms; each linear weight
    ternary times a per-tensor scale, in TQ2_0 / TQ1_0 blocks whose fp16 d keep that scale) reads as kind-9
    weights: greedy and logprobs equal transformers' AutoBitLinear (offline) on the same ternary weights
    and scales; on the kernels, 2 bits a weight."""
    from gguf import GGMLQuantizationType

    from .gguf_writer import random_llama, write_gguf
    from .reference import write_folder_like

    config = BitNetConfig(
        **{
            **COMMON,
            "vocab_size": 49152,
            "hidden_size": 256,
            "intermediate_size": 512,
            "head_dim": 64,
            "initializer_range": 0.1,
        },
        hidden_act="silu",
        tie_word_embeddings=True,
    )
    model = random_llama(config)
    tensors = {}
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if name.endswith("_proj.weight") and "lm_head" not in name:
                s = p.abs().mean().half().float()  # the converter's scale, as the blocks' fp16 d hold it
                q = (p / s).round().clamp(-1, 1)
                p.copy_(q * s)
                tensors[name], tensors[name.removesuffix("weight") + "weight_scale"] = q, s.reshape(1)
            elif name != "lm_head.weight":
                tensors[name] = p.clone()
    path = write_gguf(model, tmp_path / "bitnet.gguf", arch="bitnet", qtype=GGMLQuantizationType[qtype])
    offline = {"quant_method": "bitnet", "linear_class": "autobitlinear", "quantization_mode": "offline"}
    src = tmp_path / "src"
    model.save_pretrained(src)
    write_folder_like(src, tmp_path / "hf", tensors, {**config.to_dict(), "quantization_config": offline})
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf.model.layers[0].mlp.down_proj).__name__ == "AutoBitLinear"
    prompts = random_prompts(4, [3, 17, 40, 9], 49152, seed=2)
    diffs = _fp32_run_gaps(hf, str(path), prompts, 12)
    # NOTE: a whole-sequence forward and kvloom's steps sum in other orders, so an activation within an ulp of
    # a half int8 step can round one step apart (one position of 48 moved 5e-3 here)
    assert max(diffs) < 2e-2 and sum(d < 1e-4 for d in diffs) >= 0.9 * len(diffs), diffs
    if load_cpu_kernels() is not None:
        llm = LLM(str(path), show_progress=False)
        assert llm.engine.runner.model.model.layers[1].mlp.down_proj.method.desc.sub == 1


def test_bitnet_gguf_weight_that_is_not_ternary_is_refused(tmp_path):
    from kvloom.quantization.bitnet import ternary_rows

    w = torch.tensor([[0.5, -0.5, 0.0], [0.25, 0.5, 0.0]])
    assert torch.equal(ternary_rows(w[:1], "x").q, torch.tensor([[1, -1, 0]], dtype=torch.int8))
    with pytest.raises(ValueError, match="blk.0.attn_q.weight is not ternary"):
        ternary_rows(w, "blk.0.attn_q.weight")


def test_bitlinear_packing_reads_to_the_online_weights():
    """transformers' pack_weights (2 bits per value, quarters of the rows) read back by kvloom."""
    from transformers.integrations.bitnet import pack_weights

    w = torch.randn(24, 16)
    qw = online(w)
    packed = pack_weights(qw.q.to(torch.float32).clone())
    assert packed.shape == (6, 16) and packed.dtype == torch.uint8
    assert torch.equal(unpack_bitlinear(packed), qw.q)


def test_malformed_bitnet_config_is_refused(tmp_path, stories):
    from kvloom.engine_args import create_engine_config

    folder = _bitnet_folder(tmp_path, stories)
    config = json.loads((folder / "config.json").read_text())
    for qc, field in [
        ({**ONLINE, "linear_class": "ternarylinear"}, "quantization_config.linear_class"),
        ({**ONLINE, "linear_class": "bitlinear"}, "quantization_config.quantization_mode"),
        ({**ONLINE, "use_rms_norm": True}, "quantization_config.use_rms_norm"),
    ]:
        (folder / "config.json").write_text(json.dumps({**config, "quantization_config": qc}))
        with pytest.raises(ValueError, match=field):
            create_engine_config(str(folder))
