"""Triton kernels for the fused loss's per-chunk math on CUDA (`fused_loss`, kernel "triton").

The Triton twins of `fused_loss._dense_stats` and `_dense_grad` (their torch reference, which
the tests compare them to), one program per row of the chunk, each walking the vocabulary in
BLOCK-wide tiles:

- `dense_stats`: pass 1 keeps a running max, its first index and Σ exp(z − max) (online
  rescaling); pass 2 accumulates, over i ≠ argmax m, Σ p_i d_i, Σ p_i, Σ (p_i d_i)², Σ p_i² d_i,
  Σ p_i² with d = log p − log q. Reads z and log q once each (twice z); writes 10 numbers a row.
- `dense_grad`: writes dL/dz = βw · ∂D/∂z + c (p − onehot(y)), the argmax entry by (E4).

Math in fp32 (the chunk arrives upcast). The matmuls around them stay cuBLAS. Importing this
module needs triton; `fused_loss` only imports it on CUDA.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 1024


@triton.jit
def _stats_kernel(z_ptr, q_ptr, y_ptr, out_ptr, V, stride_z, stride_q, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    z_row = z_ptr + row * stride_z
    q_row = q_ptr + row * stride_q
    offs = tl.arange(0, BLOCK)
    run_max = -float("inf")
    run_arg = 0
    run_sum = 0.0
    for start in range(0, V, BLOCK):
        idx = start + offs
        z = tl.load(z_row + idx, mask=idx < V, other=-float("inf"))
        tile_max = tl.max(z, 0)
        tile_arg = start + tl.argmax(z, 0)
        new_max = tl.maximum(run_max, tile_max)
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max), 0)
        run_arg = tl.where(tile_max > run_max, tile_arg, run_arg)  # first index of the max
        run_max = new_max
    lognorm = tl.log(run_sum)
    s_other = 0.0
    one_minus = 0.0
    a2 = 0.0
    a1 = 0.0
    a0 = 0.0
    for start in range(0, V, BLOCK):
        idx = start + offs
        valid = idx < V
        z = tl.load(z_row + idx, mask=valid, other=-float("inf"))
        q = tl.load(q_row + idx, mask=valid, other=0.0)
        logp = z - run_max - lognorm
        p = tl.where(valid & (idx != run_arg), tl.exp(logp), 0.0)
        pod = tl.where(p > 0, p * (logp - q), 0.0)
        s_other += tl.sum(pod, 0)
        one_minus += tl.sum(p, 0)
        a2 += tl.sum(pod * pod, 0)
        a1 += tl.sum(p * pod, 0)
        a0 += tl.sum(p * p, 0)
    y = tl.load(y_ptr + row)
    out = out_ptr + row * 10
    tl.store(out + 0, run_max)
    tl.store(out + 1, lognorm)
    tl.store(out + 2, run_arg.to(tl.float32))
    tl.store(out + 3, s_other)
    tl.store(out + 4, one_minus)
    tl.store(out + 5, a2)
    tl.store(out + 6, a1)
    tl.store(out + 7, a0)
    tl.store(out + 8, tl.load(q_row + run_arg))
    tl.store(out + 9, tl.load(z_row + y) - run_max - lognorm)


@triton.jit
def _grad_kernel(z_ptr, q_ptr, g_ptr, y_ptr, row_ptr, V, stride_z, stride_q, stride_g, bw,
                 BLOCK: tl.constexpr):
    row = tl.program_id(0)
    z_row = z_ptr + row * stride_z
    q_row = q_ptr + row * stride_q
    g_row = g_ptr + row * stride_g
    r = row_ptr + row * 5  # zmax, lognorm, argmax, kl, g_m; then coef from a second array
    zmax = tl.load(r + 0)
    lognorm = tl.load(r + 1)
    m = tl.load(r + 2).to(tl.int64)
    kl = tl.load(r + 3)
    g_m = tl.load(r + 4)
    coef = tl.load(row_ptr + tl.num_programs(0) * 5 + row)
    y = tl.load(y_ptr + row)
    offs = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        idx = start + offs
        valid = idx < V
        z = tl.load(z_row + idx, mask=valid, other=0.0)
        q = tl.load(q_row + idx, mask=valid, other=0.0)
        logp = z - zmax - lognorm
        p = tl.exp(logp)
        g = tl.where(idx != m, p * (logp - q - kl), g_m) * bw + coef * p
        g = tl.where(idx == y, g - coef, g)
        tl.store(g_row + idx, g, mask=valid)


def dense_stats(z: Tensor, logq: Tensor, y: Tensor) -> tuple[Tensor, ...]:
    """`fused_loss._dense_stats` on CUDA: the same ten [n, 1] results."""
    n, V = z.shape
    out = torch.empty((n, 10), device=z.device, dtype=torch.float32)
    _stats_kernel[(n,)](z, logq, y.reshape(-1).contiguous(), out, V, z.stride(0),
                        logq.stride(0), BLOCK=BLOCK)
    cols = out.split(1, dim=1)
    return (cols[0], cols[1], cols[2].long(), *cols[3:])


def dense_grad(z: Tensor, logq: Tensor, y: Tensor, zmax: Tensor, lognorm: Tensor, m: Tensor,
               kl: Tensor, g_m: Tensor, bw: Tensor, coef: Tensor) -> Tensor:
    """`fused_loss._dense_grad` on CUDA: dL/dz [n, V] in fp32."""
    n, V = z.shape
    per_row = torch.cat([zmax, lognorm, m.to(torch.float32), kl, g_m], 1).reshape(-1)
    rows = torch.cat([per_row, coef.reshape(-1).to(torch.float32)])
    grad = torch.empty_like(z)
    _grad_kernel[(n,)](z, logq, grad, y.reshape(-1).contiguous(), rows, V, z.stride(0),
                       logq.stride(0), grad.stride(0), float(bw), BLOCK=BLOCK)
    return grad
