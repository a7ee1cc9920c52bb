// Plain C++ interface of the CUDA multi-tensor kernels. Deliberately free of torch headers so
// that nvcc compiles multi_tensor_cuda.cu quickly; the torch-facing glue lives in
// multi_tensor_cuda_glue.cpp.
#pragma once
#include <cstdint>

namespace mpl_fast {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Number of per-block partial sums multi_tensor_dot needs for these tensor sizes.
int64_t multi_tensor_dot_partials(const int64_t* numel, int n);

// out[0] = sum_i <a_i, b_i>, accumulated in fp32 per block and in double across blocks.
// partials: device buffer of multi_tensor_dot_partials(numel, n) floats (may be null if 0).
// All a_i, b_i contiguous, on the current device; dtype[i] applies to both a_i and b_i.
// Launches ceil(n / kMaxTensors)-ish kernels plus one final reduction, never one per tensor.
void multi_tensor_dot(const void* const* a, const void* const* b, const int64_t* numel,
                      const DType* dtype, int n, float* partials, float* out, void* stream);

// y_i <- alpha * x_i + beta * y_i for every i, computed in fp32, in place on y.
void multi_tensor_axpby(void* const* y, const void* const* x, const int64_t* numel,
                        const DType* dtype, int n, float alpha, float beta, void* stream);

// Sticky CUDA error of the last launch as a string, or null when there is none.
const char* last_error();

}  // namespace cuda
}  // namespace mpl_fast
