"""Quantization methods and quantized checkpoints: SmoothQuant for W8A8 (smoothquant.py), compressed-tensors
W8A8 / FP8 folders (compressed_tensors.py), GPTQ and AWQ 4-bit folders (int4.py). ``checkpoint_scheme``
names a folder's scheme from its quantization_config; ``checkpoint_tensors`` turns its tensors into the
weights kvloom runs."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch


def gather_parts(
    tensors: Iterator[tuple[str, torch.Tensor]],
    split: Callable[[str, torch.Tensor], tuple[str, str] | None],
    need: set[str],
) -> Iterator[tuple[str, torch.Tensor | dict[str, torch.Tensor]]]:
    """A checkpoint's tensors as they stream in, with the parts of each quantized layer held together:
    ``split`` maps a tensor to (its layer's base name, its part) or None; once a base has every part of
    ``need``, it comes as (base, {part: tensor}); the other tensors come as they are. A base still missing
    parts when the stream ends is a ValueError naming what it lacks."""
    waiting: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors:
        key = split(name, t)
        if key is None:
            yield name, t
            continue
        base, part = key
        parts = waiting.setdefault(base, {})
        parts[part] = t
        if need <= parts.keys():
            del waiting[base]
            yield base, parts
    if waiting:
        base, parts = next(iter(waiting.items()))
        raise ValueError(f"model: {base} has no {', '.join(sorted(need - parts.keys()))}")


def quantization_config(hf_config: Any) -> dict | None:
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None or isinstance(qc, dict):
        return qc
    return qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)


def checkpoint_scheme(hf_config: Any) -> str | None:
    """The scheme of a folder's quantization_config ("gptq", "awq", "w8a8", "fp8", "bitnet"), or None
    without one; a config kvloom does not run is a ValueError naming its field."""
    qc = quantization_config(hf_config)
    if qc is None:
        return None
    method = qc.get("quant_method")
    if method == "bitnet":
        from kvloom.quantization.bitnet import scheme

        scheme(qc)
        return method
    if method in ("gptq", "awq"):
        from kvloom.quantization.int4 import scheme

        scheme(qc)
        return method
    if method == "compressed-tensors":
        from kvloom.quantization.compressed_tensors import scheme

        return scheme(qc)
    raise ValueError(
        f"quantization_config.quant_method: {method!r} is not supported (gptq, awq, compressed-tensors, "
        "bitnet are)"
    )


def checkpoint_tensors(
    scheme: str, hf_config: Any, tensors: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype, keep: bool
) -> Iterator[tuple[str, Any]]:
    """A quantized folder's tensors as (name, weight): each quantized layer's parts as one ``X.weight``, a
    QuantizedWeight where the backend runs it (``keep``), else dequantized to ``dtype``. BitNet's ternary
    weights come as QuantizedWeights always: their int8 activations are part of the model."""
    if scheme == "bitnet":
        from kvloom.quantization.bitnet import scheme as bitnet_scheme
        from kvloom.quantization.bitnet import ternary_tensors

        return ternary_tensors(tensors, bitnet_scheme(quantization_config(hf_config)), dtype)
    if scheme in ("gptq", "awq"):
        from kvloom.quantization.int4 import pair_int4
        from kvloom.quantization.int4 import scheme as int4_scheme

        return pair_int4(tensors, int4_scheme(quantization_config(hf_config)), dtype, keep)
    from kvloom.quantization.compressed_tensors import pair_scales

    return pair_scales(tensors, dtype, keep)
