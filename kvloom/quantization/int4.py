"""GPTQ and AWQ 4-bit checkpoints (Hugging Face ``quantization_config`` with quant_method "gptq" or "awq"),
read into kind-4 QuantizedWeights (w = scale q + min per group, min = -scale zero) that the CPU kernels
run as they run GGUF 4-bit blocks, or dequantized as the format defines: w = (q - zero) scale.

Formats (each packs eight 4-bit values into an int32, value j in bits 4j .. 4j + 3):
- GPTQ ("gptq" / "gptq_v2" checkpoint_format): ``qweight`` [in / 8, out] packed along the inputs, ``qzeros``
  [groups, out / 8] and ``scales`` [groups, out] per group of inputs, ``g_idx`` [in]: each input's group.
  The "gptq" (v1) format stores zero - 1. With act-order (desc_act) the groups are scattered over the
  inputs: the inputs are permuted so that each group is contiguous, and the layer permutes its input the
  same way (QuantizedWeight.perm).
- AWQ ("gemm" version): ``qweight`` [in, out / 8] and ``qzeros`` [groups, out / 8] packed along the
  outputs in the order 0, 2, 4, 6, 1, 3, 5, 7 (value j of a word is output AWQ_ORDER[j]); ``scales``
  [groups, out].
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from kvloom.layers.quantization import QuantizedWeight
from kvloom.quantization import gather_parts

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # output 8c + AWQ_ORDER[j] is value j of word c
PARTS = ("qweight", "qzeros", "scales", "g_idx")


def scheme(qc: dict) -> dict:
    """The validated parameters of a GPTQ / AWQ quantization_config; a value kvloom does not run is a
    ValueError naming the field."""
    method = qc.get("quant_method")
    if qc.get("bits") != 4:
        raise ValueError(f"quantization_config.bits: {qc.get('bits')!r} is not supported ({method}: 4 is)")
    group = qc.get("group_size")
    if not isinstance(group, int) or not (group == -1 or (group > 0 and group % 8 == 0)):
        raise ValueError(f"quantization_config.group_size: {group!r} (expected -1 or a multiple of 8)")
    if method == "gptq":
        fmt = qc.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(
                f"quantization_config.checkpoint_format: {fmt!r} is not supported (gptq, gptq_v2)"
            )
        return {
            "method": "gptq",
            "group": group,
            "zero_offset": 1 if fmt == "gptq" else 0,
            "act_order": bool(qc.get("desc_act", False)),
        }
    version = str(qc.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"quantization_config.version: {qc.get('version')!r} is not supported (gemm is)")
    if qc.get("zero_point", True) is not True:
        zp = qc.get("zero_point")
        raise ValueError(f"quantization_config.zero_point: {zp!r} is not supported (true is)")
    return {"method": "awq", "group": group, "zero_offset": 0, "act_order": False}


def rank_slicer(params: dict, shard: Callable) -> Callable:
    """The tensor-parallel slicer of a GPTQ / AWQ folder's tensors: from the model's slice of ``X.weight``
    (dim 0: outputs, a column-parallel layer; dim 1: inputs, a row-parallel one), the matching part of X's
    qweight, qzeros, scales and g_idx, in their packing. A split that cuts a packed word or a group is a
    ValueError naming tensor_parallel_size; so is GPTQ act-order split by inputs (its groups are spread over
    all of them)."""
    gptq, group = params["method"] == "gptq", params["group"]

    def slicer(name: str) -> tuple[int, int, int] | None:
        base, _, part = name.rpartition(".")
        if part not in PARTS:
            return shard(name)
        s = shard(f"{base}.weight")
        if s is None:
            return None
        dim, start, n = s
        if dim == 0:  # outputs: a column of every tensor but g_idx, eight to a word where packed by outputs
            if part == "g_idx":
                return None
            if part == "qzeros" or (part == "qweight" and not gptq):
                _whole(start, n, 8, name, "eight outputs to a word")
                return 1, start // 8, n // 8
            return 1, start, n
        if gptq and params["act_order"]:
            raise ValueError(
                f"tensor_parallel_size: {name} is GPTQ act-order (desc_act), whose groups are spread over "
                "all inputs: a layer split by inputs cannot take its part of them; run it on one rank"
            )
        if part == "g_idx":
            return 0, start, n
        if part == "qweight":
            if gptq:
                _whole(start, n, 8, name, "eight inputs to a word")
                return 0, start // 8, n // 8
            return 0, start, n
        if group <= 0:
            raise ValueError(f"tensor_parallel_size: {name} has one group over all inputs (group_size -1)")
        _whole(start, n, group, name, f"groups of {group} inputs")
        return 0, start // group, n // group

    return slicer


def _whole(start: int, n: int, unit: int, name: str, what: str) -> None:
    if start % unit or n % unit:
        raise ValueError(
            f"tensor_parallel_size: this rank's part of {name} ({n} from {start}) cuts its {what}"
        )


def unpack(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 words -> their eight 4-bit values (uint8), value j of a word at index 8 i + j along ``dim``."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    p = packed.to(torch.int32).unsqueeze(-1) >> shifts  # [..., 8]
    values = (p & 15).to(torch.uint8)
    if dim == 0:  # [rows, cols, 8] -> [rows * 8, cols]
        return values.permute(0, 2, 1).reshape(packed.shape[0] * 8, packed.shape[1])
    return values.reshape(packed.shape[0], packed.shape[1] * 8)


def read(params: dict, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(q [out, in] uint8, zeros [out, groups], scales [out, groups] fp32, g_idx [in] long) of a layer."""
    scales = parts["scales"].float().T.contiguous()  # [out, groups]
    if params["method"] == "gptq":
        q = unpack(parts["qweight"], 0).T.contiguous()  # [out, in]
        zeros = unpack(parts["qzeros"], 1).T.to(torch.int32) + params["zero_offset"]
        g_idx = parts.get("g_idx")
    else:
        order = torch.tensor(AWQ_ORDER)
        words = parts["qweight"].shape[1]
        # value j of word c is output 8c + AWQ_ORDER[j]: put it there
        index = (torch.arange(words)[:, None] * 8 + order[None, :]).reshape(-1)
        q = torch.empty(parts["qweight"].shape[0], words * 8, dtype=torch.uint8)
        q[:, index] = unpack(parts["qweight"], 1)
        q = q.T.contiguous()
        z = unpack(parts["qzeros"], 1)
        zeros = torch.empty_like(z)
        zeros[:, index] = z
        zeros = zeros.T.to(torch.int32)
        g_idx = None
    k = q.shape[1]
    group = params["group"] if params["group"] > 0 else k
    # a rank's inputs of a row-parallel layer: its g_idx counts from its first group
    g_idx = torch.arange(k) // group if g_idx is None else g_idx.long() - g_idx.min().long()
    if zeros.shape != scales.shape or scales.shape[1] != k // group or g_idx.shape != (k,):
        raise ValueError(
            f"model: {params['method']} tensors of shapes q {tuple(q.shape)}, zeros {tuple(zeros.shape)}, "
            f"scales {tuple(scales.shape)}, g_idx {tuple(g_idx.shape)} do not agree (group_size {group})"
        )
    return q, zeros, scales, g_idx


