// The GEMM kernels, written once against V16 (vec16.h) and compiled once per instruction set:
// gemm.cpp includes this file inside `namespace portable | avx2 | avx512` under the matching
// `#pragma GCC target`. The types Gemm, Scale, Quant and the helpers of gemm.cpp's common part are
// visible here.
//
// Order of operations, identical for every M, tile shape, thread count and instruction set:
//   acc[16]   lane j sums a[k] * w[k] over k = j, j+16, j+32, ... in increasing k, one FMA each
//             (K zero-padded to a multiple of 16);
//   scales    constant along K: r = ((tree(acc) * 256) * a_scale[m]) * w_scale[n];
//             changing every 128 of K: per 128-block partial lanes p, tot = fma(p, s, tot) with
//             s = (a_scale[m, kb] * w_scale[n, kb]) * 256 (the 256 only for e4m3 weights), r = tree(tot);
//   bias      r = r + bias[n]; then the output dtype (bf16: round to nearest even).
// A row's result therefore does not depend on which other rows share the call.

// ---------------------------------------------------------------- weights: one 16-wide chunk

template <int WT>
FP8T_INLINE V16 load_w(const void* row, int64_t k) {
  if constexpr (WT == W_E4M3) return V16::load_e4m3(static_cast<const uint8_t*>(row) + k);
  else if constexpr (WT == W_BF16) return V16::load_bf16(static_cast<const uint16_t*>(row) + k);
  else return V16::load(static_cast<const float*>(row) + k);  // fp32 weights, or a decoded panel
}

// acc[m][n] += a[m][k0:k1] * w[n][k0:k1], 16 lanes at a time; rows of w end at k_full, after which
// `tail[n]` (the chunk at k_full, zero-padded) is read instead.
template <int MR, int NR, int WT>
FP8T_INLINE void dot_tile(const float* const (&a)[MR], const void* const (&w)[NR], const void* const (&tail)[NR],
                          int64_t k_full, int64_t k0, int64_t k1, V16 (&acc)[MR][NR]) {
  int64_t k = k0;
  const int64_t k_main = std::min(k1, k_full);
  for (; k < k_main; k += 16) {
    V16 av[MR];
    for (int m = 0; m < MR; ++m) av[m] = V16::load(a[m] + k);
    for (int n = 0; n < NR; ++n) {
      const V16 wv = load_w<WT>(w[n], k);
      for (int m = 0; m < MR; ++m) acc[m][n] = fma(av[m], wv, acc[m][n]);
    }
  }
  if (k < k1) {  // the last, partial chunk of K (k == k_full)
    for (int n = 0; n < NR; ++n) {
      const V16 wv = load_w<WT>(tail[n], 0);
      for (int m = 0; m < MR; ++m) acc[m][n] = fma(V16::load(a[m] + k), wv, acc[m][n]);
    }
  }
}

// Output element (m, n) from its reduced dot product (scales constant along K) or block sum.
FP8T_INLINE void store_out(const Gemm& g, int64_t m, int64_t n, float r) {
  if (g.bias) r = r + g.bias[n];
  if (g.out_f32) g.out_f32[m * g.ldo + n] = r;
  else g.out_bf16[m * g.ldo + n] = float_to_bf16(r);
}

