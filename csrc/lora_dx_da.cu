// Backward front end: the LoRA part of dX and dA from one pass over X, sharing one regeneration
// of the dropout mask per element:
//     dX_lora = keep * (dS A) / (1 - p)      (written into dX; the base dY W is added by cuBLAS)
//     dA     += dS^T (keep * X) / (1 - p)     (fp32, no dropped copy of X)
// A block owns kBlockCols columns and a contiguous range of row steps. A[:, columns] stays in
// shared memory for the whole range; per step each thread loads one 16-byte vector of X (and
// regenerates its keep bits in registers), writes the matching vector of dX, and adds its share
// of dA, kept in registers and added to global memory with one atomic per element per block.
#include "common.cuh"
#include "philox.cuh"

namespace lorafusion {
namespace {

constexpr int kThreads = 256;
constexpr int kBlockCols = 64;
constexpr int kRankLanes = kThreads / kBlockCols;  // threads sharing a dA column, over ranks

template <typename T, int VEC, int R_PAD>
__global__ void __launch_bounds__(kThreads) lora_dx_da_kernel(
    const T* __restrict__ ds, int64_t ds_row_stride, int64_t ds_rank_stride,
    const T* __restrict__ lora_A, int64_t a_rank_stride, int64_t a_col_stride,
    const T* __restrict__ x, int64_t x_row_stride, int64_t x_col_stride,
    T* __restrict__ dx, int64_t dx_row_stride, int64_t dx_col_stride,  // null: dA only
    float* __restrict__ da, int64_t M, int64_t K, int64_t R, uint64_t seed, float dropout_p,
    int64_t steps_per_split) {
  constexpr int kStepRows = kThreads * VEC / kBlockCols;
  constexpr int kVectorsPerRow = kBlockCols / VEC;
  extern __shared__ float shared[];
  float* a_tile = shared;                           // [R][kBlockCols]
  float* ds_tile = a_tile + R * kBlockCols;         // [kStepRows][R + 1]
  float* x_tile = ds_tile + kStepRows * (R + 1);    // [kStepRows][kBlockCols], dropped

  const int tid = threadIdx.x;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kBlockCols;
  const bool has_dropout = dropout_p > 0.0f;
  const float inverse_keep = has_dropout ? 1.0f / (1.0f - dropout_p) : 1.0f;

  for (int i = tid; i < R * kBlockCols; i += kThreads) {
    const int rank = i / kBlockCols, col = i % kBlockCols;
    a_tile[i] = col0 + col < K ? Element<T>::load(lora_A[rank * a_rank_stride + (col0 + col) * a_col_stride]) : 0.0f;
  }

  // This thread's vector of X and dX in a step, and its dA column and ranks.
  const int step_row = tid / kVectorsPerRow;
  const int vec_col = (tid % kVectorsPerRow) * VEC;
  const int da_col = tid % kBlockCols;
  const int da_rank_lane = tid / kBlockCols;
  float da_acc[R_PAD / kRankLanes] = {};

  const int64_t total_steps = ceil_div(M, kStepRows);
  const int64_t first_step = static_cast<int64_t>(blockIdx.y) * steps_per_split;
  const int64_t end_step = first_step + steps_per_split < total_steps ? first_step + steps_per_split : total_steps;
  for (int64_t step = first_step; step < end_step; ++step) {
    const int64_t row0 = step * kStepRows;
    for (int i = tid; i < kStepRows * R; i += kThreads) {
      const int row = i / R, rank = i % R;
      ds_tile[row * (R + 1) + rank] =
          row0 + row < M ? Element<T>::load(ds[(row0 + row) * ds_row_stride + rank * ds_rank_stride]) : 0.0f;
    }
    const int64_t row = row0 + step_row, col = col0 + vec_col;
    const int64_t remaining = K - col;
    const int count = row < M && remaining > 0 ? static_cast<int>(remaining < VEC ? remaining : VEC) : 0;
    float values[VEC];
    bool keep[VEC];
    load_row_segment<T, VEC>(x, x_row_stride, x_col_stride, row, col, count, values);
#pragma unroll
    for (int e = 0; e < VEC; ++e) {
      keep[e] = !has_dropout || (e < count && keep_element(seed, row, col + e, K, dropout_p));
      x_tile[step_row * kBlockCols + vec_col + e] = keep[e] ? values[e] : 0.0f;
    }
    __syncthreads();

    if (dx != nullptr && count > 0) {
      float grad[VEC] = {};
      const float* ds_row = ds_tile + step_row * (R + 1);
      for (int rank = 0; rank < R; ++rank) {
        const float d = ds_row[rank];
#pragma unroll
        for (int e = 0; e < VEC; ++e) grad[e] += d * a_tile[rank * kBlockCols + vec_col + e];
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) grad[e] = keep[e] ? grad[e] * inverse_keep : 0.0f;
      store_row_segment<T, VEC>(dx, dx_row_stride, dx_col_stride, row, col, count, grad);
    }

#pragma unroll
    for (int j = 0; j < R_PAD / kRankLanes; ++j) {
      const int rank = da_rank_lane + j * kRankLanes;
      if (rank < R) {
        float partial = 0.0f;
#pragma unroll 4
        for (int r = 0; r < kStepRows; ++r) partial += ds_tile[r * (R + 1) + rank] * x_tile[r * kBlockCols + da_col];
        da_acc[j] += partial;
      }
    }
    __syncthreads();
  }

  if (col0 + da_col >= K) return;
#pragma unroll
  for (int j = 0; j < R_PAD / kRankLanes; ++j) {
    const int rank = da_rank_lane + j * kRankLanes;
    if (rank < R) atomicAdd(da + rank * K + col0 + da_col, da_acc[j] * inverse_keep);
  }
}

template <typename T, int VEC, int R_PAD>
cudaError_t launch_typed(MatrixRef ds, MatrixRef lora_A, MatrixRef x, MatrixRef dx, float* da, int64_t M, int64_t K,
                         int64_t R, uint64_t seed, float dropout_p, int multiprocessor_count, cudaStream_t stream) {
  constexpr int kStepRows = kThreads * VEC / kBlockCols;
  const int64_t column_blocks = ceil_div(K, kBlockCols);
  const int64_t total_steps = ceil_div(M, kStepRows);
  // Enough row splits to fill the GPU twice over, few enough to keep dA's atomics rare.
  int64_t splits = ceil_div(2 * static_cast<int64_t>(multiprocessor_count), column_blocks);
  splits = splits < 1 ? 1 : (splits > total_steps ? total_steps : splits);
  const int64_t steps_per_split = ceil_div(total_steps, splits);
  splits = ceil_div(total_steps, steps_per_split);
  if (column_blocks > 0x7FFFFFFF || splits > 65535) return cudaErrorInvalidValue;

  const size_t shared_bytes = sizeof(float) * (R * kBlockCols + kStepRows * (R + 1) + kStepRows * kBlockCols);
  auto kernel = lora_dx_da_kernel<T, VEC, R_PAD>;
  cudaError_t status = allow_shared_memory(kernel, shared_bytes);
  if (status != cudaSuccess) return status;
  const dim3 grid(static_cast<unsigned>(column_blocks), static_cast<unsigned>(splits));
  kernel<<<grid, kThreads, shared_bytes, stream>>>(
      static_cast<const T*>(ds.data), ds.row_stride, ds.col_stride,
      static_cast<const T*>(lora_A.data), lora_A.row_stride, lora_A.col_stride,
      static_cast<const T*>(x.data), x.row_stride, x.col_stride,
      static_cast<T*>(const_cast<void*>(dx.data)), dx.row_stride, dx.col_stride,
      da, M, K, R, seed, dropout_p, steps_per_split);
  return cudaGetLastError();
}

template <typename T, int VEC>
cudaError_t launch_for_rank(MatrixRef ds, MatrixRef lora_A, MatrixRef x, MatrixRef dx, float* da, int64_t M,
                            int64_t K, int64_t R, uint64_t seed, float dropout_p, int multiprocessor_count,
                            cudaStream_t stream) {
  if (R <= 16) return launch_typed<T, VEC, 16>(ds, lora_A, x, dx, da, M, K, R, seed, dropout_p, multiprocessor_count, stream);
  if (R <= 64) return launch_typed<T, VEC, 64>(ds, lora_A, x, dx, da, M, K, R, seed, dropout_p, multiprocessor_count, stream);
  if (R <= 256) return launch_typed<T, VEC, 256>(ds, lora_A, x, dx, da, M, K, R, seed, dropout_p, multiprocessor_count, stream);
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_lora_dx_da(DType dtype, MatrixRef ds, MatrixRef lora_A, MatrixRef x, MatrixRef dx, float* da,
                              int64_t M, int64_t K, int64_t R, uint64_t seed, float dropout_p,
                              int multiprocessor_count, cudaStream_t stream) {
  if (M == 0 || K == 0 || R == 0) return cudaSuccess;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    // Vector access needs X and (when written) dX to allow it.
    const bool vectorized = vector_access_ok<T>(x) && (dx.data == nullptr || vector_access_ok<T>(dx));
    return vectorized
               ? launch_for_rank<T, kVec16<T>>(ds, lora_A, x, dx, da, M, K, R, seed, dropout_p, multiprocessor_count, stream)
               : launch_for_rank<T, 1>(ds, lora_A, x, dx, da, M, K, R, seed, dropout_p, multiprocessor_count, stream);
  });
}

}  // namespace lorafusion
