// The torch binding of the CUDA backend (module lorafusion_cuda): argument checks, output
// allocation and the current stream; the kernels and their launchers live in the .cu files.
// Compiled only in the real extension build (JIT or LORAFUSION_BUILD_CUDA=1), which needs a
// CUDA build of torch.
// c10/cuda only (not ATen/cuda/CUDAContext.h, which also needs the cuBLAS/cuSPARSE headers): the
// binding then compiles against a CPU wheel's headers plus the CUDA runtime headers, as CI checks.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "lora_kernels.h"

namespace lorafusion {
namespace {

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, name, ".dtype must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

MatrixRef matrix(const at::Tensor& t) { return MatrixRef{t.data_ptr(), t.stride(0), t.stride(1)}; }

void check_matrix(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == 2, name, " must be 2-D, got shape ", t.sizes());
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), " but the input is on ", like.device());
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, ".dtype (", t.scalar_type(), ") must match the input's (",
              like.scalar_type(), ")");
}

void check_launch(cudaError_t status, const char* op) {
  TORCH_CHECK(status == cudaSuccess, "lorafusion_cuda.", op, " failed to launch: ", cudaGetErrorString(status));
}

uint64_t checked_seed(int64_t seed) {
  TORCH_CHECK(seed >= 0, "seed must be non-negative, got ", seed);
  return static_cast<uint64_t>(seed);
}

float checked_dropout(double dropout_p) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "dropout_p must be in [0, 1), got ", dropout_p);
  return static_cast<float>(dropout_p);
}

at::Tensor lora_down(const at::Tensor& x, const at::Tensor& lora_A, double dropout_p, int64_t seed) {
  check_matrix(x, "x", x);
  check_matrix(lora_A, "lora_A", x);
  TORCH_CHECK(lora_A.size(1) == x.size(1), "lora_A must be [r, K=", x.size(1), "], got ", lora_A.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor s = at::empty({x.size(0), lora_A.size(0)}, x.options());
  check_launch(launch_lora_down(dtype_of(x, "x"), matrix(x), matrix(lora_A), s.data_ptr(), x.size(0), x.size(1),
                                lora_A.size(0), checked_seed(seed), checked_dropout(dropout_p),
                                c10::cuda::getCurrentCUDAStream()),
               "lora_down");
  return s;
}

std::tuple<at::Tensor, at::Tensor> lora_dy(const at::Tensor& dy, const at::Tensor& lora_B, const at::Tensor& s,
                                           double scaling) {
  check_matrix(dy, "dy", dy);
  check_matrix(lora_B, "lora_B", dy);
  check_matrix(s, "s", dy);
  const int64_t M = dy.size(0), N = dy.size(1), R = lora_B.size(1);
  TORCH_CHECK(lora_B.size(0) == N, "lora_B must be [N=", N, ", r], got ", lora_B.sizes());
  TORCH_CHECK(s.size(0) == M && s.size(1) == R, "s must be [M=", M, ", r=", R, "], got ", s.sizes());
  const c10::cuda::CUDAGuard guard(dy.device());
  at::Tensor ds = at::empty({M, R}, dy.options());
  at::Tensor db = at::zeros({N, R}, dy.options().dtype(at::kFloat));
  check_launch(launch_lora_dy(dtype_of(dy, "dy"), matrix(dy), matrix(lora_B), matrix(s), ds.data_ptr(),
                              db.data_ptr<float>(), M, N, R, static_cast<float>(scaling),
                              c10::cuda::getCurrentCUDAStream()),
               "lora_dy");
  return {ds, db};
}

at::Tensor lora_dx_da(const at::Tensor& ds, const at::Tensor& lora_A, const at::Tensor& x, double dropout_p,
                      int64_t seed, const c10::optional<at::Tensor>& dx_out) {
  check_matrix(x, "x", x);
  check_matrix(ds, "ds", x);
  check_matrix(lora_A, "lora_A", x);
  const int64_t M = x.size(0), K = x.size(1), R = lora_A.size(0);
  TORCH_CHECK(lora_A.size(1) == K, "lora_A must be [r, K=", K, "], got ", lora_A.sizes());
  TORCH_CHECK(ds.size(0) == M && ds.size(1) == R, "ds must be [M=", M, ", r=", R, "], got ", ds.sizes());
  MatrixRef dx{nullptr, 0, 0};
  if (dx_out.has_value()) {
    check_matrix(*dx_out, "dx_out", x);
    TORCH_CHECK(dx_out->sizes() == x.sizes(), "dx_out must have x's shape ", x.sizes(), ", got ", dx_out->sizes());
    dx = matrix(*dx_out);
  }
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor da = at::zeros({R, K}, x.options().dtype(at::kFloat));
  int multiprocessor_count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&multiprocessor_count, cudaDevAttrMultiProcessorCount, x.device().index()));
  check_launch(launch_lora_dx_da(dtype_of(x, "x"), matrix(ds), matrix(lora_A), matrix(x), dx, da.data_ptr<float>(),
                                 M, K, R, checked_seed(seed), checked_dropout(dropout_p), multiprocessor_count,
                                 c10::cuda::getCurrentCUDAStream()),
               "lora_dx_da");
  return da;
}

