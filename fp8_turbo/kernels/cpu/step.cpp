// The native CPU decoder step: the whole forward of one packed step (every layer, the final norm and
// the lm_head) in one call, over preallocated buffers, on one OpenMP team that meets at barriers
// between phases (step_kernel.h). It computes what fp8_turbo/engine/model/model.py computes with the
// GEMM, attention and small-op kernels, bit for bit: the same kernel functions (gemm_kernel.h,
// attention_kernel.h, ops_kernel.h) on the same values, so every row stays batch-, chunk-, thread-
// and ISA-invariant. The Python side is kernels/cpu/step.py.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

// The GEMM kernels, their types and scale layouts come from gemm.cpp itself, compiled into this
// translation unit (without its Python module): its fp8t::{portable, avx2, avx512} namespaces already
// hold V8, its math and the GEMM kernels; the namespaces are reopened below for the other kernels and
// the step.
#define FP8T_GEMM_NO_MODULE
#include "gemm.cpp"

#include "attention_types.h"
#include "ops_types.h"

namespace fp8t {

constexpr int64_t kPanelRows = 24, kPanelK = 768;  // gemm.cpp's blocking of the larger-M GEMM path
constexpr int64_t kPrivateRows = 4;  // up to this many rows, each thread does the row phases itself (step_kernel.h)

// Phases of the step's optional clock (StepModel::profiling; names: kernels/cpu/step.py PHASES).
enum Phase { P_ROWS = 0, P_QKV, P_ATTENTION, P_O, P_GATE_UP, P_DOWN, P_HEAD, P_WAIT, P_COUNT };

// One linear layer as the step runs it (kernels/cpu/step.py builds it from a model's Linear), with
// gemm.cpp linear()'s reading of its scales.
struct StepLinear {
  at::Tensor w, w_scale, bias, input_scale;  // kept alive while the step holds the pointers
  int wtype = W_F32;
  int act = A_NONE;  // A_NONE (the fp32 input as it is), A_TOKEN, A_TENSOR, A_GROUP
  int64_t act_group = SCALE_BLOCK;  // A_GROUP: K extent of one activation scale
  bool act_pow2 = false;            // activation scales rounded up to powers of two (MXFP8)
  int act_kind = S_NONE;            // how gemm.cpp's scale_of reads the activation scales (see below)
  int act_shift = 7;
  int64_t act_cols = 1;             // activation scales per row
  Scale ws;
  const float* bias_p = nullptr;
  bool has_static_scale = false;  // A_TENSOR with a given input scale
  float static_scale = 0.0f;
  int64_t N = 0, K = 0, Kp = 0, ldw = 0;

