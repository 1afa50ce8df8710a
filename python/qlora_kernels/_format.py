"""The NF4 storage format: its tables and the argument checks every op shares.

Everything here is a fact of bitsandbytes' NF4 format (0.50.2), checked bit for bit against bitsandbytes by
tests/test_quant.py (tables, codes, scales, state dicts) and tests/test_qlora_linear.py (Linear4bit interop).
"""

from __future__ import annotations

import torch

# NF4 code book: QLoRA's normal-quantile construction, as float32 (bitsandbytes' `quant_map` for nf4).
NF4_TABLE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
NF4_ZERO_CODE = 7  # NF4_TABLE[7] == 0.0; bitsandbytes pads an odd element count with this code


def _make_dynamic_map() -> torch.Tensor:
    """The signed 8-bit "dynamic" map (bitsandbytes' create_dynamic_map(signed=True)).

    For exponent i in 0..6: the 2^i midpoints of linspace(0.1, 1, 2^i + 1), times 10^(i-6), both signs;
    plus 0 and 1.0; 256 values, sorted. Computed in float64, then rounded once to float32.
    """
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += ((10 ** (i - 6)) * mids).tolist()
        values += (-(10 ** (i - 6)) * mids).tolist()
    values += [0.0, 1.0]
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


DYNAMIC_MAP = _make_dynamic_map()

NESTED_BLOCKSIZE = 256  # scales are double-quantized in blocks of 256 (fixed by the format)
VALID_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
DTYPE_FROM_NAME = {v: k for k, v in DTYPE_NAMES.items()}
# Integer codes the native extension uses for dtypes (it does not link against torch).
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# Double quantization rounds through a 65536-entry lookup table, exactly as bitsandbytes' CPU backend does:
# a scaled value v in [-1, 1] maps to index trunc(((v + 1) * 0.5) * 65535 + 0.5), each step rounded to float32.
LUT_SIZE = 65536


def build_code_lut(code: torch.Tensor) -> torch.Tensor:
    """uint8[65536]: for each grid point -1 + 2i/65535 (float32), the number of code midpoints below it.

    The midpoints are 0.5 * (code[j] + code[j + 1]) in float32, so a grid point exactly on a midpoint takes
    the lower code.
    """
    code = code.to(torch.float32)
    mids = 0.5 * (code[:-1] + code[1:])
    grid = -1.0 + (2.0 * torch.arange(LUT_SIZE, dtype=torch.float32)) / float(LUT_SIZE - 1)
    return torch.searchsorted(mids, grid, side="left").to(torch.uint8)


DYNAMIC_LUT = build_code_lut(DYNAMIC_MAP)


def check_blocksize(blocksize: int, name: str = "blocksize") -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, int):
        raise TypeError(f"{name} must be an int, got {type(blocksize).__name__}")
    if blocksize not in VALID_BLOCKSIZES:
        raise ValueError(f"{name} must be one of {VALID_BLOCKSIZES} (a power of two in 32..4096), got {blocksize}")
    return blocksize


def check_float_dtype(dtype: torch.dtype, name: str) -> torch.dtype:
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16 or bfloat16, got {dtype}")
    return dtype


def check_tensor(t, name: str, dtype=None, device=None, ndim=None, numel=None) -> torch.Tensor:
    """Raise a clear error naming `name` when t is not a tensor of the expected dtype/device/ndim/numel."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if device is not None and t.device != torch.device(device):
        raise ValueError(f"{name} is on {t.device} but must be on {device} (same device as the other inputs)")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if numel is not None and t.numel() != numel:
        raise ValueError(f"{name} must have {numel} elements, got {t.numel()} (shape {tuple(t.shape)})")
    return t


def all_finite(t: torch.Tensor) -> bool:
    """True when t holds no NaN or inf. One aminmax pass (NaN propagates through min and max, an inf is the
    min or the max): on CPU bf16 about 25x faster than isfinite(t).all(), and no bool tensor of t's size."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def num_blocks(n: int, blocksize: int) -> int:
    return (n + blocksize - 1) // blocksize


def packed_numel(n: int) -> int:
    return (n + 1) // 2


_device_tables: dict = {}


def device_table(name: str, device) -> torch.Tensor:
    """NF4_TABLE ("nf4"), DYNAMIC_MAP ("map") or DYNAMIC_LUT ("lut") on `device`, copied once per device:
    the native and Triton kernels read them through raw pointers on every call. Weights create the first two
    when they arrive on a device (prepare_device), so a forward finds them made."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # one entry per GPU, whatever spelling asked
        device = torch.device("cuda", torch.cuda.current_device())
    key = (name, device)
    if key not in _device_tables:
        if device.type == "cuda" and _capturing():
            raise RuntimeError(
                f"qlora_kernels: the {name!r} table does not exist on {device} yet, and a CUDA graph is being "
                "captured (its host -> device copy cannot be captured). Move the NF4 weight or layer to the device "
                "(.to(device)) before capturing, or call qlora_kernels._format.prepare_device(device)"
            )
        table = {"nf4": NF4_TABLE, "map": DYNAMIC_MAP, "lut": DYNAMIC_LUT}[name].to(device)
        if _is_fake(table):  # made while tracing (torch.compile, FSDP's meta init): not a real tensor to keep
            return table
        _device_tables[key] = table
    return _device_tables[key]


def _capturing() -> bool:
    """A CUDA graph is being captured on the current stream (False on a build or machine without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _is_fake(t: torch.Tensor) -> bool:
    try:
        from torch._subclasses.fake_tensor import is_fake
    except ImportError:  # pragma: no cover - every supported torch has it
        return False
    return is_fake(t)


def prepare_device(device) -> None:
    """Create the tables the forward and backward kernels read (NF4 table, dynamic map) on `device` now.

    Called when a weight is made on or moved to a device (NF4Weight, QLoRALinear._apply): a lazy first-use copy
    inside a forward is a pageable host -> device copy, which is not allowed while a CUDA graph is captured.
    The meta device runs no kernel and gets none."""
    device = torch.device(device)
    if device.type == "meta":
        return
    if device.type == "cuda" and _capturing():  # a copy here would break the capture
        return
    for name in ("nf4", "map"):
        device_table(name, device)
