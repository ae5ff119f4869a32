// The whole decoder step, compiled once per instruction set: step.cpp includes this file inside
// `namespace portable | avx2 | avx512` after vec8.h, vec8_math.h and the GEMM, attention and small-op
// kernel headers, whose functions it calls (all inlined into one ISA: no dispatch per op).
//
// One OpenMP parallel region per step. Between phases the threads meet at a barrier; every output
// element is computed by the same kernel function whichever thread runs it, so the logits are the
// module path's bit for bit (model.py with the GEMM / attention / small-op kernels), whatever the
// thread count. Phases of a layer (T tokens):
//   rows      norm (+ the residual add), activation quantization          -> a  (rows of T)
//   gemm      qkv                                                          -> qkv (columns of N)
//   attention per (sequence, KV head): rotary, KV write, attention         -> attn
//   rows+gemm o_proj; norm with the residual; gate_up; silu*up; down
// With few tokens (T <= kPrivateRows) each thread does the row phases for all rows into its own
// buffers (a copy of the residual stream too), which saves the barrier after each row phase: a
// layer is four barriers. With more tokens the rows are split between the threads.


// |x| max over x[0:n], NaN when any element is NaN (gemm_kernel.h amax_span's value).
FP8T_INLINE float amax_row(const float* x, int64_t n) {
  V8 m = V8::zero();
  bool nan = false;
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const V8 v = abs(V8::load(x + k));
    nan = nan || any_nan(v);
    m = max(m, v);
  }
  float r = reduce_max(m);
  for (; k < n; ++k) {
    const float v = std::fabs(x[k]);
    nan = nan || v != v;
    r = v > r ? v : r;
  }
  return nan ? NAN : r;
}

// q[0:n] = round_to_e4m3(x / scale) (gemm_kernel.h quantize_span's values), q[n:np] = 0.
FP8T_INLINE void quantize_row(const float* x, int64_t n, int64_t np, float scale, float* q) {
  const V8 s = V8::broadcast(scale);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) round_e4m3(div(V8::load(x + k), s)).store(q + k);
  for (; k < n; ++k) q[k] = round_to_e4m3(x[k] / scale);
  for (; k < np; ++k) q[k] = 0.0f;
}

// Rows [r0, r1) of src (fp32 [., lds]) -> the activation rows a [., Kp] of layer L and their scales
// `as` (per token [T] or per group [T, act_cols]); `tensor_scale` for A_TENSOR. gemm_kernel.h
// quantize_rows' values (scales rounded up to powers of two for MXFP8).
inline void prepare_rows(const StepLinear& L, const float* src, int64_t lds, int64_t r0, int64_t r1,
                         float tensor_scale, float* a, float* as) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* x = src + r * lds;
    float* q = a + r * L.Kp;
    switch (L.act) {
      case A_TOKEN: {
        float s = compute_scale(amax_row(x, L.K));
        if (L.act_pow2) s = pow2_scale(s);
        as[r] = s;
        quantize_row(x, L.K, L.Kp, s, q);
        break;
      }
      case A_TENSOR: quantize_row(x, L.K, L.Kp, tensor_scale, q); break;
      case A_GROUP: {
        for (int64_t gi = 0; gi < L.act_cols; ++gi) {
          const int64_t k0 = gi * L.act_group, len = std::min(L.act_group, L.K - k0);
          float s = compute_scale(amax_row(x + k0, len));
          if (L.act_pow2) s = pow2_scale(s);
          as[r * L.act_cols + gi] = s;
          quantize_row(x + k0, len, len, s, q + k0);
        }
        for (int64_t k = L.K; k < L.Kp; ++k) q[k] = 0.0f;
        break;
      }
      default:  // A_NONE: the fp32 row as it is
        std::memcpy(q, x, sizeof(float) * L.K);
        for (int64_t k = L.K; k < L.Kp; ++k) q[k] = 0.0f;
    }
  }
}

