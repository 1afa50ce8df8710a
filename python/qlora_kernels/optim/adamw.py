"""AdamW with fused native update kernels: 8-bit blockwise states (AdamW8bit), paged states (PagedAdamW,
PagedAdamW32bit, PagedAdamW8bit).

Semantics are torch.optim.AdamW's (decoupled weight decay, bias correction, param groups, LR schedulers,
closures, zero_grad, state_dict / load_state_dict; resuming from a state dict continues the same trajectory
bit for bit). Not supported: maximize, amsgrad, sparse gradients.

Per tensor and step one pass of a native kernel: dequantize the states, update in float32, write the
parameter in its dtype, requantize. In eager mode all tensors of a parameter group go in one call
(_ops.adamw_steps); traced by torch.compile, each through qlora::adamw8bit_step / qlora::adamw32bit_step.
The 8-bit step writes its update in bitsandbytes' blockwise form, p -= (lr * bc2 / bc1) * m / (sqrt(v) +
eps * bc2) (one division per value); the 32-bit step in torch.optim.AdamW's, p -= (lr / bc1) * m / (sqrt(v) /
bc2 + eps): the same algebra, rounded differently (optim/reference.py). State keys (bitsandbytes' names):
    8-bit  (tensors with >= min_8bit_size elements): state1, state2 uint8 codes (shape of the parameter),
           absmax1, absmax2 float32 [ceil(n / 256)]
    32-bit (smaller tensors, and the 32-bit optimizers): state1, state2 float32 (shape of the parameter)
    step, skipped: int64 [] on the parameter's device
Non-finite gradients: a gradient holding NaN, inf or |g| >= 2^63 skips that tensor's step (parameter, states
and step unchanged) and adds 1 to its `skipped` counter; `skipped_steps()` sums them. Decided on the device,
without a host synchronization.
"""

from __future__ import annotations

from itertools import chain

import torch

from .. import _ops
from ._format import MIN_8BIT_SIZE, num_state_blocks
from .paged import managed_zeros_or_none, paging_available, prefetch

_PARAM_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_STATE_KEYS = ("state1", "state2", "absmax1", "absmax2", "step", "skipped")


def _check_hyper(lr, betas, eps, weight_decay) -> None:
    lr = float(lr)
    if not 0.0 <= lr < float("inf"):
        raise ValueError(f"lr must be a finite number >= 0, got {lr}")
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    for i, b in enumerate(betas):
        if not 0.0 <= float(b) < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {b}")
    if not 0.0 <= float(eps) < float("inf"):
        raise ValueError(f"eps must be a finite number >= 0, got {eps}")
    if not 0.0 <= float(weight_decay) < float("inf"):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")


try:
    from torch.distributed.tensor import DTensor as _DTENSOR
except ImportError:  # torch built without distributed
    _DTENSOR = None


def _local_param(p: torch.Tensor) -> torch.Tensor:
    """The tensor the kernels update: the parameter, or a DTensor parameter's local shard (FSDP2). Each rank
    then keeps states for its own shard only (8-bit blocks counted from the shard's first element)."""
    return p.to_local() if _DTENSOR is not None and isinstance(p, _DTENSOR) else p


def _local_grad(p: torch.Tensor) -> torch.Tensor:
    """p.grad as _local_param(p) sees it: a DTensor parameter's gradient must be laid out like the parameter
    (FSDP2 reduce-scatters it so); its local shard is then the shard's gradient."""
    if _DTENSOR is None or not isinstance(p, _DTENSOR):
        return p.grad
    if not isinstance(p.grad, _DTENSOR) or p.grad.placements != p.placements or p.grad.shape != p.shape:
        got = f"{type(p.grad).__name__} {getattr(p.grad, 'placements', '')} {tuple(p.grad.shape)}"
        raise RuntimeError(f"a DTensor parameter {p.placements} {tuple(p.shape)} needs a gradient with the same "
                           f"placements and shape, got {got}")
    return p.grad.to_local()


