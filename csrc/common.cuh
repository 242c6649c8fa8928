// Element conversions, 16-byte vector access and dtype dispatch shared by the kernels.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "lora_kernels.h"

namespace lorafusion {

template <typename T> struct Element;
template <> struct Element<float> {
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <> struct Element<__half> {
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};
template <> struct Element<__nv_bfloat16> {
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// Elements of T in one 16-byte access.
template <typename T> constexpr int kVec16 = 16 / static_cast<int>(sizeof(T));

// Loads `count` (<= VEC) consecutive-in-column elements of row `row` starting at column `col` as
// floats, zero past `count`. VEC > 1 only when the launcher checked that the matrix is
// column-contiguous and 16-byte aligned at every row start and VEC-column boundary; then a full
// vector is one 16-byte load.
template <typename T, int VEC>
__device__ __forceinline__ void load_row_segment(const T* data, int64_t row_stride, int64_t col_stride, int64_t row,
                                                 int64_t col, int count, float (&out)[VEC]) {
  const T* base = data + row * row_stride;
  if (VEC > 1 && count == VEC) {
    union {
      uint4 raw;
      T elements[VEC];
    } vector;
    vector.raw = *reinterpret_cast<const uint4*>(base + col);
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = Element<T>::load(vector.elements[e]);
    return;
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) out[e] = e < count ? Element<T>::load(base[(col + e) * col_stride]) : 0.0f;
}

// The store counterpart of load_row_segment: writes the first `count` values.
template <typename T, int VEC>
__device__ __forceinline__ void store_row_segment(T* data, int64_t row_stride, int64_t col_stride, int64_t row,
                                                  int64_t col, int count, const float (&values)[VEC]) {
  T* base = data + row * row_stride;
  if (VEC > 1 && count == VEC) {
    union {
      uint4 raw;
      T elements[VEC];
    } vector;
#pragma unroll
    for (int e = 0; e < VEC; ++e) vector.elements[e] = Element<T>::store(values[e]);
    *reinterpret_cast<uint4*>(base + col) = vector.raw;
    return;
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    if (e < count) base[(col + e) * col_stride] = Element<T>::store(values[e]);
  }
}

// True when 16-byte vector access of a matrix of T is valid: unit column stride, row stride a
// multiple of the vector width and an aligned base pointer (columns are then visited in whole vectors).
template <typename T>
inline bool vector_access_ok(MatrixRef m) {
  return m.col_stride == 1 && m.row_stride % kVec16<T> == 0 && reinterpret_cast<uintptr_t>(m.data) % 16 == 0;
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T> struct TypeTag {
  using type = T;
};

// Calls body(TypeTag<T>{}) with T the device element type of `dtype` (a C++14 generic lambda
// recovers it as `typename decltype(tag)::type`).
template <typename Body>
cudaError_t dispatch_dtype(DType dtype, Body&& body) {
  switch (dtype) {
    case DType::kFloat32:
      return body(TypeTag<float>{});
    case DType::kFloat16:
      return body(TypeTag<__half>{});
    case DType::kBFloat16:
      return body(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}

// Kernels using more than the default 48 KiB of dynamic shared memory must opt in first.
template <typename Kernel>
cudaError_t allow_shared_memory(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

}  // namespace lorafusion
