"""Fused Triton kernels for QLoRA linear layers (installed as `qlora_kernels.triton_kernels`).

- nf4_tile.py:   the one jit helper that loads + dequantizes an NF4 weight tile in registers;
- linear_fwd.py: y = x @ deq(W)^T + s * U @ B^T + bias (fused, grouped tiles);
- linear_dx.py:  dx = dy @ deq(W) + s * G @ A;
- decode.py:     split-K GEMV for M <= 16;
- configs.py:    launch parameters (LaunchConfig, the heuristic table, pick_config, test overrides);
- dispatch.py:   the per-call choice fused / decode / dequantize + cuBLAS, and its performance model.

`nf4_linear_triton` and `nf4_linear_dx_triton` are what torch.ops.qlora.nf4_linear / nf4_linear_dx call on
the Triton path (same positional arguments as the ops).
"""

from .configs import HEURISTICS, LaunchConfig, config_override, pick_config, set_config_override
from .decode import nf4_decode
from .dispatch import crossover_m, nf4_linear_dx_triton, nf4_linear_triton, plan_linear, set_plan_override
from .linear_dx import nf4_linear_dx
from .linear_fwd import nf4_linear

nf4_decode_triton = nf4_decode

__all__ = [
    "nf4_linear_triton",
    "nf4_linear_dx_triton",
    "nf4_decode_triton",
    "nf4_linear",
    "nf4_linear_dx",
    "nf4_decode",
    "LaunchConfig",
    "HEURISTICS",
    "pick_config",
    "plan_linear",
    "crossover_m",
    "set_config_override",
    "config_override",
    "set_plan_override",
]