class _FusedAdamW(torch.optim.Optimizer):
    """Shared implementation; the public classes fix the state width and paging."""

    _optim_bits = 8
    _paged = False

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        min_8bit_size: int = MIN_8BIT_SIZE,
        maximize: bool = False,
        amsgrad: bool = False,
    ):
        _check_hyper(lr, betas, eps, weight_decay)
        if maximize:
            raise ValueError("maximize=True is not supported by qlora_kernels.optim (minimize the negated loss)")
        if amsgrad:
            raise ValueError("amsgrad=True is not supported by qlora_kernels.optim")
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be an int >= 0, got {min_8bit_size!r}")
        self.min_8bit_size = min_8bit_size
        self._managed_storages: set = set()  # data_ptr of every state storage allocated in managed memory
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group, but a parameter listed twice in a group is an error (torch only warns): the
        group's tensors go to one native call whose threads would update the same memory at once."""
        super().add_param_group(param_group)
        params = self.param_groups[-1]["params"]
        if len({id(p) for p in params}) != len(params):
            self.param_groups.pop()
            raise ValueError("a parameter appears more than once in a parameter group")

    # ------------------------------------------------------------------------------------------ states
    def _uses_8bit(self, p: torch.Tensor) -> bool:
        return self._optim_bits == 8 and p.numel() >= self.min_8bit_size

    def _zeros(self, shape, dtype, device) -> torch.Tensor:
        if self._paged and paging_available(device):
            # None: over the free-memory guard (paged.py); the state goes to device memory, warned once
            t = managed_zeros_or_none(shape, dtype, device)
            if t is not None:
                self._managed_storages.add(t.untyped_storage().data_ptr())
                return t
        return torch.zeros(shape, dtype=dtype, device=device)

    def _new_state(self, p: torch.Tensor) -> dict:
        dev = p.device
        state = {"step": torch.zeros((), dtype=torch.int64, device=dev),
                 "skipped": torch.zeros((), dtype=torch.int64, device=dev)}
        if self._uses_8bit(p):
            nb = num_state_blocks(p.numel())
            # codes 0 with absmax 0 read back as zeros (bitsandbytes initialises them the same way)
            state["state1"] = self._zeros(p.shape, torch.uint8, dev)
            state["state2"] = self._zeros(p.shape, torch.uint8, dev)
            state["absmax1"] = self._zeros((nb,), torch.float32, dev)
            state["absmax2"] = self._zeros((nb,), torch.float32, dev)
        else:
            state["state1"] = self._zeros(p.shape, torch.float32, dev)
            state["state2"] = self._zeros(p.shape, torch.float32, dev)
        return state

    def _state_tensors(self, state: dict):
        return [state[k] for k in ("state1", "state2", "absmax1", "absmax2") if k in state]

    # ------------------------------------------------------------------------------------------ step
    @torch.no_grad()
    def step(self, closure=None):
        """One AdamW step over every parameter with a gradient. Returns closure()'s loss when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            lr, beta1, beta2, eps, wd = float(lr), float(beta1), float(beta2), float(eps), float(wd)
            _check_hyper(lr, (beta1, beta2), eps, wd)  # a scheduler or a user may have changed the group
            # eager: every tensor of the group through _ops.adamw_steps (one native call per state width and
            # device); traced by torch.compile, or a tensor subclass: the qlora:: ops, one per tensor
            eager = not torch.compiler.is_compiling()
            batch8, batch32, copies = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("qlora_kernels.optim does not support sparse gradients")
                if p.dtype not in _PARAM_DTYPES:
                    raise TypeError(f"parameters must be float32, float16 or bfloat16 for {type(self).__name__}, "
                                    f"got {p.dtype} {tuple(p.shape)}")
                local, grad = _local_param(p), _local_grad(p)
                if grad.dtype != local.dtype or grad.shape != local.shape or grad.device != local.device:
                    raise RuntimeError(
                        f"gradient {grad.dtype} {tuple(grad.shape)} on {grad.device} does not match parameter "
                        f"{local.dtype} {tuple(local.shape)} on {local.device}"
                    )
                state = self.state[p]
                if not state:
                    state.update(self._new_state(local))
                if self._managed_storages and local.device.type == "cuda":
                    prefetch([t for t in self._state_tensors(state)
                              if t.untyped_storage().data_ptr() in self._managed_storages], local.device)
                target = local if local.is_contiguous() else local.contiguous()
                if target is not local:
                    copies.append((local, target))
                if "absmax1" in state:
                    item = (target, grad, state["state1"], state["state2"], state["absmax1"], state["absmax2"],
                            state["step"], state["skipped"])
                else:
                    item = (target, grad, state["state1"], state["state2"], state["step"], state["skipped"])
                if eager and type(local.data) is torch.Tensor:
                    (batch8 if len(item) == 8 else batch32).append(item)
                elif len(item) == 8:
                    _ops.adamw8bit_step(*item, lr, beta1, beta2, eps, wd)
                else:
                    _ops.adamw32bit_step(*item, lr, beta1, beta2, eps, wd)
            for device in {item[0].device for item in chain(batch8, batch32)}:
                _ops.adamw_steps([i for i in batch8 if i[0].device == device],
                                 [i for i in batch32 if i[0].device == device], lr, beta1, beta2, eps, wd,
                                 validate=False)  # states built here, gradients checked above
            for local, target in copies:
                local.copy_(target)
        return loss

    # ------------------------------------------------------------------------------------------ reports
    def skipped_steps(self) -> int:
        """Tensor steps skipped for non-finite gradients since the states were created (synchronizes)."""
        return int(sum(int(s["skipped"]) for s in self.state.values() if "skipped" in s))

    def state_bytes(self) -> dict:
        """Bytes of optimizer state: {"managed": in CUDA managed memory, "other": everywhere else}."""
        managed = other = 0
        for s in self.state.values():
            for t in s.values():
                if isinstance(t, torch.Tensor):
                    nbytes = t.numel() * t.element_size()
                    if t.untyped_storage().data_ptr() in self._managed_storages:
                        managed += nbytes
                    else:
                        other += nbytes
        return {"managed": managed, "other": other}

    # ------------------------------------------------------------------------------------------ state dicts
    def load_state_dict(self, state_dict: dict) -> None:
        """torch's load_state_dict, but the states keep their dtypes (torch would cast float32 states and absmax
        to a bfloat16 parameter's dtype) and land on the parameter's device (managed memory when paged)."""
        saved_groups = state_dict["param_groups"]
        saved_state = state_dict["state"]
        super().load_state_dict(state_dict)
        id_map = dict(zip(chain.from_iterable(g["params"] for g in saved_groups),
                          chain.from_iterable(g["params"] for g in self.param_groups)))
        for old_id, p in id_map.items():
            if old_id in saved_state:
                self.state[p] = self._restore_state(p, saved_state[old_id], old_id)

    def _restore_state(self, p: torch.Tensor, saved: dict, key) -> dict:
        expected = self._new_state(_local_param(p))
        missing = [k for k in expected if k not in saved]
        if missing:
            raise ValueError(
                f"optimizer state of parameter {key} lacks {missing} (has {sorted(saved)}); was it saved by "
                f"{type(self).__name__} with the same min_8bit_size?"
            )
        for k, fresh in expected.items():
            value = saved[k]
            if not isinstance(value, torch.Tensor):
                value = torch.tensor(value)
            if value.dtype != fresh.dtype or value.numel() != fresh.numel():
                raise ValueError(
                    f"optimizer state {k!r} of parameter {key}: expected {fresh.dtype} with {fresh.numel()} elements, "
                    f"got {value.dtype} with {value.numel()} (saved by a different optimizer or parameter shape?)"
                )
            fresh.copy_(value.reshape(fresh.shape))
        return expected


class AdamW8bit(_FusedAdamW):
    """AdamW with blockwise 8-bit states (about 2.03 bytes of state per parameter instead of 8).

    Tensors with fewer than `min_8bit_size` (4096) elements keep float32 states. Defaults as bitsandbytes'
    AdamW8bit (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2).
    """

    _optim_bits = 8
    _paged = False


class PagedAdamW8bit(_FusedAdamW):
    """AdamW8bit with its states in CUDA managed memory (paged out by the driver under memory pressure)."""

    _optim_bits = 8
    _paged = True


class PagedAdamW(_FusedAdamW):
    """AdamW with float32 states in CUDA managed memory."""

    _optim_bits = 32
    _paged = True


class PagedAdamW32bit(PagedAdamW):
    """bitsandbytes' name for PagedAdamW."""
