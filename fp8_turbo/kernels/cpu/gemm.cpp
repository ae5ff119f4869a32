// CPU FP8 GEMM: e4m3 (or bf16/fp32) weights [N, K] read directly, decoded in registers, fp32
// accumulation in a fixed order over K (gemm_kernel.h), so every output row is bit-identical
// whatever the batch, the thread count or the instruction set. Built and loaded by kernels/cpu/build.py;
// the Python API and its guarantees are documented in kernels/cpu/gemm.py.
//
// This file: argument handling, activation preparation and runtime ISA dispatch. The kernels are
// compiled three times from gemm_kernel.h: portable C++, AVX2+FMA+F16C, AVX-512 (F+VL: 32 registers).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

// Every helper used by the per-ISA kernels is force-inlined: an out-of-line call from AVX code into
// code compiled for baseline x86-64 (legacy SSE encoding) while ymm registers are live costs ~1000
// cycles per call on some CPUs (measured 3.4x on a Zen 3 VM).
#include "common.h"  // FP8T_INLINE, Isa, best_isa, bit conversions, e4m3/bf16 rounding, the e4m3 table

namespace fp8t {

constexpr int64_t SCALE_BLOCK = 128;  // N extent of one 128x128 block scale; the default K group
constexpr int64_t MIN_GROUP = 16, MAX_GROUP = 128;  // K extents of group scales: powers of two in between
constexpr float E4M3_MAX = 448.0f;
constexpr float MIN_AMAX = 1e-12f;
constexpr int64_t GEMV_MAX_M = 4;  // up to this many rows: weight decoded in registers, read once

enum WType { W_E4M3 = 0, W_BF16 = 1, W_F32 = 2 };
// GROUP: [rows, K/group]; BLOCK: [rows/128, K/128]. Group scales are fp32, or E8M0 (MXFP8: one byte,
// the power of two 2^(byte - 127)).
enum ScaleKind { S_NONE = 0, S_TENSOR, S_ROW, S_GROUP, S_BLOCK };
enum Act { A_FP8 = 0, A_NONE, A_TOKEN, A_TENSOR, A_GROUP };  // how the activations arrive / are quantized
enum Granularity { Q_TOKEN = 0, Q_TENSOR, Q_GROUP };

// One operand's scale: value for (row, global k).
struct Scale {
  const float* p = nullptr;
  const uint8_t* e8m0 = nullptr;  // GROUP scales stored as E8M0 bytes instead of p
  int kind = S_NONE;
  int64_t stride = 0;  // between rows (ROW, GROUP) or 128-row blocks (BLOCK)
  int shift = 7;       // log2 of the K extent of one scale (GROUP, BLOCK)
  FP8T_INLINE float at(int64_t row, int64_t k) const {
    switch (kind) {
      case S_TENSOR: return p[0];
      case S_ROW: return p[row * stride];
      case S_GROUP:
        return e8m0 ? bits_to_float(uint32_t(e8m0[row * stride + (k >> shift)]) << 23) : p[row * stride + (k >> shift)];
      case S_BLOCK: return p[(row / SCALE_BLOCK) * stride + (k >> shift)];
      default: return 1.0f;
    }
  }
  FP8T_INLINE bool along_k() const { return kind == S_GROUP || kind == S_BLOCK; }
  FP8T_INLINE int64_t group() const { return along_k() ? int64_t(1) << shift : 0; }
};

struct Gemm {
  const float* a = nullptr;  // [M, lda] fp32, each row zero-padded to Kp
  int64_t lda = 0, M = 0, N = 0, K = 0, Kp = 0;
  const void* w = nullptr;  // [N, ldw] of wtype
  int64_t ldw = 0;
  int wtype = W_E4M3;
  Scale as, ws;
  bool scales_along_k = false;
  int64_t k_step = SCALE_BLOCK;  // scales along K: K extent of each partial sum (the smaller group)
  bool fold_w = false;  // per-row weight groups folded into the decoded weight (gemm_kernel.h, "scales")
  const float* bias = nullptr;  // fp32 [N] or null
  float* out_f32 = nullptr;
  uint16_t* out_bf16 = nullptr;
  int64_t ldo = 0;
  int64_t panel_rows = 0, panel_k = 0;  // blocking of the larger-M path (gemm_kernel.h gemm_panel)
};

// How g's scales enter the sums (gemm_kernel.h, "scales"), from the scale layouts alone, never their
// values, so rows stay batch-invariant; every caller that builds a Gemm (linear(), step.cpp) uses this:
// per-row weight groups against activation scales constant along K are folded into the decoded
// weight; other scales changing along K take a partial sum per k_step (the smaller group: both are
// powers of two, so it divides the larger).
FP8T_INLINE void plan_scales(Gemm& g) {
  g.fold_w = g.ws.kind == S_GROUP && !g.as.along_k();
  g.scales_along_k = g.as.along_k() || (g.ws.along_k() && !g.fold_w);
  if (g.scales_along_k)
    g.k_step = std::min(g.as.along_k() ? g.as.group() : MAX_GROUP, g.ws.along_k() ? g.ws.group() : MAX_GROUP);
}

struct Quant {
  const void* x = nullptr;  // [M, ldx] fp32 or bf16
  int64_t ldx = 0, M = 0, K = 0, Kp = 0;
  int granularity = Q_TOKEN;
  int64_t group_size = SCALE_BLOCK;
  bool pow2 = false;       // scales rounded up to a power of two (MXFP8's E8M0 scales, kept in fp32)
  float* scale = nullptr;  // [1] (given, tensor) | [M] | [M, groups]
  float* q = nullptr;      // [M, ldq] grid values, zero-padded to Kp
  int64_t ldq = 0;
  uint8_t* bytes = nullptr;  // [M, ldb] e4m3, or null
  int64_t ldb = 0;
};

// ------------------------------------------------------------------- exact scalar numerics

FP8T_INLINE float to_float(float x) { return x; }
FP8T_INLINE float to_float(at::BFloat16 x) { return bits_to_float(uint32_t(x.x) << 16); }

// kernels/fp8.py compute_scale: max(amax, 1e-12) / 448 in fp32 (NaN stays NaN).
FP8T_INLINE float compute_scale(float amax) { return std::max(amax, MIN_AMAX) / E4M3_MAX; }

// kernels/fp8.py pow2_scale: a positive normal fp32 scale rounded up to a power of two (mantissa
// bits set -> the next exponent), so x / scale never exceeds 448; NaN stays NaN.
FP8T_INLINE float pow2_scale(float s) {
  if (s != s) return s;
  const uint32_t u = float_to_bits(s);
  return bits_to_float(((u >> 23) + ((u & 0x7FFFFF) != 0)) << 23);
}


// e4m3 byte -> exact fp32 value (NaN for 0x7F / 0xFF): activations given as e4m3.
struct E4m3Table {
  float v[256];
  E4m3Table() {
    for (int b = 0; b < 256; ++b) {
      const int e = (b >> 3) & 0xF, m = b & 7;
      float mag = e == 0 ? std::ldexp(float(m), -9) : std::ldexp(float(8 + m), e - 10);
      if ((b & 0x7F) == 0x7F) mag = NAN;
      v[b] = (b & 0x80) ? -mag : mag;
    }
  }
};
static const E4m3Table kE4m3;


}  // namespace fp8t

