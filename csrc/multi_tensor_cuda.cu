// CUDA multi-tensor kernels: one launch covers up to kMaxTensors tensors / kMaxBlocks chunks,
// described by a metadata struct passed by value as a kernel argument (no host-to-device copy,
// so the launches are safe inside CUDA-graph capture).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <vector>

#include "multi_tensor_cuda.h"

namespace mpl_fast {
namespace cuda {
namespace {

constexpr int kMaxTensors = 40;
constexpr int kMaxBlocks = 320;
constexpr int64_t kChunk = 16384;  // elements one block handles
constexpr int kThreads = 256;

struct ListMeta {
  const void* x[kMaxTensors];
  void* y[kMaxTensors];
  int64_t numel[kMaxTensors];
  int16_t block_tensor[kMaxBlocks];
  int32_t block_chunk[kMaxBlocks];
};

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

__device__ __forceinline__ float block_sum(float v) {
  __shared__ float warp_sums[kThreads / 32];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[threadIdx.x] : 0.f;
  if (warp == 0)
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) dot_kernel(ListMeta meta, float* partials) {
  const int t = meta.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunk;
  int64_t end = begin + kChunk;
  if (end > meta.numel[t]) end = meta.numel[t];
  const T* a = static_cast<const T*>(meta.x[t]);
  const T* b = static_cast<const T*>(meta.y[t]);
  float acc = 0.f;
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads)
    acc += to_float(a[i]) * to_float(b[i]);
  acc = block_sum(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

__global__ void __launch_bounds__(kThreads) final_sum_kernel(const float* partials, int64_t n,
                                                             float* out) {
  // Double accumulation across blocks keeps 2000-tensor sums accurate; fixed order, so
  // the result is deterministic.
  __shared__ double sums[kThreads];
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) acc += partials[i];
  sums[threadIdx.x] = acc;
  __syncthreads();
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    if (threadIdx.x < s) sums[threadIdx.x] += sums[threadIdx.x + s];
    __syncthreads();
  }
  if (threadIdx.x == 0) out[0] = static_cast<float>(sums[0]);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) axpby_kernel(ListMeta meta, float alpha, float beta) {
  const int t = meta.block_tensor[blockIdx.x];
  const int64_t begin = static_cast<int64_t>(meta.block_chunk[blockIdx.x]) * kChunk;
  int64_t end = begin + kChunk;
  if (end > meta.numel[t]) end = meta.numel[t];
  const T* x = static_cast<const T*>(meta.x[t]);
  T* y = static_cast<T*>(meta.y[t]);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads)
    y[i] = from_float<T>(alpha * to_float(x[i]) + beta * to_float(y[i]));
}

int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

// Walks the tensor list, packing (tensor, chunk) pairs into launches of at most kMaxTensors
// tensors and kMaxBlocks blocks, and never mixing dtypes within one launch.
template <typename Launch>
void for_each_launch(const void* const* x, void* const* y, const int64_t* numel,
                     const DType* dtype, int n, Launch launch) {
  ListMeta meta;
  int tensors = 0, blocks = 0;
  DType current = DType::kFloat32;
  auto flush = [&]() {
    if (blocks > 0) launch(meta, blocks, current);
    tensors = 0;
    blocks = 0;
  };
  for (int i = 0; i < n; ++i) {
    const int64_t chunks = chunks_of(numel[i]);
    if (chunks == 0) continue;
    if (blocks > 0 && dtype[i] != current) flush();
    current = dtype[i];
    meta.x[tensors] = x[i];
    meta.y[tensors] = y[i];
    meta.numel[tensors] = numel[i];
    for (int64_t c = 0; c < chunks; ++c) {
      meta.block_tensor[blocks] = static_cast<int16_t>(tensors);
      meta.block_chunk[blocks] = static_cast<int32_t>(c);
      ++blocks;
      const bool last_chunk = c + 1 == chunks;
      if (blocks == kMaxBlocks) {
        launch(meta, blocks, current);
        blocks = 0;
        if (last_chunk) {
          tensors = 0;
        } else {  // the tensor continues in the next launch, in slot 0
          meta.x[0] = x[i];
          meta.y[0] = y[i];
          meta.numel[0] = numel[i];
          tensors = 0;
        }
      }
    }
    if (blocks > 0 || tensors > 0) ++tensors;
    if (tensors == kMaxTensors) flush();
  }
  flush();
}

}  // namespace

int64_t multi_tensor_dot_partials(const int64_t* numel, int n) {
  int64_t total = 0;
  for (int i = 0; i < n; ++i) total += chunks_of(numel[i]);
  return total;
}

void multi_tensor_dot(const void* const* a, const void* const* b, const int64_t* numel,
                      const DType* dtype, int n, float* partials, float* out, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  int64_t offset = 0;
  // The dot only reads b; it travels in the writable slot of the metadata.
  std::vector<void*> b_mut(n);
  for (int i = 0; i < n; ++i) b_mut[i] = const_cast<void*>(b[i]);
  for_each_launch(a, b_mut.data(), numel, dtype, n,
                  [&](const ListMeta& meta, int blocks, DType dt) {
                    float* p = partials + offset;
                    switch (dt) {
                      case DType::kFloat32:
                        dot_kernel<float><<<blocks, kThreads, 0, stream>>>(meta, p);
                        break;
                      case DType::kFloat16:
                        dot_kernel<__half><<<blocks, kThreads, 0, stream>>>(meta, p);
                        break;
                      case DType::kBFloat16:
                        dot_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(meta, p);
                        break;
                    }
                    offset += blocks;
                  });
  final_sum_kernel<<<1, kThreads, 0, stream>>>(partials, offset, out);
}

void multi_tensor_axpby(void* const* y, const void* const* x, const int64_t* numel,
                        const DType* dtype, int n, float alpha, float beta, void* stream_ptr) {
  auto stream = static_cast<cudaStream_t>(stream_ptr);
  for_each_launch(x, y, numel, dtype, n, [&](const ListMeta& meta, int blocks, DType dt) {
    switch (dt) {
      case DType::kFloat32:
        axpby_kernel<float><<<blocks, kThreads, 0, stream>>>(meta, alpha, beta);
        break;
      case DType::kFloat16:
        axpby_kernel<__half><<<blocks, kThreads, 0, stream>>>(meta, alpha, beta);
        break;
      case DType::kBFloat16:
        axpby_kernel<__nv_bfloat16><<<blocks, kThreads, 0, stream>>>(meta, alpha, beta);
        break;
    }
  });
}

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace cuda
}  // namespace mpl_fast