// out [M, ldo] columns of this thread's share of L's N rows = a @ W.T (gemm_kernel.h; gemm.cpp's
// split of N between threads).
inline void gemm_share(const StepLinear& L, const float* a, const float* as, const float* tensor_scale, int64_t M,
                       float* out, int64_t ldo, ThreadScratch& ts, int tid, int nt) {
  Gemm g;
  g.a = a, g.lda = L.Kp, g.M = M, g.N = L.N, g.K = L.K, g.Kp = L.Kp;
  g.w = L.w.data_ptr(), g.ldw = L.ldw, g.wtype = L.wtype, g.ws = L.ws;
  g.as.kind = L.act_kind;
  if (L.act_kind == S_TENSOR) g.as.p = tensor_scale;
  else if (L.act_kind != S_NONE) g.as.p = as, g.as.stride = L.act_cols, g.as.shift = L.act_shift;
  plan_scales(g);  // as linear() does: folded weight groups, or partial sums per k_step
  g.bias = L.bias_p, g.out_f32 = out, g.ldo = ldo;
  g.panel_rows = kPanelRows, g.panel_k = kPanelK;
  const bool panel = M > GEMV_MAX_M;
  const int64_t unit = panel ? kPanelRows : 16;
  const int64_t units = cdiv(L.N, unit), per = cdiv(units, nt), u0 = tid * per, u1 = std::min(units, u0 + per);
  if (u0 < u1) gemm_range(g, u0 * unit, std::min(L.N, u1 * unit), panel ? ts.panel : nullptr, panel ? ts.state : nullptr);
}

// The scale of an A_TENSOR layer: static, or from the amax over all T rows of src (split mode: each
// thread's rows, then the max of the parts after a barrier; the max is exact in any order).
inline float tensor_scale_of(const StepLinear& L, const float* src, int64_t lds, int64_t T, bool private_rows,
                             int64_t r0, int64_t r1, float* parts, int tid, int nt) {
  if (L.act != A_TENSOR) return 0.0f;
  if (L.has_static_scale) return L.static_scale;
  float m = 0.0f;
  bool nan = false;
  const int64_t a0 = private_rows ? 0 : r0, a1 = private_rows ? T : r1;
  for (int64_t r = a0; r < a1; ++r) {
    const float v = amax_row(src + r * lds, L.K);
    nan = nan || v != v;
    m = v > m ? v : m;
  }
  if (!private_rows) {
    parts[tid] = nan ? NAN : m;
#pragma omp barrier
    m = 0.0f, nan = false;
    for (int i = 0; i < nt; ++i) {
      nan = nan || parts[i] != parts[i];
      m = parts[i] > m ? parts[i] : m;
    }
  }
  const float s = compute_scale(nan ? NAN : m);
  return L.act_pow2 ? pow2_scale(s) : s;
}

template <int KV>
FP8T_INLINE void attend(const Attn& a, const float* const* qf, int rows, int64_t L, const void* const* krows,
                        const void* const* vrows, float* const* s, float* const* out) {
  switch (rows) {
    case 1: return attend_rows<1, KV>(a, qf, L, krows, vrows, s, out);
    case 2: return attend_rows<2, KV>(a, qf, L, krows, vrows, s, out);
    case 3: return attend_rows<3, KV>(a, qf, L, krows, vrows, s, out);
    default: return attend_rows<4, KV>(a, qf, L, krows, vrows, s, out);
  }
}

// x (fp32, D values) -> a KV-cache row: attention.cpp write_kv's values.
template <int KV>
FP8T_INLINE void store_kv(const float* x, int64_t D, float scale, void* dst) {
  for (int64_t d = 0; d < D; ++d) {
    if constexpr (KV == KV_F32) static_cast<float*>(dst)[d] = x[d];
    else if constexpr (KV == KV_BF16) static_cast<uint16_t*>(dst)[d] = float_to_bf16(x[d]);
    else static_cast<uint8_t*>(dst)[d] = e4m3_byte(round_to_e4m3(x[d] / scale));
  }
}

