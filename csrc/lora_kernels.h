// Host launchers of the CUDA backend's kernels: raw device pointers, element strides, sizes and a
// stream, no torch types, so that the .cu files compile with nvcc alone (the CPU CI checks that)
// and the torch binding (bindings.cpp) stays a thin layer of checks. Each launcher enqueues its
// kernels on `stream` and returns the launch status; outputs are written in place, nothing else
// is allocated.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace lorafusion {

// Element type of the floating-point tensors (the fp32 accumulators dB and dA are always float).
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// A row-major view of a 2-D matrix: element (i, j) at data + i * row_stride + j * col_stride.
struct MatrixRef {
  const void* data;
  int64_t row_stride;
  int64_t col_stride;
};

// S [M, R] = dropout(X) A^T for X [M, K], A [R, K]; S contiguous, in X's dtype.
cudaError_t launch_lora_down(DType dtype, MatrixRef x, MatrixRef lora_A, void* s, int64_t M, int64_t K,
                             int64_t R, uint64_t seed, float dropout_p, cudaStream_t stream);

// dS [M, R] = scaling dY B (contiguous, dY's dtype) and dB [N, R] += scaling dY^T S (fp32,
// contiguous, zeroed by the caller) from one pass over dY [M, N]; B [N, R], S [M, R].
cudaError_t launch_lora_dy(DType dtype, MatrixRef dy, MatrixRef lora_B, MatrixRef s, void* ds, float* db,
                           int64_t M, int64_t N, int64_t R, float scaling, cudaStream_t stream);

// dX [M, K] = keep * (dS A) / (1 - p) (skipped when dx is null) and dA [R, K] += dS^T (keep * X) / (1 - p)
// (fp32, contiguous, zeroed by the caller). dx is written through MatrixRef's pointer.
cudaError_t launch_lora_dx_da(DType dtype, MatrixRef ds, MatrixRef lora_A, MatrixRef x, MatrixRef dx, float* da,
                              int64_t M, int64_t K, int64_t R, uint64_t seed, float dropout_p,
                              int multiprocessor_count, cudaStream_t stream);

// Y [M, N] += scaling S B^T in place (the fused epilogue after the base GEMM); S [M, R], B [N, R].
cudaError_t launch_lora_up_add(DType dtype, MatrixRef y, MatrixRef s, MatrixRef lora_B, int64_t M, int64_t N,
                               int64_t R, float scaling, cudaStream_t stream);

// The [rows, cols] bool keep-mask the kernels above use for this seed and p.
cudaError_t launch_keep_mask(bool* out, int64_t rows, int64_t cols, uint64_t seed, float dropout_p,
                             cudaStream_t stream);

// NF4 dequantization in bitsandbytes' layout (see kernels/nf4.py). Without double quantization
// absmax is float [blocks] and the nested pointers are null; with it absmax is uint8 [blocks] and
// nested_absmax, nested_code, offset are set. out: contiguous, num_elements values of `dtype`.
struct NF4Ref {
  const uint8_t* packed;
  int64_t num_bytes;
  const void* absmax;
  const float* code;
  const float* nested_absmax;
  const float* nested_code;
  const float* offset;
  int blocksize;
  int nested_blocksize;
};
cudaError_t launch_nf4_dequantize(DType dtype, NF4Ref weight, void* out, int64_t num_elements, cudaStream_t stream);

}  // namespace lorafusion
