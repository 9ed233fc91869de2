// CPU kernel of fastfair::solver_step_out: one pass over the latents, OpenMP threads over chunks (through
// at::parallel_for, so torch.set_num_threads applies), and a branch-free inner loop the compiler vectorizes.
#include <ATen/Parallel.h>

#include "launchers.h"

namespace fastfair {
namespace {

// Below this many elements per task, waking another thread costs more than it saves.
constexpr int64_t kGrain = 1 << 14;

template <bool kUncond, bool kPrev, typename T, typename E>
void step_range(const StepArgs<T, E>& args, int64_t begin, int64_t end) {
  // Restrict-qualified locals tell the compiler the streams do not alias, so it vectorizes.
  const T* __restrict__ z = args.z;
  const E* __restrict__ eps_c = args.eps_c;
  const E* __restrict__ eps_u = args.eps_u;
  const T* __restrict__ m_prev = args.m_prev;
  T* __restrict__ z_next = args.z_next;
  T* __restrict__ m = args.m;
  const StepCoefs<T> k = args.k;
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const T u = kUncond ? static_cast<T>(eps_u[i]) : T(0);
    const T p = kPrev ? m_prev[i] : T(0);
    step_element<T, kUncond, kPrev>(z[i], static_cast<T>(eps_c[i]), u, p, k, z_next[i], m[i]);
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
