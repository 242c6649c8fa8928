// Counter-based dropout RNG of the CUDA backend: Philox-4x32-10 keyed by the 64-bit seed; element
// (row, col) of a row-major [*, cols] matrix takes word col % 4 of the counter
// row * ceil(cols / 4) + col / 4 (64-bit), as the Triton kernels' keep_mask does with
// tl.rand4x (key = (seed_lo, seed_hi), counter = (offset_lo, offset_hi, 0, 0), int32 -> [0, 1)
// float). The mask therefore equals the Triton kernels' and the torch backend's bit for bit
// (checked on the CPU by tests/kernels/test_cuda_extension.py), and forward and backward
// regenerate the same bit with any tiling. Host-callable too, so the CPU tests can compile and
// check it without a GPU.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LORAFUSION_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LORAFUSION_HOST_DEVICE inline
#endif

namespace lorafusion {

LORAFUSION_HOST_DEVICE uint32_t mul_hi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// Output word `word` (0..3) of Philox-4x32-10 for key (seed_lo, seed_hi) and counter (offset_lo, offset_hi, 0, 0).
LORAFUSION_HOST_DEVICE uint32_t philox_word(uint64_t seed, uint64_t offset, int word) {
  constexpr uint32_t kKeyA = 0x9E3779B9u, kKeyB = 0xBB67AE85u;
  constexpr uint32_t kRoundA = 0xD2511F53u, kRoundB = 0xCD9E8D57u;
  uint32_t c0 = static_cast<uint32_t>(offset), c1 = static_cast<uint32_t>(offset >> 32), c2 = 0u, c3 = 0u;
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    const uint32_t prev_c0 = c0, prev_c2 = c2;
    c0 = mul_hi_u32(kRoundB, prev_c2) ^ c1 ^ k0;
    c2 = mul_hi_u32(kRoundA, prev_c0) ^ c3 ^ k1;
    c1 = kRoundB * prev_c2;
    c3 = kRoundA * prev_c0;
    k0 += kKeyA;
    k1 += kKeyB;
  }
  return word == 0 ? c0 : word == 1 ? c1 : word == 2 ? c2 : c3;
}

// Uniform [0, 1) float from the word exactly as Triton's uint_to_uniform_float: as int32, negative
// values complemented, converted to float (round to nearest) and multiplied in fp32.
LORAFUSION_HOST_DEVICE float philox_uniform(uint64_t seed, uint64_t offset, int word) {
  int32_t bits = static_cast<int32_t>(philox_word(seed, offset, word));
  bits = bits < 0 ? ~bits : bits;
#if defined(__CUDA_ARCH__)
  return __fmul_rn(__int2float_rn(bits), 4.6566127342e-10f);
#else
  return static_cast<float>(bits) * 4.6566127342e-10f;
#endif
}

// Dropout keeps element (row, col) of a row-major [*, cols] matrix when its uniform is >= p.
LORAFUSION_HOST_DEVICE bool keep_element(uint64_t seed, int64_t row, int64_t col, int64_t cols, float dropout_p) {
  const int64_t quads_per_row = (cols + 3) / 4;
  return philox_uniform(seed, static_cast<uint64_t>(row * quads_per_row + col / 4), static_cast<int>(col % 4)) >=
         dropout_p;
}

}  // namespace lorafusion
