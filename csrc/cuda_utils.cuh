// Helpers shared by the CUDA kernels: aligned vector access and a grid-stride launch shape.
#pragma once
#include <ATen/core/TensorBase.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>

namespace fastfair {

constexpr int kThreads = 256;
constexpr int kVec = 4;  // elements per thread per iteration: 16-byte fp32 loads; latents have 4k elements
constexpr int64_t kMaxBlocks = 1 << 16;  // beyond this, threads loop (grid-stride) instead

// N consecutive elements moved as one aligned access (ld.global.v4 and friends).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_pack(const T* p, int64_t pack) {
  return reinterpret_cast<const Pack<T, N>*>(p)[pack];
}

template <int N, typename T>
__device__ __forceinline__ void store_pack(T* p, int64_t pack, const Pack<T, N>& value) {
  reinterpret_cast<Pack<T, N>*>(p)[pack] = value;
}

// Whether every tensor's data can be read in kVec-element packs: numel a multiple of kVec, pointers aligned.
inline bool packable(int64_t numel, std::initializer_list<const at::TensorBase*> tensors) {
  if (numel % kVec != 0) return false;
  for (const at::TensorBase* t : tensors) {
    if (t && reinterpret_cast<std::uintptr_t>(t->data_ptr()) % (kVec * t->element_size()) != 0) return false;
  }
  return true;
}

inline unsigned int grid_size(int64_t work_items) {
  return static_cast<unsigned int>(std::min<int64_t>((work_items + kThreads - 1) / kThreads, kMaxBlocks));
}

}  // namespace fastfair
