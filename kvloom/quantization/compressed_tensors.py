"""Quantized checkpoints in the compressed-tensors format (what llm-compressor writes and vLLM reads): a
Hugging Face folder whose quantized linear layers hold ``weight`` ([out, in]) and ``weight_scale`` (one per
output channel, [out, 1], or one per tensor), and whose config.json says how in ``quantization_config``:
- W8A8 ("int-quantized"): int8 weights symmetric per channel, int8 input activations per token, dynamic;
- FP8 ("float-quantized"): FP8 E4M3 weights per channel or per tensor (run widened to bf16 in the kernels'
  registers, kind 10), activations in bf16.

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
from kvloom.quantization import gather_parts

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


def scheme(qc: dict) -> str:
    """The scheme of a compressed-tensors quantization_config: "w8a8" (int8 weights per channel, int8
    activations per token, dynamic) or "fp8" (FP8 E4M3 weights per channel or per tensor; its activations,
    FP8 in the file's scheme, run in bf16 here: the CPUs have no FP8 arithmetic, and bf16 is the finer of
    the two). Anything else is a ValueError naming the field kvloom does not run."""
    fmt = qc.get("format")
    formats = {"int-quantized": "w8a8", "float-quantized": "fp8"}
    if fmt not in formats:
        raise ValueError(
            f"quantization_config.format: {fmt!r} is not supported (int-quantized: W8A8, "
            "float-quantized: FP8 weights)"
        )
    name = formats[fmt]
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise ValueError("quantization_config.config_groups: expected one group")
    ((gname, group),) = groups.items()
    where = f"quantization_config.config_groups.{gname}"
    kind = "int" if name == "w8a8" else "float"
    wants = {
        "weights": dict(
            num_bits=[8],
            type=[kind],
            symmetric=[True],
            dynamic=[False, None],
            strategy=["channel"] if name == "w8a8" else ["channel", "tensor"],
        ),
        "input_activations": dict(
            num_bits=[8],
            type=[kind],
            symmetric=[True],
            strategy=["token"] if name == "w8a8" else ["token", "tensor"],
            dynamic=[True] if name == "w8a8" else [True, False],
        ),
    }
    for part, want in wants.items():
        got = group.get(part)
        if got is None and part == "input_activations" and name == "fp8":
            continue  # weights alone
        if not isinstance(got, dict):
            raise ValueError(f"{where}.{part}: missing")
        for key, allowed in want.items():
            if got.get(key) not in allowed:
                raise ValueError(
                    f"{where}.{part}.{key}: {got.get(key)!r} is not supported ({name} takes {allowed})"
                )
    targets = group.get("targets")
    if targets != ["Linear"]:
        raise ValueError(f"{where}.targets: {targets!r} is not supported (['Linear'] is)")
    if name == "fp8" and group.get("input_activations") is not None:
        logger.info("FP8 checkpoint: its weights run as they are, its activations in bf16 (not FP8)")
    return name


def pair_scales(
    tensors: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype, keep_quantized: bool
) -> Iterator[tuple[str, Any]]:
    """A quantized checkpoint's tensors with each ``X.weight`` (int8: W8A8, FP8 E4M3) and its
    ``X.weight_scale`` (per output channel, or one per tensor) as one ``X.weight``: a QuantizedWeight (kind
    9 or 10) where the backend runs them, else dequantized to ``dtype``. FP8 activation scales
    (``X.input_scale``) are dropped: activations run in bf16."""

    def split(name: str, t: torch.Tensor) -> tuple[str, str] | None:
        if name.endswith(".weight_scale"):
            return name.removesuffix(".weight_scale"), "weight_scale"
        if name.endswith(".weight") and t.dtype in (torch.int8, torch.float8_e4m3fn):
            return name.removesuffix(".weight"), "weight"
        return None

    for name, t in gather_parts(tensors, split, {"weight", "weight_scale"}):
        if not isinstance(t, dict):
            if not name.endswith(".input_scale"):
                yield name, t
            continue
        q, scale = t["weight"], t["weight_scale"].float().reshape(-1, 1)
        if scale.shape[0] == 1:  # one per tensor
            scale = scale.expand(q.shape[0], 1).contiguous()
        if scale.shape[0] != q.shape[0]:
            raise ValueError(f"model: {name}.weight_scale has {scale.shape[0]} rows for {q.shape[0]} outputs")
        if q.dtype == torch.int8:
            qw = QuantizedWeight(9, q, scale, None, q.shape[1])
        else:
            qw = QuantizedWeight(10, q.view(torch.uint8), scale, None, q.shape[1])
        yield f"{name}.weight", qw if keep_quantized else qw.dequantize(dtype)


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
    if ckpt.quantization is not None:
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
