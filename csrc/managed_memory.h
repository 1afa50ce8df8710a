// Memory handed to torch through DLPack: CUDA managed (unified) memory for paged optimizer states, and plain
// host memory through the same capsule code (so the CPU build's tests exercise the capsule and its deleter).
#pragma once

#include <cstdint>

#include <pybind11/pybind11.h>

namespace qk {

// A "dltensor" PyCapsule of a 1-D uint8 tensor of nbytes, zero-filled, whose deleter frees the memory and
// updates the live-byte counter. device < 0: host memory (malloc); else CUDA managed memory on that device.
pybind11::object managed_capsule(int64_t nbytes, int device);
int64_t managed_bytes_live();  // CUDA managed bytes allocated here and not yet freed
int64_t host_capsule_bytes_live();

}  // namespace qk
