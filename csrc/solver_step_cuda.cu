// CUDA kernel of fastfair::solver_step_out: one pass, each thread reads z, eps_c (eps_u, m_prev) in packs of
// kVec elements and writes z_next and m; 64-bit indices, grid-stride loop, the current stream (graph-capturable).
#include "cuda_utils.cuh"
#include "launchers.h"

namespace fastfair {
namespace {

template <bool kUncond, bool kPrev, int N, typename T, typename E>
__global__ void solver_step_kernel(const StepArgs<T, E> args) {
  const T* __restrict__ z = args.z;
  const E* __restrict__ eps_c = args.eps_c;
  const E* __restrict__ eps_u = args.eps_u;
  const T* __restrict__ m_prev = args.m_prev;
  const int64_t n_packs = args.n / N;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < n_packs; p += stride) {
    const Pack<T, N> zp = load_pack<N>(z, p);
    const Pack<E, N> ec = load_pack<N>(eps_c, p);
    Pack<E, N> eu{};
    Pack<T, N> mp{};
    if (kUncond) eu = load_pack<N>(eps_u, p);
    if (kPrev) mp = load_pack<N>(m_prev, p);
    Pack<T, N> zn, mo;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      step_element<T, kUncond, kPrev>(zp.v[j], static_cast<T>(ec.v[j]), static_cast<T>(eu.v[j]), mp.v[j],
                                      args.k, zn.v[j], mo.v[j]);
    }
    store_pack<N>(args.z_next, p, zn);
    store_pack<N>(args.m, p, mo);
  }
}

template <bool kUncond, bool kPrev, int N, typename T, typename E>
void launch(const StepArgs<T, E>& args) {
  solver_step_kernel<kUncond, kPrev, N>
      <<<grid_size(args.n / N), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void solver_step_cuda(const at::TensorBase& z, const at::TensorBase& eps_c, const at::TensorBase* eps_u,
                      const at::TensorBase* m_prev, const at::TensorBase& z_next, const at::TensorBase& m,
                      const StepCoefs<double>& k) {
  if (z.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(z.device());
  const bool vec = packable(z.numel(), {&z, &eps_c, eps_u, m_prev, &z_next, &m});
  dispatch_step(z, eps_c, eps_u, m_prev, z_next, m, k, [&](const auto& args, auto uncond, auto prev) {
    constexpr bool U = decltype(uncond)::value, P = decltype(prev)::value;
    vec ? launch<U, P, kVec>(args) : launch<U, P, 1>(args);
  });
}

}  // namespace fastfair
