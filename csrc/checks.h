// Input validation shared by the CPU and CUDA kernels (host code only): every op checks
// dtypes, devices, contiguity and sizes here before it touches memory.
#pragma once
#include <ATen/ATen.h>
#include "common.h"

namespace mini_unlearn {

inline void check_bits_block(int64_t bits, int64_t block) {
  TORCH_CHECK(bits == 8 || bits == 4, "mini_unlearn: bits must be 8 or 4, got ", bits);
  TORCH_CHECK(block >= kMinBlock && block <= kMaxBlock && (block & (block - 1)) == 0,
              "mini_unlearn: block must be a power of two in [", kMinBlock, ", ", kMaxBlock,
              "], got ", block);
}

inline void check_float_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16 ||
                  t.scalar_type() == at::kHalf,
              "mini_unlearn: ", name, " must be float32, bfloat16 or float16, got ",
              t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "mini_unlearn: ", name, " must be contiguous (call .contiguous())");
}

inline at::ScalarType code_dtype(int64_t bits) { return bits == 8 ? at::kChar : at::kByte; }

// codes [k, code_bytes(numel)] (or 1-D for k = 1) and scales [k, num_blocks(numel)], fp32.
inline int64_t check_codes(const at::Tensor& codes, const at::Tensor& scales, int64_t bits,
                           int64_t block, int64_t numel, bool rows) {
  check_bits_block(bits, block);
  TORCH_CHECK(numel >= 0, "mini_unlearn: numel must be >= 0, got ", numel);
  TORCH_CHECK(codes.scalar_type() == code_dtype(bits), "mini_unlearn: codes for bits=", bits,
              " must be ", code_dtype(bits), ", got ", codes.scalar_type(),
              " (pass the codes quantize_blockwise returned, with the same bits)");
  TORCH_CHECK(scales.scalar_type() == at::kFloat, "mini_unlearn: scales must be float32, got ",
              scales.scalar_type());
  TORCH_CHECK(codes.device() == scales.device(), "mini_unlearn: codes on ", codes.device(),
              " but scales on ", scales.device());
  TORCH_CHECK(codes.is_contiguous() && scales.is_contiguous(),
              "mini_unlearn: codes and scales must be contiguous");
  int64_t k = 1;
  if (rows) {
    TORCH_CHECK(codes.dim() == 2 && scales.dim() == 2,
                "mini_unlearn: codes and scales must be 2-D [k, ...] (k compressed rows), got ",
                codes.sizes(), " and ", scales.sizes());
    k = codes.size(0);
    TORCH_CHECK(scales.size(0) == k, "mini_unlearn: codes hold ", k, " rows but scales hold ",
                scales.size(0));
  } else {
    TORCH_CHECK(codes.dim() == 1 && scales.dim() == 1,
                "mini_unlearn: codes and scales must be 1-D, got ", codes.sizes(), " and ",
                scales.sizes());
  }
  TORCH_CHECK(codes.size(-1) == code_bytes(numel, bits), "mini_unlearn: ", numel,
              " elements at bits=", bits, " need ", code_bytes(numel, bits),
              " code bytes per row, got ", codes.size(-1));
  TORCH_CHECK(scales.size(-1) == num_blocks(numel, block), "mini_unlearn: ", numel,
              " elements in blocks of ", block, " need ", num_blocks(numel, block),
              " scales per row, got ", scales.size(-1), " (same block as quantize_blockwise?)");
  return k;
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* an,
                              const char* bn) {
  TORCH_CHECK(a.device() == b.device(), "mini_unlearn: ", an, " is on ", a.device(), " but ", bn,
              " is on ", b.device(), "; move them to one device");
}

