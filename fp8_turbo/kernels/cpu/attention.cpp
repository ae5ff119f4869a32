// CPU paged attention (decode and prefill) over the block-table KV cache, batch-invariant: every
// query row (token, head) is computed by one function in a fixed order over its cached keys
// (attention_kernel.h), so it is bit-identical whatever the batch, the chunking of its prompt,
// decode vs prefill, the thread count or the instruction set. Built and loaded by kernels/cpu/build.py;
// the Python API is kernels/cpu/attention.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <vector>

#include "common.h"

#include "attention_types.h"  // KvType, Attn

namespace fp8t::portable {
#define FP8T_ISA 0
#include "vec8.h"
#include "vec8_math.h"
#include "attention_kernel.h"
#undef FP8T_ISA
}  // namespace fp8t::portable

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace fp8t::avx2 {
#define FP8T_ISA 1
#include "vec8.h"
#include "vec8_math.h"
#include "attention_kernel.h"
#undef FP8T_ISA
}  // namespace fp8t::avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
namespace fp8t::avx512 {
#define FP8T_ISA 2
#include "vec8.h"
#include "vec8_math.h"
#include "attention_kernel.h"
#undef FP8T_ISA
}  // namespace fp8t::avx512
#pragma GCC pop_options

namespace fp8t {

using AttendFn = void (*)(const Attn&, const float* const*, int64_t, const void* const*, const void* const*,
                          float* const*, float* const*);

template <int KV>
static AttendFn attend_fn(int isa, int rows) {
#define FP8T_ROWS(NS)                                 \
  switch (rows) {                                     \
    case 1: return &NS::attend_rows<1, KV>;           \
    case 2: return &NS::attend_rows<2, KV>;           \
    case 3: return &NS::attend_rows<3, KV>;           \
    default: return &NS::attend_rows<4, KV>;          \
  }
  if (isa == ISA_AVX512) { FP8T_ROWS(avx512) }
  if (isa == ISA_AVX2) { FP8T_ROWS(avx2) }
  FP8T_ROWS(portable)
#undef FP8T_ROWS
}

static AttendFn attend_fn(int isa, int kv, int rows) {
  switch (kv) {
    case KV_E4M3: return attend_fn<KV_E4M3>(isa, rows);
    case KV_BF16: return attend_fn<KV_BF16>(isa, rows);
    default: return attend_fn<KV_F32>(isa, rows);
  }
}

// out [T, H, D] (q's dtype) = attention of q [T, H, D] over the paged caches [num_blocks, block_size,
// KVH, D]. Decode (cu_seqlens_q absent): token b is sequence b's last, causal length seq_lens[b].
// Prefill: tokens cu[b] .. cu[b+1] of sequence b are its last n_new, token i of them at causal length
// seq_lens[b] - n_new + i + 1. See kernels/cpu/attention.py for the contract.
at::Tensor attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables_in, const at::Tensor& seq_lens_in,
                     const c10::optional<at::Tensor>& cu_seqlens_in, double sm_scale, double k_scale, double v_scale,
                     int64_t isa) {
  TORCH_CHECK(isa >= ISA_PORTABLE && isa <= best_isa(), "attention: ISA ", isa, " not supported by this CPU");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
              "attention: need q [T, H, D] and caches [num_blocks, block_size, KVH, D]");
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(), "attention: CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16, "attention: q must be fp32 or bf16");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() && k_cache.strides() == v_cache.strides(),
              "attention: k and v caches must share dtype and strides");
  const int64_t T = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1), KVH = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == D && D % 8 == 0 && H % KVH == 0, "attention: head dim ", D, " (a multiple of 8, "
              "as the cache's) and ", H, " query heads (a multiple of ", KVH, " KV heads)");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1, "attention: q and caches need unit stride along D");
  int kv;
  int64_t elem;
  switch (k_cache.scalar_type()) {
    case at::kFloat8_e4m3fn: kv = KV_E4M3, elem = 1; break;
    case at::kBFloat16: kv = KV_BF16, elem = 2; break;
    case at::kFloat: kv = KV_F32, elem = 4; break;
    default: TORCH_CHECK(false, "attention: cache dtype must be float8_e4m3fn, bfloat16 or float32");
  }
  const at::Tensor tables = block_tables_in.to(at::kInt).contiguous();
  const at::Tensor seq_lens = seq_lens_in.to(at::kLong).contiguous();
  const int64_t B = seq_lens.numel(), max_blocks = tables.size(1);
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == B, "attention: block_tables ", tables.sizes(), " vs ", B, " sequences");
  const int64_t* lens = seq_lens.data_ptr<int64_t>();

  // per token: its sequence and causal length
  std::vector<int64_t> tok_seq(T), tok_len(T);
  if (!cu_seqlens_in.has_value()) {
    TORCH_CHECK(B == T, "attention (decode): ", T, " tokens but ", B, " sequences");
    for (int64_t b = 0; b < B; ++b) tok_seq[b] = b, tok_len[b] = lens[b];
  } else {
    const at::Tensor cu = cu_seqlens_in->to(at::kLong).contiguous();
    TORCH_CHECK(cu.numel() == B + 1, "attention (prefill): cu_seqlens_q has ", cu.numel(), " entries for ", B, " sequences");
    const int64_t* c = cu.data_ptr<int64_t>();
    TORCH_CHECK(c[0] >= 0 && c[B] <= T, "attention (prefill): cu_seqlens_q out of range of ", T, " tokens");
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n_new = c[b + 1] - c[b];
      TORCH_CHECK(n_new >= 0 && n_new <= lens[b], "attention (prefill): sequence ", b, " has ", n_new,
                  " new tokens but seq_len ", lens[b]);
      for (int64_t i = 0; i < n_new; ++i) tok_seq[c[b] + i] = b, tok_len[c[b] + i] = lens[b] - n_new + i + 1;
    }
    for (int64_t t = 0; t < c[0]; ++t) tok_len[t] = 0, tok_seq[t] = 0;  // tokens outside every chunk: zeros
    for (int64_t t = c[B]; t < T; ++t) tok_len[t] = 0, tok_seq[t] = 0;
  }
  int64_t max_len = 0;
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(tok_len[t] >= 0 && tok_len[t] <= max_blocks * block_size, "attention: causal length ", tok_len[t],
                " of token ", t, " exceeds the block table's ", max_blocks * block_size, " slots");
    max_len = std::max(max_len, tok_len[t]);
  }

  Attn a;
  a.D = D;
  // k_scale / v_scale dequantize e4m3 caches only (as the reference's gather); e4m3 decodes as x * 2^-8
  const bool fp8 = kv == KV_E4M3;
  a.qk_scale = float(sm_scale * 1.4426950408889634 * (fp8 ? k_scale * 256.0 : 1.0));
  a.v_scale = float(fp8 ? v_scale * 256.0 : 1.0);
  const int64_t group = H / KVH;
  at::Tensor out = at::empty({T, H, D}, q.options());
  const bool q_f32 = q.scalar_type() == at::kFloat, out_f32 = q_f32;
  const char* k_base = static_cast<const char*>(k_cache.data_ptr());
  const char* v_base = static_cast<const char*>(v_cache.data_ptr());
  const int64_t s_cb = k_cache.stride(0) * elem, s_cs = k_cache.stride(1) * elem, s_ch = k_cache.stride(2) * elem;
  const int32_t* table_base = tables.data_ptr<int32_t>();
  const int64_t Lp_max = (max_len + 7) / 8 * 8;

  // (token, KV head) tasks; a task is ~L * group * D FMAs twice: batch small work into one thread
  const int64_t work = std::max<int64_t>(1, max_len * group * D);
  const int64_t grain = std::max<int64_t>(1, 65536 / work);
  at::parallel_for(0, T * KVH, grain, [&](int64_t w0, int64_t w1) {
    std::vector<float> qbuf(group * D), obuf(group * D), sbuf(group * std::max<int64_t>(Lp_max, 8));
    std::vector<const void*> krows(std::max<int64_t>(max_len, 1)), vrows(std::max<int64_t>(max_len, 1));
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t t = w / KVH, g = w % KVH, L = tok_len[t];
      const int64_t h0 = g * group;
      if (L == 0) {  // nothing to attend to (a padding token): zeros
        for (int64_t r = 0; r < group; ++r) {
          char* o = static_cast<char*>(out.data_ptr()) + (t * H + h0 + r) * D * out.element_size();
          std::memset(o, 0, D * out.element_size());
        }
        continue;
      }
      const int32_t* table = table_base + tok_seq[t] * max_blocks;
      for (int64_t j = 0; j < L; j += block_size) {
        const int64_t blk = table[j / block_size];
        TORCH_CHECK(blk >= 0 && blk < num_blocks, "attention: block id ", blk, " of position ", j, " out of [0, ",
                    num_blocks, ")");
        const int64_t off = blk * s_cb + g * s_ch;
        for (int64_t jj = j; jj < std::min(L, j + block_size); ++jj) {
          krows[jj] = k_base + off + (jj - j) * s_cs;
          vrows[jj] = v_base + off + (jj - j) * s_cs;
        }
      }
      // q rows -> fp32
      for (int64_t r = 0; r < group; ++r) {
        float* dst = qbuf.data() + r * D;
        if (q_f32) {
          const float* src = q.data_ptr<float>() + t * q.stride(0) + (h0 + r) * q.stride(1);
          std::memcpy(dst, src, D * 4);
        } else {
          const uint16_t* src = reinterpret_cast<const uint16_t*>(q.data_ptr<at::BFloat16>()) + t * q.stride(0) +
                                (h0 + r) * q.stride(1);
          for (int64_t d = 0; d < D; ++d) dst[d] = bits_to_float(uint32_t(src[d]) << 16);
        }
      }
      for (int64_t r0 = 0; r0 < group; r0 += 4) {
        const int rows = int(std::min<int64_t>(4, group - r0));
        const float* qf[4];
        float* s[4];
        float* o[4];
        for (int r = 0; r < rows; ++r) {
          qf[r] = qbuf.data() + (r0 + r) * D;
          s[r] = sbuf.data() + (r0 + r) * Lp_max;
          o[r] = out_f32 ? out.data_ptr<float>() + (t * H + h0 + r0 + r) * D : obuf.data() + (r0 + r) * D;
        }
        attend_fn(isa, kv, rows)(a, qf, L, krows.data(), vrows.data(), s, o);
      }
      if (!out_f32) {
        uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()) + (t * H + h0) * D;
        for (int64_t i = 0; i < group * D; ++i) dst[i] = float_to_bf16(obuf[i]);
      }
    }
  });
  return out;
}

