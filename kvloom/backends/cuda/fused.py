"""Elementwise Triton kernels of the CUDA backend, each one pass where PyTorch takes several: RMSNorm with
the residual add (``RMSNorm.fused``) and act(gate) * up (``MLP.fused_act``), rounding where the PyTorch
path rounds (the residual sum and the normalized row in the model's dtype, the activation before the
product), so they follow it to within its own dtype's rounding."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm(x_ptr, res_ptr, w_ptr, out_ptr, stride_x, stride_r, stride_o, D, eps, HAS_RES: tl.constexpr,
              BLOCK: tl.constexpr):  # fmt: skip
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    h = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RES:  # residual = x + residual, in the model's dtype
        r = tl.load(res_ptr + row * stride_r + offs, mask=mask, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)
        tl.store(res_ptr + row * stride_r + offs, h, mask=mask)
    hf = h.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(hf * hf, 0) / D + eps)
    normed = (hf * inv).to(h.dtype).to(tl.float32)  # cast back before the weight, as transformers' Llama
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _act_mul(x_ptr, out_ptr, stride_x, stride_o, inter, GELU: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < inter
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + inter + offs, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    if GELU:  # tanh approximation: 0.5 g (1 + tanh(sqrt(2 / pi) (g + 0.044715 g^3)))
        u = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = 0.5 * g * (1.0 + (1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)))
    else:
        a = g / (1.0 + tl.exp(-g))
    y = a.to(gate.dtype).to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


class TritonRMSNorm:
    """RMSNorm.fused: (x + residual, normalized) in one pass over rows of up to 64k elements."""

    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> torch.Tensor | None:
        if x.dim() != 2 or x.stride(1) != 1 or (residual is not None and residual.stride(1) != 1):
            return None
        t, d = x.shape
        out = torch.empty(t, d, dtype=x.dtype, device=x.device)
        if t:
            _rms_norm[(t,)](
                x,
                x if residual is None else residual,
                weight,
                out,
                x.stride(0),
                0 if residual is None else residual.stride(0),
                out.stride(0),
                d,
                eps,
                HAS_RES=residual is not None,
                BLOCK=triton.next_power_of_2(d),
            )
        return out


class TritonActMul:
    """MLP.fused_act: act(gate) * up (silu, or Gemma's tanh gelu) in one pass."""

    def __init__(self, act: str) -> None:
        self.gelu = act == "gelu_pytorch_tanh"

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor | None:
        if gate_up.dim() != 2 or gate_up.stride(1) != 1:
            return None
        t, two_i = gate_up.shape
        i = two_i // 2
        out = torch.empty(t, i, dtype=gate_up.dtype, device=gate_up.device)
        block = min(1024, triton.next_power_of_2(i))
        if t:
            _act_mul[(t, triton.cdiv(i, block))](
                gate_up, out, gate_up.stride(0), out.stride(0), i, GELU=self.gelu, BLOCK=block
            )
        return out