// acc [d_out, d_in] (or any shape with numel = |s_out| * |s_in|), fp32; spectra fp32, 1-D.
inline void check_contraction(const at::Tensor& acc, const at::Tensor& s_out,
                              const at::Tensor& s_in, int64_t steps) {
  TORCH_CHECK(acc.scalar_type() == at::kFloat, "mini_unlearn: acc must be float32, got ",
              acc.scalar_type());
  TORCH_CHECK(acc.is_contiguous(), "mini_unlearn: acc must be contiguous");
  TORCH_CHECK(s_out.scalar_type() == at::kFloat && s_in.scalar_type() == at::kFloat,
              "mini_unlearn: s_out and s_in must be float32");
  TORCH_CHECK(s_out.dim() == 1 && s_in.dim() == 1 && s_out.is_contiguous() && s_in.is_contiguous(),
              "mini_unlearn: s_out and s_in must be contiguous 1-D spectra");
  TORCH_CHECK(acc.numel() == s_out.numel() * s_in.numel(), "mini_unlearn: acc has ", acc.numel(),
              " elements but the spectra describe ", s_out.numel(), " x ", s_in.numel());
  TORCH_CHECK(steps >= 0, "mini_unlearn: steps must be >= 0, got ", steps);
  check_same_device(acc, s_out, "acc", "s_out");
  check_same_device(acc, s_in, "acc", "s_in");
}

// ---- each op's whole validation, called by its CPU and its CUDA kernel ----------------------

inline void check_device(const at::Tensor& t, at::DeviceType dev, const char* name) {
  TORCH_CHECK(t.device().type() == dev, "mini_unlearn: expected ", name, " to be a ",
              c10::DeviceTypeName(dev), " tensor, got ", t.device());
}

inline void check_quantize(const at::Tensor& x, int64_t bits, int64_t block, at::DeviceType dev) {
  check_bits_block(bits, block);
  check_float_input(x, "x");
  TORCH_CHECK(x.dim() == 1, "mini_unlearn: quantize_blockwise takes a 1-D tensor, got shape ",
              x.sizes(), " (flatten it first)");
  check_device(x, dev, "x");
}

inline void check_dequantize(const at::Tensor& codes, const at::Tensor& scales, int64_t bits,
                             int64_t block, int64_t numel, at::ScalarType dtype, at::DeviceType dev) {
  check_codes(codes, scales, bits, block, numel, /*rows=*/false);
  check_device(codes, dev, "codes");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
              "mini_unlearn: dtype must be float32, bfloat16 or float16, got ", dtype);
}

// Returns k, the number of compressed rows.
inline int64_t check_dot(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& v,
                         int64_t bits, int64_t block, at::DeviceType dev) {
  check_float_input(v, "v");
  TORCH_CHECK(v.dim() == 1, "mini_unlearn: v must be 1-D, got shape ", v.sizes());
  const int64_t k = check_codes(codes, scales, bits, block, v.numel(), /*rows=*/true);
  check_same_device(codes, v, "codes", "v");
  check_device(v, dev, "v");
  return k;
}

inline int64_t check_axpy(const at::Tensor& y, const at::Tensor& codes, const at::Tensor& scales,
                          const at::Tensor& coeff, int64_t bits, int64_t block, at::DeviceType dev) {
  check_float_input(y, "y");
  TORCH_CHECK(y.dim() == 1, "mini_unlearn: y must be 1-D, got shape ", y.sizes());
  const int64_t k = check_codes(codes, scales, bits, block, y.numel(), /*rows=*/true);
  TORCH_CHECK(coeff.scalar_type() == at::kFloat && coeff.dim() == 1 && coeff.numel() == k &&
                  coeff.is_contiguous(),
              "mini_unlearn: coeff must be a contiguous float32 vector of length k=", k, ", got ",
              coeff.scalar_type(), " ", coeff.sizes());
  check_same_device(codes, y, "codes", "y");
  check_same_device(coeff, y, "coeff", "y");
  check_device(y, dev, "y");
  return k;
}

inline void check_contraction_dense(const at::Tensor& acc, const at::Tensor& x, const at::Tensor& s_out,
                                    const at::Tensor& s_in, int64_t steps, at::DeviceType dev) {
  check_contraction(acc, s_out, s_in, steps);
  check_float_input(x, "x");
  TORCH_CHECK(x.numel() == acc.numel(), "mini_unlearn: x has ", x.numel(), " elements, acc has ",
              acc.numel());
  check_same_device(acc, x, "acc", "x");
  check_device(acc, dev, "acc");
}

