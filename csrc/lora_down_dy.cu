// The two passes that reduce a wide matrix onto the rank: the forward front end
// S = dropout(X) A^T (one pass over X, dropout fused) and the backward pass over dY,
// dS = scaling dY B with dB = scaling dY^T S from the same tiles of dY.
//
// A block owns kBlockRows rows and a tile of R_TILE ranks and walks the reduction dimension in
// steps of kBlockK columns: the wide-matrix tile is read once with 16-byte loads (dropout applied
// as it is read) into shared memory, the matching [R_TILE, kBlockK] tile of A (or B^T) beside it,
// and each thread accumulates a 4 x (R_TILE / 16) block of the output in fp32 registers. Ranks up
// to 16 use one 16-rank tile; larger ranks use 64-rank tiles (r <= 64 reads X once; r = 256 four
// times, the repeats close together in time so mostly from L2).
#include "common.cuh"
#include "philox.cuh"

namespace lorafusion {
namespace {

constexpr int kThreads = 256;
constexpr int kBlockRows = 64;
constexpr int kBlockK = 32;
constexpr int kRowsPerThread = 4;    // kBlockRows / (kThreads / 16)
constexpr int kRankGroups = 16;      // threads along the rank tile

template <typename T, int VEC, int R_TILE, bool WITH_DB>
__global__ void __launch_bounds__(kThreads) rank_projection_kernel(
    const T* __restrict__ wide, int64_t wide_row_stride, int64_t wide_col_stride,  // X or dY [M, K]
    const T* __restrict__ proj, int64_t proj_rank_stride, int64_t proj_col_stride, // A [R, K] or B^T
    const T* __restrict__ s, int64_t s_row_stride, int64_t s_rank_stride,          // S [M, R], dy pass only
    T* __restrict__ out,                                                           // [M, R] contiguous
    float* __restrict__ db,                                                        // [K, R] fp32, dy pass only
    int64_t M, int64_t K, int64_t R, uint64_t seed, float dropout_p, float out_scale, float db_scale) {
  constexpr int kRanksPerThread = R_TILE / kRankGroups;
  __shared__ float wide_tile[kBlockK][kBlockRows + 1];   // transposed; +1 against bank conflicts
  __shared__ float proj_tile[kBlockK][R_TILE + 1];
  __shared__ float s_tile[WITH_DB ? kBlockRows : 1][R_TILE + 1];

  const int tid = threadIdx.x;
  const int rank_group = tid % kRankGroups;
  const int row_group = tid / kRankGroups;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBlockRows;
  const int64_t rank0 = static_cast<int64_t>(blockIdx.y) * R_TILE;
  const bool has_dropout = dropout_p > 0.0f;

  if (WITH_DB) {
    for (int i = tid; i < kBlockRows * R_TILE; i += kThreads) {
      const int row = i / R_TILE, rank = i % R_TILE;
      const bool ok = row0 + row < M && rank0 + rank < R;
      s_tile[row][rank] = ok ? Element<T>::load(s[(row0 + row) * s_row_stride + (rank0 + rank) * s_rank_stride]) : 0.0f;
    }
  }

  float acc[kRowsPerThread][kRanksPerThread] = {};
  // Coalesced reads of the projection tile: along whichever of its dimensions is contiguous.
  const bool rank_contiguous = proj_rank_stride == 1;
  for (int64_t k0 = 0; k0 < K; k0 += kBlockK) {
    constexpr int kVectorsPerRow = kBlockK / VEC;
    for (int v = tid; v < kBlockRows * kVectorsPerRow; v += kThreads) {
      const int row = v / kVectorsPerRow, col = (v % kVectorsPerRow) * VEC;
      const int64_t global_row = row0 + row, global_col = k0 + col;
      const int64_t remaining = K - global_col;
      const int count = global_row < M ? static_cast<int>(remaining < VEC ? remaining : VEC) : 0;
      float values[VEC];
      load_row_segment<T, VEC>(wide, wide_row_stride, wide_col_stride, global_row, global_col, count, values);
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        const bool keep = !has_dropout || keep_element(seed, global_row, global_col + e, K, dropout_p);
        wide_tile[col + e][row] = keep ? values[e] : 0.0f;
      }
    }
    for (int i = tid; i < kBlockK * R_TILE; i += kThreads) {
      const int rank = rank_contiguous ? i % R_TILE : i / kBlockK;
      const int col = rank_contiguous ? i / R_TILE : i % kBlockK;
      const bool ok = rank0 + rank < R && k0 + col < K;
      proj_tile[col][rank] =
          ok ? Element<T>::load(proj[(rank0 + rank) * proj_rank_stride + (k0 + col) * proj_col_stride]) : 0.0f;
    }
    __syncthreads();

#pragma unroll 4
    for (int k = 0; k < kBlockK; ++k) {
      float a[kRowsPerThread], b[kRanksPerThread];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) a[i] = wide_tile[k][row_group * kRowsPerThread + i];
#pragma unroll
      for (int j = 0; j < kRanksPerThread; ++j) b[j] = proj_tile[k][rank_group * kRanksPerThread + j];
#pragma unroll
      for (int i = 0; i < kRowsPerThread; ++i) {
#pragma unroll
        for (int j = 0; j < kRanksPerThread; ++j) acc[i][j] += a[i] * b[j];
      }
    }

