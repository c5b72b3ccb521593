"""The fused loss's Triton kernels (services/learner/fused_triton.py).

On CUDA (marker gpu) the whole fused loss runs with kernel="triton" against the eager kernel.
Without CUDA the kernels themselves run in Triton's CPU interpreter (TRITON_INTERPRET=1): the
same kernel code, tiles, masks and loops, executed with numpy; this checks their logic, not their
speed or the GPU compiler.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

triton = pytest.importorskip("triton")
KERNELS = Path(__file__).parents[3] / "services" / "learner" / "fused_triton.py"


def _kernels_by_path() -> Any:
    spec = importlib.util.spec_from_file_location("fused_triton_by_path", KERNELS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.BLOCK = 16  # several tiles per row at a small V, and a ragged last tile
    return module


def check_kernels() -> None:
    """Kernels vs the torch functions they replace (run with TRITON_INTERPRET=1 set before triton
    is imported: triton decorates its own library functions at import)."""
    from protege.services.learner.fused_loss import _dense_grad, _dense_stats

    ft = _kernels_by_path()
    g = torch.Generator().manual_seed(0)
    n, V = 6, 37
    z = torch.randn(n, V, generator=g) * 3
    z[1, 4] = 40.0  # a row where p_m -> 1: (E4) matters
    z[2, 30:] = z[2].max() + 1.0  # ties: the first index of the max wins, as torch.max
    logq = torch.log_softmax(torch.randn(n, V, generator=g) * 2, -1)
    y = torch.randint(0, V, (n, 1), generator=g)
    got, want = ft.dense_stats(z, logq, y), _dense_stats(z, logq, y)
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(a.to(b.dtype), b, rtol=1e-5, atol=1e-6, msg=f"output {i}")
    zmax, lognorm, m = want[:3]
    kl, g_m = torch.rand(n, 1, generator=g), torch.rand(n, 1, generator=g)
    coef = torch.randn(n, 1, generator=g)
    bw = torch.tensor(0.3)
    torch.testing.assert_close(ft.dense_grad(z, logq, y, zmax, lognorm, m, kl, g_m, bw, coef),
                               _dense_grad(z, logq, y, zmax, lognorm, m, kl, g_m, bw, coef),
                               rtol=1e-5, atol=1e-6)


def test_interpreted_kernels_match_the_torch_functions() -> None:
    code = ("import importlib.util, sys; "
            f"spec = importlib.util.spec_from_file_location('t', {str(Path(__file__))!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "m.check_kernels(); print('kernels ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0 and "kernels ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_fused_loss_equals_eager_on_cuda(dtype: torch.dtype) -> None:
    from protege.services.learner.fused_loss import LMHead, fused_hybrid_loss
    from protege.services.learner.objective import HiddenRef

    g = torch.Generator(device="cuda").manual_seed(0)
    B, T, H, D, V = 8, 64, 256, 128, 151_936
    dev = dict(device="cuda", generator=g)
    h = torch.randn(B, T, H, **dev).to(dtype)
    w = (torch.randn(V, H, **dev) / H**0.5).to(dtype)
    ref = HiddenRef(torch.randn(B, T, D, **dev), torch.randn(V, D, **dev) / D**0.5)
    tokens = torch.randint(0, V, (B, T), **dev)
    mask = torch.ones(B, T, dtype=torch.bool, device="cuda")
    rewards = torch.rand(B, **dev)
    out = []
    for kernel in ("eager", "triton"):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        loss, _ = fused_hybrid_loss(hh, LMHead(ww), tokens, mask, ref, rewards, 0.1,
                                    group_size=4, kernel=kernel)
        out.append((loss, *torch.autograd.grad(loss, [hh, ww])))
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for a, b in zip(out[1], out[0], strict=True):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol)