inline void check_contraction_codes(const at::Tensor& acc, const at::Tensor& codes,
                                    const at::Tensor& scales, const at::Tensor& s_out,
                                    const at::Tensor& s_in, int64_t steps, int64_t bits, int64_t block,
                                    at::DeviceType dev) {
  check_contraction(acc, s_out, s_in, steps);
  check_codes(codes, scales, bits, block, acc.numel(), /*rows=*/false);
  check_same_device(acc, codes, "acc", "codes");
  check_device(acc, dev, "acc");
}

// ---- contraction2_accumulate ----------------------------------------------------------------

inline void check_finite_scalar(double v, const char* name) {
  TORCH_CHECK(std::isfinite(v), "mini_unlearn: ", name, " must be a finite number, got ", v);
}

// The fp32 state tensors u and e of contraction2_accumulate.
inline void check_state(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "mini_unlearn: ", name, " must be float32, got ",
              t.scalar_type(), " (keep the state in fp32; convert with .float())");
  TORCH_CHECK(t.is_contiguous(), "mini_unlearn: ", name, " must be contiguous (call .contiguous())");
}

// u, e fp32 contiguous, one shape, numel = |s_out| * |s_in| ([rows, cols], or flat with s_in of
// length 1); x fp32/bf16/fp16 and d (optional) fp32, contiguous with u's numel; spectra fp32 1-D;
// all on one device of type `dev`; steps >= 0 and every scalar finite.
inline void check_contraction2(const at::Tensor& u, const at::Tensor& e, const at::Tensor& x,
                               const at::Tensor& s_out, const at::Tensor& s_in,
                               const std::optional<at::Tensor>& d, double lam, double lam_dec,
                               double eta, double mu, double c, int64_t steps, at::DeviceType dev) {
  check_state(u, "u");
  check_state(e, "e");
  TORCH_CHECK(e.sizes() == u.sizes(), "mini_unlearn: u and e must have the same shape, got ",
              u.sizes(), " and ", e.sizes());
  TORCH_CHECK(s_out.scalar_type() == at::kFloat && s_in.scalar_type() == at::kFloat,
              "mini_unlearn: s_out and s_in must be float32, got ", s_out.scalar_type(), " and ",
              s_in.scalar_type());
  TORCH_CHECK(s_out.dim() == 1 && s_in.dim() == 1 && s_out.is_contiguous() && s_in.is_contiguous(),
              "mini_unlearn: s_out and s_in must be contiguous 1-D spectra, got shapes ",
              s_out.sizes(), " and ", s_in.sizes());
  TORCH_CHECK(u.numel() == s_out.numel() * s_in.numel(), "mini_unlearn: u has ", u.numel(),
              " elements but the spectra describe ", s_out.numel(), " x ", s_in.numel(),
              " (u is [len(s_out), len(s_in)])");
  check_float_input(x, "x");
  TORCH_CHECK(x.numel() == u.numel(), "mini_unlearn: x has ", x.numel(), " elements, u has ",
              u.numel());
  if (d.has_value()) {
    TORCH_CHECK(d->scalar_type() == at::kFloat, "mini_unlearn: d must be float32, got ",
                d->scalar_type(), " (or pass None for d = 1)");
    TORCH_CHECK(d->is_contiguous(), "mini_unlearn: d must be contiguous (call .contiguous())");
    TORCH_CHECK(d->numel() == u.numel(), "mini_unlearn: d has ", d->numel(), " elements, u has ",
                u.numel());
    check_same_device(u, *d, "u", "d");
  }
  TORCH_CHECK(steps >= 0, "mini_unlearn: steps must be >= 0, got ", steps);
  check_finite_scalar(lam, "lam");
  check_finite_scalar(lam_dec, "lam_dec");
  check_finite_scalar(eta, "eta");
  check_finite_scalar(mu, "mu");
  check_finite_scalar(c, "c");
  check_same_device(u, e, "u", "e");
  check_same_device(u, x, "u", "x");
  check_same_device(u, s_out, "u", "s_out");
  check_same_device(u, s_in, "u", "s_in");
  check_device(u, dev, "u");
}

}  // namespace mini_unlearn

// The input dtypes every op accepts (fp32, fp16, bf16): no double instantiation to compile.
#define MU_DISPATCH_FLOATS(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                             \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
