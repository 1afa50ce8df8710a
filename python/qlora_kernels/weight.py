"""NF4Weight: a frozen 4-bit weight in bitsandbytes' NF4 format, with its (double-quantized) scales."""

from __future__ import annotations

import json
import math
import operator

import torch

from . import _ops
from ._format import (
    DTYPE_FROM_NAME,
    DTYPE_NAMES,
    DYNAMIC_MAP,
    NESTED_BLOCKSIZE,
    NF4_TABLE,
    check_blocksize,
    check_float_dtype,
    num_blocks,
    prepare_device,
)

QUANT_STATE_KEY = "quant_state.bitsandbytes__nf4"
_STATE_SUFFIXES = ("", ".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", "." + QUANT_STATE_KEY)


class NF4Weight:
    """A weight of `shape` stored as NF4 codes and per-block scales.

    Attributes:
        packed: uint8 [(n + 1) // 2, 1], two codes per byte, first in the high nibble.
        absmax: float32 [nb] scales, or uint8 [nb] codes of DYNAMIC_MAP when double-quantized.
        nested_absmax: float32 [ceil(nb / 256)] or None.  offset: float32 [] or None.
        quant_map: NF4_TABLE (float32 [16]).  nested_quant_map: DYNAMIC_MAP (float32 [256]) or None.
        shape, dtype (of the original weight), blocksize.
    """

    def __init__(self, packed, absmax, *, shape, dtype, blocksize, nested_absmax=None, offset=None):
        try:
            dims = [operator.index(d) for d in shape]
        except TypeError:
            raise TypeError(f"shape must be a sequence of ints, got {shape!r}") from None
        if any(d < 0 for d in dims):
            raise ValueError(f"shape must not have negative dimensions, got {list(dims)}")
        self.shape = torch.Size(dims)
        self.dtype = check_float_dtype(dtype, "dtype")
        self.blocksize = check_blocksize(blocksize)
        n = self.numel
        if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
            raise TypeError(f"packed must be a uint8 tensor, got {getattr(packed, 'dtype', type(packed).__name__)}")
        if packed.numel() < (n + 1) // 2:
            raise ValueError(
                f"packed has {packed.numel()} bytes, too short for shape {tuple(self.shape)} ({(n + 1) // 2} needed)"
            )
        nb = num_blocks(n, blocksize)
        if absmax.numel() != nb:
            raise ValueError(f"absmax must have {nb} elements for {n} values at blocksize {blocksize}, got {absmax.numel()}")
        if (nested_absmax is None) != (offset is None):
            raise ValueError("nested_absmax and offset must be given together (double quantization) or not at all")
        if nested_absmax is None:
            if absmax.dtype != torch.float32:
                raise TypeError(f"absmax must be float32 without double quantization, got {absmax.dtype}")
        else:
            if absmax.dtype != torch.uint8:
                raise TypeError(f"absmax must be uint8 codes with double quantization, got {absmax.dtype}")
            if nested_absmax.dtype != torch.float32 or nested_absmax.numel() != num_blocks(nb, NESTED_BLOCKSIZE):
                raise ValueError(
                    f"nested_absmax must be float32 with {num_blocks(nb, NESTED_BLOCKSIZE)} elements, "
                    f"got {nested_absmax.dtype} with {nested_absmax.numel()}"
                )
            offset = torch.as_tensor(offset, dtype=torch.float32, device=absmax.device).reshape(())
        tensors = [t for t in (packed, absmax, nested_absmax, offset) if t is not None]
        if len({t.device for t in tensors}) != 1:
            raise ValueError(f"packed, absmax, nested_absmax and offset must share one device, got {[str(t.device) for t in tensors]}")
        self.packed = packed.reshape(-1, 1)
        self.absmax = absmax.reshape(-1)
        self.nested_absmax = None if nested_absmax is None else nested_absmax.reshape(-1)
        self.offset = offset
        self.quant_map = NF4_TABLE.to(packed.device)
        self.nested_quant_map = None if nested_absmax is None else DYNAMIC_MAP.to(packed.device)
        # the kernels' per-device tables exist from here on: no forward copies them (CUDA-graph capture)
        prepare_device(packed.device)

    # ---------------------------------------------------------------------------------------------- basics
    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    def tensors(self) -> tuple:
        """(packed, absmax, nested_absmax, offset): the arguments the ops take."""
        return self.packed, self.absmax, self.nested_absmax, self.offset

    @property
    def nbytes(self) -> int:
        """Bytes of storage: packed codes plus scales (the 16- and 256-entry maps are shared constants)."""
        return sum(t.numel() * t.element_size() for t in self.tensors() if t is not None)

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / self.numel if self.numel else 0.0

    def scales(self) -> torch.Tensor:
        """float32 [nb] block scales (rebuilt from the codes when double-quantized)."""
        if not self.double_quant:
            return self.absmax
        return _ops.double_dequantize(self.absmax, self.nested_absmax, self.offset)

    def dequantize(self, dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Dense tensor of `shape` in `dtype` (default: the original dtype, or out's dtype).

        out: optional contiguous buffer of `shape` (or of numel elements) on this weight's device to write
        into, e.g. a scratch buffer reused across calls; it is returned viewed as `shape`.
        """
        if out is None:
            dtype = self.dtype if dtype is None else check_float_dtype(dtype, "dtype")
            flat = _ops.dequantize_nf4(
                self.packed.view(-1), self.absmax, self.nested_absmax, self.offset, self.numel, self.blocksize, dtype
            )
            return flat.view(self.shape)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
        check_float_dtype(out.dtype, "out.dtype")
        if dtype is not None and dtype != out.dtype:
            raise TypeError(f"dtype={dtype} disagrees with out.dtype={out.dtype}")
        if out.numel() != self.numel or not out.is_contiguous():
            raise ValueError(f"out must be contiguous with {self.numel} elements (shape {tuple(self.shape)}), "
                             f"got shape {tuple(out.shape)}{'' if out.is_contiguous() else ', non-contiguous'}")
        if out.device != self.device:
            raise ValueError(f"out is on {out.device} but the weight is on {self.device}")
        _ops.dequantize_nf4_out(
            out.view(-1), self.packed.view(-1), self.absmax, self.nested_absmax, self.offset, self.numel, self.blocksize
        )
        return out.view(self.shape)

    @classmethod
    def empty(cls, shape, *, dtype: torch.dtype, blocksize: int = 64, double_quant: bool = True,
              device="meta") -> "NF4Weight":
        """An NF4Weight of `shape` with tensors of the right sizes and no values (torch.empty's): on the meta
        device, the skeleton a loader or the planner builds before any weight exists."""
        n = math.prod(shape)
        nb = num_blocks(n, blocksize)
        f = dict(device=device)
        packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, **f)
        if not double_quant:
            return cls(packed, torch.empty(nb, dtype=torch.float32, **f), shape=shape, dtype=dtype, blocksize=blocksize)
        return cls(packed, torch.empty(nb, dtype=torch.uint8, **f), shape=shape, dtype=dtype, blocksize=blocksize,
                   nested_absmax=torch.empty(num_blocks(nb, NESTED_BLOCKSIZE), dtype=torch.float32, **f),
                   offset=torch.empty((), dtype=torch.float32, **f))

    def to(self, device) -> "NF4Weight":
        device = torch.device(device)
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Weight(
            move(self.packed), move(self.absmax), shape=self.shape, dtype=self.dtype, blocksize=self.blocksize,
            nested_absmax=move(self.nested_absmax), offset=move(self.offset),
        )

    def cuda(self) -> "NF4Weight":
        return self.to("cuda")

    def cpu(self) -> "NF4Weight":
        return self.to("cpu")

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (
            f"NF4Weight(shape={tuple(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}{dq}, "
            f"device={self.device}, {self.bits_per_param:.3f} bits/param)"
        )

    # ----------------------------------------------------------------------------------------- state dicts
    def quant_state_json(self) -> dict:
        state = {
            "quant_type": "nf4",
            "blocksize": self.blocksize,
            "dtype": DTYPE_NAMES[self.dtype],
            "shape": list(self.shape),
        }
        if self.double_quant:
            state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=self.offset.item())
        return state

    def state_dict(self, prefix: str = "weight") -> dict:
        """The bitsandbytes Linear4bit keys: `weight`, `weight.absmax`, `weight.quant_map`,
        (`weight.nested_absmax`, `weight.nested_quant_map` when double-quantized) and
        `weight.quant_state.bitsandbytes__nf4` (uint8 bytes of the JSON quant state)."""
        blob = json.dumps(self.quant_state_json()).encode("utf-8")
        # The maps are copied (80 B + 1 KiB): one tensor shared by every layer would make safetensors (and
        # with it save_pretrained and Trainer checkpoints) refuse the state dict as "shared tensors".
        sd = {
            prefix: self.packed,
            f"{prefix}.absmax": self.absmax,
            f"{prefix}.quant_map": self.quant_map.clone(),
        }
        if self.double_quant:
            sd[f"{prefix}.nested_absmax"] = self.nested_absmax
            sd[f"{prefix}.nested_quant_map"] = self.nested_quant_map.clone()
        sd[f"{prefix}.{QUANT_STATE_KEY}"] = torch.tensor(list(blob), dtype=torch.uint8)
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict, prefix: str = "weight", strict: bool = True) -> "NF4Weight":
        """Load the keys written by `state_dict` or by bitsandbytes' Linear4bit (nf4).

        strict: also reject keys under `prefix.` that the format does not know.
        """
        key = f"{prefix}.{QUANT_STATE_KEY}"
        if key not in sd:
            fp4 = f"{prefix}.quant_state.bitsandbytes__fp4"
            if fp4 in sd:
                raise ValueError(f"{fp4}: only nf4 is supported, this state dict holds an fp4 weight")
            raise KeyError(f"state dict is missing {key!r} (not an NF4 weight saved by bitsandbytes or qlora_kernels)")
        try:
            state = json.loads(bytes(sd[key].cpu().to(torch.uint8).tolist()).decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{key} is not a UTF-8 JSON quant state: {exc}") from None
        if state.get("quant_type") != "nf4":
            raise ValueError(f"{key}: quant_type must be 'nf4', got {state.get('quant_type')!r}")
        for field in ("blocksize", "dtype", "shape"):
            if field not in state:
                raise ValueError(f"{key}: quant state has no {field!r}")
        double_quant = "nested_offset" in state or f"{prefix}.nested_absmax" in sd
        required = [prefix, f"{prefix}.absmax"] + ([f"{prefix}.nested_absmax"] if double_quant else [])
        missing = [k for k in required if k not in sd]
        if missing:
            raise KeyError(f"state dict is missing {missing}")
        if strict:
            known = {prefix + s for s in _STATE_SUFFIXES}
            unexpected = [k for k in sd if k.startswith(prefix + ".") and k not in known]
            if unexpected:
                raise KeyError(f"unexpected keys for an NF4 weight: {unexpected}")
        if f"{prefix}.quant_map" in sd and not torch.equal(sd[f"{prefix}.quant_map"].float().cpu(), NF4_TABLE):
            raise ValueError(f"{prefix}.quant_map is not the NF4 table")
        if double_quant:
            if "nested_offset" not in state:
                raise ValueError(f"{key}: double-quantized weight has no nested_offset")
            if state.get("nested_blocksize", NESTED_BLOCKSIZE) != NESTED_BLOCKSIZE:
                raise ValueError(f"{key}: nested_blocksize must be {NESTED_BLOCKSIZE}, got {state['nested_blocksize']}")
            nqm = sd.get(f"{prefix}.nested_quant_map")
            if nqm is not None and not torch.equal(nqm.float().cpu(), DYNAMIC_MAP):
                raise ValueError(f"{prefix}.nested_quant_map is not the signed dynamic map")
        dtype_name = state["dtype"]
        dtype_name = dtype_name[len("torch."):] if dtype_name.startswith("torch.") else dtype_name
        if dtype_name not in DTYPE_FROM_NAME:
            raise ValueError(f"{key}: unsupported dtype {state['dtype']!r}")
        shape = state["shape"]
        if (not isinstance(shape, (list, tuple)) or not shape
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise ValueError(f"{key}: shape must be a list of non-negative ints, got {shape!r}")
        packed = packed_bytes(sd[prefix], prefix)
        absmax = sd[f"{prefix}.absmax"]
        nested = offset = None
        if double_quant:
            nested = sd[f"{prefix}.nested_absmax"].to(absmax.device)
            offset = state["nested_offset"]
            if isinstance(offset, bool) or not isinstance(offset, (int, float)) or not math.isfinite(offset):
                raise ValueError(f"{key}: nested_offset must be a finite number, got {offset!r}")
            offset = torch.tensor(float(offset), dtype=torch.float32, device=absmax.device)
            _check_scales(nested, f"{prefix}.nested_absmax", torch.float32)
            _check_scales(absmax, f"{prefix}.absmax", torch.uint8)
        else:
            _check_scales(absmax, f"{prefix}.absmax", torch.float32)
        return cls(
            packed, absmax.to(packed.device), shape=shape, dtype=DTYPE_FROM_NAME[dtype_name],
            blocksize=state["blocksize"],
            nested_absmax=None if nested is None else nested.to(packed.device),
            offset=None if offset is None else offset.to(packed.device),
        )


def packed_bytes(t: torch.Tensor, name: str = "packed") -> torch.Tensor:
    """The packed NF4 bytes of `t` as uint8 [nbytes, 1]: bitsandbytes' `bnb_4bit_quant_storage` keeps them in
    a tensor of another dtype (bfloat16 for FSDP-QLoRA: [N*K/4, 1]); the bytes are viewed, not converted."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype == torch.uint8:
        return t.reshape(-1, 1)
    if t.dtype not in QUANT_STORAGE_DTYPES:
        raise TypeError(f"{name} holds packed NF4 codes in {t.dtype}; the storage dtypes bitsandbytes allows are "
                        f"{[str(d) for d in (torch.uint8,) + QUANT_STORAGE_DTYPES]}")
    return t.contiguous().reshape(-1).view(torch.uint8).reshape(-1, 1)


# bnb_4bit_quant_storage dtypes besides uint8 (bitsandbytes' Params4bit accepts any of these)
QUANT_STORAGE_DTYPES = (torch.int8, torch.float16, torch.bfloat16, torch.float32, torch.int32, torch.float64)


def _check_scales(t: torch.Tensor, name: str, dtype: torch.dtype) -> None:
    """A scale tensor read from a state dict: the right dtype, finite, not negative (else a clear error)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {t.dtype}")
    if dtype.is_floating_point and t.numel():
        bad = ~torch.isfinite(t) | (t < 0)
        if bool(bad.any()):
            i = int(bad.reshape(-1).nonzero()[0, 0])
            raise ValueError(f"{name} holds {int(bad.sum())} impossible scale(s) (NaN, inf or negative); "
                             f"the first is {t.reshape(-1)[i].item()!r} at index {i}")
