from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvloom.distributed.parallel_state import get_tp, vocab_range


class LinearMethod:
    """How a Linear computes ``x @ W.T + b``. This base is PyTorch on the layer's own weight, the
    reference every device runs; a backend gives a layer a method of its own that holds the weight in
    the backend's form (kvloom/backends/cpu: packed bf16 or quantized blocks). The layer never asks which.
    """

    weight_format = "bf16"  # what the weight is (bf16, q4, q8): logged, tested

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)


class Linear(nn.Linear):
    """nn.Linear whose forward is its method's (``LinearMethod``): a backend may replace the method, and
    with it the weight (the plain weight is then None: no second copy is kept).

    Tensor parallel: a column-parallel layer holds its rank's output rows and a row-parallel one its input
    columns, whose partial outputs are summed over the ranks (``reduce_output``). ``shard_slices`` says,
    per checkpoint shard (q, k, v of a fused layer), which (dim, start, length) of the checkpoint tensor
    this rank loads; the loaders read only that.
    """

    method: LinearMethod = LinearMethod()
    shard_slices: dict[int, tuple[int, int, int]] | None = None
    reduce_output = False

    def reset_parameters(self) -> None:
        """No random init: every weight comes from the checkpoint. (On the meta device, nn.init's
        normal_ goes through torch's reference ops, which import torch._dynamo: 1 s of start-up.)"""

    @property
    def quant(self) -> str:
        return self.method.weight_format

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(self, x)
        return get_tp().all_reduce(y) if self.reduce_output else y


def column_parallel(layer: Linear, shards: list[tuple[int, int]]) -> Linear:
    """Mark ``layer`` as holding, of each checkpoint shard, the rows (start, length) (with more than one
    rank)."""
    if get_tp().size > 1:
        layer.shard_slices = {i: (0, start, n) for i, (start, n) in enumerate(shards)}
    return layer


def row_parallel(layer: Linear) -> Linear:
    """Mark ``layer`` as holding this rank's equal slice of the input columns, its output summed over the
    ranks (the bias is added by rank 0 alone: the others' is zero)."""
    tp = get_tp()
    if tp.size > 1:
        layer.shard_slices = {0: (1, tp.rank * layer.in_features, layer.in_features)}
        layer.reduce_output = True
    return layer


class Embedding(nn.Embedding):
    """Token embeddings; with tensor parallel each rank holds an equal slice of the vocabulary
    (``vocab_range``) and the rows it does not hold come out zero before the sum over the ranks."""

    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        self.vocab_start, rows = vocab_range(num_embeddings)
        super().__init__(rows, embedding_dim)
        self.vocab_size = num_embeddings

    def reset_parameters(self) -> None:
        """No random init (see Linear.reset_parameters)."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        tp = get_tp()
        if tp.size == 1:
            return super().forward(ids)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        h = F.embedding(local.masked_fill(outside, 0), self.weight)
        return tp.all_reduce(h.masked_fill_(outside[:, None], 0))


class LMHead(Linear):
    """The output layer: with tensor parallel, this rank's vocabulary rows (as the Embedding's); the
    logits are gathered on rank 0 (the others get None)."""

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        start, rows = vocab_range(vocab_size)
        super().__init__(hidden_size, rows, bias=False)
        self.vocab_size = vocab_size
        if get_tp().size > 1:
            self.shard_slices = {0: (0, start, min(rows, vocab_size - start))}

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        tp = get_tp()
        out = self(hidden)
        if tp.size == 1:
            return out
        parts = tp.gather(out)
        return None if parts is None else torch.cat(parts, dim=-1)[:, : self.vocab_size]