// ------------------------------------------------------------------- the kernels, per ISA

namespace fp8t::portable {
#define FP8T_ISA 0
#include "vec8.h"
#include "vec8_math.h"
#include "gemm_kernel.h"
#undef FP8T_ISA
}  // namespace fp8t::portable

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace fp8t::avx2 {
#define FP8T_ISA 1
#include "vec8.h"
#include "vec8_math.h"
#include "gemm_kernel.h"
#undef FP8T_ISA
}  // namespace fp8t::avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
namespace fp8t::avx512 {
#define FP8T_ISA 2
#include "vec8.h"
#include "vec8_math.h"
#include "gemm_kernel.h"
#undef FP8T_ISA
}  // namespace fp8t::avx512
#pragma GCC pop_options

namespace fp8t {

// ------------------------------------------------------------------- dispatch

static int checked_isa(int64_t isa) {
  TORCH_CHECK(isa >= ISA_PORTABLE && isa <= best_isa(), "fp8 cpu kernels: ISA ", isa,
              " is not supported by this CPU (best: ", best_isa(), ")");
  return int(isa);
}

static void run_gemm_range(int isa, const Gemm& g, int64_t n0, int64_t n1, float* panel, float* state) {
  switch (isa) {
    case ISA_AVX512: return avx512::gemm_range(g, n0, n1, panel, state);
    case ISA_AVX2: return avx2::gemm_range(g, n0, n1, panel, state);
    default: return portable::gemm_range(g, n0, n1, panel, state);
  }
}

template <typename T>
static void run_quantize_rows(int isa, const Quant& q, int64_t r0, int64_t r1) {
  switch (isa) {
    case ISA_AVX512: return avx512::quantize_rows<T>(q, r0, r1);
    case ISA_AVX2: return avx2::quantize_rows<T>(q, r0, r1);
    default: return portable::quantize_rows<T>(q, r0, r1);
  }
}

// ------------------------------------------------------------------- arguments

static int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The K extent of a per-row group scale with `cols` columns over K: the power of two g in
// [MIN_GROUP, MAX_GROUP] with cdiv(K, g) == cols (unique whenever cols > 1), else 0.
static int64_t group_of(int64_t k, int64_t cols) {
  for (int64_t g = MIN_GROUP; g <= MAX_GROUP; g *= 2)
    if (cdiv(k, g) == cols) return g;
  return 0;
}

static int log2_of(int64_t g) { return __builtin_ctzll(uint64_t(g)); }

// Scale layout of an operand with `rows` rows (the rules of kernels/gemm.py _scale_layout): fp32, or
// E8M0 bytes (float8_e8m0fnu) for per-row group scales.
static Scale scale_of(const at::Tensor& s, int64_t rows, int64_t k, const char* name) {
  TORCH_CHECK(s.is_contiguous(), name, " must be contiguous");
  const bool e8m0 = s.scalar_type() == at::kFloat8_e8m0fnu;
  TORCH_CHECK(e8m0 || s.scalar_type() == at::kFloat, name, " must be fp32 or float8_e8m0fnu, got ", s.scalar_type());
  const int64_t kb = cdiv(k, SCALE_BLOCK);
  const int64_t group = s.dim() == 2 && s.size(0) == rows && s.size(1) > 1 ? group_of(k, s.size(1)) : 0;
  Scale sc;
  if (e8m0) {
    TORCH_CHECK(group > 0 || (s.dim() == 2 && s.size(0) == rows && s.size(1) == 1 && k <= MAX_GROUP), name,
                ": float8_e8m0fnu scales are per-row groups along K [", rows, ", cdiv(K, g)] only, got ", s.sizes());
    sc.e8m0 = reinterpret_cast<const uint8_t*>(s.data_ptr());
    sc.kind = S_GROUP, sc.stride = s.size(1), sc.shift = log2_of(group > 0 ? group : MAX_GROUP);
    return sc;
  }
  sc.p = s.data_ptr<float>();
  if (s.numel() == 1 && s.dim() <= 2) {
    sc.kind = S_TENSOR;
  } else if (s.dim() == 2 && s.size(0) == rows && s.size(1) == 1) {
    sc.kind = S_ROW, sc.stride = 1;
  } else if (group > 0) {
    sc.kind = S_GROUP, sc.stride = s.size(1), sc.shift = log2_of(group);
  } else if (s.dim() == 2 && s.size(0) == cdiv(rows, SCALE_BLOCK) && s.size(1) == kb) {
    sc.kind = S_BLOCK, sc.stride = kb;
  } else {
    TORCH_CHECK(false, name, " of shape ", s.sizes(), " fits none of [1], [", rows, ", 1], [", rows,
                ", cdiv(K, g)] for g in 16..128 (K = ", k, "), [", cdiv(rows, SCALE_BLOCK), ", ", kb, "]");
  }
  return sc;
}

// Quantize x [M, K] (fp32/bf16) into q (fp32 grid values [M, Kp]) and optionally bytes [M, K].
// pow2: dynamic scales rounded up to a power of two (MXFP8).
static at::Tensor quantize_into(int isa, const at::Tensor& x, int granularity, int64_t group_size, bool pow2,
                                const c10::optional<at::Tensor>& static_scale, float* q, int64_t ldq, uint8_t* bytes) {
  const int64_t M = x.size(0), K = x.size(1);
  Quant qu;
  qu.x = x.data_ptr(), qu.ldx = x.stride(0), qu.M = M, qu.K = K, qu.Kp = ldq, qu.pow2 = pow2;
  qu.granularity = granularity, qu.group_size = group_size, qu.q = q, qu.ldq = ldq, qu.bytes = bytes, qu.ldb = K;
  at::Tensor scale;
  if (granularity == Q_TENSOR) {
    if (static_scale.has_value()) {
      scale = static_scale->to(at::kFloat).reshape({1}).contiguous();
    } else {  // one amax over the whole tensor (the max is exact in any order)
      scale = at::empty({1}, x.options().dtype(at::kFloat));
      const float s = compute_scale(x.numel() ? x.abs().max().item<float>() : 0.0f);
      scale.data_ptr<float>()[0] = pow2 ? pow2_scale(s) : s;
    }
  } else if (granularity == Q_TOKEN) {
    scale = at::empty({M, 1}, x.options().dtype(at::kFloat));
  } else {
    scale = at::empty({M, cdiv(K, group_size)}, x.options().dtype(at::kFloat));
  }
  qu.scale = scale.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));  // rows per task
  at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
    if (x.scalar_type() == at::kFloat) run_quantize_rows<float>(isa, qu, r0, r1);
    else run_quantize_rows<at::BFloat16>(isa, qu, r0, r1);
  });
  return scale;
}