// Sequence b, KV head g of one layer: rotate the chunk's q rows (the heads of g) and k row, write k
// and v into the cache, then attend each chunk token over its causal keys (attention.cpp's order).
template <int KV>
void attention_task(const StepModel& m, const StepIn& in, int64_t layer, int64_t b, int64_t g, float* qkv,
                    float* out, ThreadScratch& ts) {
  const int64_t c0 = in.cu[b], n_new = in.cu[b + 1] - c0;
  if (n_new == 0) return;
  const int64_t D = m.head_dim, group = m.heads / m.kv_heads, ld = m.qkv_width, len = in.seq_lens[b];
  const int64_t q_off = g * group * D, k_off = (m.heads + g) * D, v_off = (m.heads + m.kv_heads + g) * D;
  char* k_base = static_cast<char*>(m.k_caches[layer].data_ptr()) + g * m.kv_head_stride;
  char* v_base = static_cast<char*>(m.v_caches[layer].data_ptr()) + g * m.kv_head_stride;
  const StepLayer& ly = m.layers[layer];
  for (int64_t i = 0; i < n_new; ++i) {
    const int64_t t = c0 + i;
    float* row = qkv + t * ld;
    Rotary rot;
    rot.cos = m.cos.data_ptr<float>() + in.positions[t] * D, rot.sin = m.sin.data_ptr<float>() + in.positions[t] * D;
    rot.ldc = D, rot.ldh = D, rot.ldt = 0, rot.D = D;
    rot.x = row + q_off, rot.heads = group;
    rotary_rows<float>(rot, 0, group);
    rot.x = row + k_off, rot.heads = 1;
    rotary_rows<float>(rot, 0, 1);
    const int64_t slot = in.slot_mapping[t];
    if (slot >= 0) {
      const int64_t off = (slot / m.block_size) * m.kv_block_stride + (slot % m.block_size) * m.kv_slot_stride;
      store_kv<KV>(row + k_off, D, ly.k_scale, k_base + off);
      store_kv<KV>(row + v_off, D, ly.v_scale, v_base + off);
    }
  }
  if (len == 0) {  // padding: nothing to attend to, zeros (attention.cpp's value)
    for (int64_t i = 0; i < n_new; ++i)
      std::memset(out + (c0 + i) * m.heads * D + q_off, 0, sizeof(float) * group * D);
    return;
  }
  const int32_t* table = in.block_tables + b * in.max_blocks;
  for (int64_t j = 0; j < len; ++j) {
    const int64_t off = int64_t(table[j / m.block_size]) * m.kv_block_stride + (j % m.block_size) * m.kv_slot_stride;
    ts.krows[j] = k_base + off, ts.vrows[j] = v_base + off;
  }
  Attn a;
  a.D = D, a.qk_scale = ly.qk_scale, a.v_scale = ly.attn_v_scale;
  for (int64_t i = 0; i < n_new; ++i) {
    const int64_t t = c0 + i, L = len - n_new + i + 1;
    for (int64_t r0 = 0; r0 < group; r0 += 4) {
      const int rows = int(std::min<int64_t>(4, group - r0));
      const float* qf[4];
      float* s[4];
      float* o[4];
      for (int r = 0; r < rows; ++r) {
        qf[r] = qkv + t * ld + q_off + (r0 + r) * D;
        s[r] = ts.scores + r * ts.scores_stride;
        o[r] = out + t * m.heads * D + q_off + (r0 + r) * D;
      }
      attend<KV>(a, qf, rows, L, ts.krows, ts.vrows, s, o);
    }
  }
}

