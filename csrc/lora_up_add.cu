// Forward epilogue: Y += scaling * S B^T in place, right after the base GEMM wrote Y = X W^T + b.
// Y is read and written once, in 16-byte vectors; the rank-r reduction runs from shared memory
// (B[columns, :] for the block's columns and S[rows, :] for its rows) in fp32, and each output is
// rounded once, as cuBLAS' addmm with beta = 1 rounds it.
#include "common.cuh"

namespace lorafusion {
namespace {

constexpr int kThreads = 256;
constexpr int kBlockCols = 64;

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads) lora_up_add_kernel(
    T* __restrict__ y, int64_t y_row_stride, int64_t y_col_stride,
    const T* __restrict__ s, int64_t s_row_stride, int64_t s_rank_stride,
    const T* __restrict__ lora_B, int64_t b_col_stride, int64_t b_rank_stride,
    int64_t M, int64_t N, int64_t R, float scaling) {
  constexpr int kBlockRows = kThreads * VEC / kBlockCols;
  constexpr int kVectorsPerRow = kBlockCols / VEC;
  extern __shared__ float shared[];
  float* b_tile = shared;                    // [R][kBlockCols]
  float* s_tile = b_tile + R * kBlockCols;   // [kBlockRows][R + 1]

  const int tid = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBlockRows;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kBlockCols;
  // B [N, R] is usually rank-contiguous: read along the rank for coalescing.
  for (int i = tid; i < R * kBlockCols; i += kThreads) {
    const int col = i / R, rank = i % R;
    b_tile[rank * kBlockCols + col] =
        col0 + col < N ? Element<T>::load(lora_B[(col0 + col) * b_col_stride + rank * b_rank_stride]) : 0.0f;
  }
  for (int i = tid; i < kBlockRows * R; i += kThreads) {
    const int row = i / R, rank = i % R;
    s_tile[row * (R + 1) + rank] =
        row0 + row < M ? Element<T>::load(s[(row0 + row) * s_row_stride + rank * s_rank_stride]) : 0.0f;
  }
  __syncthreads();

  const int tile_row = tid / kVectorsPerRow;
  const int tile_col = (tid % kVectorsPerRow) * VEC;
  const int64_t row = row0 + tile_row, col = col0 + tile_col;
  const int64_t remaining = N - col;
  const int count = row < M && remaining > 0 ? static_cast<int>(remaining < VEC ? remaining : VEC) : 0;
  if (count == 0) return;
  float up[VEC] = {};
  const float* s_row = s_tile + tile_row * (R + 1);
  for (int rank = 0; rank < R; ++rank) {
    const float value = s_row[rank];
#pragma unroll
    for (int e = 0; e < VEC; ++e) up[e] += value * b_tile[rank * kBlockCols + tile_col + e];
  }
  float values[VEC];
  load_row_segment<T, VEC>(y, y_row_stride, y_col_stride, row, col, count, values);
#pragma unroll
  for (int e = 0; e < VEC; ++e) values[e] += scaling * up[e];
  store_row_segment<T, VEC>(y, y_row_stride, y_col_stride, row, col, count, values);
}

template <typename T, int VEC>
cudaError_t launch_typed(MatrixRef y, MatrixRef s, MatrixRef lora_B, int64_t M, int64_t N, int64_t R, float scaling,
                         cudaStream_t stream) {
  constexpr int kBlockRows = kThreads * VEC / kBlockCols;
  const int64_t row_blocks = ceil_div(M, kBlockRows), column_blocks = ceil_div(N, kBlockCols);
  if (row_blocks > 0x7FFFFFFF || column_blocks > 65535) return cudaErrorInvalidValue;
  const size_t shared_bytes = sizeof(float) * (R * kBlockCols + kBlockRows * (R + 1));
  auto kernel = lora_up_add_kernel<T, VEC>;
  cudaError_t status = allow_shared_memory(kernel, shared_bytes);
  if (status != cudaSuccess) return status;
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(column_blocks));
  kernel<<<grid, kThreads, shared_bytes, stream>>>(
      static_cast<T*>(const_cast<void*>(y.data)), y.row_stride, y.col_stride,
      static_cast<const T*>(s.data), s.row_stride, s.col_stride,
      static_cast<const T*>(lora_B.data), lora_B.row_stride, lora_B.col_stride, M, N, R, scaling);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_lora_up_add(DType dtype, MatrixRef y, MatrixRef s, MatrixRef lora_B, int64_t M, int64_t N,
                               int64_t R, float scaling, cudaStream_t stream) {
  if (M == 0 || N == 0 || R == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    return vector_access_ok<T>(y) ? launch_typed<T, kVec16<T>>(y, s, lora_B, M, N, R, scaling, stream)
                                  : launch_typed<T, 1>(y, s, lora_B, M, N, R, scaling, stream);
  });
}

}  // namespace lorafusion