// ------------------------------------------------------------------- entry points

// out [M, N] = act(x) @ (w * w_scale).T (+ bias); see kernels/cpu/gemm.py for the contract.
//   act A_FP8:   x e4m3 [M, K] with x_scale [1] | [M, 1] | [M, K/g] (g in 16..128) | [M/128, K/128]
//   act A_NONE:  x fp32/bf16 used as it is (weight-only and dense layers)
//   act A_TOKEN / A_TENSOR / A_GROUP: x fp32/bf16 quantized here (kernels/fp8.py numerics), A_GROUP in
//                groups of act_group along K; act_pow2: power-of-two scales (MXFP8);
//                A_TENSOR takes x_scale as a static scale when given
//   w: e4m3 [N, K] with w_scale [1] | [N, 1] | [N, K/g] (g in 16..128; fp32 or E8M0) | [N/128, K/128];
//      or bf16/fp32 without scale
at::Tensor linear(const at::Tensor& x_in, int64_t act, const c10::optional<at::Tensor>& x_scale_in,
                  const at::Tensor& w, const c10::optional<at::Tensor>& w_scale_in, const c10::optional<at::Tensor>& bias,
                  at::ScalarType out_dtype, int64_t isa_arg, int64_t act_group, bool act_pow2) {
  const int isa = checked_isa(isa_arg);
  TORCH_CHECK(act != A_GROUP || (act_group >= MIN_GROUP && act_group <= MAX_GROUP && (act_group & (act_group - 1)) == 0),
              "linear: act_group must be a power of two in [", MIN_GROUP, ", ", MAX_GROUP, "], got ", act_group);
  TORCH_CHECK(x_in.dim() >= 1 && w.dim() == 2 && x_in.size(-1) == w.size(1), "linear: need x [..., K] and w [N, K], got ",
              x_in.sizes(), " and ", w.sizes());
  TORCH_CHECK(x_in.device().is_cpu() && w.device().is_cpu(), "linear: CPU tensors only");
  TORCH_CHECK(w.stride(1) == 1, "linear: w needs unit stride along K");
  int64_t rows = 1;
  for (int64_t d = 0; d + 1 < x_in.dim(); ++d) rows *= x_in.size(d);
  at::Tensor x = x_in.reshape({rows, x_in.size(-1)});
  if (x.stride(1) != 1) x = x.contiguous();
  c10::optional<at::Tensor> x_scale, w_scale;  // fp32, contiguous
  if (x_scale_in.has_value()) x_scale = x_scale_in->to(at::kFloat).contiguous();
  if (w_scale_in.has_value())
    w_scale = w_scale_in->scalar_type() == at::kFloat8_e8m0fnu ? w_scale_in->contiguous()
                                                               : w_scale_in->to(at::kFloat).contiguous();
  const int64_t M = x.size(0), N = w.size(0), K = x.size(1), Kp = cdiv(K, 16) * 16;
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kBFloat16 || out_dtype == at::kHalf,
              "linear: out_dtype must be float32, bfloat16 or float16");
  const auto work_dtype = out_dtype == at::kHalf ? at::kFloat : out_dtype;
  at::Tensor out = at::empty({M, N}, x.options().dtype(work_dtype));
  if (M == 0 || N == 0) {
    std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end() - 1);
    shape.push_back(N);
    return out.to(out_dtype).view(shape);
  }

  Gemm g;
  g.M = M, g.N = N, g.K = K, g.Kp = Kp;
  // weights
  if (w.scalar_type() == at::kFloat8_e4m3fn) {
    g.wtype = W_E4M3;
    TORCH_CHECK(w_scale.has_value(), "linear: e4m3 weights need w_scale");
    g.ws = scale_of(*w_scale, N, K, "w_scale");
  } else {
    TORCH_CHECK(w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kFloat,
                "linear: w must be float8_e4m3fn, bfloat16 or float32, got ", w.scalar_type());
    TORCH_CHECK(!w_scale.has_value(), "linear: w_scale is for e4m3 weights only");
    g.wtype = w.scalar_type() == at::kBFloat16 ? W_BF16 : W_F32;
  }
  g.w = w.data_ptr(), g.ldw = w.stride(0);

  // activations -> fp32 rows of Kp (zero-padded)
  at::Tensor a = at::empty({M, Kp}, x.options().dtype(at::kFloat));
  float* ap = a.data_ptr<float>();
  at::Tensor a_scale;  // kept alive for g.as
  if (act == A_FP8) {
    TORCH_CHECK(x.scalar_type() == at::kFloat8_e4m3fn, "linear: act=fp8 needs e4m3 x");
    TORCH_CHECK(x_scale.has_value(), "linear: e4m3 x needs x_scale");
    a_scale = *x_scale;
    g.as = scale_of(a_scale, M, K, "x_scale");
    const uint8_t* xb = reinterpret_cast<const uint8_t*>(x.data_ptr());
    at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(Kp, 16)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        for (int64_t k = 0; k < K; ++k) ap[r * Kp + k] = kE4m3.v[xb[r * x.stride(0) + k]];
        for (int64_t k = K; k < Kp; ++k) ap[r * Kp + k] = 0.0f;
      }
    });
  } else {
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
                "linear: x must be float32 or bfloat16, got ", x.scalar_type());
    if (act == A_NONE) {
      TORCH_CHECK(!x_scale.has_value(), "linear: x_scale given for unquantized activations");
      at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(Kp, 16)), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          float* dst = ap + r * Kp;
          if (x.scalar_type() == at::kFloat) std::memcpy(dst, x.data_ptr<float>() + r * x.stride(0), K * 4);
          else
            for (int64_t k = 0; k < K; ++k) dst[k] = to_float(x.data_ptr<at::BFloat16>()[r * x.stride(0) + k]);
          for (int64_t k = K; k < Kp; ++k) dst[k] = 0.0f;
        }
      });
    } else {
      TORCH_CHECK(act == A_TOKEN || act == A_TENSOR || act == A_GROUP, "linear: unknown act ", act);
      TORCH_CHECK(act == A_TENSOR || !x_scale.has_value(), "linear: a static x_scale is per-tensor only");
      const int gran = act == A_TOKEN ? Q_TOKEN : act == A_TENSOR ? Q_TENSOR : Q_GROUP;
      a_scale = quantize_into(isa, x, gran, act_group, act_pow2, x_scale, ap, Kp, nullptr);
      g.as = scale_of(a_scale, M, K, "x_scale");
    }
  }
  g.a = ap, g.lda = Kp;
  plan_scales(g);

  at::Tensor bias_f32;
  if (bias.has_value()) {
    TORCH_CHECK(bias->numel() == N, "linear: bias of shape ", bias->sizes(), ", expected [", N, "]");
    bias_f32 = bias->to(at::kFloat).contiguous();
    g.bias = bias_f32.data_ptr<float>();
  }
  if (work_dtype == at::kFloat) g.out_f32 = out.data_ptr<float>();
  else g.out_bf16 = reinterpret_cast<uint16_t*>(out.data_ptr());
  g.ldo = N;

  // Small M: one pass over the weight, decoded in registers. Larger M: blocks of 24 weight rows x 768
  // of K decoded into an fp32 panel, swept by register tiles. Threads split N only; each
  // thread has its own panel and tile states.
  const bool use_panel = M > GEMV_MAX_M;
  g.panel_rows = 24, g.panel_k = 768;  // <= 72 KiB of fp32 (L2); panel_k: a multiple of every group
  const int64_t unit = use_panel ? g.panel_rows : 16;  // weight rows per task
  at::parallel_for(0, cdiv(N, unit), 1, [&](int64_t t0, int64_t t1) {
    const int64_t n0 = t0 * unit, n1 = std::min(N, t1 * unit);
    std::unique_ptr<float, decltype(&std::free)> panel(nullptr, &std::free), state(nullptr, &std::free);
    if (use_panel) {
      panel.reset(static_cast<float*>(std::aligned_alloc(64, sizeof(float) * g.panel_rows * g.panel_k)));
      state.reset(static_cast<float*>(std::aligned_alloc(64, sizeof(float) * 8 * M * g.panel_rows)));
      TORCH_CHECK(panel && state, "linear: out of memory for the weight panel");
    }
    run_gemm_range(isa, g, n0, n1, panel.get(), state.get());
  });
  std::vector<int64_t> out_shape(x_in.sizes().begin(), x_in.sizes().end() - 1);
  out_shape.push_back(N);
  return (out_dtype == at::kHalf ? out.to(at::kHalf) : out).view(out_shape);
}

