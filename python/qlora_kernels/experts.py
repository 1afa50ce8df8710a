"""NF4 experts of mixture-of-experts models, with per-expert LoRA in PEFT's `target_parameters` layout.

transformers 5 keeps a MoE layer's experts in one `*Experts` module with fused 3-D parameters:
    Qwen3-MoE / Mixtral   gate_up_proj [E, 2I, H], down_proj [E, H, I]      ([E, out, in])
    GptOss                gate_up_proj [E, H, 2I], down_proj [E, I, H]      ([E, in, out], `is_transposed`)
                          + gate_up_proj_bias [E, 2I], down_proj_bias [E, H]
`NF4Experts` replaces such a module. Each expert's matrix, taken in [out, in] orientation, is quantized exactly
as a Linear weight of that shape (expert e's bytes are `quantize_nf4(W_e)`'s, double quant included: each
expert has its own offset and nested scales), stacked: packed uint8 [E, ceil(N*K/2)], absmax [E, nb],
nested_absmax float32 [E, ceil(nb/256)], offset float32 [E]. The router stays the model's (dense), and so does
the gating math (the replaced module's `_apply_gate` / `act_fn`).

Forward, as transformers' grouped_mm experts path: sort the (token, expert) pairs by expert, gather the rows,
one grouped op per projection (`GroupedQLoRAFunction`), the model's gate, routing weights, sum over top-k.
Per projection, expert e's LoRA is A_e [r, in], B_e [out, r] (stored stacked: lora_A [E, r, in], lora_B
[E, out, r]); y_e = x_e @ deq(W_e)^T + s * (x_e @ A_e^T) @ B_e^T.

PEFT's ParamWrapper stores the same adapter as one nn.Linear pair per parameter: lora_A.weight [r*E, in]
(expert e: rows e*r .. e*r+r-1) and lora_B.weight [out, r*E] (expert e: columns j*E + e); `peft_lora_A` /
`peft_lora_B` and `from_peft_lora` convert.
"""

from __future__ import annotations

import json
import math
from typing import Iterable, Optional

import torch
from torch import Tensor, nn

from . import _ops
from ._format import (DTYPE_FROM_NAME, DTYPE_NAMES, FLOAT_DTYPES, NESTED_BLOCKSIZE, all_finite, num_blocks,
                      prepare_device)
from .functional import quantize_nf4
from .nn import _scaling, check_lora_args

__all__ = ["NF4Experts", "NF4ExpertWeight", "GroupedQLoRAFunction", "find_experts_modules", "experts_modules",
           "check_experts_layout", "EXPERTS_QUANT_STATE_KEY"]

EXPERTS_QUANT_STATE_KEY = "quant_state.qlora_experts_nf4"
_NF4_BUFFERS = ("weight_packed", "weight_absmax", "weight_nested_absmax", "weight_offset")
_WEIGHT_NAMES = ("gate_up_proj", "up_proj", "down_proj")  # the 3-D parameters transformers' experts hold


# ------------------------------------------------------------------------------------------ grouped ops
def _grouped_ops():
    """The grouped qlora:: ops module, or None while it is not there (the per-expert loop serves then)."""
    try:
        from . import _grouped_ops as g
    except ImportError:
        return None
    return g


