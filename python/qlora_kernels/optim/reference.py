"""Pure-PyTorch reference of the fused AdamW steps: the test oracle and the fallback without `_C`.

Each function does, in float32 with one rounding per operation (no fused multiply-add), exactly what the
native kernels do per element (csrc/optim_format.h), in the same order, so kernel and reference agree bit
for bit. Scalars derived from the hyperparameters are computed once per step in float64 (Python floats) and
rounded once to float32, as the kernels do.

One step of tensor p with gradient g, t = step + 1 (the count of steps taken so far, plus this one), with
bc1 = 1 - beta1^t and bc2 = sqrt(1 - beta2^t). The 32-bit states (torch.optim.AdamW's order of operations):
    m = m * beta1 + g * (1 - beta1)
    v = v * beta2 + (g * g) * (1 - beta2)
    denom = sqrt(v) / bc2 + eps
    p = p * (1 - lr * weight_decay)
    p = p - (lr / bc1) * (m / denom)
The 8-bit states (bitsandbytes' blockwise 8-bit AdamW form: the same algebra, the bias corrections folded into
two scalars, so one division per value instead of two; adamw8_update_ref):
    m, v as above
    denom = sqrt(v) + eps * bc2
    p = p * (1 - lr * weight_decay)
    p = p - (lr * bc2 / bc1) * (m / denom)
then p is rounded to its dtype. A gradient holding NaN, inf or |g| >= 2^63 skips the whole step of that
tensor: p, m, v and step stay as they were and `skipped` counts it.
"""

from __future__ import annotations

import math

import torch

from ._format import BLOCKSIZE, GRAD_LIMIT, SIGNED_MAP, UNSIGNED_MAP, midpoints


def ipow(base: float, exp: int) -> float:
    """base ** exp by binary exponentiation in float64: the kernels use the same multiplications, so the
    bias corrections are bit-identical on every device (libm pow may differ in the last bit)."""
    result = 1.0
    while exp:
        if exp & 1:
            result *= base
        base *= base
        exp >>= 1
    return result


def step_scalars(t: int, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float) -> dict:
    """The float32 scalars of step t (>= 1), computed in float64 and rounded once."""
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    bc1 = 1.0 - ipow(beta1, t)
    bc2 = math.sqrt(1.0 - ipow(beta2, t))
    return {
        "beta1": f32(beta1),
        "beta2": f32(beta2),
        "one_minus_beta1": f32(1.0 - beta1),
        "one_minus_beta2": f32(1.0 - beta2),
        "bc2_sqrt": f32(bc2),
        "eps": f32(eps),
        "decay": f32(1.0 - lr * weight_decay),
        "step_size": f32(lr / bc1),
        "eps_bc2": f32(eps * bc2),  # the 8-bit update's
        "step_size_bc2": f32(lr * bc2 / bc1),
    }


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root. torch.sqrt on float32 CPU tensors is not (it goes through MKL's
    vector math: ~17% of values 1 ulp off, measured); the float64 root rounded once to float32 is, since no
    float32 root lies within float64 precision of a float32 rounding midpoint."""
    return torch.sqrt(x.double()).float()


def adam_moments_ref(g, m, v, s):
    """The moments' update in float32, shared by both update forms. Returns (m, v)."""
    return m * s["beta1"] + g * s["one_minus_beta1"], v * s["beta2"] + (g * g) * s["one_minus_beta2"]


def adamw_update_ref(p32, g, m, v, s):
    """The per-element update in float32 (all operands float32 tensors). Returns (p, m, v)."""
    m, v = adam_moments_ref(g, m, v, s)
    denom = sqrt_rn(v) / s["bc2_sqrt"] + s["eps"]
    p32 = p32 * s["decay"]
    p32 = p32 - s["step_size"] * (m / denom)
    return p32, m, v


