"""The tolerance every fused-kernel test holds a result to, derived from PyTorch's own error (CPU interpreter
tests and GPU tests alike)."""

from __future__ import annotations

import torch


def assert_close_derived(out, exact, plain, what=""):
    """RMS error vs float64 <= 2 x PyTorch's RMS error (a stable statistic), and the max error <= 4 x PyTorch's
    max error (catches a few wrong elements the RMS would dilute); floors of 1e-2 float32 ulp of the output's
    magnitude only matter when PyTorch is exact. `plain`: the same computation by PyTorch in out's dtype (on a
    GPU, cuBLAS); `exact`: it in float64."""
    assert out.shape == exact.shape and out.dtype == plain.dtype, (out.shape, exact.shape, out.dtype, plain.dtype)
    if out.numel() == 0:
        return
    assert torch.isfinite(out).all(), f"{what}: {int((~torch.isfinite(out)).sum())} non-finite (unwritten?) elements"
    d_out, d_plain = out.double() - exact, plain.double() - exact
    floor = 1e-2 * torch.finfo(torch.float32).eps * (1.0 + exact.abs().max().item())
    rms, rms_t = d_out.pow(2).mean().sqrt().item(), d_plain.pow(2).mean().sqrt().item()
    mx, mx_t = d_out.abs().max().item(), d_plain.abs().max().item()
    assert rms <= 2 * rms_t + floor, f"{what}: kernel RMS error {rms:.3e} > 2 x PyTorch's {rms_t:.3e}"
    assert mx <= 4 * mx_t + floor, f"{what}: kernel max error {mx:.3e} > 4 x PyTorch's {mx_t:.3e}"
