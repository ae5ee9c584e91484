// Every op's schema, in one place. Kernels register in cpu/*.cpp and cuda/*.cu.
#include <torch/library.h>

TORCH_LIBRARY(mini_unlearn, m) {
  m.def("quantize_blockwise(Tensor x, int bits, int block, bool stochastic, int seed) -> (Tensor, Tensor)");
  m.def("dequantize_blockwise(Tensor codes, Tensor scales, int bits, int block, int numel, ScalarType dtype) -> Tensor");
  m.def("dequant_dot(Tensor codes, Tensor scales, Tensor v, int bits, int block) -> Tensor");
  m.def("dequant_axpy(Tensor y, Tensor codes, Tensor scales, Tensor coeff, int bits, int block) -> Tensor");
  m.def("contraction_accumulate(Tensor(a!) acc, Tensor x, Tensor s_out, Tensor s_in, float lam, float eta, int steps) -> ()");
  m.def("contraction_accumulate_q(Tensor(a!) acc, Tensor codes, Tensor scales, Tensor s_out, Tensor s_in, float lam, float eta, int steps, int bits, int block) -> ()");
  m.def("contraction2_accumulate(Tensor(a!) u, Tensor(b!) e, Tensor x, Tensor s_out, Tensor s_in, Tensor? d, *, float lam, float lam_dec, float eta, float mu, float c, bool nesterov, int steps) -> ()");
}

// `import mini_unlearn._C` loads this library, which registers the ops above.
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