// kernels.write_kv on CPU: rows t of k, v [T, KVH, D] (fp32/bf16) into their cache slots
// slot_mapping[t] (negative: skipped) of k_cache, v_cache [num_blocks, block_size, KVH, D]; e4m3 caches
// get round_to_e4m3(x / scale) (kernels/fp8.py), fp32/bf16 caches the value in their dtype, as the reference.
void write_kv(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
              const at::Tensor& slot_mapping_in, double k_scale, double v_scale) {
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
              k_cache.size(2) == k.size(1) && k_cache.size(3) == k.size(2),
              "write_kv: k, v [T, KVH, D] and caches [num_blocks, block_size, KVH, D], got ", k.sizes(), " and ",
              k_cache.sizes());
  TORCH_CHECK(k.scalar_type() == v.scalar_type() && (k.scalar_type() == at::kFloat || k.scalar_type() == at::kBFloat16),
              "write_kv: k, v fp32 or bf16");
  TORCH_CHECK(k_cache.scalar_type() == v_cache.scalar_type() && k_cache.stride(3) == 1 && v_cache.stride(3) == 1,
              "write_kv: caches of one dtype, unit stride along D");
  const auto cdt = k_cache.scalar_type();
  TORCH_CHECK(cdt == at::kFloat || cdt == at::kBFloat16 || cdt == at::kFloat8_e4m3fn,
              "write_kv: cache dtype fp32, bf16 or float8_e4m3fn");
  const int64_t T = k.size(0), KVH = k.size(1), D = k.size(2);
  const int64_t slots = k_cache.size(0) * k_cache.size(1), block_size = k_cache.size(1);
  const at::Tensor slot_mapping = slot_mapping_in.to(at::kLong).contiguous();
  TORCH_CHECK(slot_mapping.numel() == T, "write_kv: slot_mapping ", slot_mapping.sizes(), " for ", T, " tokens");
  const int64_t* slot = slot_mapping.data_ptr<int64_t>();
  const bool src_f32 = k.scalar_type() == at::kFloat;
  for (int pass = 0; pass < 2; ++pass) {
    const at::Tensor& src_in = pass == 0 ? k : v;
    at::Tensor& cache = pass == 0 ? k_cache : v_cache;
    const at::Tensor src = src_in.stride(2) == 1 ? src_in : src_in.contiguous();
    const float scale = float(pass == 0 ? k_scale : v_scale);
    char* base = static_cast<char*>(cache.data_ptr());
    const int64_t elem = cache.element_size();
    const float* src_f = src_f32 ? src.data_ptr<float>() : nullptr;
    const uint16_t* src_b = src_f32 ? nullptr : reinterpret_cast<const uint16_t*>(src.data_ptr<at::BFloat16>());
    for (int64_t t = 0; t < T; ++t) {
      if (slot[t] < 0) continue;
      TORCH_CHECK(slot[t] < slots, "write_kv: slot ", slot[t], " of token ", t, " outside the cache's ", slots);
      const int64_t b = slot[t] / block_size, o = slot[t] % block_size;
      for (int64_t h = 0; h < KVH; ++h) {
        char* dst = base + (b * cache.stride(0) + o * cache.stride(1) + h * cache.stride(2)) * elem;
        const int64_t off = t * src.stride(0) + h * src.stride(1);
        for (int64_t d = 0; d < D; ++d) {
          const float x = src_f32 ? src_f[off + d] : bf16_to_float(src_b[off + d]);
          if (cdt == at::kFloat) reinterpret_cast<float*>(dst)[d] = x;
          else if (cdt == at::kBFloat16) reinterpret_cast<uint16_t*>(dst)[d] = float_to_bf16(x);
          else reinterpret_cast<uint8_t*>(dst)[d] = e4m3_byte(round_to_e4m3(x / scale));
        }
      }
    }
  }
}

}  // namespace fp8t

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fp8-turbo CPU paged attention (see kernels/cpu/attention.py)";
  m.def("attention", &fp8t::attention);
  m.def("write_kv", &fp8t::write_kv);
  m.def("best_isa", &fp8t::best_isa);
}
