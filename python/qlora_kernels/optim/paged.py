"""State tensors in CUDA managed (unified) memory for the paged optimizers.

The native extension allocates the memory (cudaMallocManaged) and hands it to torch as a CUDA tensor through
a DLPack capsule whose deleter frees it, so the states are ordinary CUDA tensors to torch (state dicts,
torch.compile and FSDP see nothing special) while the driver may page them out to host memory under
pressure. Before each update the optimizer prefetches a tensor's states to the GPU on the current stream
(cudaMemPrefetchAsync): no synchronization per parameter.

Where the device lacks concurrent managed access (cudaDevAttrConcurrentManagedAccess = 0: Windows, WSL,
some virtualised GPUs), managed memory would fault on every CPU/GPU overlap; the optimizer warns once and
uses ordinary device memory. On the CPU, paged and unpaged states are the same ordinary tensors.
"""

from __future__ import annotations

import warnings

import torch

from .._backend import native_module

_warned: set = set()


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


def managed_zeros(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zero-filled tensor of `shape`/`dtype` in CUDA managed memory on `device` (a CUDA tensor to torch)."""
    numel = 1
    for s in shape:
        numel *= int(s)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    index = device.index if device.index is not None else torch.cuda.current_device()
    raw = torch.from_dlpack(native_module().managed_capsule(nbytes, index))
    return raw.view(dtype).reshape(shape)


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
