"""transformers as the reference implementation: greedy continuations on the same weights."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

# A tiny model whose shapes take the CPU kernels' specialised paths (head_dim 64, 3 query heads per KV head,
# as SmolLM2; sizes multiples of 16).
KERNEL_SHAPES = dict(
    vocab_size=512,
    hidden_size=384,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def hf_greedy(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """One prompt at a time (no padding), stopping at EOS like kvloom does."""
    outs = []
    for ids in prompts:
        with torch.no_grad():
            seq = model.generate(
                torch.tensor([ids], device=model.device),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=model.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
            )
        outs.append(seq[0, len(ids) :].tolist())
    return outs


def random_prompts(n: int, lengths: list[int], vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(lengths[i % len(lengths)])] for i in range(n)]


def save_random_model(config, folder: Path, tokenizer_from: Path, seed: int = 0):
    """A random-weight transformers model saved as a Hugging Face folder, with a real tokenizer beside it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    model.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, folder / name)
    return model


def write_folder_like(src: Path, folder: Path, tensors: dict, config: dict) -> None:
    """A Hugging Face folder with ``src``'s tokenizer files, ``tensors`` as its weights and ``config``."""
    from safetensors.torch import save_file

    folder.mkdir()
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            (folder / f.name).write_bytes(f.read_bytes())
    save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps(config))


def first_outputs(folder: Path, prompts: list[list[int]], params, **kwargs) -> tuple:  # noqa: ANN001
    """(the LLM, each prompt's first output) of ``folder`` run with ``kwargs``."""
    from kvloom import LLM

    llm = LLM(str(folder), show_progress=False, **kwargs)
    return llm, [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
