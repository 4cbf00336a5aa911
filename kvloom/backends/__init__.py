"""Backends: what runs the model's math on a kind of hardware. ``cpu``: kvloom's C kernels (AVX-512 BF16
/ VNNI), their build, packing and the fused decoder. The PyTorch ops in kvloom/layers are the reference
path every device runs."""
