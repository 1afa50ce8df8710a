"""State tensors in CUDA managed (unified) memory for the paged optimizers.

The native extension allocates the memory (cudaMallocManaged) and hands it to torch as a CUDA tensor through
a DLPack capsule whose deleter frees it, so the states are ordinary CUDA tensors to torch (state dicts,
torch.compile and FSDP see nothing special) while the driver may page them out to host memory under
pressure. Before each update the optimizer prefetches a tensor's states to the GPU on the current stream
(cudaMemPrefetchAsync): no synchronization per parameter.

Where the device lacks concurrent managed access (cudaDevAttrConcurrentManagedAccess = 0: Windows, WSL,
some virtualised GPUs), managed memory would fault on every CPU/GPU overlap; the optimizer warns once and
uses ordinary device memory. On the CPU, paged and unpaged states are the same ordinary tensors.

Guard: a managed allocation is never larger than the device's free memory (torch.cuda.mem_get_info) minus a
margin (MANAGED_MARGIN_MIN_BYTES or MANAGED_MARGIN_FRACTION of the device, the larger). The states are zero-filled
on the device when allocated (cudaMemset), so each one is resident at once and lowers the free memory the next
one sees; asking the driver for more managed memory than the GPU has free can hang the GPU itself, not only the
process. managed_zeros raises ManagedMemoryError beyond the guard; the optimizers call managed_zeros_or_none and
put such a state in ordinary device memory instead, with one warning per device (torch's allocator may still
find room in its cached blocks, which mem_get_info counts as used, or raises its own out-of-memory error).
"""

from __future__ import annotations

import warnings

import torch

from .._backend import native_module

_warned: set = set()
_warned_guard: set = set()

# Headroom left beside the managed states: the CUDA context, cuBLAS workspaces, Triton's launches and the
# caching allocator's next segment need memory after the states are placed.
MANAGED_MARGIN_MIN_BYTES = 1 << 30
MANAGED_MARGIN_FRACTION = 0.05


class ManagedMemoryError(MemoryError):
    """A managed allocation the guard refused: more than the device has free minus the margin."""


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def managed_budget(device: torch.device) -> int:
    """Bytes of managed memory one allocation on `device` may take now: free device memory minus the margin
    (can be negative)."""
    free, total = torch.cuda.mem_get_info(_index(device))
    return int(free) - max(MANAGED_MARGIN_MIN_BYTES, int(MANAGED_MARGIN_FRACTION * total))


def paging_available(device: torch.device) -> bool:
    """True when states on `device` can live in managed memory allocated by the extension."""
    if device.type != "cuda":
        return False
    mod = native_module()
    index = device.index if device.index is not None else torch.cuda.current_device()
    if mod is None or not mod.has_cuda() or not mod.concurrent_managed_access(index):
        if device not in _warned:
            _warned.add(device)
            why = ("the native extension has no CUDA kernels" if mod is None or not mod.has_cuda()
                   else "the device lacks concurrent managed access")
            warnings.warn(
                f"qlora_kernels.optim: paged states unavailable on {device} ({why}); using ordinary device memory",
                RuntimeWarning,
                stacklevel=4,
            )
        return False
    return True


def _nbytes(shape, dtype: torch.dtype) -> int:
    numel = 1
    for s in shape:
        numel *= int(s)
    return numel * torch.empty((), dtype=dtype).element_size()


def managed_zeros(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled tensor of `shape`/`dtype` in CUDA managed memory on `device` (a CUDA tensor to torch).

    Raises ManagedMemoryError, before anything reaches the driver, when the tensor would take more than the
    device has free minus the margin (managed_budget)."""
    nbytes = _nbytes(shape, dtype)
    budget = managed_budget(device)
    if nbytes > 0 and nbytes > budget:
        raise ManagedMemoryError(
            f"qlora_kernels.optim: a paged state of {nbytes / 2**20:.1f} MiB ({tuple(shape)}, {dtype}) exceeds "
            f"the managed-memory budget of {device}: {max(budget, 0) / 2**20:.1f} MiB (free device memory minus "
            f"a margin of max({MANAGED_MARGIN_MIN_BYTES / 2**30:g} GiB, {MANAGED_MARGIN_FRACTION:.0%} of the "
            f"device)); more managed memory than the GPU has free can hang the GPU")
    raw = torch.from_dlpack(native_module().managed_capsule(nbytes, _index(device)))
    return raw.view(dtype).reshape(shape)


def managed_zeros_or_none(shape, dtype: torch.dtype, device: torch.device):
    """managed_zeros, or None when the guard refuses the allocation (the caller then uses ordinary device memory;
    one RuntimeWarning per device says so)."""
    try:
        return managed_zeros(shape, dtype, device)
    except ManagedMemoryError as exc:
        if device not in _warned_guard:
            _warned_guard.add(device)
            warnings.warn(f"{exc}; this state and any other refused on {device} use ordinary device memory",
                          RuntimeWarning, stacklevel=4)
        return None


def host_capsule_zeros(nbytes: int) -> torch.Tensor:
    """Host memory through the same capsule code (a test hook for the CPU build: ownership and deleter)."""
    return torch.from_dlpack(native_module().managed_capsule(nbytes, -1))


def prefetch(tensors, device: torch.device) -> None:
    """cudaMemPrefetchAsync of managed tensors to `device` on its current stream."""
    mod = native_module()
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(device).cuda_stream
    for t in tensors:
        mod.managed_prefetch(t.data_ptr(), t.numel() * t.element_size(), index, stream)


def pointer_type(t: torch.Tensor) -> str:
    """Where the CUDA runtime says t's memory lives: 'managed', 'device', 'host' or 'unregistered'."""
    mod = native_module()
    if mod is None or not mod.has_cuda():
        return "unregistered"
    return mod.cuda_pointer_type(t.data_ptr())
