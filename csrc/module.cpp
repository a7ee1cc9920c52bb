// The extension module mpl_fast._C: op schemas (TORCH_LIBRARY) and a small pybind11 surface.
// Importing the module registers the ops as torch.ops.mpl_fast.*.
#include <pybind11/pybind11.h>
#include <torch/library.h>

TORCH_LIBRARY(mpl_fast, m) {
  m.def("multi_tensor_dot(Tensor[] a, Tensor[] b) -> Tensor");
  m.def("multi_tensor_axpby(Tensor(a!)[] y, Tensor[] x, float alpha, float beta) -> ()");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "mpl-fast compiled multi-tensor ops (registered as torch.ops.mpl_fast.*)";
#ifdef MPL_FAST_WITH_CUDA
  m.attr("cuda_built") = true;
#else
  m.attr("cuda_built") = false;
#endif
}
