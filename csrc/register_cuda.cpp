// CUDA kernels of the fastfair operators (built only with CUDA; see setup.py native_extensions).
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(fastfair, CUDA, m) {
  m.impl("solver_step_out", &fastfair::solver_step_op<&fastfair::solver_step_cuda>);
  m.impl("grad_fanout_out", &fastfair::grad_fanout_op<&fastfair::grad_fanout_cuda>);
}
