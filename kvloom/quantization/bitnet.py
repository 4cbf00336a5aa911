"""BitNet b1.58 checkpoints (quantization_config quant_method "bitnet"): the linear layers' ternary weights
as kind-9 QuantizedWeights (q in {-1, 0, 1}, one scale per tensor repeated per output), which kvloom runs
with int8 activations per token, as BitNet's BitLinear does. Three forms:
- "autobitlinear", "online": float weights, made ternary at load as transformers does at run time:
  s = 1 / mean|w|, q = clamp(round(w s), -1, 1), w = q / s;
- "autobitlinear", "offline": ternary float weights and ``weight_scale``: w = q x weight_scale;
- "bitlinear" (offline): ``weight`` uint8 [out / 4, in], row r of quarter i in bits 2i .. 2i + 1 as q + 1,
  and ``weight_scale``: w = q / weight_scale.
The output layer and the embeddings stay as they are (modules_to_not_convert)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from kvloom.layers.quantization import QuantizedWeight
from kvloom.quantization import gather_parts

TERNARY = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def scheme(qc: dict) -> dict:
    cls, mode = qc.get("linear_class", "bitlinear"), qc.get("quantization_mode", "offline")
    if cls not in ("bitlinear", "autobitlinear"):
        raise ValueError(
            f"quantization_config.linear_class: {cls!r} is not supported (bitlinear, autobitlinear)"
        )
    if mode not in ("offline", "online") or (cls == "bitlinear" and mode != "offline"):
        raise ValueError(f"quantization_config.quantization_mode: {mode!r} is not supported with {cls}")
    if qc.get("use_rms_norm"):
        raise ValueError("quantization_config.use_rms_norm: true is not supported (no norm inside BitLinear)")
    return {"linear_class": cls, "mode": mode}


def _ternary(q: torch.Tensor, scale: torch.Tensor) -> QuantizedWeight:
    if q.abs().max() > 1:
        raise ValueError("model: a BitNet weight holds values outside {-1, 0, 1}")
    n, k = q.shape
    scale = scale.float().reshape(1, 1).expand(n, 1).contiguous()
    return QuantizedWeight(9, q.to(torch.int8), scale, None, k)


def ternary_rows(w: torch.Tensor, name: str) -> QuantizedWeight:
    """Float weights that are ternary times a scale per row (a BitNet GGUF's, as llama.cpp's converter
    writes them: TQ1_0 / TQ2_0 blocks or floats) -> kind 9, q in {-1, 0, 1}, the scale per output: exact,
    else a ValueError naming the tensor."""
    s = w.abs().amax(1, keepdim=True)
    q = torch.where(s > 0, w / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(w)).round()
    if not torch.equal(q * s, w) or q.abs().max() > 1:
        raise ValueError(f"model: {name} is not ternary (BitNet's weights are -s, 0 or s in each row)")
    return QuantizedWeight(9, q.to(torch.int8), s.float(), None, w.shape[1])


def online(w: torch.Tensor) -> QuantizedWeight:
    """transformers' WeightQuant: per tensor, s = 1 / mean|w|, q = clamp(round(w s), -1, 1)."""
    s = 1.0 / w.abs().mean().clamp(min=1e-5)
    return _ternary((w * s).round().clamp(-1, 1), 1.0 / s)


def unpack_bitlinear(packed: torch.Tensor) -> torch.Tensor:
    """BitLinear's uint8 [out / 4, in] -> q [out, in] in {-1, 0, 1} (quarter i of the rows in bits 2i)."""
    return torch.cat([((packed >> (2 * i)) & 3).to(torch.int8) - 1 for i in range(4)])


def ternary_tensors(
    tensors: Iterator[tuple[str, torch.Tensor]], params: dict, dtype: torch.dtype
) -> Iterator[tuple[str, Any]]:
    """The checkpoint's tensors (as stored) with each BitLinear's weight (and weight_scale) as one kind-9
    weight, made from the stored values; the other floating-point tensors in ``dtype``."""

    def split(name: str, t: torch.Tensor) -> tuple[str, str] | None:
        base, _, part = name.rpartition(".")
        ternary = base.rpartition(".")[2] in TERNARY and part in ("weight", "weight_scale")
        return (base, part) if ternary and params["mode"] != "online" else None

    for name, t in gather_parts(tensors, split, {"weight", "weight_scale"}):
        if isinstance(t, dict):
            w, scale = t["weight"], t["weight_scale"].float()
            if params["linear_class"] == "bitlinear":
                yield f"{name}.weight", _ternary(unpack_bitlinear(w), 1.0 / scale)
            else:
                yield f"{name}.weight", _ternary(w.float().round(), scale)
        elif (
            params["mode"] == "online"
            and name.rpartition(".")[0].rpartition(".")[2] in TERNARY
            and (name.endswith(".weight"))
        ):
            yield name, online(t.float())
        else:
            yield name, t.to(dtype) if t.is_floating_point() else t
