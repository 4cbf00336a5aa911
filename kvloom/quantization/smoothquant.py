"""SmoothQuant (Xiao et al., 2023) for W8A8: a few input channels of a linear layer carry activations tens of
times larger than the rest, and a per-token int8 scale sized for them leaves the others a handful of
levels. SmoothQuant divides each input channel j by s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) and
multiplies the weight's column j by it, which leaves the product unchanged and splits the difficulty
between activations and weights. The division is folded into whatever makes the input:
- the norm before q/k/v and before gate/up (its weight),
- the up half of gate/up before down (act(gate) * up is linear in up).
max|X_j| comes from a calibration pass over ``calibration.txt`` (shipped with kvloom: prose, dialogue,
lists, code, numbers); ``kvloom quantize`` writes the result so later starts skip it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kvloom.layers.linear import Linear
from kvloom.layers.mlp import MLP
from kvloom.logger import init_logger

logger = init_logger(__name__)

CALIBRATION_TEXT = Path(__file__).with_name("calibration.txt")
ALPHA = 0.5  # the paper's default; how much of the outliers' range moves into the weights
WINDOW = 512  # tokens per calibration sequence


def smoothing_pairs(model: torch.nn.Module) -> list[tuple[str, Any, Linear]]:
    """(kind, source, linear): the linear layers SmoothQuant smooths and what divides their input: kind
    "norm" (source: the RMSNorm before it) or "up" (source: the MLP, whose up rows feed its down_proj)."""
    pairs = []
    for layer in model.model.layers:
        pairs.append(("norm", layer.input_layernorm, layer.self_attn.qkv_proj))
        if isinstance(layer.mlp, MLP):  # a mixture of experts keeps its bf16 experts
            pairs.append(("norm", layer.mlp_norm, layer.mlp.gate_up_proj))
            pairs.append(("up", layer.mlp, layer.mlp.down_proj))
    return pairs


def w8a8_linears(model: torch.nn.Module) -> dict[str, Linear]:
    """The linear layers W8A8 quantizes, by name: attention's q/k/v and o, every dense MLP's gate/up and down
    (shared experts included), and the output layer (not smoothed; a tied one gets an int8 copy, the
    embedding stays as it is). Not a mixture of experts' router and experts.
    NOTE: vLLM's W8A8 checkpoints keep the output layer in bf16; here it is a fifth of the linear FLOPs of
    a small model (SmolLM2, Llama 3.2 1B), ~30% of a batched W8A8 step's time in bf16, and costs +0.3%
    perplexity (SmolLM2) in int8."""
    out = {"lm_head": model.lm_head}
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}."
        out[prefix + "self_attn.qkv_proj"] = layer.self_attn.qkv_proj
        out[prefix + "self_attn.o_proj"] = layer.self_attn.o_proj
        for name, module in layer.named_modules():
            if isinstance(module, MLP):
                out[f"{prefix}{name}.gate_up_proj"] = module.gate_up_proj
                out[f"{prefix}{name}.down_proj"] = module.down_proj
    return out


@torch.inference_mode()
def input_maxima(model: torch.nn.Module, windows: list[list[int]], linears: list[Linear]) -> dict:
    """max |x| per input channel ([in_features] fp32) of each of ``linears`` over the tokens of ``windows``
    (one sequence each, run as a prefill on PyTorch ops with a cache of their own)."""
    from kvloom.layers.attention import TorchAttention
    from kvloom.worker.model_runner import ModelInput

    maxima: dict[Linear, torch.Tensor] = {}

    def record(module: Linear, args: tuple) -> None:
        m = args[0].detach().abs().amax(0).float()
        maxima[module] = m if module not in maxima else torch.maximum(maxima[module], m)

    hooks = [lin.register_forward_pre_hook(record) for lin in linears]
    layers = model.model.layers
    attn = layers[0].self_attn
    bs = 16
    try:
        for ids in windows:
            n = len(ids)
            blocks = -(-n // bs)
            dtype = attn.qkv_proj.weight.dtype
            cache = torch.zeros(2, attn.num_kv_heads, blocks, bs, attn.head_dim, dtype=dtype)
            inp = ModelInput(
                np.array(ids, dtype=np.int64),
                np.arange(n, dtype=np.int64),
                np.arange(n, dtype=np.int64)[None, :],
                [n],
                [[list(range(blocks))]],
                None,
                [],
            )
            meta = TorchAttention().build_metadata(inp, 0, bs, torch.device("cpu"))
            saved = [layer.self_attn.impl for layer in layers]
            for layer in layers:  # the reference attention on this cache, whatever a backend gave
                layer.self_attn.impl = TorchAttention()
            try:
                model(
                    torch.tensor(ids),
                    torch.arange(n),
                    [cache.clone() for _ in layers],
                    [meta] * len(layers),
                )
            finally:
                for layer, impl in zip(layers, saved, strict=True):
                    layer.self_attn.impl = impl
    finally:
        for h in hooks:
            h.remove()
    return maxima


def smooth(model: torch.nn.Module, tokenizer: Any, max_len: int, alpha: float = ALPHA) -> None:
    """Calibrate on calibration.txt (in sequences of up to ``max_len`` tokens) and fold the smoothing scales
    into ``model`` (loaded, not yet prepared by a backend); the model computes the same function up to the
    rounding of its weights."""
    start = time.perf_counter()
    ids = tokenizer.encode(CALIBRATION_TEXT.read_text())
    window = min(WINDOW, max_len)
    windows = [ids[i : i + window] for i in range(0, len(ids), window)]
    pairs = smoothing_pairs(model)
    maxima = input_maxima(model, windows, [lin for _, _, lin in pairs])
    worst = 0.0
    for kind, source, lin in pairs:
        x_max = maxima[lin].clamp(min=1e-5)
        w = lin.weight.data
        w_max = w.float().abs().amax(0).clamp(min=1e-5)
        s = (x_max.pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)
        if kind == "norm":
            s = source.divide_weight(s)  # the ratio its rounded weight applies
        else:  # the up rows of gate/up: output j of up divided by s_j
            n = source.intermediate_size
            up = source.gate_up_proj.weight.data[n:]
            s_up = s.to(up.dtype).float()  # NOTE: a bf16 s divides the up rows and multiplies down exactly
            up.copy_((up.float() / s_up[:, None]).to(up.dtype))
            if source.gate_up_proj.bias is not None:
                b = source.gate_up_proj.bias.data[n:]
                b.copy_((b.float() / s_up).to(b.dtype))
            s = s_up
        w.copy_((w.float() * s[None, :]).to(w.dtype))
        worst = max(worst, float((x_max / x_max.median()).max()))
    logger.info(
        "SmoothQuant: %d linear layers smoothed (alpha %.2f) from %d calibration tokens in %.1f s; the "
        "largest input channel was %.0fx its layer's median (`kvloom quantize` does this once and writes the "
        "result)",
        len(pairs),
        alpha,
        len(ids),
        time.perf_counter() - start,
        worst,
    )
