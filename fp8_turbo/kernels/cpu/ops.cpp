// Fused small ops of the CPU decode step (RMSNorm + residual add, rotary, SiLU(gate) * up): one pass
// over each row, fixed order, batch-invariant (ops_kernel.h). Built and loaded by kernels/cpu/build.py;
// the Python API is kernels/cpu/ops.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <type_traits>

#include "common.h"

#include "ops_types.h"  // Norm, Rotary, SiluMul

namespace fp8t::portable {
#define FP8T_ISA 0
#include "vec8.h"
#include "vec8_math.h"
#include "ops_kernel.h"
#undef FP8T_ISA
}  // namespace fp8t::portable

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace fp8t::avx2 {
#define FP8T_ISA 1
#include "vec8.h"
#include "vec8_math.h"
#include "ops_kernel.h"
#undef FP8T_ISA
}  // namespace fp8t::avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
namespace fp8t::avx512 {
#define FP8T_ISA 2
#include "vec8.h"
#include "vec8_math.h"
#include "ops_kernel.h"
#undef FP8T_ISA
}  // namespace fp8t::avx512
#pragma GCC pop_options

namespace fp8t {

// Run KERNEL<T>(args, r0, r1) over rows [0, M) in the chosen ISA, T = float or bf16 bits.
#define FP8T_DISPATCH(KERNEL, ARGS, M, GRAIN, DTYPE, ISA)                                       \
  at::parallel_for(0, M, GRAIN, [&](int64_t r0, int64_t r1) {                                   \
    const bool f32 = (DTYPE) == at::kFloat;                                                     \
    switch (ISA) {                                                                              \
      case ISA_AVX512:                                                                          \
        f32 ? avx512::KERNEL<float>(ARGS, r0, r1) : avx512::KERNEL<uint16_t>(ARGS, r0, r1);     \
        break;                                                                                  \
      case ISA_AVX2:                                                                            \
        f32 ? avx2::KERNEL<float>(ARGS, r0, r1) : avx2::KERNEL<uint16_t>(ARGS, r0, r1);         \
        break;                                                                                  \
      default:                                                                                  \
        f32 ? portable::KERNEL<float>(ARGS, r0, r1) : portable::KERNEL<uint16_t>(ARGS, r0, r1); \
    }                                                                                           \
  })

static void check_common(const at::Tensor& x, int64_t isa, const char* name) {
  TORCH_CHECK(isa >= ISA_PORTABLE && isa <= best_isa(), name, ": ISA ", isa, " not supported by this CPU");
  TORCH_CHECK(x.device().is_cpu(), name, ": CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, name, ": fp32 or bf16 only, got ",
              x.scalar_type());
}

static int64_t grain_rows(int64_t row_elems) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(row_elems, 1)); }

// (out, h): h = x + residual (x when there is none), out = RMSNorm(h) * weight; x, residual [M, N]
// with unit stride along N, weight [N], all of one dtype.
std::tuple<at::Tensor, c10::optional<at::Tensor>> rms_norm(const at::Tensor& x_in, const at::Tensor& weight,
                                                           double eps, const c10::optional<at::Tensor>& residual_in,
                                                           int64_t isa) {
  check_common(x_in, isa, "rms_norm");
  const int64_t N = x_in.size(-1);
  TORCH_CHECK(weight.scalar_type() == x_in.scalar_type() && weight.numel() == N && weight.is_contiguous(),
              "rms_norm: weight [", N, "] of x's dtype, got ", weight.sizes(), " ", weight.scalar_type());
  at::Tensor x = x_in.reshape({-1, N});
  if (x.stride(1) != 1) x = x.contiguous();
  const int64_t M = x.size(0);
  Norm a;
  a.x = x.data_ptr(), a.ldx = x.stride(0), a.weight = weight.data_ptr(), a.N = N, a.eps = float(eps);
  at::Tensor out = at::empty({M, N}, x.options());
  a.out = out.data_ptr(), a.ldo = N;
  c10::optional<at::Tensor> h;
  at::Tensor res;
  if (residual_in.has_value()) {
    TORCH_CHECK(residual_in->scalar_type() == x.scalar_type() && residual_in->numel() == x.numel(),
                "rms_norm: residual ", residual_in->sizes(), " ", residual_in->scalar_type(), " vs x ", x_in.sizes());
    res = residual_in->reshape({-1, N});
    if (res.stride(1) != 1) res = res.contiguous();
    h = at::empty({M, N}, x.options());
    a.residual = res.data_ptr(), a.ldr = res.stride(0), a.h_out = h->data_ptr(), a.ldh = N;
  }
  if (M > 0) FP8T_DISPATCH(rms_norm_rows, a, M, grain_rows(N), x.scalar_type(), isa);
  if (h.has_value()) h = h->view(x_in.sizes());
  return {out.view(x_in.sizes()), h};
}

// x [T, heads, D] (unit stride along D) rotated in place by cos, sin [T, D] of x's dtype; returns x.
at::Tensor rotary_(at::Tensor x, const at::Tensor& cos_in, const at::Tensor& sin_in, int64_t isa) {
  check_common(x, isa, "rotary");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0, "rotary: need x [T, heads, D] with even D "
              "and unit stride along D, got ", x.sizes(), " strides ", x.strides());
  const int64_t T = x.size(0), heads = x.size(1), D = x.size(2);
  const at::Tensor c = cos_in.contiguous(), s = sin_in.contiguous();
  TORCH_CHECK(c.sizes() == s.sizes() && c.dim() == 2 && c.size(0) == T && c.size(1) == D &&
              c.scalar_type() == x.scalar_type() && s.scalar_type() == x.scalar_type(),
              "rotary: cos/sin [", T, ", ", D, "] of x's dtype, got ", c.sizes(), " ", c.scalar_type());
  Rotary a;
  a.x = x.data_ptr(), a.ldt = x.stride(0), a.ldh = x.stride(1), a.cos = c.data_ptr(), a.sin = s.data_ptr();
  a.ldc = D, a.heads = heads, a.D = D;
  if (T * heads > 0) FP8T_DISPATCH(rotary_rows, a, T * heads, grain_rows(D), x.scalar_type(), isa);
  return x;
}

// out [..., I] = silu(x[..., :I]) * x[..., I:] for x [..., 2I] (unit stride along the last dim).
at::Tensor silu_mul(const at::Tensor& x_in, int64_t isa) {
  check_common(x_in, isa, "silu_mul");
  const int64_t I2 = x_in.size(-1);
  TORCH_CHECK(I2 % 2 == 0, "silu_mul: last dim ", I2, " must be even (gate, up)");
  at::Tensor x = x_in.reshape({-1, I2});
  if (x.stride(1) != 1) x = x.contiguous();
  const int64_t M = x.size(0);
  at::Tensor out = at::empty({M, I2 / 2}, x.options());
  SiluMul a;
  a.x = x.data_ptr(), a.ldx = x.stride(0), a.out = out.data_ptr(), a.ldo = I2 / 2, a.I = I2 / 2;
  if (M > 0) FP8T_DISPATCH(silu_mul_rows, a, M, grain_rows(I2), x.scalar_type(), isa);
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = I2 / 2;
  return out.view(shape);
}

}  // namespace fp8t

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fp8-turbo CPU fused small ops (see kernels/cpu/ops.py)";
  m.def("rms_norm", &fp8t::rms_norm);
  m.def("rotary_", &fp8t::rotary_);
  m.def("silu_mul", &fp8t::silu_mul);
  m.def("best_isa", &fp8t::best_isa);
}