  StepLinear(at::Tensor w_in, c10::optional<at::Tensor> w_scale_in, int64_t act_in,
             c10::optional<at::Tensor> input_scale_in, c10::optional<at::Tensor> bias_in, int64_t act_group_in,
             bool act_pow2_in) {
    TORCH_CHECK(w_in.dim() == 2 && w_in.stride(1) == 1 && w_in.device().is_cpu(), "step linear: weight [N, K] on CPU");
    w = w_in, N = w.size(0), K = w.size(1), Kp = cdiv(K, 16) * 16, ldw = w.stride(0);
    TORCH_CHECK(act_in == A_NONE || act_in == A_TOKEN || act_in == A_TENSOR || act_in == A_GROUP,
                "step linear: act ", act_in);
    act = int(act_in), act_group = act_group_in, act_pow2 = act_pow2_in;
    TORCH_CHECK(act != A_GROUP || (act_group >= MIN_GROUP && act_group <= MAX_GROUP && (act_group & (act_group - 1)) == 0),
                "step linear: act_group ", act_group);
    if (w.scalar_type() == at::kFloat8_e4m3fn) {
      TORCH_CHECK(w_scale_in.has_value(), "step linear: e4m3 weights need a scale");
      wtype = W_E4M3;
      w_scale = w_scale_in->scalar_type() == at::kFloat8_e8m0fnu ? w_scale_in->contiguous()
                                                                   : w_scale_in->to(at::kFloat).contiguous();
      ws = scale_of(w_scale, N, K, "w_scale");
    } else {
      TORCH_CHECK(w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kFloat, "step linear: weight dtype ",
                  w.scalar_type());
      TORCH_CHECK(!w_scale_in.has_value() && act == A_NONE, "step linear: bf16/fp32 weights take fp32 activations");
      wtype = w.scalar_type() == at::kBFloat16 ? W_BF16 : W_F32;
    }
    // linear() hands scale_of the activation scales [M, 1] (token), [1] (tensor) or [M, cdiv(K, g)]
    // (group): one scale per row is read as per-row (constant along K), several as 1 x group_of(...).
    if (act == A_TOKEN) act_kind = S_ROW;
    if (act == A_TENSOR) act_kind = S_TENSOR;
    if (act == A_GROUP) {
      act_cols = cdiv(K, act_group);
      act_kind = act_cols == 1 ? S_ROW : S_GROUP;
      if (act_cols > 1) act_shift = log2_of(group_of(K, act_cols));
    }
    if (input_scale_in.has_value()) {
      TORCH_CHECK(act == A_TENSOR && input_scale_in->numel() == 1, "step linear: a static input scale is per-tensor");
      input_scale = input_scale_in->to(at::kFloat).reshape({1}).contiguous();
      has_static_scale = true, static_scale = input_scale.data_ptr<float>()[0];
    }
    if (bias_in.has_value()) {
      TORCH_CHECK(bias_in->numel() == N, "step linear: bias of ", bias_in->numel(), " for ", N, " rows");
      bias = bias_in->to(at::kFloat).contiguous();
      bias_p = bias.data_ptr<float>();
    }
  }
};

struct StepLayer {
  StepLinear qkv, o, gate_up, down;
  at::Tensor input_norm, post_norm;  // fp32 [hidden]
  float k_scale = 1.0f, v_scale = 1.0f;  // cache write scales (e4m3 caches)
  float qk_scale = 1.0f, attn_v_scale = 1.0f;  // attention.cpp's Attn scales
  StepLayer(StepLinear qkv_, StepLinear o_, StepLinear gu_, StepLinear down_, at::Tensor in_norm, at::Tensor post)
      : qkv(std::move(qkv_)), o(std::move(o_)), gate_up(std::move(gu_)), down(std::move(down_)),
        input_norm(in_norm.contiguous()), post_norm(post.contiguous()) {}
};

// Rows of the residual stream and the activations (shared, or one copy per thread for few rows).
struct RowBuffers {
  float *x = nullptr, *h = nullptr, *tmp = nullptr, *a = nullptr, *as = nullptr;
  int64_t ld_tmp = 0;
};

struct ThreadScratch {
  RowBuffers rows;
  float* panel = nullptr;  // [kPanelRows, kPanelK]
  float* state = nullptr;  // V8 [M, kPanelRows]
  float* scores = nullptr;  // [4, scores_stride]
  int64_t scores_stride = 0;
  const void** krows = nullptr;
  const void** vrows = nullptr;
};

// What one step reads, as raw pointers (validated by StepModel::step before the parallel region).
struct StepIn {
  int64_t T = 0, B = 0, N = 0, max_blocks = 0;
  const int64_t *input_ids = nullptr, *positions = nullptr, *slot_mapping = nullptr, *logits_indices = nullptr;
  const int32_t *block_tables = nullptr, *seq_lens = nullptr, *cu = nullptr;
  float* logits = nullptr;
};

// Grow-only float arena with per-thread parts.
struct Workspace {
  RowBuffers rows;
  float *qkv = nullptr, *attn = nullptr, *o = nullptr, *gate_up = nullptr, *down = nullptr, *parts = nullptr;
  double phase_seconds[P_COUNT] = {};  // thread 0's wall time per phase while profiling
  std::vector<ThreadScratch> threads;
  int64_t cap_rows = -1, cap_len = -1;
  int cap_threads = -1;
  std::vector<std::unique_ptr<float, decltype(&std::free)>> blocks;
  std::vector<int64_t> block_bytes;

