// CPU implementations of the multi-tensor ops, registered for the CPU dispatch key.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "multi_tensor_checks.h"

namespace mpl_fast {
namespace {

at::Tensor multi_tensor_dot_cpu(at::TensorList a, at::TensorList b) {
  check_tensor_lists("multi_tensor_dot", a, b, "a", "b");
  double total = 0.0;  // at least fp32 accumulation, as the op promises; double costs nothing here
  for (size_t i = 0; i < a.size(); ++i) {
    const at::Tensor x = a[i].contiguous(), y = b[i].contiguous();
    const int64_t n = x.numel();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multi_tensor_dot", [&] {
      const scalar_t* px = x.const_data_ptr<scalar_t>();
      const scalar_t* py = y.const_data_ptr<scalar_t>();
      double acc = 0.0;
      for (int64_t j = 0; j < n; ++j) acc += static_cast<double>(px[j]) * static_cast<double>(py[j]);
      total += acc;
    });
  }
  const bool all_double = !a.empty() && a[0].scalar_type() == at::kDouble;
  return at::scalar_tensor(total, at::TensorOptions().dtype(all_double ? at::kDouble : at::kFloat));
}

void multi_tensor_axpbycpu(at::TensorList y, at::TensorList x, double alpha, double beta) {
  check_tensor_lists("multi_tensor_axpby", y, x, "y", "x");
  for (size_t i = 0; i < y.size(); ++i) {
    // fp32 arithmetic, one rounding to the storage dtype, as on the GPU.
    at::Tensor yi = y[i];
    const auto compute = at::promote_types(yi.scalar_type(), at::kFloat);
    yi.copy_(x[i].to(compute).mul(alpha).add_(yi.to(compute), beta));
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(mpl_fast, CPU, m) {
  m.impl("multi_tensor_dot", &multi_tensor_dot_cpu);
  m.impl("multi_tensor_axpby", &multi_tensor_axpbycpu);
}

}  // namespace mpl_fast
