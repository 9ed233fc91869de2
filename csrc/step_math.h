// Per-element math of the two ops, shared by the CPU and CUDA kernels so both follow the torch reference's
// expression order (kernels/reference.py) and differ from it at most by FMA contraction.
#pragma once
#include <c10/macros/Macros.h>

namespace fastfair {

// Scalars of one DPM-Solver++ step (data prediction):
//   eps = eps_u + guidance (eps_c - eps_u);  m = cz z + ce eps;  z_next = a z + b0 m (+ b1 m_prev at order 2)
template <typename T>
struct StepCoefs {
  T guidance, cz, ce, a, b0, b1;

  template <typename U>
  C10_HOST_DEVICE StepCoefs<U> cast() const {
    return {U(guidance), U(cz), U(ce), U(a), U(b0), U(b1)};
  }
};

template <typename T, bool kUncond, bool kPrev>
C10_HOST_DEVICE inline void step_element(T z, T eps_c, T eps_u, T m_prev, const StepCoefs<T>& k, T& z_next,
                                         T& m) {
  const T eps = kUncond ? eps_u + k.guidance * (eps_c - eps_u) : eps_c;
  m = k.cz * z + k.ce * eps;
  T next = k.a * z + k.b0 * m;
  if (kPrev) next = next + k.b1 * m_prev;
  z_next = next;
}

// Compute type of the fan-out: fp64 for an fp64 g, fp32 otherwise (fp16/bf16 g is upcast, as in the reference).
template <typename G>
struct FanoutAcc {
  using type = float;
};
template <>
struct FanoutAcc<double> {
  using type = double;
};

}  // namespace fastfair