  float* take(int64_t n) {
    const int64_t bytes = std::max<int64_t>(64, cdiv(n * 4, 64) * 64);
    float* p = static_cast<float*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(p, "native step: out of memory for its buffers");
    blocks.emplace_back(p, &std::free);
    block_bytes.push_back(bytes);
    return p;
  }
  int64_t nbytes() const {
    int64_t n = 0;
    for (int64_t b : block_bytes) n += b;
    return n;
  }
};

// ------------------------------------------------------------------- the model the step runs

struct StepModel {
  int64_t hidden = 0, heads = 0, kv_heads = 0, head_dim = 0, inter = 0, vocab = 0;
  int64_t q_size = 0, qkv_width = 0;
  float eps = 0.0f;
  double sm_scale = 0.0;
  at::Tensor embed, embed_scale, final_norm, cos, sin;
  int embed_type = W_F32;
  StepLinear lm_head;
  std::vector<StepLayer> layers;
  std::vector<at::Tensor> k_caches, v_caches;
  int kv_type = KV_F32;
  int64_t num_blocks = 0, block_size = 0, kv_block_stride = 0, kv_slot_stride = 0, kv_head_stride = 0;  // bytes
  bool profiling = false;
  Workspace ws;

  StepModel(int64_t hidden_, int64_t heads_, int64_t kv_heads_, int64_t head_dim_, int64_t inter_, double eps_,
            double sm_scale_, at::Tensor embed_, c10::optional<at::Tensor> embed_scale_, at::Tensor final_norm_,
            StepLinear lm_head_, std::vector<StepLayer> layers_);
  void set_rotary(at::Tensor cos_, at::Tensor sin_);
  void set_kv(std::vector<at::Tensor> k, std::vector<at::Tensor> v, std::vector<double> k_scales,
              std::vector<double> v_scales);
  at::Tensor step(const at::Tensor& input_ids, const at::Tensor& positions, const at::Tensor& slot_mapping,
                  const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& cu_seqlens_q,
                  const at::Tensor& logits_indices, int64_t num_threads, int64_t isa);
  void reserve(int64_t rows, int64_t max_len, int threads);
};

}  // namespace fp8t

// ------------------------------------------------------------------- the step, per ISA

namespace fp8t::portable {
#define FP8T_ISA 0
#include "attention_kernel.h"
#include "ops_kernel.h"
#include "step_kernel.h"
#undef FP8T_ISA
}  // namespace fp8t::portable

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace fp8t::avx2 {
#define FP8T_ISA 1
#include "attention_kernel.h"
#include "ops_kernel.h"
#include "step_kernel.h"
#undef FP8T_ISA
}  // namespace fp8t::avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
namespace fp8t::avx512 {
#define FP8T_ISA 2
#include "attention_kernel.h"
#include "ops_kernel.h"
#include "step_kernel.h"
#undef FP8T_ISA
}  // namespace fp8t::avx512
#pragma GCC pop_options

