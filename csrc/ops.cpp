// Registers the fastfair operators (torch.ops.fastfair.*) and their CPU kernels; CUDA kernels are registered by
// register_cuda.cpp when the extension is built with CUDA. Also the (empty) Python module fastfair._C whose
// import loads this library.
#include <Python.h>
#include <torch/library.h>

#include "ops.h"

namespace fastfair {
namespace {

bool has_cuda() {
#ifdef FASTFAIR_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace fastfair

TORCH_LIBRARY(fastfair, m) {
  m.def(
      "solver_step_out(Tensor z, Tensor eps_c, Tensor? eps_u, Tensor? m_prev, Tensor(a!) z_next, "
      "Tensor(b!) m, float guidance, float cz, float ce, float a, float b0, float b1) -> ()");
  m.def("grad_fanout_out(Tensor g, float[] scales, float[] branch_weights, Tensor(a!) out) -> ()");
  m.def("has_cuda() -> bool", &fastfair::has_cuda);
}

TORCH_LIBRARY_IMPL(fastfair, CPU, m) {
  m.impl("solver_step_out", &fastfair::solver_step_op<&fastfair::solver_step_cpu>);
  m.impl("grad_fanout_out", &fastfair::grad_fanout_op<&fastfair::grad_fanout_cpu>);
}

// `import fastfair._C` runs the registrations above; the module itself is empty.
extern "C" PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fastfair native ops, as torch.ops.fastfair", -1};
  return PyModule_Create(&module);
}