def adamw8_update_ref(p32, g, m, v, s):
    """The 8-bit step's per-element update (bitsandbytes' blockwise form: one division). Returns (p, m, v)."""
    m, v = adam_moments_ref(g, m, v, s)
    denom = sqrt_rn(v) + s["eps_bc2"]
    p32 = p32 * s["decay"]
    p32 = p32 - s["step_size_bc2"] * (m / denom)
    return p32, m, v


def grad_is_finite(grad: torch.Tensor) -> bool:
    """False when any element is NaN, inf or has |g| >= 2^63 (its square would overflow float32)."""
    g = grad.reshape(-1).to(torch.float32).abs()
    return not bool((g >= GRAD_LIMIT).any() | g.isnan().any())


def dequantize_state_ref(codes: torch.Tensor, absmax: torch.Tensor, code_map: torch.Tensor) -> torch.Tensor:
    """float32 [n]: MAP[code] * absmax[i // 256] (one rounding)."""
    n = codes.numel()
    scale = absmax.reshape(-1).repeat_interleave(BLOCKSIZE)[:n]
    return code_map.to(codes.device)[codes.reshape(-1).long()] * scale


def quantize_state_ref(x: torch.Tensor, code_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [n] -> (codes uint8 [n], absmax float32 [ceil(n / 256)]): per block absmax = max |x|;
    s = x * (1 / absmax) (0 where absmax == 0); code = number of midpoints strictly below s."""
    n = x.numel()
    nb = (n + BLOCKSIZE - 1) // BLOCKSIZE
    padded = x.new_zeros(nb * BLOCKSIZE)
    padded[:n] = x.reshape(-1)
    blocks = padded.reshape(nb, BLOCKSIZE)
    absmax = blocks.abs().amax(dim=1) if nb else x.new_zeros(0)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    scaled = (blocks * inv.unsqueeze(1)).reshape(-1)[:n]
    codes = torch.bucketize(scaled, midpoints(code_map).to(x.device), right=False).to(torch.uint8)
    return codes, absmax




@torch.no_grad()
def adamw8bit_step_ref(param, grad, state1, state2, absmax1, absmax2, step, skipped,
                       lr, beta1, beta2, eps, weight_decay) -> None:
    """In place: param (f32/f16/bf16), codes state1/state2 (uint8, shape of param), absmax1/absmax2 (float32
    [ceil(n / 256)]), step and skipped (int64 [])."""
    if not grad_is_finite(grad):
        skipped += 1
        return
    s = step_scalars(int(step) + 1, lr, beta1, beta2, eps, weight_decay)
    m = dequantize_state_ref(state1, absmax1, SIGNED_MAP)
    v = dequantize_state_ref(state2, absmax2, UNSIGNED_MAP)
    p32, m, v = adamw8_update_ref(param.reshape(-1).float(), grad.reshape(-1).float(), m, v, s)
    param.copy_(p32.reshape(param.shape))
    c1, a1 = quantize_state_ref(m, SIGNED_MAP)
    c2, a2 = quantize_state_ref(v, UNSIGNED_MAP)
    state1.copy_(c1.reshape(state1.shape))
    state2.copy_(c2.reshape(state2.shape))
    absmax1.copy_(a1)
    absmax2.copy_(a2)
    step += 1


@torch.no_grad()
def adamw32bit_step_ref(param, grad, exp_avg, exp_avg_sq, step, skipped,
                        lr, beta1, beta2, eps, weight_decay) -> None:
    """In place: param (f32/f16/bf16), exp_avg/exp_avg_sq (float32, shape of param), step/skipped (int64 [])."""
    if not grad_is_finite(grad):
        skipped += 1
        return
    s = step_scalars(int(step) + 1, lr, beta1, beta2, eps, weight_decay)
    p32, m, v = adamw_update_ref(param.reshape(-1).float(), grad.reshape(-1).float(),
                                 exp_avg.reshape(-1), exp_avg_sq.reshape(-1), s)
    param.copy_(p32.reshape(param.shape))
    exp_avg.copy_(m.reshape(exp_avg.shape))
    exp_avg_sq.copy_(v.reshape(exp_avg_sq.shape))
    step += 1