// Embedding rows [r0, r1) into x (fp32 [., hidden]): parallel.py VocabParallelEmbedding's values.
inline void embed_rows(const StepModel& m, const StepIn& in, int64_t r0, int64_t r1, float* x) {
  const int64_t H = m.hidden;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t id = in.input_ids[r];
    float* dst = x + r * H;
    if (m.embed_type == W_F32) {
      std::memcpy(dst, m.embed.data_ptr<float>() + id * H, sizeof(float) * H);
    } else if (m.embed_type == W_BF16) {
      const uint16_t* src = reinterpret_cast<const uint16_t*>(m.embed.data_ptr()) + id * H;
      for (int64_t k = 0; k < H; ++k) dst[k] = bf16_to_float(src[k]);
    } else {
      const uint8_t* src = reinterpret_cast<const uint8_t*>(m.embed.data_ptr()) + id * H;
      const float s = m.embed_scale.data_ptr<float>()[id];
      for (int64_t k = 0; k < H; ++k) dst[k] = kE4m3.v[src[k]] * s;
    }
  }
}

inline void split_rows(int64_t n, int tid, int nt, int64_t& r0, int64_t& r1) {
  const int64_t per = cdiv(n, nt);
  r0 = std::min(n, tid * per), r1 = std::min(n, r0 + per);
}

// Thread 0's wall time per phase (StepModel::profiling): lap(p) adds the time since the last lap to p.
struct PhaseClock {
  double* acc = nullptr;  // [P_COUNT] seconds, or null (off)
  std::chrono::steady_clock::time_point t;
  explicit PhaseClock(double* a) : acc(a) {
    if (acc) t = std::chrono::steady_clock::now();
  }
  FP8T_INLINE void lap(int phase) {
    if (!acc) return;
    const auto now = std::chrono::steady_clock::now();
    acc[phase] += std::chrono::duration<double>(now - t).count();
    t = now;
  }
};