def dequantize(
    q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor
) -> torch.Tensor:
    """The format's own arithmetic: w[n, k] = (q[n, k] - zero[n, g]) scale[n, g], g = g_idx[k] (fp32)."""
    return (q.to(torch.int32) - zeros[:, g_idx]).float() * scales[:, g_idx]


def to_kind4(
    q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor
) -> QuantizedWeight:
    """Kind 4 with contiguous groups: inputs permuted by group where act-order scattered them."""
    k = q.shape[1]
    groups = scales.shape[1]
    group = k // groups
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], torch.arange(k) // group):
        raise ValueError(f"model: g_idx does not give every one of the {groups} groups {group} inputs")
    if torch.equal(perm, torch.arange(k)):
        perm = None
    else:
        q = q[:, perm]
    return QuantizedWeight(4, q.contiguous(), scales, -scales * zeros.float(), group, perm)


def pair_int4(
    tensors: Iterator[tuple[str, torch.Tensor]], params: dict, dtype: torch.dtype, keep_quantized: bool
) -> Iterator[tuple[str, Any]]:
    """A GPTQ / AWQ checkpoint's tensors with each layer's qweight, qzeros, scales (and g_idx) as one
    ``X.weight``: kind 4 where the backend runs it, else dequantized (the format's arithmetic) to
    ``dtype``."""
    need = {"qweight", "qzeros", "scales"} | ({"g_idx"} if params["method"] == "gptq" else set())

    def split(name: str, t: torch.Tensor) -> tuple[str, str] | None:
        base, _, part = name.rpartition(".")
        return (base, part) if part in PARTS else None

    for name, t in gather_parts(tensors, split, need):
        if not isinstance(t, dict):
            yield name, t
            continue
        q, zeros, scales, g_idx = read(params, t)
        if keep_quantized:
            yield f"{name}.weight", to_kind4(q, zeros, scales, g_idx)
        else:
            yield f"{name}.weight", dequantize(q, zeros, scales, g_idx).to(dtype)