namespace fp8t {

StepModel::StepModel(int64_t hidden_, int64_t heads_, int64_t kv_heads_, int64_t head_dim_, int64_t inter_, double eps_,
                     double sm_scale_, at::Tensor embed_, c10::optional<at::Tensor> embed_scale_,
                     at::Tensor final_norm_, StepLinear lm_head_, std::vector<StepLayer> layers_)
    : hidden(hidden_), heads(heads_), kv_heads(kv_heads_), head_dim(head_dim_), inter(inter_), eps(float(eps_)),
      sm_scale(sm_scale_), final_norm(final_norm_.contiguous()), lm_head(std::move(lm_head_)), layers(std::move(layers_)) {
  TORCH_CHECK(heads > 0 && kv_heads > 0 && heads % kv_heads == 0 && head_dim % 8 == 0 && head_dim % 2 == 0,
              "native step: ", heads, " heads, ", kv_heads, " KV heads, head dim ", head_dim);
  q_size = heads * head_dim, qkv_width = (heads + 2 * kv_heads) * head_dim;
  vocab = lm_head.N;
  TORCH_CHECK(lm_head.K == hidden && final_norm.numel() == hidden && final_norm.scalar_type() == at::kFloat,
              "native step: lm_head / final norm shapes");
  for (const StepLayer& l : layers) {
    TORCH_CHECK(l.qkv.K == hidden && l.qkv.N == qkv_width && l.o.K == q_size && l.o.N == hidden &&
                    l.gate_up.K == hidden && l.gate_up.N == 2 * inter && l.down.K == inter && l.down.N == hidden,
                "native step: layer shapes");
    TORCH_CHECK(l.input_norm.numel() == hidden && l.post_norm.numel() == hidden &&
                    l.input_norm.scalar_type() == at::kFloat && l.post_norm.scalar_type() == at::kFloat,
                "native step: norm weights must be fp32 [hidden]");
  }
  TORCH_CHECK(embed_.dim() == 2 && embed_.size(1) == hidden && embed_.is_contiguous(), "native step: embedding [V, hidden]");
  embed = embed_;
  if (embed.scalar_type() == at::kFloat8_e4m3fn) {
    TORCH_CHECK(embed_scale_.has_value() && embed_scale_->numel() == embed.size(0), "native step: e4m3 embedding scale");
    embed_type = W_E4M3, embed_scale = embed_scale_->to(at::kFloat).contiguous();
  } else {
    TORCH_CHECK(embed.scalar_type() == at::kBFloat16 || embed.scalar_type() == at::kFloat, "native step: embedding dtype");
    embed_type = embed.scalar_type() == at::kBFloat16 ? W_BF16 : W_F32;
  }
}

void StepModel::set_rotary(at::Tensor cos_, at::Tensor sin_) {
  TORCH_CHECK(cos_.dim() == 2 && cos_.size(1) == head_dim && cos_.sizes() == sin_.sizes() &&
                  cos_.scalar_type() == at::kFloat && sin_.scalar_type() == at::kFloat,
              "native step: cos/sin tables [positions, head_dim] fp32");
  cos = cos_.contiguous(), sin = sin_.contiguous();
}

void StepModel::set_kv(std::vector<at::Tensor> k, std::vector<at::Tensor> v, std::vector<double> k_scales,
                       std::vector<double> v_scales) {
  const size_t L = layers.size();
  TORCH_CHECK(k.size() == L && v.size() == L && k_scales.size() == L && v_scales.size() == L,
              "native step: one KV cache pair and scale pair per layer");
  const at::Tensor& k0 = k[0];
  TORCH_CHECK(k0.dim() == 4 && k0.size(2) == kv_heads && k0.size(3) == head_dim && k0.stride(3) == 1,
              "native step: caches [num_blocks, block_size, ", kv_heads, ", ", head_dim, "]");
  switch (k0.scalar_type()) {
    case at::kFloat8_e4m3fn: kv_type = KV_E4M3; break;
    case at::kBFloat16: kv_type = KV_BF16; break;
    case at::kFloat: kv_type = KV_F32; break;
    default: TORCH_CHECK(false, "native step: cache dtype ", k0.scalar_type());
  }
  for (size_t i = 0; i < L; ++i)
    TORCH_CHECK(k[i].sizes() == k0.sizes() && v[i].sizes() == k0.sizes() && k[i].strides() == k0.strides() &&
                    v[i].strides() == k0.strides() && k[i].scalar_type() == k0.scalar_type() &&
                    v[i].scalar_type() == k0.scalar_type(),
                "native step: every layer's caches alike");
  const int64_t elem = k0.element_size();
  num_blocks = k0.size(0), block_size = k0.size(1);
  kv_block_stride = k0.stride(0) * elem, kv_slot_stride = k0.stride(1) * elem, kv_head_stride = k0.stride(2) * elem;
  k_caches = std::move(k), v_caches = std::move(v);
  const bool fp8 = kv_type == KV_E4M3;
  for (size_t i = 0; i < L; ++i) {  // attention.cpp / write_kv's scale arithmetic
    layers[i].k_scale = float(k_scales[i]), layers[i].v_scale = float(v_scales[i]);
    layers[i].qk_scale = float(sm_scale * 1.4426950408889634 * (fp8 ? k_scales[i] * 256.0 : 1.0));
    layers[i].attn_v_scale = float(fp8 ? v_scales[i] * 256.0 : 1.0);
  }
}

void StepModel::reserve(int64_t rows, int64_t max_len, int nt) {
  Workspace& w = ws;
  if (rows <= w.cap_rows && max_len <= w.cap_len && nt <= w.cap_threads) return;
  rows = std::max(rows, w.cap_rows), max_len = std::max(max_len, w.cap_len), nt = std::max(nt, w.cap_threads);
  w.blocks.clear(), w.block_bytes.clear();
  int64_t kp_max = cdiv(std::max({hidden, q_size, inter}), 16) * 16;
  const int64_t ld_tmp = std::max({hidden, q_size, inter});
  const int64_t scale_cols = cdiv(std::max({hidden, q_size, inter}), MIN_GROUP);
  auto row_buffers = [&](RowBuffers& rb, int64_t n) {
    rb.x = w.take(n * hidden), rb.h = w.take(n * hidden), rb.tmp = w.take(n * ld_tmp), rb.ld_tmp = ld_tmp;
    rb.a = w.take(n * kp_max), rb.as = w.take(n * scale_cols);
  };
  row_buffers(w.rows, rows);
  w.qkv = w.take(rows * qkv_width), w.attn = w.take(rows * q_size), w.o = w.take(rows * hidden);
  w.gate_up = w.take(rows * 2 * inter), w.down = w.take(rows * hidden), w.parts = w.take(nt);
  w.threads.assign(nt, ThreadScratch());
  const int64_t lp = cdiv(std::max<int64_t>(max_len, 8), 8) * 8;
  for (ThreadScratch& ts : w.threads) {
    row_buffers(ts.rows, std::min<int64_t>(rows, kPrivateRows));
    ts.panel = w.take(kPanelRows * kPanelK);
    ts.state = w.take(8 * rows * kPanelRows);
    ts.scores_stride = lp, ts.scores = w.take(4 * lp);
    float* ptrs = w.take(2 * lp * int64_t(sizeof(void*) / sizeof(float)));
    ts.krows = reinterpret_cast<const void**>(ptrs), ts.vrows = ts.krows + lp;
  }
  w.cap_rows = rows, w.cap_len = max_len, w.cap_threads = nt;
}

static const int64_t* i64(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.is_contiguous() && t.numel() == n && t.device().is_cpu(), "native step: ",
              name, " must be a contiguous int64 CPU tensor of ", n, " elements, got ", t.sizes(), " ", t.scalar_type());
  return t.data_ptr<int64_t>();
}