template <int KV>
void run_step_kv(const StepModel& m, const StepIn& in, Workspace& w, int nt) {
  const int64_t T = in.T, H = m.hidden, I = m.inter, N = in.N;
  const bool priv = T <= kPrivateRows;
#pragma omp parallel num_threads(nt)
  {
    const int tid = omp_get_thread_num(), nth = omp_get_num_threads();
    ThreadScratch& ts = w.threads[tid];
    RowBuffers& rb = priv ? ts.rows : w.rows;  // residual stream, norm output, activations, their scales
    PhaseClock clock(tid == 0 && m.profiling ? w.phase_seconds : nullptr);
    int64_t r0 = 0, r1 = T;
    if (!priv) split_rows(T, tid, nth, r0, r1);
    auto sync_rows = [&] {
      clock.lap(P_ROWS);
      if (!priv) {
#pragma omp barrier
      }
      clock.lap(P_WAIT);
    };
    auto sync = [&](int phase) {  // the end of a phase every thread takes part in
      clock.lap(phase);
#pragma omp barrier
      clock.lap(P_WAIT);
    };
    float tensor_scale = 0.0f;

    embed_rows(m, in, r0, r1, rb.x);
    for (int64_t l = 0; l < int64_t(m.layers.size()); ++l) {
      const StepLayer& ly = m.layers[l];
      Norm nrm;
      nrm.weight = ly.input_norm.data_ptr<float>(), nrm.N = H, nrm.eps = m.eps;
      nrm.out = rb.tmp, nrm.ldo = rb.ld_tmp;
      if (l == 0) {
        nrm.x = rb.x, nrm.ldx = H;
      } else {  // x = h + down (the previous block's output), then its norm
        nrm.x = w.down, nrm.ldx = H, nrm.residual = rb.h, nrm.ldr = H, nrm.h_out = rb.x, nrm.ldh = H;
      }
      rms_norm_rows<float>(nrm, r0, r1);
      tensor_scale = tensor_scale_of(ly.qkv, rb.tmp, rb.ld_tmp, T, priv, r0, r1, w.parts, tid, nth);
      prepare_rows(ly.qkv, rb.tmp, rb.ld_tmp, r0, r1, tensor_scale, rb.a, rb.as);
      sync_rows();
      gemm_share(ly.qkv, rb.a, rb.as, &tensor_scale, T, w.qkv, m.qkv_width, ts, tid, nth);
      sync(P_QKV);
#pragma omp for schedule(dynamic, 1) nowait
      for (int64_t task = 0; task < in.B * m.kv_heads; ++task)
        attention_task<KV>(m, in, l, task / m.kv_heads, task % m.kv_heads, w.qkv, w.attn, ts);
      sync(P_ATTENTION);
      tensor_scale = tensor_scale_of(ly.o, w.attn, m.q_size, T, priv, r0, r1, w.parts, tid, nth);
      prepare_rows(ly.o, w.attn, m.q_size, r0, r1, tensor_scale, rb.a, rb.as);
      sync_rows();
      gemm_share(ly.o, rb.a, rb.as, &tensor_scale, T, w.o, H, ts, tid, nth);
      sync(P_O);
      nrm = Norm();
      nrm.weight = ly.post_norm.data_ptr<float>(), nrm.N = H, nrm.eps = m.eps;
      nrm.x = w.o, nrm.ldx = H, nrm.residual = rb.x, nrm.ldr = H, nrm.h_out = rb.h, nrm.ldh = H;
      nrm.out = rb.tmp, nrm.ldo = rb.ld_tmp;
      rms_norm_rows<float>(nrm, r0, r1);
      tensor_scale = tensor_scale_of(ly.gate_up, rb.tmp, rb.ld_tmp, T, priv, r0, r1, w.parts, tid, nth);
      prepare_rows(ly.gate_up, rb.tmp, rb.ld_tmp, r0, r1, tensor_scale, rb.a, rb.as);
      sync_rows();
      gemm_share(ly.gate_up, rb.a, rb.as, &tensor_scale, T, w.gate_up, 2 * I, ts, tid, nth);
      sync(P_GATE_UP);
      SiluMul sm;
      sm.x = w.gate_up, sm.ldx = 2 * I, sm.out = rb.tmp, sm.ldo = rb.ld_tmp, sm.I = I;
      silu_mul_rows<float>(sm, r0, r1);
      tensor_scale = tensor_scale_of(ly.down, rb.tmp, rb.ld_tmp, T, priv, r0, r1, w.parts, tid, nth);
      prepare_rows(ly.down, rb.tmp, rb.ld_tmp, r0, r1, tensor_scale, rb.a, rb.as);
      sync_rows();
      gemm_share(ly.down, rb.a, rb.as, &tensor_scale, T, w.down, H, ts, tid, nth);
      sync(P_DOWN);
    }
    // The rows that want logits: x = h + down, the final norm, lm_head.
    if (N > 0) {
      int64_t i0 = 0, i1 = N;
      if (!priv) split_rows(N, tid, nth, i0, i1);
      for (int64_t i = i0; i < i1; ++i) {
        const int64_t r = in.logits_indices[i];
        Norm nrm;
        nrm.weight = m.final_norm.data_ptr<float>(), nrm.N = H, nrm.eps = m.eps;
        nrm.x = w.down + r * H, nrm.residual = rb.h + r * H, nrm.h_out = rb.x + i * H;  // rows < i are done
        nrm.out = rb.tmp + i * rb.ld_tmp;
        rms_norm_rows<float>(nrm, 0, 1);
      }
      tensor_scale = tensor_scale_of(m.lm_head, rb.tmp, rb.ld_tmp, N, priv, i0, i1, w.parts, tid, nth);
      prepare_rows(m.lm_head, rb.tmp, rb.ld_tmp, i0, i1, tensor_scale, rb.a, rb.as);
      sync_rows();
      gemm_share(m.lm_head, rb.a, rb.as, &tensor_scale, N, in.logits, m.lm_head.N, ts, tid, nth);
      clock.lap(P_HEAD);
    }
  }
}

inline void run_step(const StepModel& m, const StepIn& in, Workspace& w, int nt) {
  switch (m.kv_type) {
    case KV_E4M3: return run_step_kv<KV_E4M3>(m, in, w, nt);
    case KV_BF16: return run_step_kv<KV_BF16>(m, in, w, nt);
    default: return run_step_kv<KV_F32>(m, in, w, nt);
  }
}
