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


def iter_safetensors(folder: Path, dtype: torch.dtype, shard: Callable) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor, or of those ``shard(name)`` slices, (dim, start, length), that part alone (read as
    such: safetensors' get_slice); floating point in ``dtype``, but quantization scales (``*_scale``) as
    stored."""
    for f in safetensors_files(folder):
        with safe_open(f, framework="pt") as st:
            for name in st.keys():
                part = shard(name)
                if part is None:
                    t = st.get_tensor(name)
                else:
                    dim, start, n = part
                    index = (slice(None),) * dim + (slice(start, start + n),)
                    t = st.get_slice(name)[index]
                yield name, t.to(dtype) if t.is_floating_point() and not name.endswith("_scale") else t