static const int32_t* i32(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kInt && t.is_contiguous() && t.numel() == n && t.device().is_cpu(), "native step: ",
              name, " must be a contiguous int32 CPU tensor of ", n, " elements, got ", t.sizes(), " ", t.scalar_type());
  return t.data_ptr<int32_t>();
}

at::Tensor StepModel::step(const at::Tensor& input_ids, const at::Tensor& positions, const at::Tensor& slot_mapping,
                           const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& cu_seqlens_q,
                           const at::Tensor& logits_indices, int64_t num_threads, int64_t isa) {
  TORCH_CHECK(isa >= ISA_PORTABLE && isa <= best_isa(), "native step: ISA ", isa, " not supported by this CPU");
  TORCH_CHECK(!k_caches.empty() && cos.defined(), "native step: set_kv and set_rotary first");
  StepIn in;
  in.T = input_ids.numel(), in.B = seq_lens.numel(), in.N = logits_indices.numel();
  TORCH_CHECK(in.T > 0 && block_tables.dim() == 2 && block_tables.size(0) == in.B, "native step: block_tables ",
              block_tables.sizes(), " for ", in.B, " sequences");
  in.max_blocks = block_tables.size(1);
  in.input_ids = i64(input_ids, in.T, "input_ids"), in.positions = i64(positions, in.T, "positions");
  in.slot_mapping = i64(slot_mapping, in.T, "slot_mapping"), in.logits_indices = i64(logits_indices, in.N, "logits_indices");
  in.block_tables = i32(block_tables, in.B * in.max_blocks, "block_tables"), in.seq_lens = i32(seq_lens, in.B, "seq_lens");
  in.cu = i32(cu_seqlens_q, in.B + 1, "cu_seqlens_q");
  // Everything the parallel region indexes is checked here (an exception cannot leave it).
  const int64_t vocab_rows = embed.size(0), positions_max = cos.size(0), slots = num_blocks * block_size;
  for (int64_t t = 0; t < in.T; ++t) {
    TORCH_CHECK(in.input_ids[t] >= 0 && in.input_ids[t] < vocab_rows, "native step: token id ", in.input_ids[t],
                " outside the embedding's ", vocab_rows, " rows");
    TORCH_CHECK(in.positions[t] >= 0 && in.positions[t] < positions_max, "native step: position ", in.positions[t],
                " outside the rotary table's ", positions_max);
    TORCH_CHECK(in.slot_mapping[t] < slots, "native step: slot ", in.slot_mapping[t], " outside the cache's ", slots);
  }
  TORCH_CHECK(in.cu[0] == 0 && in.cu[in.B] == in.T, "native step: cu_seqlens_q must run from 0 to ", in.T);
  int64_t max_len = 0;
  for (int64_t b = 0; b < in.B; ++b) {
    const int64_t n_new = in.cu[b + 1] - in.cu[b], len = in.seq_lens[b];
    // A sequence of length 0 is padding (CUDA-graph buckets): its tokens attend to nothing (zeros).
    TORCH_CHECK(n_new >= 0 && (n_new <= len || len == 0), "native step: sequence ", b, " has ", n_new,
                " new tokens but length ", len);
    TORCH_CHECK(n_new == 0 || len <= in.max_blocks * block_size, "native step: sequence ", b, " of length ", len,
                " exceeds its block table's ", in.max_blocks * block_size, " slots");
    if (n_new == 0) continue;
    const int32_t* table = in.block_tables + b * in.max_blocks;
    for (int64_t j = 0; j < len; j += block_size)
      TORCH_CHECK(table[j / block_size] >= 0 && table[j / block_size] < num_blocks, "native step: block id ",
                  table[j / block_size], " of sequence ", b, " outside [0, ", num_blocks, ")");
    max_len = std::max(max_len, len);
  }
  for (int64_t i = 0; i < in.N; ++i)
    TORCH_CHECK(in.logits_indices[i] >= 0 && in.logits_indices[i] < in.T, "native step: logits index ",
                in.logits_indices[i], " outside the step's ", in.T, " tokens");

  const int nt = int(std::max<int64_t>(1, num_threads));
  reserve(std::max(in.T, in.N), max_len, nt);
  at::Tensor logits = at::empty({in.N, vocab}, at::TensorOptions().dtype(at::kFloat));
  in.logits = logits.data_ptr<float>();
  {
    pybind11::gil_scoped_release no_gil;
    switch (isa) {
      case ISA_AVX512: avx512::run_step(*this, in, ws, nt); break;
      case ISA_AVX2: avx2::run_step(*this, in, ws, nt); break;
      default: portable::run_step(*this, in, ws, nt);
    }
  }
  return logits;
}

}  // namespace fp8t

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "fp8-turbo native CPU decoder step (see kernels/cpu/step.py)";
  py::class_<fp8t::StepLinear>(m, "Linear")
      .def(py::init<at::Tensor, c10::optional<at::Tensor>, int64_t, c10::optional<at::Tensor>, c10::optional<at::Tensor>,
                    int64_t, bool>());
  py::class_<fp8t::StepLayer>(m, "Layer")
      .def(py::init<fp8t::StepLinear, fp8t::StepLinear, fp8t::StepLinear, fp8t::StepLinear, at::Tensor, at::Tensor>());
  py::class_<fp8t::StepModel>(m, "Model")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, double, at::Tensor, c10::optional<at::Tensor>,
                    at::Tensor, fp8t::StepLinear, std::vector<fp8t::StepLayer>>())
      .def("set_rotary", &fp8t::StepModel::set_rotary)
      .def("set_kv", &fp8t::StepModel::set_kv)
      .def("step", &fp8t::StepModel::step)
      // Buffers for steps of up to `rows` tokens over up to `max_len` keys on `threads` threads, written
      // once so their pages are the process's from now on (a server's memory is then known at start).
      .def("reserve", [](fp8t::StepModel& m, int64_t rows, int64_t max_len, int64_t threads) {
        m.reserve(rows, max_len, int(std::max<int64_t>(1, threads)));
        for (size_t i = 0; i < m.ws.blocks.size(); ++i) std::memset(m.ws.blocks[i].get(), 0, m.ws.block_bytes[i]);
      })
      .def("workspace", [](const fp8t::StepModel& m) {  // (rows, keys, threads, bytes) it holds buffers for
        return std::make_tuple(m.ws.cap_rows, m.ws.cap_len, m.ws.cap_threads, m.ws.nbytes());
      })
      .def_readwrite("profiling", &fp8t::StepModel::profiling)
      .def("phase_seconds", [](fp8t::StepModel& m, bool reset) {  // thread 0's seconds per phase, summed
        std::vector<double> out(m.ws.phase_seconds, m.ws.phase_seconds + fp8t::P_COUNT);
        if (reset) std::fill(m.ws.phase_seconds, m.ws.phase_seconds + fp8t::P_COUNT, 0.0);
        return out;
      }, pybind11::arg("reset") = true);
  m.def("best_isa", &fp8t::best_isa);
}
