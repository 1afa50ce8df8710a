// DLPack capsules over memory this module allocates. torch.from_dlpack(capsule) takes ownership: when the
// last tensor over the storage dies, torch calls the DLManagedTensor's deleter (from any thread, maybe without
// the GIL), which frees the memory. The DLPack structs are declared here (ABI of dlpack.h v0.8, the layout
// torch reads from a "dltensor" capsule) so the build needs no dlpack header.
#include "managed_memory.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

#include "optim_kernels.h"

namespace qk {
namespace {

struct DLDevice {
  int32_t device_type;  // kDLCPU = 1, kDLCUDA = 2
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;  // kDLUInt = 1
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor*);
};

constexpr int32_t kDLCPU = 1;
constexpr int32_t kDLCUDA = 2;

std::atomic<int64_t> g_managed_live{0};
std::atomic<int64_t> g_host_live{0};

struct Owner {
  DLManagedTensor t;
  int64_t shape[1];
  int64_t strides[1];
  int64_t nbytes;
  bool managed;
};

void free_owner(DLManagedTensor* t) {
  Owner* o = static_cast<Owner*>(t->manager_ctx);
  if (o->managed) {
    if (o->t.dl_tensor.data) cuda_managed_free(reinterpret_cast<uintptr_t>(o->t.dl_tensor.data));
    g_managed_live.fetch_sub(o->nbytes);
  } else {
    std::free(o->t.dl_tensor.data);
    g_host_live.fetch_sub(o->nbytes);
  }
  delete o;
}

// A capsule that was never consumed (renamed "used_dltensor" by the consumer) frees its tensor itself.
void capsule_destructor(PyObject* cap) {
  if (PyCapsule_IsValid(cap, "used_dltensor")) return;
  auto* t = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
  if (t == nullptr) {
    PyErr_Clear();
    return;
  }
  t->deleter(t);
}

}  // namespace

pybind11::object managed_capsule(int64_t nbytes, int device) {
  if (nbytes < 0) throw std::invalid_argument("nbytes must be >= 0, got " + std::to_string(nbytes));
  auto* o = new Owner();
  o->nbytes = nbytes;
  o->managed = device >= 0;
  void* data = nullptr;
  if (o->managed) {
    try {
      data = nbytes ? reinterpret_cast<void*>(cuda_managed_alloc(nbytes, device)) : nullptr;
    } catch (...) {
      delete o;
      throw;
    }
    g_managed_live.fetch_add(nbytes);
  } else {
    data = std::calloc(nbytes ? nbytes : 1, 1);
    if (data == nullptr) {
      delete o;
      throw std::bad_alloc();
    }
    g_host_live.fetch_add(nbytes);
  }
  o->shape[0] = nbytes;
  o->strides[0] = 1;
  DLTensor& d = o->t.dl_tensor;
  d.data = data;
  d.device = DLDevice{o->managed ? kDLCUDA : kDLCPU, o->managed ? device : 0};
  d.ndim = 1;
  d.dtype = DLDataType{1, 8, 1};
  d.shape = o->shape;
  d.strides = o->strides;
  d.byte_offset = 0;
  o->t.manager_ctx = o;
  o->t.deleter = free_owner;
  PyObject* cap = PyCapsule_New(&o->t, "dltensor", capsule_destructor);
  if (cap == nullptr) {
    free_owner(&o->t);
    throw pybind11::error_already_set();
  }
  return pybind11::reinterpret_steal<pybind11::object>(cap);
}

int64_t managed_bytes_live() { return g_managed_live.load(); }
int64_t host_capsule_bytes_live() { return g_host_live.load(); }

}  // namespace qk
