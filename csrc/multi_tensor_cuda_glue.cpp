// Torch-facing host glue of the CUDA multi-tensor ops: checks, dtype codes, raw pointers,
// the current stream. Compiled only into CUDA builds of the extension.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "multi_tensor_checks.h"
#include "multi_tensor_cuda.h"

namespace mpl_fast {
namespace {

cuda::DType dtype_code(at::ScalarType st) {
  switch (st) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    default: return cuda::DType::kBFloat16;
  }
}

void check_launch(const char* op) {
  const char* err = cuda::last_error();
  TORCH_CHECK(err == nullptr, op, ": CUDA kernel launch failed: ", err);
}

at::Tensor multi_tensor_dot_cuda(at::TensorList a, at::TensorList b) {
  check_tensor_lists("multi_tensor_dot", a, b, "a", "b");
  const c10::cuda::CUDAGuard guard(a[0].device());
  std::vector<at::Tensor> keep;  // contiguous copies of strided inputs must outlive the launch
  std::vector<const void*> pa, pb;
  std::vector<int64_t> numel;
  std::vector<cuda::DType> dtype;
  for (size_t i = 0; i < a.size(); ++i) {
    keep.push_back(a[i].contiguous());
    keep.push_back(b[i].contiguous());
    pa.push_back(keep[keep.size() - 2].const_data_ptr());
    pb.push_back(keep.back().const_data_ptr());
    numel.push_back(a[i].numel());
    dtype.push_back(dtype_code(a[i].scalar_type()));
  }
  const auto opts = at::TensorOptions().dtype(at::kFloat).device(a[0].device());
  const int n = static_cast<int>(a.size());
  at::Tensor partials = at::empty({cuda::multi_tensor_dot_partials(numel.data(), n)}, opts);
  at::Tensor out = at::empty({}, opts);
  cuda::multi_tensor_dot(pa.data(), pb.data(), numel.data(), dtype.data(), n,
                         partials.data_ptr<float>(), out.data_ptr<float>(),
                         c10::cuda::getCurrentCUDAStream().stream());
  check_launch("multi_tensor_dot");
  return out;
}

void multi_tensor_axpbycuda(at::TensorList y, at::TensorList x, double alpha, double beta) {
  check_tensor_lists("multi_tensor_axpby", y, x, "y", "x");
  if (y.empty()) return;
  const c10::cuda::CUDAGuard guard(y[0].device());
  std::vector<at::Tensor> keep, strided_targets, strided_results;
  std::vector<void*> py;
  std::vector<const void*> px;
  std::vector<int64_t> numel;
  std::vector<cuda::DType> dtype;
  for (size_t i = 0; i < y.size(); ++i) {
    at::Tensor yi = y[i];
    if (!yi.is_contiguous()) {  // work on a dense copy, then write it back
      strided_targets.push_back(yi);
      yi = yi.contiguous();
      strided_results.push_back(yi);
    }
    keep.push_back(x[i].contiguous());
    py.push_back(yi.data_ptr());
    px.push_back(keep.back().const_data_ptr());
    numel.push_back(yi.numel());
    dtype.push_back(dtype_code(yi.scalar_type()));
  }
  cuda::multi_tensor_axpby(py.data(), px.data(), numel.data(), dtype.data(),
                           static_cast<int>(y.size()), static_cast<float>(alpha),
                           static_cast<float>(beta), c10::cuda::getCurrentCUDAStream().stream());
  check_launch("multi_tensor_axpby");
  for (size_t i = 0; i < strided_targets.size(); ++i) strided_targets[i].copy_(strided_results[i]);
}

}  // namespace

TORCH_LIBRARY_IMPL(mpl_fast, CUDA, m) {
  m.impl("multi_tensor_dot", &multi_tensor_dot_cuda);
  m.impl("multi_tensor_axpby", &multi_tensor_axpbycuda);
}

}  // namespace mpl_fast
