"""NF4Linear: a frozen NF4 weight (+ bias), a drop-in for nn.Linear; QLoRALinear: an NF4Linear with trainable
LoRA adapters.

State dict (what `state_dict()` writes and `load_state_dict()` reads):
    weight, weight.absmax, weight.quant_map, [weight.nested_absmax, weight.nested_quant_map,]
    weight.quant_state.bitsandbytes__nf4        the base weight under bitsandbytes' Linear4bit keys
    bias                                        when the layer has one
    lora_A.weight [r, K], lora_B.weight [N, r]  the adapters, under PEFT's names
The NF4 tensors are written and read by `_save_to_state_dict` / `_load_from_state_dict`, as bitsandbytes'
Linear4bit does.

Storage (one layout, so that FSDP2's plain `fully_shard`, as accelerate / torchtitan call it, shards the
weights with no call of ours): FSDP2 shards parameters on dim 0, never casts integer ones under a
MixedPrecisionPolicy, and leaves buffers replicated. So when in_features % blocksize == 0 (blocks never
straddle rows: every real model) the codes and scales are frozen uint8 parameters by rows:
    weight_packed   uint8 [N, K / 2]             the packed codes of row i are bytes [i K/2, (i+1) K/2)
    weight_absmax   uint8 [N, K / blocksize]     double-quantized scale codes (row i owns its K / blocksize blocks)
                    uint8 [N, 4 K / blocksize]   without double quantization: the float32 scales' bytes
    weight_nested_absmax, weight_offset          float32 non-persistent buffers (one per 256 blocks: replicated)
Other layers keep flat non-persistent buffers (packed [ceil(N K / 2), 1], absmax [blocks]), replicated.
Under FSDP2 (weight_packed a DTensor) the state dict holds these attribute names instead (what
torch.distributed.checkpoint saves and reshards); `load_state_dict` reads either form.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from ._format import FLOAT_DTYPES, prepare_device
from .autograd import _nf4_linear, _qlora_linear
from .functional import quantize_nf4
from .weight import QUANT_STATE_KEY, NF4Weight, packed_bytes

__all__ = ["NF4Linear", "QLoRALinear"]

# The NF4 weight's tensors (parameters or buffers, see the module docstring); their dtypes are part of the
# format, so module.to(dtype) must not cast them.
_NF4_BUFFERS = ("weight_packed", "weight_absmax", "weight_nested_absmax", "weight_offset")
_ROW_PARAMS = ("weight_packed", "weight_absmax")  # uint8 parameters in row layout (FSDP2 shards them)


def _is_dtensor(t) -> bool:
    """True for a DTensor (an FSDP2-sharded parameter outside forward)."""
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _scaling(alpha: float, r: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def check_lora_args(r, alpha, dropout, adapter_dtype=torch.float32) -> None:
    """Raise a clear error naming the argument for an impossible adapter setting (prepare_model calls this
    before it touches the model)."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"rank r must be an int >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a finite number > 0 (the LoRA scaling is alpha / r), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (0.0 <= dropout < 1.0):
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    if adapter_dtype is not None and adapter_dtype not in FLOAT_DTYPES:
        raise TypeError(f"adapter_dtype must be torch.float32, float16, bfloat16 or None (the base weight's "
                        f"dtype), got {adapter_dtype!r}")


