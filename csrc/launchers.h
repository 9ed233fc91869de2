// Device launchers of the two ops, and the dtype dispatch they share. They take already-checked arguments (see
// ops.h) as TensorBase, which keeps the heavy ATen/core/Tensor.h out of the kernel translation units (notably
// the nvcc ones).
#pragma once
#include <ATen/Dispatch.h>
#include <ATen/core/TensorBase.h>

#include <type_traits>
#include <vector>

#include "step_math.h"

namespace fastfair {

// eps_u / m_prev are nullptr when absent (no CFG / order-1 step). All tensors contiguous, z's shape.
using StepLauncher = void (*)(const at::TensorBase& z, const at::TensorBase& eps_c, const at::TensorBase* eps_u,
                              const at::TensorBase* m_prev, const at::TensorBase& z_next, const at::TensorBase& m,
                              const StepCoefs<double>& k);
// out holds coefs.size() contiguous copies of g's shape: out[c] = coefs[c] * g.
using FanoutLauncher = void (*)(const at::TensorBase& g, const std::vector<double>& coefs,
                                const at::TensorBase& out);

void solver_step_cpu(const at::TensorBase& z, const at::TensorBase& eps_c, const at::TensorBase* eps_u,
                     const at::TensorBase* m_prev, const at::TensorBase& z_next, const at::TensorBase& m,
                     const StepCoefs<double>& k);
void grad_fanout_cpu(const at::TensorBase& g, const std::vector<double>& coefs, const at::TensorBase& out);

void solver_step_cuda(const at::TensorBase& z, const at::TensorBase& eps_c, const at::TensorBase* eps_u,
                      const at::TensorBase* m_prev, const at::TensorBase& z_next, const at::TensorBase& m,
                      const StepCoefs<double>& k);
void grad_fanout_cuda(const at::TensorBase& g, const std::vector<double>& coefs, const at::TensorBase& out);

// Typed view of a step's tensors: T the trajectory type (float/double), E the eps type; n elements.
template <typename T, typename E>
struct StepArgs {
  const T* z;
  const E* eps_c;
  const E* eps_u;   // nullptr without CFG
  const T* m_prev;  // nullptr at order 1
  T* z_next;
  T* m;
  StepCoefs<T> k;
  int64_t n;
};

// Calls f(StepArgs<T, E>, std::bool_constant<has eps_u>, std::bool_constant<has m_prev>), so kernels get the
// types and the step variant at compile time.
template <typename F>
void dispatch_step(const at::TensorBase& z, const at::TensorBase& eps_c, const at::TensorBase* eps_u,
                   const at::TensorBase* m_prev, const at::TensorBase& z_next, const at::TensorBase& m,
                   const StepCoefs<double>& k, F&& f) {
  AT_DISPATCH_FLOATING_TYPES(z.scalar_type(), "fastfair_solver_step", [&] {
    using T = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, eps_c.scalar_type(), "fastfair_solver_step", [&] {
      using E = scalar_t;
      const StepArgs<T, E> args{z.const_data_ptr<T>(),
                                eps_c.const_data_ptr<E>(),
                                eps_u ? eps_u->const_data_ptr<E>() : nullptr,
                                m_prev ? m_prev->const_data_ptr<T>() : nullptr,
                                z_next.mutable_data_ptr<T>(),
                                m.mutable_data_ptr<T>(),
                                k.cast<T>(),
                                z.numel()};
      using Yes = std::true_type;
      using No = std::false_type;
      if (eps_u) {
        m_prev ? f(args, Yes{}, Yes{}) : f(args, Yes{}, No{});
      } else {
        m_prev ? f(args, No{}, Yes{}) : f(args, No{}, No{});
      }
    });
  });
}

// Calls f(const G* g, O* out) with g's and out's element types (fp16, bf16, fp32, fp64 each).
template <typename F>
void dispatch_fanout(const at::TensorBase& g, const at::TensorBase& out, F&& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "fastfair_grad_fanout", [&] {
    using G = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "fastfair_grad_fanout", [&] {
      f(g.const_data_ptr<G>(), out.mutable_data_ptr<scalar_t>());
    });
  });
}

}  // namespace fastfair