// quantize_fp8 (kernels/quantize.py) on CPU: x [M, K] fp32/bf16 -> (e4m3 [M, K], scale), bit-exact.
std::tuple<at::Tensor, at::Tensor> quantize(const at::Tensor& x, int64_t granularity, int64_t group_size,
                                            const c10::optional<at::Tensor>& static_scale, int64_t isa_arg, bool pow2) {
  const int isa = checked_isa(isa_arg);
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1 && x.device().is_cpu(), "quantize: need a CPU x [M, K] with unit stride");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "quantize: x must be float32 or bfloat16");
  TORCH_CHECK(granularity >= Q_TOKEN && granularity <= Q_GROUP && group_size >= 1, "quantize: bad granularity");
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor bytes = at::empty({M, K}, x.options().dtype(at::kFloat8_e4m3fn));
  at::Tensor q = at::empty({M, K}, x.options().dtype(at::kFloat));
  at::Tensor scale = quantize_into(isa, x, int(granularity), group_size, pow2, static_scale, q.data_ptr<float>(), K,
                                   reinterpret_cast<uint8_t*>(bytes.data_ptr()));
  return {bytes, scale};
}

}  // namespace fp8t

#ifndef FP8T_GEMM_NO_MODULE  // step.cpp compiles this file into the native step, without its module
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fp8-turbo CPU GEMM kernels (see kernels/cpu/gemm.py)";
  m.def("linear", &fp8t::linear);
  m.def("quantize", &fp8t::quantize);
  m.def("best_isa", &fp8t::best_isa);
}
#endif