def _symbolic(t: Tensor) -> bool:
    """A tensor without values (meta, or a FakeTensor: the planner's simulation, torch.compile tracing)."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "meta" or is_fake(t)


def _per_expert(offsets: Tensor, rows: int) -> list:
    """Row counts per expert (one host sync; the LoRA factors and the loop fallback run per expert). Offsets
    without values (the planner's fake run) count as an even split of the `rows`: the tensors' sizes depend on
    the total only."""
    if _symbolic(offsets):
        e = offsets.shape[0] - 1
        return [rows // e + (1 if i < rows % e else 0) for i in range(e)]
    return torch.diff(offsets).tolist()


def _base_forward(x, offsets, counts, packed, absmax, nested, offset, n_out, k_in, blocksize, u, b, scaling):
    """y [T, N] = x_e @ deq(W_e)^T + scaling * u_e @ b_e^T for every expert's rows."""
    g = _grouped_ops()
    if g is not None and (n_out * k_in) % blocksize == 0:
        return torch.ops.qlora.nf4_grouped_linear(x, offsets, packed, absmax, nested, offset, n_out, k_in,
                                                  blocksize, u, b, scaling)
    # an expert whose N*K is not a multiple of blocksize has a partial last block, as a Linear weight of that
    # shape; the grouped launch needs whole blocks, so those go expert by expert through the Linear op
    ys, start = [], 0
    for e, c in enumerate(counts):
        if c:
            rows = slice(start, start + c)
            ys.append(_ops.nf4_linear(
                x[rows], packed[e], absmax[e], None if nested is None else nested[e],
                None if offset is None else offset[e], n_out, k_in, blocksize,
                None if u is None else u[rows], None if b is None else b[e], scaling, None))
        start += c
    return torch.cat(ys) if ys else x.new_empty(0, n_out)


def _base_dx(dy, offsets, counts, packed, absmax, nested, offset, n_out, k_in, blocksize, g_, a, scaling):
    """dx [T, K] = dy_e @ deq(W_e) + scaling * g_e @ a_e for every expert's rows."""
    g = _grouped_ops()
    if g is not None and (n_out * k_in) % blocksize == 0:
        return torch.ops.qlora.nf4_grouped_linear_dx(dy, offsets, packed, absmax, nested, offset, n_out, k_in,
                                                     blocksize, g_, a, scaling)
    dxs, start = [], 0
    for e, c in enumerate(counts):
        if c:
            rows = slice(start, start + c)
            dxs.append(_ops.nf4_linear_dx(
                dy[rows], packed[e], absmax[e], None if nested is None else nested[e],
                None if offset is None else offset[e], n_out, k_in, blocksize,
                None if g_ is None else g_[rows], None if a is None else a[e], scaling))
        start += c
    return torch.cat(dxs) if dxs else dy.new_empty(0, k_in)


def _rows_times(x: Tensor, w: Tensor, counts: list) -> Tensor:
    """out [T, w.shape[2]]: rows of expert e times w[e] ([E, a, b]); the rank-r LoRA factors."""
    outs, start = [], 0
    for e, c in enumerate(counts):
        if c:
            outs.append(x[start:start + c] @ w[e])
        start += c
    return torch.cat(outs) if outs else x.new_empty(0, w.shape[2])


def _outer_per_expert(p: Tensor, q: Tensor, counts: list, out_dtype) -> Tensor:
    """[E, p.shape[1], q.shape[1]]: p_e^T @ q_e per expert (zeros for an expert with no rows)."""
    out = torch.zeros(len(counts), p.shape[1], q.shape[1], dtype=p.dtype, device=p.device)
    start = 0
    for e, c in enumerate(counts):
        if c:
            out[e] = p[start:start + c].t() @ q[start:start + c]
        start += c
    return out.to(out_dtype)


class GroupedQLoRAFunction(torch.autograd.Function):
    """y [T, N] = x_e @ deq(W_e)^T + s * (x_e @ A_e^T) @ B_e^T for the rows of each expert e.

    forward(ctx, x, offsets, packed, absmax, nested_absmax, offset, lora_A, lora_B, out_features, in_features,
            blocksize, scaling)
    x [T, K] sorted by expert, offsets int64 [E+1] (expert e owns rows offsets[e]:offsets[e+1]); the NF4 tensors
    stacked per expert (module docstring); lora_A [E, r, K] / lora_B [E, N, r] in any float dtype (float32
    masters are cast to x's dtype per call, never kept) or both None.
    Gradients: x, lora_A, lora_B, each only when asked; never the NF4 tensors. Saved: x (for dA), U = x_e A_e^T
    [T, r] (for dB), offsets. No dequantized weight is saved or made outside an op call.
    """

    @staticmethod
    def forward(ctx, x, offsets, packed, absmax, nested_absmax, offset, lora_A, lora_B, out_features,
                in_features, blocksize, scaling):
        counts = _per_expert(offsets, x.shape[0])
        u = b = None
        if lora_A is not None:
            b = lora_B.to(x.dtype)
            u = _rows_times(x, lora_A.to(x.dtype).transpose(1, 2), counts)
        y = _base_forward(x, offsets, counts, packed, absmax, nested_absmax, offset, out_features, in_features,
                          blocksize, u, b, scaling)
        need_a = lora_A is not None and ctx.needs_input_grad[6]
        need_b = lora_A is not None and ctx.needs_input_grad[7]
        ctx.save_for_backward(x if need_a else None, u if need_b else None, offsets)
        ctx.weight_handles = (packed, absmax, nested_absmax, offset)
        ctx.lora = (lora_A, lora_B)
        ctx.meta = (out_features, in_features, blocksize, scaling, counts)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, u, offsets = ctx.saved_tensors
        packed, absmax, nested_absmax, offset = ctx.weight_handles
        master_A, master_B = ctx.lora
        out_features, in_features, blocksize, scaling, counts = ctx.meta
        need_x, need_a, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[6], ctx.needs_input_grad[7]
        if dy.stride(-1) != 1:
            dy = dy.contiguous()
        dx = d_a = d_b = None
        g = a = None
        if master_A is not None and (need_x or need_a):
            a = master_A.to(dy.dtype)
            g = _rows_times(dy, master_B.to(dy.dtype), counts)  # [T, r] = dy_e @ B_e
        if need_b:
            d_b = _outer_per_expert(dy, u, counts, master_B.dtype).mul_(scaling)   # s * dy_e^T U_e  [E, N, r]
        if need_a:
            d_a = _outer_per_expert(g, x, counts, master_A.dtype).mul_(scaling)    # s * G_e^T x_e   [E, r, K]
        if need_x:
            dx = _base_dx(dy, offsets, counts, packed, absmax, nested_absmax, offset, out_features, in_features,
                          blocksize, g, a, scaling)
        return dx, None, None, None, None, None, d_a, d_b, None, None, None, None


# ------------------------------------------------------------------------------------------ the layout
def _experts_attr(module: nn.Module, name: str, default):
    return getattr(module, name, default)


def check_experts_layout(name: str, module: nn.Module) -> dict:
    """The layout of a transformers `*Experts` module, or ValueError naming `name` and what was expected.

    Returns {"num_experts", "hidden", "intermediate", "transposed", "has_gate", "has_bias", "weights":
    {param name: (out_features, in_features)}}. Accepted: 3-D float parameters gate_up_proj (or up_proj
    without gating) and down_proj, [E, out, in] (`is_transposed` False: Qwen3-MoE, Mixtral, ...) or
    [E, in, out] (`is_transposed` True: GptOss), biases `<param>_bias` [E, out] when `has_bias`.
    """
    cls = type(module).__name__
    has_gate = bool(_experts_attr(module, "has_gate", isinstance(getattr(module, "gate_up_proj", None), nn.Parameter)))
    first = "gate_up_proj" if has_gate else "up_proj"
    params = {}
    for p in (first, "down_proj"):
        t = module._parameters.get(p)
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            got = "missing" if t is None else f"shape {list(t.shape)}"
            raise ValueError(f"{name} ({cls}): unsupported experts layout: expected 3-D parameters {first} and "
                             f"down_proj ([num_experts, out, in] or [num_experts, in, out]), {p} is {got}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name}.{p} ({cls}) must be float32, float16 or bfloat16 to quantize, got {t.dtype}")
        params[p] = t
    if _experts_attr(module, "has_post_expert_norm", False):
        raise ValueError(f"{name} ({cls}): unsupported experts layout: has_post_expert_norm (a norm after each "
                         "expert) is not supported; expected gate/up -> activation -> down")
    if _experts_attr(module, "_is_expert_parallel", False):
        raise ValueError(f"{name} ({cls}): expert-parallel experts (a local slice of the experts) are not "
                         "supported; expected the module to hold every expert")
    up, down = params[first], params["down_proj"]
    num_experts = up.shape[0]
    if down.shape[0] != num_experts:
        raise ValueError(f"{name} ({cls}): {first} has {num_experts} experts but down_proj {down.shape[0]}")
    transposed = _experts_attr(module, "is_transposed", None)
    if transposed is None:  # an undecorated module: [E, out, in] when the inner dims chain that way
        transposed = not (up.shape[2] == down.shape[1])
    transposed = bool(transposed)
    # [E, out, in]: up [E, U, H], down [E, H, I]; [E, in, out]: up [E, H, U], down [E, I, H]
    hidden = up.shape[1] if transposed else up.shape[2]
    inter = down.shape[1] if transposed else down.shape[2]
    u_out = up.shape[2] if transposed else up.shape[1]
    d_out = down.shape[2] if transposed else down.shape[1]
    expect_u = 2 * inter if has_gate else inter
    orient = "[E, in, out]" if transposed else "[E, out, in]"
    want_up = [num_experts, hidden, expect_u] if transposed else [num_experts, expect_u, hidden]
    want_down = [num_experts, inter, hidden] if transposed else [num_experts, hidden, inter]
    if d_out != hidden or u_out != expect_u:
        raise ValueError(
            f"{name} ({cls}): unsupported experts layout: in {orient} orientation {first} {list(up.shape)} and "
            f"down_proj {list(down.shape)} do not chain hidden {hidden} -> {expect_u} -> intermediate {inter} -> "
            f"hidden (expected {first} {want_up}, down_proj {want_down})")
    has_bias = bool(_experts_attr(module, "has_bias", False))
    if has_bias:
        for p, n_out in ((first, u_out), ("down_proj", hidden)):
            bias = module._parameters.get(p + "_bias")
            if bias is None or tuple(bias.shape) != (num_experts, n_out):
                got = "missing" if bias is None else list(bias.shape)
                raise ValueError(f"{name} ({cls}): has_bias is set but {p}_bias is {got}, expected "
                                 f"[{num_experts}, {n_out}]")
    if has_gate and not callable(getattr(module, "_apply_gate", None)) and getattr(module, "act_fn", None) is None:
        raise ValueError(f"{name} ({cls}): gated experts need the module's _apply_gate or act_fn")
    if not has_gate and getattr(module, "act_fn", None) is None:
        raise ValueError(f"{name} ({cls}): experts without gating need the module's act_fn")
    return {"num_experts": num_experts, "hidden": hidden, "intermediate": inter, "transposed": transposed,
            "has_gate": has_gate, "has_bias": has_bias,
            "weights": {first: (u_out, hidden), "down_proj": (hidden, inter)}}


def check_experts(name: str, module: nn.Module) -> dict:
    """check_experts_layout, and finite weights (ValueError naming the first expert with a NaN / inf). An
    NF4Experts without adapters (NF4Config's from_pretrained) passes: it was checked when it was quantized."""
    if isinstance(module, NF4Experts):
        return {"num_experts": module.num_experts, "hidden": module.hidden_dim,
                "intermediate": module.intermediate_dim, "transposed": module.is_transposed,
                "has_gate": module.has_gate, "has_bias": module.has_bias,
                "weights": {p: (w.out_features, w.in_features) for p, w in module.projections.items()}}
    layout = check_experts_layout(name, module)
    for p in layout["weights"]:
        t = module._parameters[p]
        if t.device.type != "meta" and not all_finite(t):
            bad = next(e for e in range(t.shape[0]) if not all_finite(t[e]))
            raise ValueError(f"{name}.{p}[{bad}] has non-finite values (NaN or inf): NF4 cannot represent them")
    return layout


def _looks_like_experts(module: nn.Module) -> bool:
    """A module holding a 3-D gate_up_proj / up_proj / down_proj parameter: an experts module to convert (or to
    refuse with a message, when the rest of its layout is not one this package knows)."""
    return not isinstance(module, NF4Experts) and any(
        isinstance(t, torch.Tensor) and t.dim() == 3 for t in (module._parameters.get(p) for p in _WEIGHT_NAMES))


def find_experts_modules(model: nn.Module) -> list:
    """Paths of the modules holding fused 3-D expert weights (a 3-D `down_proj` beside `gate_up_proj` or
    `up_proj`), the ones `prepare_model` turns into NF4Experts; NF4Experts already there are not listed."""
    return [n for n, m in model.named_modules() if n and _looks_like_experts(m)]


def experts_modules(model: nn.Module) -> dict:
    """{module path: NF4Experts} of a prepared model, in module order (paths as in `qlora_modules`)."""
    from .model import module_path, unwrap_model

    model = unwrap_model(model)
    return {module_path(n): m for n, m in model.named_modules() if isinstance(m, NF4Experts)}


# ------------------------------------------------------------------------------------ one projection
class NF4ExpertWeight(nn.Module):
    """One fused expert parameter ([E, out, in] or [E, in, out]) in NF4 per expert, with optional LoRA.

    Buffers (their dtypes are the format: `.to(dtype)` never casts them): weight_packed uint8 [E, ceil(N*K/2)],
    weight_absmax [E, nb] (uint8 codes with double quant, float32 without), weight_nested_absmax float32
    [E, ceil(nb/256)] or None, weight_offset float32 [E] or None.
    Parameters (when r > 0): lora_A [E, r, in], lora_B [E, out, r] (B = 0 at start: a no-op).
    """

    def __init__(self, num_experts: int, out_features: int, in_features: int, *, transposed: bool,
                 dtype: torch.dtype, blocksize: int, packed: Tensor, absmax: Tensor,
                 nested_absmax: Optional[Tensor], offset: Optional[Tensor], r: int = 0, alpha: float = 16,
                 use_rslora: bool = False, adapter_dtype: Optional[torch.dtype] = torch.float32):
        super().__init__()
        self.num_experts, self.out_features, self.in_features = num_experts, out_features, in_features
        self.transposed, self.weight_dtype, self.blocksize = bool(transposed), dtype, blocksize
        for n, t in zip(_NF4_BUFFERS, (packed, absmax, nested_absmax, offset)):
            self.register_buffer(n, t, persistent=False)
        self.r, self.lora_alpha, self.use_rslora = r, float(alpha), bool(use_rslora)
        self.scaling = _scaling(self.lora_alpha, r, self.use_rslora) if r else 0.0
        if r:
            factory = dict(device=packed.device, dtype=adapter_dtype or dtype)
            self.lora_A = nn.Parameter(torch.empty(num_experts, r, in_features, **factory))
            self.lora_B = nn.Parameter(torch.zeros(num_experts, out_features, r, **factory))
            self.reset_lora_parameters()
        else:
            self.register_parameter("lora_A", None)
            self.register_parameter("lora_B", None)

    @classmethod
    def quantize(cls, param: Tensor, *, transposed: bool, blocksize: int = 64, double_quant: bool = True,
                 name: str = "param", **lora) -> "NF4ExpertWeight":
        """Quantize a 3-D expert parameter one expert at a time (expert e's [out, in] matrix exactly as
        `quantize_nf4` of a Linear weight of that shape); only one expert's codes are made at a time."""
        num_experts = param.shape[0]
        n_out, k_in = (param.shape[2], param.shape[1]) if transposed else (param.shape[1], param.shape[2])
        parts = [_quantize_expert(param[e], transposed, blocksize, double_quant, f"{name}[{e}]")
                 for e in range(num_experts)]
        return cls.from_experts(parts, n_out, k_in, transposed=transposed, dtype=param.dtype,
                                blocksize=blocksize, **lora)

    @classmethod
    def from_experts(cls, parts: list, out_features: int, in_features: int, *, transposed: bool, dtype,
                     blocksize: int, **lora) -> "NF4ExpertWeight":
        """Stack per-expert NF4Weights ([out, in] each) into one module."""
        stack = lambda ts: torch.stack([t.reshape(-1) for t in ts])  # noqa: E731
        packed = stack([p.packed for p in parts])
        absmax = stack([p.absmax for p in parts])
        nested = offset = None
        if parts[0].double_quant:
            nested = stack([p.nested_absmax for p in parts])
            offset = torch.stack([p.offset.reshape(()) for p in parts])
        return cls(len(parts), out_features, in_features, transposed=transposed, dtype=dtype, blocksize=blocksize,
                   packed=packed, absmax=absmax, nested_absmax=nested, offset=offset, **lora)

    def add_lora(self, r: int, alpha: float, use_rslora: bool, adapter_dtype: Optional[torch.dtype]) -> None:
        """Give a projection without adapters (r = 0: NF4Config's from_pretrained) fresh LoRA factors on its
        device (A as PEFT's init, B = 0); the NF4 bytes are kept as they are."""
        if self.r:
            raise ValueError(f"this expert projection already has LoRA (r={self.r})")
        factory = dict(device=self.weight_packed.device, dtype=adapter_dtype or self.weight_dtype)
        self.r, self.lora_alpha, self.use_rslora = r, float(alpha), bool(use_rslora)
        self.scaling = _scaling(self.lora_alpha, r, self.use_rslora)
        self.lora_A = nn.Parameter(torch.empty(self.num_experts, r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.num_experts, self.out_features, r, **factory))
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A as PEFT's nn.Linear(in, r * E) init (kaiming uniform, a = sqrt(5): bound 1 / sqrt(in)), B zeros."""
        if self.lora_A is not None:
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.lora_A.view(-1, self.in_features), a=math.sqrt(5))
                self.lora_B.zero_()

    def nf4_tensors(self) -> tuple:
        return self.weight_packed, self.weight_absmax, self.weight_nested_absmax, self.weight_offset

    @property
    def numel(self) -> int:
        """Logical elements of the expert weights (E * out * in)."""
        return self.num_experts * self.out_features * self.in_features

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.nf4_tensors() if t is not None)

    def expert_weight(self, e: int):
        """Expert e's NF4Weight [out, in] (a view of the stacked buffers)."""
        from .weight import NF4Weight

        packed, absmax, nested, offset = self.nf4_tensors()
        return NF4Weight(packed[e], absmax[e], shape=(self.out_features, self.in_features), dtype=self.weight_dtype,
                         blocksize=self.blocksize, nested_absmax=None if nested is None else nested[e],
                         offset=None if offset is None else offset[e])

    def dense(self, dtype: Optional[torch.dtype] = None, merge: bool = False) -> Tensor:
        """The model's 3-D parameter (its orientation) in `dtype` (default the original): deq(W_e), plus
        s * B_e @ A_e with `merge`, computed in float32 and rounded once. Export only: it materializes every
        expert, which training never does."""
        dtype = dtype or self.weight_dtype
        out = []
        with torch.no_grad():
            for e in range(self.num_experts):
                w = self.expert_weight(e).dequantize(torch.float32)
                if merge and self.lora_A is not None:
                    w += self.scaling * (self.lora_B[e].float() @ self.lora_A[e].float())
                out.append((w.t() if self.transposed else w).to(dtype))
        return torch.stack(out)

    def forward(self, x: Tensor, offsets: Tensor) -> Tensor:
        """y [T, out] for x [T, in] grouped by expert (offsets int64 [E+1])."""
        return GroupedQLoRAFunction.apply(x, offsets, *self.nf4_tensors(), self.lora_A, self.lora_B,
                                          self.out_features, self.in_features, self.blocksize, self.scaling)

    # PEFT's ParamWrapper stores one nn.Linear pair per parameter (module docstring)
    def peft_lora_A(self) -> Tensor:
        """lora_A.weight as PEFT stores it: [r * E, in]."""
        return self.lora_A.detach().reshape(self.num_experts * self.r, self.in_features)

    def peft_lora_B(self) -> Tensor:
        """lora_B.weight as PEFT stores it: [out, r * E], expert e in columns j * E + e."""
        return self.lora_B.detach().permute(1, 2, 0).reshape(self.out_features, self.r * self.num_experts)

    def load_peft_lora(self, a: Tensor, b: Tensor, name: str = "") -> None:
        """Set lora_A / lora_B from PEFT's [r * E, in] / [out, r * E] tensors."""
        e, r = self.num_experts, self.r
        want_a, want_b = (r * e, self.in_features), (self.out_features, r * e)
        if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
            raise ValueError(f"shape mismatch for {name!r}: adapter lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}; "
                             f"the model's {e} experts [{self.out_features}, {self.in_features}] at r={r} need "
                             f"lora_A {want_a}, lora_B {want_b}")
        with torch.no_grad():
            self.lora_A.copy_(a.reshape(e, r, self.in_features))
            self.lora_B.copy_(b.reshape(self.out_features, r, e).permute(2, 0, 1))

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() would cast the float32 scales: the NF4 buffers take only fn's device part
        saved = {n: self._buffers.pop(n) for n in _NF4_BUFFERS if n in self._buffers}
        try:
            super()._apply(fn, recurse)
        finally:
            for n, t in saved.items():
                if t is not None:
                    moved = fn(t)
                    t = moved if moved.dtype == t.dtype else t.to(moved.device)
                self._buffers[n] = t
        packed = self._buffers.get("weight_packed")
        if isinstance(packed, Tensor) and packed.device.type != "meta":
            prepare_device(packed.device)
        return self

    # state dict: the stacked NF4 tensors under `<param>.weight*` keys, with a JSON quant state
    def quant_state_json(self) -> dict:
        return {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": DTYPE_NAMES[self.weight_dtype],
                "shape": [self.num_experts, self.out_features, self.in_features], "transposed": self.transposed,
                "double_quant": self.weight_nested_absmax is not None, "nested_blocksize": NESTED_BLOCKSIZE}

    def nf4_state_dict(self, prefix: str) -> dict:
        """{prefix + "weight": packed, ".weight.absmax", [".weight.nested_absmax", ".weight.offset"],
        ".weight.quant_state.qlora_experts_nf4": JSON bytes}."""
        packed, absmax, nested, offset = self.nf4_tensors()
        sd = {prefix + "weight": packed, prefix + "weight.absmax": absmax}
        if nested is not None:
            sd[prefix + "weight.nested_absmax"] = nested
            sd[prefix + "weight.offset"] = offset
        blob = json.dumps(self.quant_state_json()).encode("utf-8")
        sd[prefix + "weight." + EXPERTS_QUANT_STATE_KEY] = torch.tensor(list(blob), dtype=torch.uint8)
        return sd

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for k, t in self.nf4_state_dict(prefix).items():
            destination[k] = t if keep_vars else t.detach()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        wkey = prefix + "weight"
        own = {k: v for k, v in state_dict.items() if k == wkey or k.startswith(wkey + ".")}
        rest = {k: v for k, v in state_dict.items() if k not in own}
        if wkey not in own:
            missing_keys.append(wkey)
        else:
            try:
                self._load_nf4(own, wkey)
            except (KeyError, ValueError, TypeError) as exc:
                error_msgs.append(f"{wkey}: {exc}")
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _load_nf4(self, sd: dict, wkey: str) -> None:
        state = json.loads(bytes(sd[wkey + "." + EXPERTS_QUANT_STATE_KEY].tolist()).decode("utf-8"))
        shape = [self.num_experts, self.out_features, self.in_features]
        if state.get("shape") != shape or bool(state.get("transposed")) != self.transposed:
            raise ValueError(f"NF4 experts of shape {state.get('shape')} (transposed={state.get('transposed')}), "
                             f"this module is {shape} (transposed={self.transposed})")
        dev = self.weight_packed.device
        if dev.type == "meta":  # a skeleton (NF4Config's load of a saved model): the bytes stay where they are
            dev = sd[wkey].device
        packed = sd[wkey].to(dev)
        absmax = sd[wkey + ".absmax"].to(dev)
        nested = sd.get(wkey + ".nested_absmax")
        offset = sd.get(wkey + ".offset")
        n = self.out_features * self.in_features
        nb = num_blocks(n, int(state["blocksize"]))
        if tuple(packed.shape) != (self.num_experts, (n + 1) // 2) or absmax.shape[-1] != nb:
            raise ValueError(f"packed {list(packed.shape)} / absmax {list(absmax.shape)} do not fit {shape} at "
                             f"blocksize {state['blocksize']}")
        if (nested is None) != (offset is None):
            raise ValueError("nested_absmax and offset must come together")
        for n_, t in zip(_NF4_BUFFERS, (packed, absmax, None if nested is None else nested.to(dev),
                                        None if offset is None else offset.to(dev))):
            self._buffers[n_] = t
        self.blocksize = int(state["blocksize"])
        self.weight_dtype = DTYPE_FROM_NAME[state["dtype"]]

    def extra_repr(self) -> str:
        orient = "[E, in, out]" if self.transposed else "[E, out, in]"
        bits = 8.0 * self.nbytes / max(1, self.numel)
        return (f"experts={self.num_experts}, out_features={self.out_features}, in_features={self.in_features}, "
                f"stored {orient}, nf4(blocksize={self.blocksize}, {bits:.3f} bits/param), r={self.r}, "
                f"alpha={self.lora_alpha:g}, scaling={self.scaling:g}")


def _quantize_expert(w: Tensor, transposed: bool, blocksize: int, double_quant: bool, name: str):
    if w.device.type != "meta" and not all_finite(w):
        raise ValueError(f"{name} has non-finite values (NaN or inf): NF4 cannot represent them")
    return quantize_nf4((w.t() if transposed else w).contiguous(), blocksize=blocksize, double_quant=double_quant)


# --------------------------------------------------------------------------------------- the module
class NF4Experts(nn.Module):
    """Drop-in for a transformers `*Experts` module: forward(hidden_states [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H] in hidden_states' dtype, the replaced module's routing contract.

    Submodules named like the replaced parameters (`gate_up_proj` or `up_proj`, `down_proj`) are
    NF4ExpertWeight; biases (GptOss) stay frozen parameters `<name>_bias`; the activation (`act_fn`), the
    gate (`_apply_gate` of the replaced class) and its scalar settings (GptOss alpha / limit) are the model's.
    """

    def __init__(self, experts: nn.Module, name: str = "experts", *, targets: Iterable[str] = ("all",),
                 r: int = 16, alpha: float = 16, use_rslora: bool = False, blocksize: int = 64,
                 double_quant: bool = True, adapter_dtype: Optional[torch.dtype] = torch.float32):
        super().__init__()
        layout = check_experts_layout(name, experts)
        self.num_experts = layout["num_experts"]
        self.hidden_dim, self.intermediate_dim = layout["hidden"], layout["intermediate"]
        self.is_transposed, self.has_gate, self.has_bias = layout["transposed"], layout["has_gate"], layout["has_bias"]
        self.source_class = type(experts).__name__
        self._gate_fn = getattr(type(experts), "_apply_gate", None)
        for k, v in vars(experts).items():  # the gate's scalar settings (GptOss alpha, limit), config
            if not k.startswith("_") and isinstance(v, (bool, int, float)) and not hasattr(self, k):
                setattr(self, k, v)
        if getattr(experts, "act_fn", None) is not None:
            self.act_fn = experts.act_fn
        targets = set(targets)
        self.weight_names = list(layout["weights"])
        for p in self.weight_names:
            lora = dict(r=r, alpha=alpha, use_rslora=use_rslora, adapter_dtype=adapter_dtype) \
                if ("all" in targets or p in targets) else {}
            param = experts._parameters[p]
            if param.device.type == "meta":  # load_pretrained fills it expert by expert
                mod = _empty_expert_weight(param.shape[0], *layout["weights"][p], transposed=self.is_transposed,
                                           device="meta",
                                           dtype=param.dtype, blocksize=blocksize, double_quant=double_quant,
                                           **lora)
            else:
                mod = NF4ExpertWeight.quantize(param.detach(), transposed=self.is_transposed, blocksize=blocksize,
                                               double_quant=double_quant, name=f"{name}.{p}", **lora)
            self.add_module(p, mod)
            if self.has_bias:
                b = experts._parameters[p + "_bias"]
                self.register_parameter(p + "_bias", nn.Parameter(b.detach().clone(), requires_grad=False))
        self.train(experts.training)
        # the replaced module, emptied (its weights on meta, not registered: not in the state dict), to give
        # merge_and_unload back the model's own class
        for p in list(experts._parameters):
            t = experts._parameters[p]
            if t is not None and (p in layout["weights"] or p.removesuffix("_bias") in layout["weights"]):
                experts._parameters[p] = nn.Parameter(t.detach().to("meta"), requires_grad=False)
        self._shell = [experts]

    def unquantized(self, dtype: Optional[torch.dtype] = None, merge: bool = True) -> nn.Module:
        """The replaced transformers module with dense weights again (LoRA folded in with `merge`), on this
        module's device: what merge_and_unload puts back."""
        experts = self._shell[0]
        for p, t in self.dense_parameters(dtype, merge=merge).items():
            experts._parameters[p] = nn.Parameter(t, requires_grad=False)
        experts.train(self.training)
        return experts

    @property
    def projections(self) -> dict:
        """{parameter name: NF4ExpertWeight}, in the replaced module's parameter order."""
        return {p: getattr(self, p) for p in self.weight_names}

    def _gate(self, h: Tensor) -> Tensor:
        if not self.has_gate:
            return self.act_fn(h)
        if self._gate_fn is not None:
            return self._gate_fn(self, h)
        gate, up = h.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def _project(self, p: str, x: Tensor, offsets: Tensor, ids: Tensor) -> Tensor:
        y = getattr(self, p)(x, offsets)
        if self.has_bias:
            y = y + getattr(self, p + "_bias")[ids].to(y.dtype)
        return y

    def forward(self, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        num_tokens, hidden = hidden_states.shape
        k = top_k_index.shape[-1]
        expert_ids = top_k_index.reshape(-1)
        weights = top_k_weights.reshape(-1)
        ids, perm = torch.sort(expert_ids, stable=True)
        # ids >= num_experts (transformers' expert-parallel sentinel) route nowhere: their rows get no output
        # a static-shape count (bincount's size depends on the values): also runs on fake tensors
        counts = torch.zeros(self.num_experts + 1, dtype=torch.int64, device=ids.device).scatter_add_(
            0, ids.clamp(max=self.num_experts), torch.ones_like(ids))[:self.num_experts]
        offsets = torch.zeros(self.num_experts + 1, dtype=torch.int64, device=ids.device)
        torch.cumsum(counts, 0, out=offsets[1:])
        routed = ids.numel() if _symbolic(offsets) else int(offsets[-1])
        if routed != ids.numel():
            ids, perm = ids[:routed], perm[:routed]
        x = hidden_states[perm // k]
        names = self.weight_names
        h = self._gate(self._project(names[0], x, offsets, ids))
        out = self._project(names[1], h, offsets, ids) * weights[perm].unsqueeze(-1).to(h.dtype)
        final = torch.zeros(num_tokens * k, hidden, dtype=out.dtype, device=out.device)
        final = final.index_copy(0, perm, out)  # back to (token, slot) order, then the sum over the k slots
        return final.view(num_tokens, k, hidden).sum(dim=1).to(hidden_states.dtype)

    def dense_parameters(self, dtype: Optional[torch.dtype] = None, merge: bool = False) -> dict:
        """{parameter name: the model's dense 3-D tensor} (biases included, in `dtype`), LoRA folded in with
        `merge`: what the replaced module's state dict held."""
        out = {}
        for p, mod in self.projections.items():
            out[p] = mod.dense(dtype, merge=merge)
            if self.has_bias:
                b = getattr(self, p + "_bias").detach()
                out[p + "_bias"] = b.to(dtype) if dtype else b.clone()
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, from {self.source_class}, has_bias={self.has_bias}"


def _empty_expert_weight(num_experts, n_out, k_in, *, transposed, dtype, blocksize, double_quant, device, **lora):
    """An NF4ExpertWeight with buffers of the right shapes on `device` (meta: the planner's model, and the
    loader's skeleton, which `to_empty` then fills expert by expert)."""
    n = n_out * k_in
    nb = num_blocks(n, blocksize)
    packed = torch.empty(num_experts, (n + 1) // 2, dtype=torch.uint8, device=device)
    absmax = torch.empty(num_experts, nb, dtype=torch.uint8 if double_quant else torch.float32, device=device)
    nested = torch.empty(num_experts, num_blocks(nb, NESTED_BLOCKSIZE), device=device) if double_quant else None
    offset = torch.empty(num_experts, device=device) if double_quant else None
    return NF4ExpertWeight(num_experts, n_out, k_in, transposed=transposed, dtype=dtype, blocksize=blocksize,
                           packed=packed, absmax=absmax, nested_absmax=nested, offset=offset, **lora)


def replace_experts(model: nn.Module, names: Iterable[str], targets: dict, *, r: int, alpha: float,
                    use_rslora: bool, blocksize: int, double_quant: bool,
                    adapter_dtype: Optional[torch.dtype]) -> list:
    """Swap each module in `names` for an NF4Experts (in place); targets: {path: parameter names with LoRA}.
    Every module is checked before any is swapped. Returns the paths."""
    check_lora_args(r, alpha, 0.0, adapter_dtype)
    names = list(names)
    for n in names:
        check_experts(n, model.get_submodule(n))
    for n in names:
        parent_name, _, child = n.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        if isinstance(old, NF4Experts):  # NF4 already, without adapters: its bytes as they are, LoRA added
            want = set(targets.get(n, ("all",)))
            for p, w in old.projections.items():
                if "all" in want or p in want:
                    w.add_lora(r, alpha, use_rslora, adapter_dtype)
            continue
        setattr(parent, child, NF4Experts(old, n, targets=targets.get(n, ("all",)), r=r, alpha=alpha,
                                          use_rslora=use_rslora, blocksize=blocksize, double_quant=double_quant,
                                          adapter_dtype=adapter_dtype))
        del old
    return names


def match_target_parameters(model: nn.Module, target_parameters: Iterable[str]) -> dict:
    """{experts module path: [parameter names]} for PEFT-style `target_parameters` ("<module path>.<param>",
    matching a full "path.param" or its suffix after a dot, as LoraConfig does). Raises ValueError for an
    entry that matches no expert weight."""
    if isinstance(target_parameters, str):
        target_parameters = [target_parameters]
    wanted = list(target_parameters)
    hits, used = {}, set()
    for n, m in model.named_modules():
        if not n or not (_looks_like_experts(m) or isinstance(m, NF4Experts)):
            continue
        own = m.weight_names if isinstance(m, NF4Experts) else \
            [p for p in _WEIGHT_NAMES if isinstance(m._parameters.get(p), torch.Tensor)]
        for p in own:
            key = f"{n}.{p}"
            for t in wanted:
                if key == t or key.endswith("." + t):
                    hits.setdefault(n, [])
                    if p not in hits[n]:
                        hits[n].append(p)
                    used.add(t)
    missing = [t for t in wanted if t not in used]
    if missing:
        raise ValueError(f"target_parameters {missing} match no fused expert weight (a 3-D gate_up_proj / up_proj "
                         f"/ down_proj of an experts module); experts modules: "
                         f"{find_experts_modules(model)[:4] or 'none'}")
    return hits


def peft_param_keys(module_path: str, names: list) -> dict:
    """{parameter name: the prefix PEFT's nested ParamWrappers give its adapter}: PEFT wraps the targeted
    parameters of one module in their registration order, the first innermost, so with n targets the i-th
    (0-based) sits under (n - 1 - i) `base_layer.` segments."""
    n = len(names)
    return {p: module_path + "." + "base_layer." * (n - 1 - i) for i, p in enumerate(names)}


def select_experts(model: nn.Module, target_modules, target_parameters, exclude_modules=()) -> dict:
    """{experts module path: [parameter names that get LoRA]} that prepare_model turns into NF4Experts.

    target_parameters (PEFT's LoraConfig option) selects expert weights explicitly; without it,
    "all-linear" takes every fused experts module (all the big matmuls), and a name list / regex takes the
    experts modules whose path it matches (as for Linear modules). exclude_modules removes modules (names by
    the suffix rule, a str as a regex). NF4Experts without any adapter (NF4Config's from_pretrained) are
    selected like the dense module (they get LoRA, their bytes as they are); NF4Experts with adapters (a model
    prepared earlier) are left alone.
    """
    from .model import _name_matches

    if isinstance(exclude_modules, str):
        import re

        pat = re.compile(exclude_modules)
        excluded = lambda n: pat.fullmatch(n) is not None  # noqa: E731
    else:
        ex = list(exclude_modules)
        excluded = lambda n: any(_name_matches(n, e) for e in ex)  # noqa: E731
    def bare(n):
        m = model.get_submodule(n)
        return not isinstance(m, NF4Experts) or all(w.r == 0 for w in m.projections.values())

    if target_parameters is not None:
        hits = match_target_parameters(model, target_parameters)
        return {n: ps for n, ps in hits.items() if bare(n) and not excluded(n)}
    found = [n for n, m in model.named_modules()
             if n and (_looks_like_experts(m) or (isinstance(m, NF4Experts) and bare(n)))]
    if target_modules == "all-linear":
        chosen = found
    elif isinstance(target_modules, str):
        import re

        chosen = [n for n in found if re.fullmatch(target_modules, n)]
    else:
        chosen = [n for n in found if any(_name_matches(n, t) for t in target_modules)]
    return {n: ["all"] for n in chosen if not excluded(n)}


# ------------------------------------------------------------------------------ streaming from checkpoints
def _per_expert_sources(path: str, proj: str) -> list:
    """Checkpoint key templates ({e}: the expert) of one fused parameter in the per-expert (2-D) layouts
    transformers' conversion merges (conversion_mapping.py): Qwen2/3-MoE style gate_proj / up_proj /
    down_proj, and Mixtral's w1 / w3 / w2 under `block_sparse_moe`. Each entry lists the keys concatenated on
    dim 0 (gate then up)."""
    mixtral = path.replace(".mlp.experts", ".block_sparse_moe.experts")
    if proj == "gate_up_proj":
        return [[path + ".{e}.gate_proj.weight", path + ".{e}.up_proj.weight"],
                [mixtral + ".{e}.w1.weight", mixtral + ".{e}.w3.weight"]]
    if proj == "up_proj":
        return [[path + ".{e}.up_proj.weight"], [mixtral + ".{e}.w3.weight"]]
    return [[path + ".{e}.down_proj.weight"], [mixtral + ".{e}.w2.weight"]]


def checkpoint_keys(path: str, module: "NF4Experts", keys) -> dict:
    """{parameter name: ("fused", key) | ("nf4", weight key) | ("experts", [[key per part] per expert])} for
    each projection of `module` (at `path`) found in the checkpoint's `keys`. Raises ValueError naming what
    is missing."""
    keys = set(keys)
    out = {}
    for proj in module.weight_names:
        fused = f"{path}.{proj}"
        if fused + ".weight." + EXPERTS_QUANT_STATE_KEY in keys:
            wkey = fused + ".weight"
            out[proj] = ("nf4", [k for k in sorted(keys) if k == wkey or k.startswith(wkey + ".")])
            continue
        if fused in keys:
            out[proj] = ("fused", fused)
            continue
        for templates in _per_expert_sources(path, proj):
            per = [[t.format(e=e) for t in templates] for e in range(module.num_experts)]
            if all(k in keys for ks in per for k in ks):
                out[proj] = ("experts", per)
                break
        else:
            raise ValueError(f"the checkpoint has no tensor for {fused} (looked for {fused!r}, its NF4 keys, and "
                             f"per-expert keys such as {_per_expert_sources(path, proj)[0][0].format(e=0)!r})")
    return out


def load_experts(module: "NF4Experts", path: str, sources: dict, read, read_slice, device, blocksize: int,
                 double_quant: bool) -> None:
    """Fill `module`'s NF4 buffers from a checkpoint, one expert matrix at a time: `read(key)` gives a tensor,
    `read_slice(key, e)` expert e of a 3-D tensor (host memory: one expert's matrix, not the stacked tensor).
    Each expert is quantized on `device` exactly as `quantize_nf4` of its [out, in] matrix; an NF4 checkpoint
    written by save_pretrained keeps its bytes."""
    for proj, (kind, src) in sources.items():
        w = getattr(module, proj)
        if kind == "nf4":
            wkey = f"{path}.{proj}.weight"
            w._load_nf4({"weight" + k[len(wkey):]: read(k) for k in src}, "weight")
            w.to(device)
            continue
        packed, absmax, nested, offset = w.nf4_tensors()
        for e in range(module.num_experts):
            if kind == "fused":
                m = read_slice(src, e)
                shape = (w.in_features, w.out_features) if w.transposed else (w.out_features, w.in_features)
                if tuple(m.shape) != shape:
                    raise ValueError(f"tensor {src!r} expert {e} has shape {list(m.shape)}, config.json gives "
                                     f"{list(shape)}")
                m = m.to(device)
                transposed = w.transposed
            else:
                m = torch.cat([read(k).to(device) for k in src[e]]) if len(src[e]) > 1 else read(src[e][0]).to(device)
                transposed = False  # per-expert nn.Linear weights are [out, in]
                if tuple(m.shape) != (w.out_features, w.in_features):
                    raise ValueError(f"tensors {src[e]} give expert {e} shape {list(m.shape)}, config.json gives "
                                     f"{[w.out_features, w.in_features]}")
            q = _quantize_expert(m, transposed, blocksize, double_quant, f"{path}.{proj}[{e}]")
            del m
            # written into the buffers made for the skeleton: no second copy of the stacked codes
            packed[e].copy_(q.packed.view(-1))
            absmax[e].copy_(q.absmax)
            if nested is not None:
                nested[e].copy_(q.nested_absmax)
                offset[e].copy_(q.offset)



def replace_for_loading(model: nn.Module, keys, opts: dict, device) -> dict:
    """load_pretrained's step on the meta skeleton: swap the target experts modules for NF4Experts (zero NF4
    buffers and fresh LoRA on `device`) and find their checkpoint keys. Returns {path: sources} for
    `load_experts`."""
    targets = select_experts(model, opts["target_modules"], opts.get("target_parameters"), opts["exclude_modules"])
    replace_experts(model, targets, targets, r=opts["r"], alpha=opts["alpha"], use_rslora=opts["use_rslora"],
                    blocksize=opts["blocksize"], double_quant=opts["double_quant"],
                    adapter_dtype=opts["adapter_dtype"])
    out = {}
    for path in targets:
        module = model.get_submodule(path)
        for w in module.projections.values():  # every byte of the buffers is written by load_experts
            w.to_empty(device=device)
            w.reset_lora_parameters()
        out[path] = checkpoint_keys(path, module, keys)
    return out


def source_keys(sources: dict) -> list:
    """Every checkpoint key `load_experts` reads for one module's sources."""
    out = []
    for kind, src in sources.values():
        if kind == "experts":
            out += [k for ks in src for k in ks]
        elif kind == "nf4":
            out += list(src)
        else:
            out.append(src)
    return out


def refuse_peft_target_parameters(model: nn.Module, config) -> None:
    """PEFT's `LoraConfig(target_parameters=[...])` on a model with NF4Experts: ValueError naming the module.

    PEFT's ParamWrapper adds its delta to the dense 3-D parameter (`module.gate_up_proj` as a tensor) and runs
    the model's own experts forward; NF4Experts holds NF4 bytes per expert, not that parameter, so PEFT would
    find no parameter to wrap (its error says only that nothing matched). The per-expert LoRA in PEFT's format
    is this package's: NF4Experts' own lora_A / lora_B, saved by save_adapter as PEFT's target_parameters adapter.
    """
    wanted = getattr(config, "target_parameters", None)
    if not wanted:
        return
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    for n, m in model.named_modules():
        if not isinstance(m, NF4Experts):
            continue
        for p in m.weight_names:
            key = f"{n}.{p}"
            hit = next((t for t in wanted if key == t or key.endswith("." + t)), None)
            if hit is not None:
                raise ValueError(
                    f"LoraConfig(target_parameters=[{hit!r}, ...]): {key} is a weight of an NF4Experts module "
                    f"({m.source_class}, quantized per expert by qlora_kernels), which PEFT's ParamWrapper cannot "
                    "wrap (it needs the dense 3-D parameter). Train expert LoRA with qlora_kernels instead: "
                    "qlora_kernels.prepare_model(model, target_modules=[...], target_parameters=[...]) on this "
                    "model (NF4 bytes kept) or qlora_kernels.load_pretrained(path, target_parameters=[...]) adds "
                    "per-expert LoRA in PEFT's layout, "
                    "qlora_kernels.save_adapter writes it as a PEFT target_parameters adapter that "
                    "peft.PeftModel.from_pretrained loads on the dense model, and qlora_kernels.load_adapter loads "
                    "PEFT's back.")