    if (WITH_DB) {
      // dB[k0 + col, rank] += db_scale * sum over this block's rows of dY[row, col] * S[row, rank].
      for (int i = tid; i < kBlockK * R_TILE; i += kThreads) {
        const int col = i / R_TILE, rank = i % R_TILE;
        if (k0 + col >= K || rank0 + rank >= R) continue;
        float partial = 0.0f;
#pragma unroll 8
        for (int row = 0; row < kBlockRows; ++row) partial += wide_tile[col][row] * s_tile[row][rank];
        atomicAdd(db + (k0 + col) * R + rank0 + rank, db_scale * partial);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kRowsPerThread; ++i) {
    const int64_t row = row0 + row_group * kRowsPerThread + i;
    if (row >= M) continue;
#pragma unroll
    for (int j = 0; j < kRanksPerThread; ++j) {
      const int64_t rank = rank0 + rank_group * kRanksPerThread + j;
      if (rank < R) out[row * R + rank] = Element<T>::store(acc[i][j] * out_scale);
    }
  }
}

template <typename T, int VEC, int R_TILE, bool WITH_DB>
cudaError_t launch_tiled(MatrixRef wide, MatrixRef proj, MatrixRef s, void* out, float* db, int64_t M, int64_t K,
                         int64_t R, uint64_t seed, float dropout_p, float out_scale, float db_scale,
                         cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(ceil_div(M, kBlockRows)), static_cast<unsigned>(ceil_div(R, R_TILE)));
  rank_projection_kernel<T, VEC, R_TILE, WITH_DB><<<grid, kThreads, 0, stream>>>(
      static_cast<const T*>(wide.data), wide.row_stride, wide.col_stride,
      static_cast<const T*>(proj.data), proj.row_stride, proj.col_stride,
      static_cast<const T*>(s.data), s.row_stride, s.col_stride,
      static_cast<T*>(out), db, M, K, R, seed, dropout_p, out_scale, db_scale);
  return cudaGetLastError();
}

// `proj` is indexed [rank, column]: A itself, or B [N, R] viewed as B^T through its strides.
template <bool WITH_DB>
cudaError_t launch_rank_projection(DType dtype, MatrixRef wide, MatrixRef proj, MatrixRef s, void* out, float* db,
                                   int64_t M, int64_t K, int64_t R, uint64_t seed, float dropout_p, float out_scale,
                                   float db_scale, cudaStream_t stream) {
  if (M == 0 || R == 0) return cudaSuccess;
  if (ceil_div(R, 16) > 65535) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    constexpr int kVec = kVec16<T>;
    const bool vectorized = vector_access_ok<T>(wide);
    if (R <= 16) {
      return vectorized ? launch_tiled<T, kVec, 16, WITH_DB>(wide, proj, s, out, db, M, K, R, seed, dropout_p, out_scale, db_scale, stream)
                        : launch_tiled<T, 1, 16, WITH_DB>(wide, proj, s, out, db, M, K, R, seed, dropout_p, out_scale, db_scale, stream);
    }
    return vectorized ? launch_tiled<T, kVec, 64, WITH_DB>(wide, proj, s, out, db, M, K, R, seed, dropout_p, out_scale, db_scale, stream)
                      : launch_tiled<T, 1, 64, WITH_DB>(wide, proj, s, out, db, M, K, R, seed, dropout_p, out_scale, db_scale, stream);
  });
}

}  // namespace

cudaError_t launch_lora_down(DType dtype, MatrixRef x, MatrixRef lora_A, void* s, int64_t M, int64_t K, int64_t R,
                             uint64_t seed, float dropout_p, cudaStream_t stream) {
  // Dropout's 1 / (1 - p) is linear: applied once to the fp32 accumulator, not per element of X.
  const float out_scale = dropout_p > 0.0f ? 1.0f / (1.0f - dropout_p) : 1.0f;
  const MatrixRef unused{nullptr, 0, 0};
  return launch_rank_projection<false>(dtype, x, lora_A, unused, s, nullptr, M, K, R, seed, dropout_p, out_scale,
                                       0.0f, stream);
}

cudaError_t launch_lora_dy(DType dtype, MatrixRef dy, MatrixRef lora_B, MatrixRef s, void* ds, float* db, int64_t M,
                           int64_t N, int64_t R, float scaling, cudaStream_t stream) {
  const MatrixRef lora_B_transposed{lora_B.data, lora_B.col_stride, lora_B.row_stride};
  return launch_rank_projection<true>(dtype, dy, lora_B_transposed, s, ds, db, M, N, R, 0, 0.0f, scaling, scaling,
                                      stream);
}

}  // namespace lorafusion