// One MR x NR tile of the output. `w` are the NR weight rows (raw, or panel rows of fp32 decoded
// values when WT == W_F32 and the panel came from e4m3: then `e4m3` says to rescale by 256).
template <int MR, int NR, int WT>
void tile(const Gemm& g, int64_t m0, int64_t n0, const void* const (&w)[NR], bool e4m3) {
  const float* a[MR];
  for (int m = 0; m < MR; ++m) a[m] = g.a + (m0 + m) * g.lda;
  // the partial last chunk of each raw row, zero-padded (panels are padded already)
  const int64_t k_full = WT == W_F32 && g.panel ? g.Kp : (g.K & ~int64_t(15));
  alignas(64) unsigned char tail_buf[NR][64];
  const void* tail[NR];
  if (k_full < g.Kp) {
    const int es = WT == W_E4M3 ? 1 : WT == W_BF16 ? 2 : 4;
    for (int n = 0; n < NR; ++n) {
      std::memset(tail_buf[n], 0, sizeof tail_buf[n]);
      std::memcpy(tail_buf[n], static_cast<const unsigned char*>(w[n]) + k_full * es, (g.K - k_full) * es);
      tail[n] = tail_buf[n];
    }
  } else {
    for (int n = 0; n < NR; ++n) tail[n] = nullptr;
  }
  const float rescale = e4m3 ? 256.0f : 1.0f;
  if (!g.scales_along_k) {
    V16 acc[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int n = 0; n < NR; ++n) acc[m][n] = V16::zero();
    dot_tile<MR, NR, WT>(a, w, tail, k_full, 0, g.Kp, acc);
    for (int m = 0; m < MR; ++m)
      for (int n = 0; n < NR; ++n) {
        float r = acc[m][n].reduce() * rescale;
        if (g.as.kind != S_NONE) r = r * g.as.at(m0 + m, 0);
        if (g.ws.kind != S_NONE) r = r * g.ws.at(n0 + n, 0);
        store_out(g, m0 + m, n0 + n, r);
      }
    return;
  }
  V16 tot[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) tot[m][n] = V16::zero();
  for (int64_t kb = 0, k0 = 0; k0 < g.Kp; ++kb, k0 += SCALE_BLOCK) {
    V16 p[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int n = 0; n < NR; ++n) p[m][n] = V16::zero();
    dot_tile<MR, NR, WT>(a, w, tail, k_full, k0, std::min(k0 + SCALE_BLOCK, g.Kp), p);
    for (int m = 0; m < MR; ++m)
      for (int n = 0; n < NR; ++n) {
        const float s = (g.as.at(m0 + m, kb) * g.ws.at(n0 + n, kb)) * rescale;
        tot[m][n] = fma(p[m][n], V16::broadcast(s), tot[m][n]);
      }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) store_out(g, m0 + m, n0 + n, tot[m][n].reduce());
}

// ---------------------------------------------------------------- drivers

// Small M: each weight chunk is decoded in registers and used at once by all M rows (MR == M),
// NR rows of the weight at a time. Bandwidth-bound: the weight is read exactly once.
template <int MR, int NR, int WT>
void gemv_rows(const Gemm& g, int64_t n_begin, int64_t n_end) {
  const char* wb = static_cast<const char*>(g.w);
  const int64_t es = WT == W_E4M3 ? 1 : WT == W_BF16 ? 2 : 4;
  int64_t n = n_begin;
  for (; n + NR <= n_end; n += NR) {
    const void* w[NR];
    for (int r = 0; r < NR; ++r) w[r] = wb + (n + r) * g.ldw * es;
    tile<MR, NR, WT>(g, 0, n, w, WT == W_E4M3);
  }
  for (; n < n_end; ++n) {
    const void* w[1] = {wb + n * g.ldw * es};
    tile<MR, 1, WT>(g, 0, n, w, WT == W_E4M3);
  }
}

template <int WT>
void gemv(const Gemm& g, int64_t n_begin, int64_t n_end) {
  switch (g.M) {
    case 1: return gemv_rows<1, 4, WT>(g, n_begin, n_end);
    case 2: return gemv_rows<2, 2, WT>(g, n_begin, n_end);
    case 3: return gemv_rows<3, 2, WT>(g, n_begin, n_end);
    case 4: return gemv_rows<4, 1, WT>(g, n_begin, n_end);
    default: std::abort();  // the caller takes the panel path for M > 4
  }
}

