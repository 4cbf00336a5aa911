"""Hugging Face folders: model.safetensors or a sharded index."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"model: {folder} has no *.safetensors weights")
    return files


def _kept(name: str, t: torch.Tensor) -> bool:
    """Tensors read as stored: quantization scales (compressed-tensors' ``*_scale``, GPTQ / AWQ ``scales``)
    and FP8 weights (their scale comes separately)."""
    return name.endswith(("_scale", ".scales")) or t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


def iter_safetensors(folder: Path, dtype: torch.dtype, shard: Callable) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor, or of those ``shard(name)`` slices, (dim, start, length), that part alone (read as
    such: safetensors' get_slice); floating point in ``dtype``, but quantization scales and FP8 weights as
    stored (``_kept``); ``dtype`` None: everything as stored."""
    for f in safetensors_files(folder):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                part = shard(name)
                view = st.get_slice(name)
                if part is None or len(view.get_shape()) <= part[0] or view.get_shape()[part[0]] == 1:
                    t = st.get_tensor(name)  # NOTE: a size-1 dimension (one scale per tensor) broadcasts
                else:
                    dim, start, n = part
                    t = view[(slice(None),) * dim + (slice(start, start + n),)]
                cast = dtype is not None and t.is_floating_point() and not _kept(name, t)
                yield name, t.to(dtype) if cast else t
