// Argument checks shared by the CPU and CUDA implementations of the multi-tensor ops: the
// messages are the op's contract, so both devices must say the same thing.
#pragma once
#include <ATen/ATen.h>

namespace mpl_fast {

inline void check_tensor_lists(const char* op, at::TensorList a, at::TensorList b,
                               const char* a_name, const char* b_name) {
  TORCH_CHECK_VALUE(a.size() == b.size(), op, ": ", a_name, " and ", b_name,
                    " must have the same length, got ", a.size(), " and ", b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    TORCH_CHECK_VALUE(a[i].sizes() == b[i].sizes(), op, ": ", a_name, "[", i, "] and ", b_name,
                      "[", i, "] differ in shape: ", a[i].sizes(), " vs ", b[i].sizes());
    TORCH_CHECK_VALUE(a[i].scalar_type() == b[i].scalar_type(), op, ": ", a_name, "[", i,
                      "] and ", b_name, "[", i, "] differ in dtype: ", a[i].scalar_type(),
                      " vs ", b[i].scalar_type());
    const auto st = a[i].scalar_type();
    const bool cpu_double = st == at::kDouble && a[i].device().is_cpu();
    TORCH_CHECK_VALUE(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || cpu_double,
                      op, ": ", a_name, "[", i, "] has dtype ", st,
                      "; only float32, float16 and bfloat16 are supported (and float64 on CPU)");
    TORCH_CHECK_VALUE(a[i].device() == a[0].device() && b[i].device() == a[0].device(), op,
                      ": all tensors must be on one device; ", a_name, "[0] is on ",
                      a[0].device(), " but ", a_name, "[", i, "] is on ", a[i].device(),
                      " and ", b_name, "[", i, "] on ", b[i].device());
  }
}

}  // namespace mpl_fast
