"""Checkpoint readers: Hugging Face folders (safetensors) and GGUF files."""

from kvloom.loader.checkpoint import Checkpoint, resolve_checkpoint

__all__ = ["Checkpoint", "resolve_checkpoint"]
