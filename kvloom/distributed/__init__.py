"""Tensor-parallel ranks: who this process is among them, and the collectives the layers call."""
