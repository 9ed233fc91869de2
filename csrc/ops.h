// Operator entry points shared by every device: argument checks, then the device's launcher. The Python
// dispatcher (kernels/dispatch.py) raises friendlier errors first; these checks keep a direct
// torch.ops.fastfair call from reading or writing out of bounds.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

#include "launchers.h"

namespace fastfair {

inline void check_like(const at::Tensor& t, const at::Tensor& z, const char* name, bool same_dtype) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "fastfair: ", name, " must be contiguous");
  TORCH_CHECK_VALUE(t.sizes() == z.sizes(), "fastfair: ", name, " has shape ", t.sizes(), ", expected ", z.sizes());
  TORCH_CHECK_VALUE(t.device() == z.device(), "fastfair: ", name, " is on ", t.device(), ", z on ", z.device());
  TORCH_CHECK_TYPE(!same_dtype || t.scalar_type() == z.scalar_type(), "fastfair: ", name, " has dtype ",
                   t.scalar_type(), ", expected ", z.scalar_type());
}

// schema: solver_step_out(z, eps_c, eps_u?, m_prev?, z_next!, m!, guidance, cz, ce, a, b0, b1) -> ()
template <StepLauncher launch>
void solver_step_op(const at::Tensor& z, const at::Tensor& eps_c, const std::optional<at::Tensor>& eps_u,
                    const std::optional<at::Tensor>& m_prev, const at::Tensor& z_next, const at::Tensor& m,
                    double guidance, double cz, double ce, double a, double b0, double b1) {
  TORCH_CHECK_TYPE(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble,
                   "fastfair: z (the trajectory) must be float32 or float64, got ", z.scalar_type());
  check_like(z, z, "z", true);
  check_like(eps_c, z, "eps_c", false);
  if (eps_u) {
    check_like(*eps_u, z, "eps_u", false);
    TORCH_CHECK_TYPE(eps_u->scalar_type() == eps_c.scalar_type(), "fastfair: eps_u and eps_c dtypes differ");
  }
  // As in the reference, m_prev is read only at order 2 (b1 != 0).
  const bool second_order = b1 != 0.0;
  TORCH_CHECK_VALUE(!second_order || m_prev, "fastfair: b1 != 0 (second-order step) needs m_prev");
  if (second_order) check_like(*m_prev, z, "m_prev", true);
  check_like(z_next, z, "z_next", true);
  check_like(m, z, "m", true);
  launch(z, eps_c, eps_u ? &*eps_u : nullptr, second_order ? &*m_prev : nullptr, z_next, m,
         StepCoefs<double>{guidance, cz, ce, a, b0, b1});
}

// schema: grad_fanout_out(g, scales, branch_weights, out!) -> ();  out[j, b] = scales[j] * branch_weights[b] * g
template <FanoutLauncher launch>
void grad_fanout_op(const at::Tensor& g, c10::ArrayRef<double> scales, c10::ArrayRef<double> branch_weights,
                    const at::Tensor& out) {
  TORCH_CHECK_VALUE(g.is_contiguous(), "fastfair: g must be contiguous");
  TORCH_CHECK_VALUE(out.is_contiguous(), "fastfair: out must be contiguous");
  TORCH_CHECK_VALUE(out.device() == g.device(), "fastfair: out is on ", out.device(), ", g on ", g.device());
  std::vector<double> coefs;
  coefs.reserve(scales.size() * branch_weights.size());
  // Products in double, as the reference forms float(s) * float(w) in Python before scaling g.
  for (double s : scales)
    for (double w : branch_weights) coefs.push_back(s * w);
  TORCH_CHECK_VALUE(out.numel() == static_cast<int64_t>(coefs.size()) * g.numel(), "fastfair: out has ",
                    out.numel(), " elements, expected ", scales.size(), " x ", branch_weights.size(), " x ",
                    g.numel());
  if (!coefs.empty() && g.numel() > 0) launch(g, coefs, out);
}

}  // namespace fastfair