void lora_up_add_(at::Tensor& y, const at::Tensor& s, const at::Tensor& lora_B, double scaling) {
  check_matrix(y, "y", y);
  check_matrix(s, "s", y);
  check_matrix(lora_B, "lora_B", y);
  const int64_t M = y.size(0), N = y.size(1), R = s.size(1);
  TORCH_CHECK(s.size(0) == M, "s must be [M=", M, ", r], got ", s.sizes());
  TORCH_CHECK(lora_B.size(0) == N && lora_B.size(1) == R, "lora_B must be [N=", N, ", r=", R, "], got ",
              lora_B.sizes());
  const c10::cuda::CUDAGuard guard(y.device());
  check_launch(launch_lora_up_add(dtype_of(y, "y"), matrix(y), matrix(s), matrix(lora_B), M, N, R,
                                  static_cast<float>(scaling), c10::cuda::getCurrentCUDAStream()),
               "lora_up_add_");
}

at::Tensor keep_mask(int64_t seed, int64_t rows, int64_t cols, double dropout_p, const at::Device& device) {
  TORCH_CHECK(device.is_cuda(), "device must be a CUDA device, got ", device);
  TORCH_CHECK(rows >= 0 && cols >= 0, "rows and cols must be non-negative, got ", rows, " x ", cols);
  const c10::cuda::CUDAGuard guard(device);
  at::Tensor out = at::empty({rows, cols}, at::TensorOptions().dtype(at::kBool).device(device));
  check_launch(launch_keep_mask(out.data_ptr<bool>(), rows, cols, checked_seed(seed), checked_dropout(dropout_p),
                                c10::cuda::getCurrentCUDAStream()),
               "keep_mask");
  return out;
}

void nf4_dequantize(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code,
                    const c10::optional<at::Tensor>& nested_absmax, const c10::optional<at::Tensor>& nested_code,
                    const c10::optional<at::Tensor>& offset, at::Tensor& out, int64_t blocksize,
                    int64_t nested_blocksize) {
  TORCH_CHECK(out.is_cuda() && out.is_contiguous(), "out must be a contiguous CUDA tensor");
  const auto on_device = [&](const at::Tensor& t, const char* name, at::ScalarType dtype) {
    TORCH_CHECK(t.device() == out.device() && t.is_contiguous() && t.scalar_type() == dtype, name,
                " must be a contiguous ", dtype, " tensor on ", out.device(), ", got ", t.scalar_type(), " on ",
                t.device());
  };
  const bool double_quant = nested_absmax.has_value();
  TORCH_CHECK(double_quant == nested_code.has_value() && double_quant == offset.has_value(),
              "nested_absmax, nested_code and offset must be given together (double quantization)");
  on_device(packed, "packed", at::kByte);
  on_device(absmax, "absmax", double_quant ? at::kByte : at::kFloat);
  on_device(code, "code", at::kFloat);
  TORCH_CHECK(code.numel() == 16, "code must have 16 entries, got ", code.numel());
  const int64_t blocks = (out.numel() + blocksize - 1) / blocksize;
  TORCH_CHECK(packed.numel() == (out.numel() + 1) / 2, "packed must hold ceil(numel / 2) = ", (out.numel() + 1) / 2,
              " bytes, got ", packed.numel());
  TORCH_CHECK(absmax.numel() == blocks, "absmax must have ", blocks, " entries, got ", absmax.numel());
  NF4Ref weight{packed.data_ptr<uint8_t>(), packed.numel(), absmax.data_ptr(), code.data_ptr<float>(),
                nullptr, nullptr, nullptr, static_cast<int>(blocksize), static_cast<int>(nested_blocksize)};
  if (double_quant) {
    on_device(*nested_absmax, "nested_absmax", at::kFloat);
    on_device(*nested_code, "nested_code", at::kFloat);
    on_device(*offset, "offset", at::kFloat);
    TORCH_CHECK(nested_code->numel() == 256, "nested_code must have 256 entries, got ", nested_code->numel());
    TORCH_CHECK(nested_absmax->numel() == (blocks + nested_blocksize - 1) / nested_blocksize,
                "nested_absmax must have ceil(blocks / nested_blocksize) entries, got ", nested_absmax->numel());
    weight.nested_absmax = nested_absmax->data_ptr<float>();
    weight.nested_code = nested_code->data_ptr<float>();
    weight.offset = offset->data_ptr<float>();
  }
  const c10::cuda::CUDAGuard guard(out.device());
  check_launch(launch_nf4_dequantize(dtype_of(out, "out"), weight, out.data_ptr(), out.numel(),
                                     c10::cuda::getCurrentCUDAStream()),
               "nf4_dequantize");
}

}  // namespace
}  // namespace lorafusion

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "lorafusion's CUDA backend: the memory-bound LoRA kernels and NF4 dequantization";
  m.def("lora_down", &lorafusion::lora_down, "S = dropout(X) A^T");
  m.def("lora_dy", &lorafusion::lora_dy, "(dS, dB fp32) from one pass over dY");
  m.def("lora_dx_da", &lorafusion::lora_dx_da, "LoRA part of dX into dx_out (optional); returns dA fp32");
  m.def("lora_up_add_", &lorafusion::lora_up_add_, "Y += scaling S B^T in place");
  m.def("keep_mask", &lorafusion::keep_mask, "the dropout keep-mask the kernels regenerate");
  m.def("nf4_dequantize", &lorafusion::nf4_dequantize, "NF4 dequantization into out, bit-exact to bitsandbytes");
}
