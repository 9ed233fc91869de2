// CUDA kernel of fastfair::grad_fanout_out: each thread reads a pack of g once and writes it scaled by every
// (step, branch) coefficient; the coefficients travel in the kernel's parameters (no host-to-device copy).
#include <algorithm>
#include <type_traits>

#include "cuda_utils.cuh"
#include "launchers.h"

namespace fastfair {
namespace {

constexpr int kMaxCoefs = 128;  // per launch (1 KiB of parameters); more coefficients take more launches

struct Coefs {
  double value[kMaxCoefs];
};

template <typename G, typename O, int N>
__global__ void grad_fanout_kernel(const G* __restrict__ g, O* __restrict__ out, const Coefs coefs, int n_coefs,
                                   int64_t n) {
  using A = typename FanoutAcc<G>::type;
  const int64_t n_packs = n / N;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < n_packs; p += stride) {
    const Pack<G, N> gp = load_pack<N>(g, p);
    A ga[N];
#pragma unroll
    for (int j = 0; j < N; ++j) ga[j] = static_cast<A>(gp.v[j]);
    for (int c = 0; c < n_coefs; ++c) {
      const A s = static_cast<A>(coefs.value[c]);
      Pack<O, N> o;
#pragma unroll
      for (int j = 0; j < N; ++j) o.v[j] = static_cast<O>(s * ga[j]);
      store_pack<N>(out + c * n, p, o);
    }
  }
}

}  // namespace

void grad_fanout_cuda(const at::TensorBase& g, const std::vector<double>& coefs, const at::TensorBase& out) {
  const int64_t n = g.numel();
  const c10::cuda::CUDAGuard guard(g.device());
  const bool vec = packable(n, {&g, &out});
  const auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_fanout(g, out, [&](const auto* g_ptr, auto* out_ptr) {
    using G = std::remove_cv_t<std::remove_pointer_t<decltype(g_ptr)>>;
    using O = std::remove_pointer_t<decltype(out_ptr)>;
    for (size_t first = 0; first < coefs.size(); first += kMaxCoefs) {
      const int count = static_cast<int>(std::min<size_t>(kMaxCoefs, coefs.size() - first));
      Coefs chunk;
      std::copy_n(coefs.begin() + first, count, chunk.value);
      O* dst = out_ptr + static_cast<int64_t>(first) * n;
      if (vec) {
        grad_fanout_kernel<G, O, kVec><<<grid_size(n / kVec), kThreads, 0, stream>>>(g_ptr, dst, chunk, count, n);
      } else {
        grad_fanout_kernel<G, O, 1><<<grid_size(n), kThreads, 0, stream>>>(g_ptr, dst, chunk, count, n);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace fastfair