class NF4Linear(nn.Module):
    """y = x @ deq(W)^T + bias with W frozen in NF4 and no adapters: what a quantized model holds for every
    quantized linear that LoRA does not target (the base of QLoRALinear, which adds the adapters).

    Build one with `from_linear` (quantizes an nn.Linear), `from_bnb` (takes over a bitsandbytes Linear4bit's
    NF4 weight as is) or the constructor (an NF4Weight). The codes and scales are frozen uint8 parameters in
    row layout when in_features % blocksize == 0 (so FSDP2's fully_shard shards them), flat non-persistent
    buffers otherwise (see the module docstring); either way they are saved under bitsandbytes' Linear4bit
    keys, and `bias` is frozen by default. Optimizers skip them (no grad ever).
    forward never keeps deq(W): the backward recomputes x's gradient through the `qlora::nf4_linear_dx` op.

    Attributes:
        in_features, out_features, blocksize, weight_dtype (the dtype W was quantized from),
        weight: the NF4Weight (a view of the stored tensors; rebuilt after .to()). Under FSDP2, outside
            forward, the tensors are sharded and `weight` raises (gather with distributed.full_state_dict).
    """

    def __init__(self, weight: NF4Weight, bias: Optional[Tensor] = None):
        super().__init__()
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
        if len(weight.shape) != 2:
            raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.blocksize = weight.blocksize
        self.weight_dtype = weight.dtype
        self._set_weight(weight)
        if bias is not None:
            if bias.shape != (self.out_features,):
                raise ValueError(f"bias must have shape [{self.out_features}], got {tuple(bias.shape)}")
            # the bias keeps its own dtype: it is frozen by default, and a trained one wants its precision too
            self.bias = nn.Parameter(bias.detach().to(device=weight.device).clone(), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    # ----------------------------------------------------------------------------------------- builders
    @classmethod
    def from_linear(cls, linear: nn.Linear, blocksize: int = 64, double_quant: bool = True) -> "NF4Linear":
        """Quantize `linear.weight` to NF4 (bitsandbytes-identical); the bias keeps its dtype and stays frozen."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        weight = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(weight, linear.bias)

    @classmethod
    def from_bnb(cls, layer) -> "NF4Linear":
        """Take over a bitsandbytes `Linear4bit` (nf4): its packed codes and (double-quantized) scales are
        used as they are (see `nf4_weight_from_bnb`)."""
        weight = nf4_weight_from_bnb(layer)
        return cls(weight, None if layer.bias is None else layer.bias.detach())

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool = False, blocksize: int = 64,
              double_quant: bool = True, dtype: torch.dtype = torch.float32, device="meta",
              bias_dtype: Optional[torch.dtype] = None) -> "NF4Linear":
        """A layer with NF4 storage of the right sizes but no values (torch.empty's), to be filled by
        `set_weight` or `load_state_dict`: on the meta device it is the skeleton a loader builds before any
        weight exists (a meta layer takes the device of the first weight set into it).
        dtype: the dtype the weight will be quantized from; bias_dtype: the bias's (default dtype)."""
        weight = NF4Weight.empty((out_features, in_features), dtype=dtype, blocksize=blocksize,
                                 double_quant=double_quant, device=device)
        b = torch.empty(out_features, dtype=bias_dtype or dtype, device=device) if bias else None
        return cls(weight, b)

    # ------------------------------------------------------------------------------------------ the weight
    @property
    def row_layout(self) -> bool:
        """True when the codes and scales are uint8 parameters by rows (FSDP2 shards them on dim 0)."""
        return "weight_packed" in self._parameters

    def _set_weight(self, weight: NF4Weight) -> None:
        packed, absmax, nested, offset = weight.tensors()
        for name in _NF4_BUFFERS:  # a parameter cannot be re-registered as a buffer (nor the reverse)
            self._parameters.pop(name, None)
            self._buffers.pop(name, None)
        n, k = self.out_features, self.in_features
        if k % self.blocksize == 0:  # blocks never straddle rows: row i owns bytes [i K/2, (i+1) K/2)
            if nested is None:  # float32 scales as their bytes: an integer parameter is never cast
                absmax = absmax.contiguous().view(torch.uint8)
            self.weight_packed = nn.Parameter(packed.reshape(n, k // 2), requires_grad=False)
            self.weight_absmax = nn.Parameter(absmax.reshape(n, -1), requires_grad=False)
        else:
            self.register_buffer("weight_packed", packed, persistent=False)
            self.register_buffer("weight_absmax", absmax, persistent=False)
        self.register_buffer("weight_nested_absmax", nested, persistent=False)
        self.register_buffer("weight_offset", offset, persistent=False)
        self._weight_cache = None

    def _nf4_tensors(self) -> tuple:
        """(packed, absmax, nested_absmax, offset) as the ops take them (flat; absmax float32 without double
        quantization)."""
        packed, absmax, nested = self.weight_packed, self.weight_absmax, self.weight_nested_absmax
        if not self.row_layout:
            return packed, absmax, nested, self.weight_offset
        if _is_dtensor(packed) or _is_dtensor(absmax):
            raise RuntimeError(
                f"this {type(self).__name__}'s NF4 weight is sharded by FSDP2 (weight_packed is a DTensor): use it "
                "inside forward, or gather it with qlora_kernels.distributed.full_state_dict(model) on every rank")
        if nested is None:  # float32 scales stored as their bytes: view them back
            absmax = absmax.view(torch.float32)
        return packed.reshape(-1), absmax.reshape(-1), nested, self.weight_offset

    @property
    def weight(self) -> NF4Weight:
        """The NF4Weight over this module's buffers (read-only; set a new one with `set_weight`)."""
        key = tuple(id(getattr(self, n)) for n in _NF4_BUFFERS)
        if self._weight_cache is None or self._weight_cache[0] != key:
            packed, absmax, nested, offset = self._nf4_tensors()
            w = NF4Weight(packed, absmax, shape=(self.out_features, self.in_features), dtype=self.weight_dtype,
                          blocksize=self.blocksize, nested_absmax=nested, offset=offset)
            self._weight_cache = (key, w)
        return self._weight_cache[1]

    def set_weight(self, weight: NF4Weight) -> None:
        """Replace the base weight (same shape); it moves to this module's device (a layer on the meta
        device, a skeleton, takes the weight's device instead)."""
        if not isinstance(weight, NF4Weight):
            raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight has shape {tuple(weight.shape)}, this layer is [{self.out_features}, {self.in_features}]"
            )
        if _is_dtensor(self.weight_packed):
            raise RuntimeError(f"{type(self).__name__}.set_weight: the NF4 weight is sharded by FSDP2; set it "
                               "before fully_shard (or fill a sharded model with distributed.load_from_rank0)")
        if self.weight_packed.device.type != "meta":
            weight = weight.to(self.weight_packed.device)
        self.blocksize, self.weight_dtype = weight.blocksize, weight.dtype
        self._set_weight(weight)

    def _apply(self, fn, recurse=True):
        # .to(dtype) / .half() would cast the float32 nested scales (and .type(dtype) even the uint8 codes):
        # the NF4 tensors take only the device part of fn. Parameters stay the same objects (Module._apply).
        own = {id(t) for t in (self._parameters.get(n, self._buffers.get(n)) for n in _NF4_BUFFERS)
               if t is not None}

        def keep_dtype(t):
            moved = fn(t)
            if id(t) in own and moved.dtype != t.dtype:
                return t.to(moved.device)
            return moved

        super()._apply(keep_dtype, recurse)
        self._weight_cache = None
        packed = getattr(self, "weight_packed", None)
        if isinstance(packed, Tensor):  # the kernels' tables on the new device now, not in the first forward
            prepare_device(packed.device)
        return self

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        return _nf4_linear(x, *self._nf4_tensors(), (self.out_features, self.in_features), self.blocksize,
                           self.bias)

    def merged_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """deq(W) as a dense [N, K] tensor of `dtype` (default: the dtype W was quantized from): what
        merge_and_unload puts in place of a layer without adapters. Materializes W (export only)."""
        with torch.no_grad():
            return self.weight.dequantize(torch.float32).to(dtype or self.weight_dtype)

    def _nf4_repr(self) -> str:
        dq = "double_quant" if self.weight_nested_absmax is not None else "single_quant"
        # from the stored tensors (a DTensor's numel is the whole tensor's), so a sharded layer prints too
        nbytes = sum(t.numel() * t.element_size() for t in (getattr(self, n) for n in _NF4_BUFFERS)
                     if t is not None)
        bits = 8.0 * nbytes / max(1, self.in_features * self.out_features)
        layout = ", row layout" if self.row_layout else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4(blocksize={self.blocksize}, {dq}, {bits:.3f} bits/param{layout})")

    def extra_repr(self) -> str:
        return self._nf4_repr()

    # ----------------------------------------------------------------------------------------- state dicts
    def _sharded(self) -> bool:
        return _is_dtensor(self.weight_packed) or _is_dtensor(self.weight_absmax)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self._sharded():
            # FSDP2's sharded state: the tensors under their attribute names (DTensors), which
            # torch.distributed.checkpoint saves and reshards; distributed.full_state_dict writes bnb keys
            for name in _NF4_BUFFERS:
                t = getattr(self, name)
                if t is not None:
                    destination[prefix + name] = t if keep_vars else t.detach()
        elif self.weight_packed.device.type == "meta":
            # a skeleton has no quant state to write (its offset has no value): the key alone says "a weight
            # goes here", which is what loaders (transformers' from_pretrained) read a meta model's keys for
            destination[prefix + "weight"] = self.weight_packed
        else:
            for key, t in self.weight.state_dict(prefix + "weight").items():
                destination[key] = t if keep_vars else t.detach()
        with self._nf4_params_hidden():  # bias (and what a subclass adds); the NF4 tensors are written above
            super()._save_to_state_dict(destination, prefix, keep_vars)

    def _nf4_params_hidden(self):
        """A context in which the row-layout parameters are out of `_parameters` (nn.Module's own state-dict
        code must neither write nor expect them); their order is restored after."""
        module = self

        class _Hidden:
            def __enter__(self):
                self.order = list(module._parameters)
                self.hidden = {n: module._parameters.pop(n) for n in _ROW_PARAMS if n in module._parameters}

            def __exit__(self, *exc):
                merged = {**module._parameters, **self.hidden}
                module._parameters.clear()
                module._parameters.update((k, merged[k]) for k in self.order + [k for k in merged
                                                                              if k not in self.order])
                return False

        return _Hidden()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        wkey = prefix + "weight"
        attr = {prefix + n: n for n in _NF4_BUFFERS}
        own = {k: v for k, v in state_dict.items() if k == wkey or k.startswith(wkey + ".")}
        named = {k: v for k, v in state_dict.items() if k in attr}
        rest = {k: v for k, v in state_dict.items() if k not in own and k not in named}
        if named:  # the attribute-name form (an FSDP2 sharded state dict, a DCP checkpoint)
            self._load_named(named, attr, prefix, local_metadata, missing_keys, error_msgs)
        elif wkey not in own:
            missing_keys.append(prefix + "weight_packed" if self._sharded() else wkey)
        elif self._sharded():
            error_msgs.append(f"{wkey}: this layer's NF4 weight is sharded by FSDP2: load a bitsandbytes-keyed state "
                              "dict before fully_shard, or fill the sharded model with "
                              "qlora_kernels.distributed.load_from_rank0")
        else:
            try:
                self._load_weight(own, wkey)
            except (KeyError, ValueError, TypeError) as exc:
                error_msgs.append(f"{wkey}: {exc}")
        with self._nf4_params_hidden():
            super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)

    def _load_named(self, named: dict, attr: dict, prefix: str, local_metadata, missing_keys, error_msgs) -> None:
        """Copy (or with load_state_dict(assign=True) put) tensors stored under the attribute names into this
        layer's, checking dtype and shape first."""
        assign = local_metadata.get("assign_to_params_buffers", False)
        for name in _NF4_BUFFERS:
            t, key = getattr(self, name), prefix + name
            if t is None:
                continue
            if key not in named:
                missing_keys.append(key)
                continue
            v = named[key]
            if tuple(v.shape) != tuple(t.shape) or v.dtype != t.dtype:
                error_msgs.append(f"{key}: expected {t.dtype} {tuple(t.shape)}, got {v.dtype} {tuple(v.shape)}")
                continue
            if assign:
                if name in self._parameters:
                    self._parameters[name] = nn.Parameter(v, requires_grad=False)
                else:
                    self._buffers[name] = v
            else:
                with torch.no_grad():
                    t.copy_(v)
        for key in named:
            if getattr(self, attr[key]) is None:
                error_msgs.append(f"{key}: this layer has no {attr[key]} (double quantization differs)")
        self._weight_cache = None

    def _load_weight(self, sd: dict, wkey: str) -> None:
        t = sd[wkey]
        shape = (self.out_features, self.in_features)
        # An unquantized nn.Linear weight (float, no quant state; a packed weight in a float quant_storage
        # dtype comes with its quant state): quantize it like this layer.
        if t.is_floating_point() and f"{wkey}.{QUANT_STATE_KEY}" not in sd:
            if tuple(t.shape) != shape:
                raise ValueError(f"float weight has shape {tuple(t.shape)}, this layer is {list(shape)}")
            extra = [k for k in sd if k != wkey]
            if extra:
                raise ValueError(f"a float weight cannot come with quantization keys {extra}")
            w = quantize_nf4(t.to(self.weight_packed.device), blocksize=self.blocksize,
                             double_quant=self.weight_nested_absmax is not None)
        else:
            w = NF4Weight.from_state_dict(sd, prefix=wkey, strict=True)
            if tuple(w.shape) != shape:
                raise ValueError(f"NF4 weight has shape {list(w.shape)}, this layer is {list(shape)}")
        self.set_weight(w)


class QLoRALinear(NF4Linear):
    """y = x @ deq(W)^T + scaling * dropout(x) @ A^T @ B^T + bias, with W frozen in NF4 (an NF4Linear with
    trainable LoRA adapters), a drop-in for nn.Linear.

    Build one with `from_linear` (quantizes an nn.Linear), `from_bnb` (takes over a bitsandbytes
    Linear4bit's NF4 weight as is) or the constructor (an NF4Weight). Only `lora_A.weight`, `lora_B.weight`
    (and `bias`, when unfrozen) are parameters.

    adapter_dtype: the adapters' storage dtype, float32 by default as PEFT keeps them: on a bf16 model a bf16
    adapter rounds most small optimizer updates away. The adapter math runs in the activation dtype (the
    float32 masters are cast per call); None stores them in the base weight's dtype instead.

    Attributes:
        in_features, out_features, r, lora_alpha, use_rslora, scaling, dropout (probability),
        lora_A / lora_B: nn.Linear without bias, weights [r, in_features] / [out_features, r].
        weight: the NF4Weight (a view of the buffers; rebuilt after .to()).
    """

    def __init__(self, weight: NF4Weight, bias: Optional[Tensor] = None, r: int = 16, alpha: float = 16,
                 dropout: float = 0.0, use_rslora: bool = False,
                 adapter_dtype: Optional[torch.dtype] = torch.float32):
        if not isinstance(weight, NF4Weight):  # before check_lora_args, as before the split
            raise TypeError(f"weight must be an NF4Weight, got {type(weight).__name__}")
        check_lora_args(r, alpha, dropout, adapter_dtype)
        super().__init__(weight, bias)
        self.r = r
        self.lora_alpha = float(alpha)
        self.use_rslora = bool(use_rslora)
        self.scaling = _scaling(self.lora_alpha, r, self.use_rslora)
        self.dropout = float(dropout)
        dtype = adapter_dtype or weight.dtype
        factory = dict(device=weight.device, dtype=dtype)
        self.lora_A = nn.Linear(self.in_features, r, bias=False, **factory)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, **factory)
        self.reset_lora_parameters()

    # ----------------------------------------------------------------------------------------- builders
    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int = 16, alpha: float = 16, dropout: float = 0.0,
                    use_rslora: bool = False, blocksize: int = 64, double_quant: bool = True,
                    adapter_dtype: Optional[torch.dtype] = torch.float32) -> "QLoRALinear":
        """Quantize `linear.weight` to NF4 (bitsandbytes-identical) and add rank-r adapters (B = 0: a no-op).

        The adapters live on linear's device in `adapter_dtype` (None: linear's dtype); the bias keeps its
        dtype and stays frozen.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        check_lora_args(r, alpha, dropout, adapter_dtype)
        weight = quantize_nf4(linear.weight.detach(), blocksize=blocksize, double_quant=double_quant)
        return cls(weight, linear.bias, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                   adapter_dtype=adapter_dtype)

    @classmethod
    def from_bnb(cls, layer, r: int = 16, alpha: float = 16, dropout: float = 0.0,
                 use_rslora: bool = False, adapter_dtype: Optional[torch.dtype] = torch.float32) -> "QLoRALinear":
        """Take over a bitsandbytes `Linear4bit` (nf4): its packed codes and (double-quantized) scales are
        used as they are, with no dequantize / requantize. A Linear4bit not yet quantized (bitsandbytes
        quantizes on the first .to(device)) is quantized here with its blocksize and compress_statistics,
        which gives the same bits. adapter_dtype None: the layer's compute_dtype."""
        check_lora_args(r, alpha, dropout, adapter_dtype)
        weight = nf4_weight_from_bnb(layer)
        bias = None if layer.bias is None else layer.bias.detach()
        if adapter_dtype is None:
            adapter_dtype = getattr(layer, "compute_dtype", None) or weight.dtype
        return cls(weight, bias, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora,
                   adapter_dtype=adapter_dtype)

    def reset_lora_parameters(self) -> None:
        """A kaiming-uniform (a = sqrt(5), nn.Linear's default), B zeros: the adapter starts as a no-op."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def merged_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """deq(W) + scaling * B @ A as a dense [N, K] tensor of `dtype` (default: the base weight's original
        dtype), computed in float32 and rounded once.

        For export / inference merging only: it materializes W, which training never does.
        """
        dtype = dtype or self.weight_dtype
        with torch.no_grad():
            w = self.weight.dequantize(torch.float32)
            w += self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())
        return w.to(dtype)

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> Tensor:
        return _qlora_linear(
            x, *self._nf4_tensors(),
            (self.out_features, self.in_features), self.blocksize, self.lora_A.weight, self.lora_B.weight,
            self.scaling, self.bias, self.dropout, self.training,
        )

    def extra_repr(self) -> str:
        scale = "alpha/sqrt(r)" if self.use_rslora else "alpha/r"
        return (f"{self._nf4_repr()}, "
                f"r={self.r}, alpha={self.lora_alpha:g}, scaling={self.scaling:g} ({scale}), dropout={self.dropout:g}")


class BnbRepackedError(ValueError):
    """A bitsandbytes Linear4bit whose NF4 bytes and scales bitsandbytes itself changed for its CPU kernel, so the
    original ones are gone (see `check_bnb_layer`)."""


def check_bnb_layer(layer, name: Optional[str] = None) -> None:
    """Refuse a bitsandbytes Linear4bit (or Params4bit) that bitsandbytes repacked for its CPU kernel.

    bitsandbytes 0.50.2's `Linear4bit.forward`, on a CPU with AVX512-BF16 (`bitsandbytes.functional.
    has_avx512bf16()`), in eval mode, with an input that does not require grad, converts the weight in place
    (`_convert_weight_packed_for_cpu`): the codes go to a private layout, the scales are re-rounded to bfloat16
    and double-quantized scales are dequantized and dropped; it marks the quant state with
    `packing_format_for_cpu = True`. Its `state_dict()`, `.cuda()` and `.xpu()` convert the layout back
    (`packing_format_for_cpu = False`) but keep the bfloat16-rounded scales. Either way the original scales
    cannot be rebuilt, and taking the layer over with other numbers would silently change the model: this
    raises `BnbRepackedError` (a ValueError) naming the layer, the cause and the ways out.

    A forward that crashed in the conversion (in_features % blocksize != 0, out_features % 32 != 0) marks the
    state with `original_*` attributes only; it is refused when it had already dropped the nested scales, and
    accepted when nothing else changed (its bytes and scales are the original ones).
    """
    param = getattr(layer, "weight", layer)
    qs = getattr(param, "quant_state", None)
    if qs is None:
        return
    repacked = getattr(qs, "packing_format_for_cpu", None)  # QuantState raises AttributeError when never set
    half_done = repacked is None and hasattr(qs, "original_nested") and bool(qs.original_nested) != bool(qs.nested)
    if repacked is None and not half_done:
        return
    what = name or f"Linear4bit(out_features={qs.shape[0]}, in_features={qs.shape[1]})"
    if repacked:
        state = ("its weight is in bitsandbytes' private CPU layout (quant_state.packing_format_for_cpu is set) "
                 "and its scales were re-rounded to bfloat16")
    elif repacked is not None:
        state = ("it was converted back to the standard layout (by its state_dict(), .cuda() or .xpu()), but its "
                 "scales stay re-rounded to bfloat16")
    else:
        state = ("the conversion failed half-way (in_features % blocksize != 0) after dropping its "
                 "double-quantized scales")
    raise BnbRepackedError(
        f"{what}: bitsandbytes repacked this layer for its CPU kernel during an inference forward (eval mode, no "
        f"grad, on a CPU with AVX512-BF16); {state}, so its original NF4 scales are gone and it cannot be taken "
        f"over exactly. Ways out: load the checkpoint with qlora_kernels.load_pretrained(path) instead of "
        f"transformers + bitsandbytes, or reload the bitsandbytes model and prepare it before any eval forward "
        f"(keep it in train mode, or run forwards with inputs that require grad, until it is prepared)"
    )


def nf4_weight_from_bnb(layer, name: Optional[str] = None) -> NF4Weight:
    """The NF4Weight of a bitsandbytes Linear4bit (or Params4bit), sharing its tensors. `name` (the module's
    path) only names it in errors. A layer bitsandbytes repacked for its CPU kernel raises BnbRepackedError
    (`check_bnb_layer`): every way of taking a bitsandbytes layer over comes through here."""
    check_bnb_layer(layer, name)
    param = getattr(layer, "weight", layer)
    quant_state = getattr(param, "quant_state", None)
    if quant_state is None:  # not quantized yet: bitsandbytes would quantize on .to(device); same bits here
        if getattr(param, "quant_type", "nf4") != "nf4":
            raise ValueError(f"only nf4 Linear4bit layers are supported, got quant_type={param.quant_type!r}")
        data = param.data
        if not data.is_floating_point():
            raise ValueError("Linear4bit weight holds packed data but no quant_state")
        return quantize_nf4(data, blocksize=getattr(param, "blocksize", 64),
                            double_quant=bool(getattr(param, "compress_statistics", True)))
    if quant_state.quant_type != "nf4":
        raise ValueError(f"only nf4 Linear4bit layers are supported, got quant_type={quant_state.quant_type!r}")
    nested = offset = None
    if quant_state.nested:
        if quant_state.state2.blocksize != 256:
            raise ValueError(f"nested blocksize must be 256, got {quant_state.state2.blocksize}")
        nested, offset = quant_state.state2.absmax, quant_state.offset
    return NF4Weight(packed_bytes(param.data, "Linear4bit weight"), quant_state.absmax, shape=tuple(quant_state.shape),
                     dtype=quant_state.dtype, blocksize=quant_state.blocksize, nested_absmax=nested, offset=offset)
