// CPU kernel of fastfair::solver_step_out: one pass over the latents, OpenMP threads over chunks (through
// at::parallel_for, so torch.set_num_threads applies), and a branch-free inner loop the compiler vectorizes.
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "half_cpu.h"
#include "launchers.h"

namespace fastfair {
namespace {

// Below this many elements per task, waking another thread costs more than it saves.
constexpr int64_t kGrain = 1 << 14;

// Elements of an fp16 eps widened to fp32 at a time (kept in L1), as in grad_fanout_cpu.cpp.
constexpr int64_t kTile = 256;

template <bool kUncond, bool kPrev, typename T, typename E>
void step_loop(const T* __restrict__ z, const E* __restrict__ eps_c, const E* __restrict__ eps_u,
               const T* __restrict__ m_prev, T* __restrict__ z_next, T* __restrict__ m, const StepCoefs<T>& k,
               int64_t n) {
  // Restrict-qualified pointers tell the compiler the streams do not alias, so it vectorizes.
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const T u = kUncond ? static_cast<T>(eps_u[i]) : T(0);
    const T p = kPrev ? m_prev[i] : T(0);
    step_element<T, kUncond, kPrev>(z[i], static_cast<T>(eps_c[i]), u, p, k, z_next[i], m[i]);
  }
}

template <bool kUncond, bool kPrev, typename T, typename E>
void step_range(const StepArgs<T, E>& a, int64_t begin, int64_t end) {
  if constexpr (!std::is_same_v<E, c10::Half>) {
    step_loop<kUncond, kPrev>(a.z + begin, a.eps_c + begin, kUncond ? a.eps_u + begin : nullptr,
                              kPrev ? a.m_prev + begin : nullptr, a.z_next + begin, a.m + begin, a.k, end - begin);
  } else {  // c10's fp16 -> fp32 conversion keeps the loop scalar: widen tiles first (exact, half_cpu.h)
    float eps_c[kTile], eps_u[kTile];
    for (int64_t tile = begin; tile < end; tile += kTile) {
      const int64_t len = std::min(kTile, end - tile);
      half_cpu::widen(a.eps_c + tile, eps_c, len);
      if (kUncond) half_cpu::widen(a.eps_u + tile, eps_u, len);
      step_loop<kUncond, kPrev>(a.z + tile, eps_c, eps_u, kPrev ? a.m_prev + tile : nullptr, a.z_next + tile,
                                a.m + tile, a.k, len);
    }
  }
}

}  // namespace

void solver_step_cpu(const at::TensorBase& z, const at::TensorBase& eps_c, const at::TensorBase* eps_u,
                     const at::TensorBase* m_prev, const at::TensorBase& z_next, const at::TensorBase& m,
                     const StepCoefs<double>& k) {
  dispatch_step(z, eps_c, eps_u, m_prev, z_next, m, k, [](const auto& args, auto uncond, auto prev) {
    at::parallel_for(0, args.n, kGrain, [&](int64_t begin, int64_t end) {
      step_range<decltype(uncond)::value, decltype(prev)::value>(args, begin, end);
    });
  });
}

}  // namespace fastfair