// Larger M: the thread's weight rows are decoded PANEL_ROWS at a time into an fp32 panel (the same
// decoded values as in registers), then kTileM x kTileN register tiles sweep all M rows over it.
template <int WT>
void gemm_panel(const Gemm& g, int64_t n_begin, int64_t n_end, float* panel) {
  constexpr int TM = V16::kTileM, TN = V16::kTileN;
  const char* wb = static_cast<const char*>(g.w);
  const int64_t es = WT == W_E4M3 ? 1 : WT == W_BF16 ? 2 : 4;
  Gemm gp = g;
  gp.panel = true;
  for (int64_t nb = n_begin; nb < n_end; nb += g.panel_rows) {
    const int64_t rows = std::min<int64_t>(g.panel_rows, n_end - nb);
    for (int64_t r = 0; r < rows; ++r) {  // decode rows nb .. nb+rows into the panel, zero-padded to Kp
      const char* src = wb + (nb + r) * g.ldw * es;
      float* dst = panel + r * g.Kp;
      const int64_t k_full = g.K & ~int64_t(15);
      for (int64_t k = 0; k < k_full; k += 16) load_w<WT>(src, k).store(dst + k);
      if (k_full < g.Kp) {
        alignas(64) unsigned char buf[64] = {};
        std::memcpy(buf, src + k_full * es, (g.K - k_full) * es);
        load_w<WT>(buf, 0).store(dst + k_full);
      }
    }
    int64_t m = 0;
    for (; m + TM <= g.M; m += TM) {
      int64_t n = 0;
      for (; n + TN <= rows; n += TN) {
        const void* w[TN];
        for (int r = 0; r < TN; ++r) w[r] = panel + (n + r) * g.Kp;
        tile<TM, TN, W_F32>(gp, m, nb + n, w, WT == W_E4M3);
      }
      for (; n < rows; ++n) {
        const void* w[1] = {panel + n * g.Kp};
        tile<TM, 1, W_F32>(gp, m, nb + n, w, WT == W_E4M3);
      }
    }
    for (; m < g.M; ++m) {
      int64_t n = 0;
      for (; n + TN <= rows; n += TN) {
        const void* w[TN];
        for (int r = 0; r < TN; ++r) w[r] = panel + (n + r) * g.Kp;
        tile<1, TN, W_F32>(gp, m, nb + n, w, WT == W_E4M3);
      }
      for (; n < rows; ++n) {
        const void* w[1] = {panel + n * g.Kp};
        tile<1, 1, W_F32>(gp, m, nb + n, w, WT == W_E4M3);
      }
    }
  }
}

// The whole GEMM on rows [n_begin, n_end) of the weight (one thread's share).
inline void gemm_range(const Gemm& g, int64_t n_begin, int64_t n_end, float* panel) {
  if (panel) {
    switch (g.wtype) {
      case W_E4M3: return gemm_panel<W_E4M3>(g, n_begin, n_end, panel);
      case W_BF16: return gemm_panel<W_BF16>(g, n_begin, n_end, panel);
      default: return gemm_panel<W_F32>(g, n_begin, n_end, panel);
    }
  }
  switch (g.wtype) {
    case W_E4M3: return gemv<W_E4M3>(g, n_begin, n_end);
    case W_BF16: return gemv<W_BF16>(g, n_begin, n_end);
    default: return gemv<W_F32>(g, n_begin, n_end);
  }
}

// ---------------------------------------------------------------- activations

// x[0:K] (fp32 or bf16) -> q[0:Kp] fp32 on the e4m3 grid (x / scale rounded; zero-padded), and the
// e4m3 bytes when `bytes` is given. Exactly kernels/fp8.py's round_to_e4m3(x / scale).
template <typename T>
void quantize_span(const T* x, int64_t n, float scale, float* q, uint8_t* bytes) {
  for (int64_t k = 0; k < n; ++k) q[k] = round_to_e4m3(to_float(x[k]) / scale);
  if (bytes)
    for (int64_t k = 0; k < n; ++k) bytes[k] = e4m3_byte(q[k]);
}

template <typename T>
float amax_span(const T* x, int64_t n) {
  float m = 0.0f;
  for (int64_t k = 0; k < n; ++k) {
    const float v = std::fabs(to_float(x[k]));
    m = (v > m || v != v) && m == m ? v : m;  // NaN propagates, as in torch's amax
  }
  return m;
}

// Quantize rows [r0, r1) of q.x per q.granularity (the scale of "tensor" is already in q.scale).
template <typename T>
void quantize_rows(const Quant& q, int64_t r0, int64_t r1) {
  const T* x = static_cast<const T*>(q.x);
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * q.ldx;
    float* qr = q.q + r * q.ldq;
    uint8_t* br = q.bytes ? q.bytes + r * q.ldb : nullptr;
    if (q.granularity == Q_TENSOR) {
      quantize_span(xr, q.K, q.scale[0], qr, br);
    } else if (q.granularity == Q_TOKEN) {
      const float s = compute_scale(amax_span(xr, q.K));
      q.scale[r] = s;
      quantize_span(xr, q.K, s, qr, br);
    } else {
      const int64_t groups = (q.K + q.group_size - 1) / q.group_size;
      for (int64_t gi = 0; gi < groups; ++gi) {
        const int64_t k0 = gi * q.group_size, len = std::min(q.group_size, q.K - k0);
        const float s = compute_scale(amax_span(xr + k0, len));
        q.scale[r * groups + gi] = s;
        quantize_span(xr + k0, len, s, qr + k0, br ? br + k0 : nullptr);
      }
    }
    for (int64_t k = q.K; k < q.Kp; ++k) qr[k] = 0.0f;
  }
}
