// Materialises the CUDA backend's dropout keep-mask, for tests and for debugging a run: the fused
// kernels never store it, they regenerate it from (seed, element position) (see philox.cuh).
#include "common.cuh"
#include "philox.cuh"

namespace lorafusion {
namespace {

__global__ void keep_mask_kernel(bool* __restrict__ out, int64_t rows, int64_t cols, uint64_t seed, float dropout_p) {
  const int64_t total = rows * cols;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = keep_element(seed, i / cols, i % cols, cols, dropout_p);
  }
}

}  // namespace

cudaError_t launch_keep_mask(bool* out, int64_t rows, int64_t cols, uint64_t seed, float dropout_p,
                             cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const int64_t blocks = ceil_div(rows * cols, kThreads);
  keep_mask_kernel<<<static_cast<unsigned>(blocks < 65535 ? blocks : 65535), kThreads, 0, stream>>>(
      out, rows, cols, seed, dropout_p);
  return cudaGetLastError();
}

}  // namespace lorafusion
