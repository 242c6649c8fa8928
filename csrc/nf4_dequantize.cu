// NF4 dequantization in bitsandbytes' layout, bit-exact to bitsandbytes' dequantize_4bit (the
// contract is kernels/reference.py's nf4_dequantize_reference):
//   absmax = dynamic[qabsmax] * nested_absmax[block / 256] + offset   (double quantization; a
//            multiply then a separate add, never a fused multiply-add, hence __fmul_rn/__fadd_rn)
//   value  = code[index] * absmax in fp32, rounded to nearest even into the compute dtype.
// A thread owns 16 packed bytes (32 values, one 16-byte load): block sizes are powers of two >= 32,
// so its 32 values share one absmax; it writes them with 16-byte stores.
#include "common.cuh"

namespace lorafusion {
namespace {

constexpr int kThreads = 256;
constexpr int kBytesPerThread = 16;
constexpr int kValuesPerThread = 2 * kBytesPerThread;

template <typename T, bool DOUBLE_QUANT>
__global__ void __launch_bounds__(kThreads) nf4_dequantize_kernel(NF4Ref weight, T* __restrict__ out,
                                                                   int64_t num_elements, bool packed_aligned,
                                                                   bool out_aligned) {
  __shared__ float code[16];
  if (threadIdx.x < 16) code[threadIdx.x] = weight.code[threadIdx.x];
  __syncthreads();

  const int64_t chunk = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  const int64_t byte0 = chunk * kBytesPerThread;
  if (byte0 >= weight.num_bytes) return;
  union {
    uint4 raw;
    uint8_t bytes[kBytesPerThread];
  } packed;
  if (packed_aligned && byte0 + kBytesPerThread <= weight.num_bytes) {
    packed.raw = *reinterpret_cast<const uint4*>(weight.packed + byte0);
  } else {
#pragma unroll
    for (int i = 0; i < kBytesPerThread; ++i) packed.bytes[i] = byte0 + i < weight.num_bytes ? weight.packed[byte0 + i] : 0;
  }

  const int64_t element0 = 2 * byte0;
  const int64_t block = element0 / weight.blocksize;
  float absmax;
  if (DOUBLE_QUANT) {
    const uint8_t quantized = static_cast<const uint8_t*>(weight.absmax)[block];
    absmax = __fadd_rn(__fmul_rn(weight.nested_code[quantized], weight.nested_absmax[block / weight.nested_blocksize]),
                       *weight.offset);
  } else {
    absmax = static_cast<const float*>(weight.absmax)[block];
  }

  union {
    uint4 raw[kValuesPerThread * sizeof(T) / 16];
    T values[kValuesPerThread];
  } result;
#pragma unroll
  for (int i = 0; i < kBytesPerThread; ++i) {
    result.values[2 * i] = Element<T>::store(__fmul_rn(code[packed.bytes[i] >> 4], absmax));
    result.values[2 * i + 1] = Element<T>::store(__fmul_rn(code[packed.bytes[i] & 15], absmax));
  }
  if (out_aligned && element0 + kValuesPerThread <= num_elements) {
    uint4* destination = reinterpret_cast<uint4*>(out + element0);
#pragma unroll
    for (int v = 0; v < static_cast<int>(kValuesPerThread * sizeof(T) / 16); ++v) destination[v] = result.raw[v];
  } else {
    for (int i = 0; i < kValuesPerThread && element0 + i < num_elements; ++i) out[element0 + i] = result.values[i];
  }
}

}  // namespace

cudaError_t launch_nf4_dequantize(DType dtype, NF4Ref weight, void* out, int64_t num_elements, cudaStream_t stream) {
  if (weight.blocksize < kValuesPerThread || weight.blocksize % kValuesPerThread != 0) return cudaErrorInvalidValue;
  if (weight.num_bytes == 0) return cudaSuccess;
  const bool double_quant = weight.nested_absmax != nullptr;
  const bool packed_aligned = reinterpret_cast<uintptr_t>(weight.packed) % 16 == 0;
  const bool out_aligned = reinterpret_cast<uintptr_t>(out) % 16 == 0;
  const int64_t blocks = ceil_div(ceil_div(weight.num_bytes, kBytesPerThread), kThreads);
  if (blocks > 0x7FFFFFFF) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* typed_out = static_cast<T*>(out);
    if (double_quant) {
      nf4_dequantize_kernel<T, true><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          weight, typed_out, num_elements, packed_aligned, out_aligned);
    } else {
      nf4_dequantize_kernel<T, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          weight, typed_out, num_elements, packed_aligned, out_aligned);
    }
    return cudaGetLastError();
  });
}

}  // namespace lorafusion
