"""W8A8 checkpoints in the compressed-tensors format (what llm-compressor writes and vLLM reads): a Hugging
Face folder whose quantized linear layers hold ``weight`` (int8, [out, in]) and ``weight_scale`` (one per
output channel, [out, 1]), and whose config.json says so in ``quantization_config``:
weights int8 symmetric per channel, input activations int8 symmetric per token, dynamic.

``kvloom quantize`` writes one (``write_w8a8``: the model smoothed and quantized as ``--quantization w8a8``
does at start-up); loading reads it back (``scheme``, ``pair_scales``) and runs it as it was written.
"""

from __future__ import annotations

import copy
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kvloom.layers.quantization import QuantizedWeight
from kvloom.logger import init_logger

logger = init_logger(__name__)

W8A8_GROUP = {
    "targets": ["Linear"],
    "weights": dict(num_bits=8, type="int", symmetric=True, strategy="channel", dynamic=False),
    "input_activations": dict(num_bits=8, type="int", symmetric=True, strategy="token", dynamic=True),
}


def w8a8_config(ignore: list[str]) -> dict:
    """config.json's quantization_config of a W8A8 checkpoint; ``ignore``: linear layers left unquantized."""
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "config_groups": {"group_0": W8A8_GROUP},
        "ignore": ignore,
    }


def scheme(hf_config: Any) -> str | None:
    """ "w8a8" for a compressed-tensors W8A8 checkpoint, None for one without quantization_config; any
    other quantization_config is a ValueError naming the field that kvloom does not run."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    if not isinstance(qc, dict):
        qc = qc.to_dict() if hasattr(qc, "to_dict") else vars(qc)
    method, fmt = qc.get("quant_method"), qc.get("format")
    if method != "compressed-tensors":
        raise ValueError(
            f"quantization_config.quant_method: {method!r} is not supported (compressed-tensors is)"
        )
    if fmt not in ("int-quantized", None):
        raise ValueError(f"quantization_config.format: {fmt!r} is not supported (int-quantized is)")
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise ValueError("quantization_config.config_groups: expected one group (W8A8)")
    ((gname, group),) = groups.items()
    where = f"quantization_config.config_groups.{gname}"
    for part in ("weights", "input_activations"):
        want, got = W8A8_GROUP[part], group.get(part)
        if not isinstance(got, dict):
            raise ValueError(f"{where}.{part}: missing (W8A8 needs {want})")
        for key in ("num_bits", "type", "symmetric", "strategy", "dynamic"):
            if got.get(key, want[key] if key == "dynamic" else None) != want[key]:
                raise ValueError(
                    f"{where}.{part}.{key}: {got.get(key)!r} is not supported (W8A8 needs {want[key]!r})"
                )
    targets = group.get("targets")
    if targets != ["Linear"]:
        raise ValueError(f"{where}.targets: {targets!r} is not supported (['Linear'] is)")
    return "w8a8"


def pair_scales(
    tensors: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype, keep_quantized: bool
) -> Iterator[tuple[str, Any]]:
    """A W8A8 checkpoint's tensors with each int8 ``X.weight`` and its ``X.weight_scale`` as one
    ``X.weight``: a QuantizedWeight (kind 9) where the backend runs them, else dequantized to ``dtype``."""
    waiting: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in tensors:
        if name.endswith(".weight_scale") or (name.endswith(".weight") and t.dtype == torch.int8):
            base = name.removesuffix("_scale")
            parts = waiting.setdefault(base, {})
            parts["scale" if name.endswith("_scale") else "q"] = t
            if len(parts) < 2:
                continue
            del waiting[base]
            q, scale = parts["q"], parts["scale"].float().reshape(-1, 1)
            if scale.shape[0] != q.shape[0]:
                raise ValueError(f"model: {base}_scale has {scale.shape[0]} rows for {q.shape[0]} outputs")
            qw = QuantizedWeight(9, q, scale, None, q.shape[1])
            yield base, qw if keep_quantized else qw.dequantize(dtype)
        else:
            yield name, t
    if waiting:
        name = next(iter(waiting))
        raise ValueError(f"model: {name} has no {'weight_scale' if 'q' in waiting[name] else 'int8 weight'}")


def write_w8a8(
    model: str, output: Path, max_model_len: int | None = None, show_progress: bool = True
) -> Path:
    """``kvloom quantize``: smooth (SmoothQuant, calibration.txt) and quantize ``model`` as --quantization
    w8a8 does at start-up, and write it to ``output`` as a compressed-tensors W8A8 folder with its config and
    tokenizer. Returns ``output``."""
    from kvloom.engine_args import create_engine_config
    from kvloom.layers.quantization import quantize_w8a8
    from kvloom.quantization.smoothquant import w8a8_linears
    from kvloom.worker.model_runner import load_model

    config = create_engine_config(
        model,
        dtype="bfloat16",
        device="cpu",
        backend="torch",
        quantization="w8a8",
        max_model_len=max_model_len,
    )
    ckpt = config.checkpoint
    if scheme(config.hf_config) is not None:
        raise ValueError(f"model: {ckpt.path} is already quantized")
    net = load_model(config, keep_quantized=False, show_progress=show_progress)  # smoothed
    targets = {f"{name}.weight" for name in w8a8_linears(net)}
    tensors: dict[str, torch.Tensor] = {}
    ignore = []
    for name, original in ckpt.iter_tensors(torch.bfloat16):
        value, target = net.checkpoint_tensor(name)
        value = original if value is None else value
        if target in targets:
            qw = quantize_w8a8(value)
            tensors[name] = qw.q.contiguous()
            tensors[name.removesuffix("weight") + "weight_scale"] = qw.scale.contiguous()
        else:
            tensors[name] = value.to(torch.bfloat16).contiguous()
            if name.endswith(".weight") and value.dim() == 2 and "embed" not in name and "norm" not in name:
                ignore.append(name.removesuffix(".weight"))
    hf = copy.deepcopy(ckpt.transformers_config())
    hf.dtype = torch.bfloat16  # W8A8 runs on bf16 activations
    if "lm_head.weight" in targets and "lm_head.weight" not in tensors:  # tied: an int8 copy of its own
        qw = quantize_w8a8(net.lm_head.weight.data)
        tensors["lm_head.weight"], tensors["lm_head.weight_scale"] = qw.q.contiguous(), qw.scale.contiguous()
        hf.tie_word_embeddings = False
    output.mkdir(parents=True, exist_ok=True)
    hf.quantization_config = w8a8_config(sorted(ignore))
    hf.save_pretrained(output)
    ckpt.load_tokenizer().save_pretrained(output)
    if (ckpt.path / "generation_config.json").is_file():
        shutil.copy(ckpt.path / "generation_config.json", output)
    from safetensors.torch import save_file

    save_file(tensors, output / "model.safetensors", metadata={"format": "pt"})
    n = sum(1 for name in tensors if name.endswith("weight_scale"))
    logger.info(
        "Wrote %s: %d linear layers in W8A8 (compressed-tensors), %d left in bf16", output, n, len(ignore)
    )
    return output
