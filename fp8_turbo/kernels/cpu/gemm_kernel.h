// The GEMM kernels, written once against V8 (vec8.h) and compiled once per instruction set:
// gemm.cpp includes this file inside `namespace portable | avx2 | avx512` under the matching
// `#pragma GCC target`. The types Gemm, Scale, Quant and the helpers of gemm.cpp's common part are
// visible here.
//
// Order of operations, identical for every M, tile shape, blocking, thread count and instruction set:
//   lanes     lane j (of 8) sums a[k] * w[k] over k = j, j+8, j+16, ... in increasing k, one FMA
//             each (K zero-padded to a multiple of 16);
//   scales    constant along K: r = ((tree(lanes) * 256) * a_scale[m]) * w_scale[n];
//             changing along K (groups of 16..128, 128x128 blocks): per k_step-block partial lanes p
//             (k_step = the smaller group of the two operands), tot = fma(p, s, tot) with
//             s = (a_scale[m, k / group_a] * w_scale[n, k / group_w]) * 256, r = tree(tot);
//             except per-row weight groups (1 x g, fp32 or E8M0) against activation scales constant
//             along K (weight-only, per-token, per-tensor; gemm.cpp plan_scales): those are folded
//             into the weight as it is decoded, w = fma(q, w_scale[n, k / g], 0) = fl(q * s)
//             (dequantize_fp8's value; exact for E8M0), and the lanes sum a[k] * w in one run like a
//             per-channel weight's (g.fold_w);
//             (the factor 256 only for e4m3 weights, which decode to value * 2^-8: exact)
//   bias      r = r + bias[n]; then the output dtype (bf16: round to nearest even).
// A row's result therefore does not depend on which other rows share the call.

// ---------------------------------------------------------------- one register tile

template <int WT>
constexpr int64_t elem_size() { return WT == W_E4M3 ? 1 : WT == W_BF16 ? 2 : 4; }

template <int WT>
constexpr float rescale_of() { return WT == W_E4M3 ? 256.0f : 1.0f; }

// 16 weights of a row from k: two chunks of 8 lanes.
template <int WT>
FP8T_INLINE void load_w16(const void* row, int64_t k, V8& lo, V8& hi) {
  if constexpr (WT == W_E4M3) {
    V8::load_e4m3x2(static_cast<const uint8_t*>(row) + k, lo, hi);
  } else if constexpr (WT == W_BF16) {
    lo = V8::load_bf16(static_cast<const uint16_t*>(row) + k), hi = V8::load_bf16(static_cast<const uint16_t*>(row) + k + 8);
  } else {  // fp32 weights, or a decoded panel
    lo = V8::load(static_cast<const float*>(row) + k), hi = V8::load(static_cast<const float*>(row) + k + 8);
  }
}

#if FP8T_ISA == 2
// AVX-512, e4m3 weights: rows n and n+1 share one zmm (lanes 0-7: row n's 8 lanes, 8-15: row n+1's),
// decoded and multiplied by one instruction each. Every lane takes exactly the FMAs of the ymm code
// below, in the same order, so the results are the same bits; the decode (the bottleneck of the
// small-M GEMV on e4m3: vcvtph2ps) costs half the instructions per weight.
FP8T_INLINE void load_e4m3_pair(const uint8_t* r0, const uint8_t* r1, __m512& lo, __m512& hi) {
  __m256i b = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(r0))),
                                      _mm_loadu_si128(reinterpret_cast<const __m128i*>(r1)), 1);
  b = _mm256_permute4x64_epi64(b, 0xD8);  // qwords [r0 k0-7 | r1 k0-7 | r0 k8-15 | r1 k8-15]
  __m512i h = _mm512_cvtepi8_epi16(b);  // vec8.h's fp16 bit patterns, 32 at once
  h = _mm512_and_si512(_mm512_slli_epi16(h, 7), _mm512_set1_epi16(int16_t(0xBF80)));
  lo = _mm512_cvtph_ps(_mm512_castsi512_si256(h));
  hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1));
}

// z[m][p] += a[m][ka .. ka+16) * (rows w[2p], w[2p+1] at kw .. kw+16), lo chunk then hi chunk.
// FOLD: the rows are rows n0 + 2p, n0 + 2p + 1 of g.w, scaled by their group scale at ka as they load.
template <int MR, int NP, bool FOLD>
FP8T_INLINE void pair_step(const Gemm& g, int64_t n0, const float* const (&a)[MR], const void* const* w, int64_t ka,
                           int64_t kw, int64_t pf, __m512 (&z)[MR][NP]) {
  __m512 alo[MR], ahi[MR];
  for (int m = 0; m < MR; ++m) {
    alo[m] = _mm512_broadcast_f32x8(_mm256_loadu_ps(a[m] + ka));
    ahi[m] = _mm512_broadcast_f32x8(_mm256_loadu_ps(a[m] + ka + 8));
  }
  for (int p = 0; p < NP; ++p) {
    const uint8_t* r0 = static_cast<const uint8_t*>(w[2 * p]) + kw;
    const uint8_t* r1 = static_cast<const uint8_t*>(w[2 * p + 1]) + kw;
    if (pf) {
      _mm_prefetch(reinterpret_cast<const char*>(r0) + pf, _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(r1) + pf, _MM_HINT_T0);
    }
    __m512 lo, hi;
    load_e4m3_pair(r0, r1, lo, hi);
    if constexpr (FOLD) {  // each half as the ymm code scales its row: fma(q, s, 0)
      const __m512 sv = _mm512_insertf32x8(_mm512_set1_ps(g.ws.at(n0 + 2 * p, ka)),
                                           _mm256_set1_ps(g.ws.at(n0 + 2 * p + 1, ka)), 1);
      lo = _mm512_fmadd_ps(lo, sv, _mm512_setzero_ps()), hi = _mm512_fmadd_ps(hi, sv, _mm512_setzero_ps());
    }
    for (int m = 0; m < MR; ++m) z[m][p] = _mm512_fmadd_ps(alo[m], lo, z[m][p]);
    for (int m = 0; m < MR; ++m) z[m][p] = _mm512_fmadd_ps(ahi[m], hi, z[m][p]);
  }
}

template <int MR, int NR, bool FOLD>
FP8T_INLINE void dot_tile_e4m3_pairs(const Gemm& g, int64_t n0, const float* const (&a)[MR], const void* const (&w)[NR],
                                     const void* const (&tail)[NR], int64_t k_full, int64_t k0, int64_t k1, int64_t pf,
                                     V8 (&acc)[MR][NR]) {
  constexpr int NP = NR / 2;
  __m512 z[MR][NP];
  for (int m = 0; m < MR; ++m)
    for (int p = 0; p < NP; ++p) z[m][p] = _mm512_insertf32x8(_mm512_castps256_ps512(acc[m][2 * p].x), acc[m][2 * p + 1].x, 1);
  int64_t k = k0;
  const int64_t k_main = std::min(k1, k_full);
  for (; k < k_main; k += 16) pair_step<MR, NP, FOLD>(g, n0, a, w, k, k, pf, z);
  if (k < k1) pair_step<MR, NP, FOLD>(g, n0, a, tail, k, 0, 0, z);  // k == k_full: the zero-padded partial chunk
  for (int m = 0; m < MR; ++m)
    for (int p = 0; p < NP; ++p) {
      acc[m][2 * p].x = _mm512_castps512_ps256(z[m][p]);
      acc[m][2 * p + 1].x = _mm512_extractf32x8_ps(z[m][p], 1);
    }
}
#endif

// 16 weights of row n from k (global kg), each times its group scale when FOLD: fma(q, s, 0) = fl(q * s).
template <int WT, bool FOLD>
FP8T_INLINE void load_w16_scaled(const Gemm& g, const void* row, int64_t k, int64_t n, int64_t kg, V8& lo, V8& hi) {
  load_w16<WT>(row, k, lo, hi);
  if constexpr (FOLD) {
    const V8 s = V8::broadcast(g.ws.at(n, kg));  // one group: groups are multiples of 16, chunks aligned
    lo = fma(lo, s, V8::zero()), hi = fma(hi, s, V8::zero());
  }
}

// acc[m][n] += a[m][k] * w[n][k] for k in [k0, k1) (multiples of 16). Weight rows are read up to
// k_full; the 16 weights at k_full (a partial last chunk of K) come from tail[n], zero-padded.
// pf > 0: also prefetch each weight row pf bytes ahead (the next tile's rows: one tile of lead).
// FOLD: the rows are rows n0.. of g.w, scaled by their group scales as they load (g.fold_w).
template <int MR, int NR, int WT, bool FOLD = false>
FP8T_INLINE void dot_tile(const Gemm& g, int64_t n0, const float* const (&a)[MR], const void* const (&w)[NR],
                          const void* const (&tail)[NR], int64_t k_full, int64_t k0, int64_t k1, int64_t pf,
                          V8 (&acc)[MR][NR]) {
#if FP8T_ISA == 2
  if constexpr (WT == W_E4M3 && NR % 2 == 0)
    return dot_tile_e4m3_pairs<MR, NR, FOLD>(g, n0, a, w, tail, k_full, k0, k1, pf, acc);
#endif
  int64_t k = k0;
  const int64_t k_main = std::min(k1, k_full);
  for (; k < k_main; k += 16) {
    for (int n = 0; n < NR; ++n) {
      if (pf) _mm_prefetch(static_cast<const char*>(w[n]) + k * elem_size<WT>() + pf, _MM_HINT_T0);
      V8 lo, hi;
      load_w16_scaled<WT, FOLD>(g, w[n], k, n0 + n, k, lo, hi);
      for (int m = 0; m < MR; ++m) acc[m][n] = fma(V8::load(a[m] + k), lo, acc[m][n]);
      for (int m = 0; m < MR; ++m) acc[m][n] = fma(V8::load(a[m] + k + 8), hi, acc[m][n]);
    }
  }
  if (k < k1) {  // k == k_full
    for (int n = 0; n < NR; ++n) {
      V8 lo, hi;
      load_w16_scaled<WT, FOLD>(g, tail[n], 0, n0 + n, k, lo, hi);
      for (int m = 0; m < MR; ++m) acc[m][n] = fma(V8::load(a[m] + k), lo, acc[m][n]);
      for (int m = 0; m < MR; ++m) acc[m][n] = fma(V8::load(a[m] + k + 8), hi, acc[m][n]);
    }
  }
}

// Add k in [k0, k1) of tile (m0.., n0..) into its running state st: the lanes themselves when the
// scales are constant along K (or folded into the weight: FOLD); else one fma per g.k_step-block of K
// (k0 a multiple of k_step): st = fma(block lanes, (a_scale * w_scale) * rescale, st). `k_offset` + k
// is the global k.
template <int MR, int NR, int WT, bool FOLD = false>
FP8T_INLINE void accumulate(const Gemm& g, int64_t m0, int64_t n0, const float* const (&a)[MR],
                            const void* const (&w)[NR], const void* const (&tail)[NR], int64_t k_full, int64_t k0,
                            int64_t k1, int64_t k_offset, int64_t pf, float rescale, V8 (&st)[MR][NR]) {
  if (!g.scales_along_k) return dot_tile<MR, NR, WT, FOLD>(g, n0, a, w, tail, k_full, k0, k1, pf, st);
  for (int64_t k = k0; k < k1; k += g.k_step) {
    V8 p[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int n = 0; n < NR; ++n) p[m][n] = V8::zero();
    dot_tile<MR, NR, WT>(g, n0, a, w, tail, k_full, k, std::min(k + g.k_step, k1), pf, p);
    const int64_t kg = k_offset + k;  // global k of this block
    for (int m = 0; m < MR; ++m)
      for (int n = 0; n < NR; ++n) {
        const float s = (g.as.at(m0 + m, kg) * g.ws.at(n0 + n, kg)) * rescale;
        st[m][n] = fma(p[m][n], V8::broadcast(s), st[m][n]);
      }
  }
}

// Outputs (m, n0 .. n0+count) from their final states: tree, scales constant along K, bias, dtype.
inline void finish_row(const Gemm& g, int64_t m, int64_t n0, int64_t count, const V8* st, float rescale) {
  alignas(32) float sums[64];
  const float a_scale = g.as.kind != S_NONE && !g.scales_along_k ? g.as.at(m, 0) : 1.0f;
  for (int64_t c0 = 0; c0 < count; c0 += 64) {
    const int64_t len = std::min<int64_t>(64, count - c0);
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) V8::reduce8(st + c0 + i, sums + i);
    for (; i < len; ++i) sums[i] = st[c0 + i].reduce();
    i = 0;
#if FP8T_ISA != 0
    // eight outputs at a time where the scales are a vector (the same multiplies and add per output;
    // folded weight groups are already in the sums: no weight scale here, as in the loop below)
    const bool ws_vec = g.ws.kind == S_NONE || g.ws.kind == S_TENSOR || (g.ws.kind == S_ROW && g.ws.stride == 1) ||
                        g.fold_w;
    if (g.out_f32 && (g.scales_along_k || ws_vec)) {
      for (; i + 8 <= len; i += 8) {
        const int64_t n = n0 + c0 + i;
        V8 r = V8::load(sums + i);
        if (!g.scales_along_k) {
          r = mul(r, V8::broadcast(rescale));
          if (g.as.kind != S_NONE) r = mul(r, V8::broadcast(a_scale));
          if (g.ws.kind == S_TENSOR) r = mul(r, V8::broadcast(g.ws.p[0]));
          else if (g.ws.kind == S_ROW) r = mul(r, V8::load(g.ws.p + n));
        }
        if (g.bias) r = add(r, V8::load(g.bias + n));
        r.store(g.out_f32 + m * g.ldo + n);
      }
    }
#endif
    for (; i < len; ++i) {
      const int64_t n = n0 + c0 + i;
      float r = sums[i];
      if (!g.scales_along_k) {
        r = r * rescale;
        if (g.as.kind != S_NONE) r = r * a_scale;
        if (g.ws.kind != S_NONE && !g.fold_w) r = r * g.ws.at(n, 0);
      }
      if (g.bias) r = r + g.bias[n];
      if (g.out_f32) g.out_f32[m * g.ldo + n] = r;
      else g.out_bf16[m * g.ldo + n] = float_to_bf16(r);
    }
  }
}

// ---------------------------------------------------------------- small M: weight decoded in registers

// All M (= MR) rows against NR weight rows at a time over the whole K: the weight is read once,
// straight from memory, decoded in registers. Bandwidth-bound. pf: see dot_tile.
template <int MR, int NR, int WT>
__attribute__((noinline)) void gemv_tile(const Gemm& g, int64_t n, int64_t pf) {
  constexpr int64_t es = elem_size<WT>();
  const float* a[MR];
  for (int m = 0; m < MR; ++m) a[m] = g.a + m * g.lda;
  const int64_t k_full = g.K & ~int64_t(15);
  alignas(64) unsigned char tail_buf[NR][64];
  const void* w[NR];
  const void* tail[NR];
  for (int r = 0; r < NR; ++r) {
    w[r] = static_cast<const char*>(g.w) + (n + r) * g.ldw * es;
    tail[r] = tail_buf[r];
    if (k_full < g.K) {
      std::memset(tail_buf[r], 0, sizeof tail_buf[r]);
      std::memcpy(tail_buf[r], static_cast<const char*>(w[r]) + k_full * es, (g.K - k_full) * es);
    }
  }
  V8 st[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) st[m][r] = V8::zero();
  if (g.fold_w) accumulate<MR, NR, WT, true>(g, 0, n, a, w, tail, k_full, 0, g.Kp, 0, pf, rescale_of<WT>(), st);
  else accumulate<MR, NR, WT>(g, 0, n, a, w, tail, k_full, 0, g.Kp, 0, pf, rescale_of<WT>(), st);
  for (int m = 0; m < MR; ++m) finish_row(g, m, n, NR, st[m], rescale_of<WT>());
}

// Tiles prefetch the next tile's rows (the hardware prefetcher alone reached ~55% of the bandwidth
// on SmolLM2's lm_head), except the last, whose next rows belong to another thread or to no one.
template <int MR, int NR, int WT>
void gemv_rows(const Gemm& g, int64_t n_begin, int64_t n_end) {
  const int64_t pf = NR * g.ldw * elem_size<WT>();
  int64_t n = n_begin;
  for (; n + 2 * NR <= n_end; n += NR) gemv_tile<MR, NR, WT>(g, n, pf);
  for (; n + NR <= n_end; n += NR) gemv_tile<MR, NR, WT>(g, n, 0);
  for (; n < n_end; ++n) gemv_tile<MR, 1, WT>(g, n, 0);
}

template <int WT>
void gemv(const Gemm& g, int64_t n_begin, int64_t n_end) {
  switch (g.M) {  // MR x NR: 8 to 12 accumulators
    case 1: return gemv_rows<1, 8, WT>(g, n_begin, n_end);
    case 2: return gemv_rows<2, 4, WT>(g, n_begin, n_end);
    case 3: return gemv_rows<3, FP8T_ISA == 2 ? 4 : 3, WT>(g, n_begin, n_end);
    case 4: return gemv_rows<4, 2, WT>(g, n_begin, n_end);
    default: std::abort();  // the caller takes the panel path for M > GEMV_MAX_M
  }
}

// ---------------------------------------------------------------- larger M: decoded panels

// A decoded chunk of 16 weights of row n at global k times its group scale (g.fold_w): the same
// fma(q, s, 0) the small-M path forms in registers, so both paths multiply the same weights.
FP8T_INLINE void fold_group_scale(const Gemm& g, int64_t n, int64_t k, V8& lo, V8& hi) {
  const V8 s = V8::broadcast(g.ws.at(n, k));
  lo = fma(lo, s, V8::zero()), hi = fma(hi, s, V8::zero());
}

// Weights k .. k + 15 of row n (`src`) as a panel packer stores them: decoded, zero past K, group scale
// folded where the layout asks for it.
template <int WT>
FP8T_INLINE void panel_w16(const Gemm& g, const char* src, int64_t n, int64_t k, V8& lo, V8& hi) {
  constexpr int64_t es = elem_size<WT>();
  if (k + 16 <= g.K) {
    load_w16<WT>(src, k, lo, hi);
  } else {
    alignas(64) unsigned char buf[64] = {};
    std::memcpy(buf, src + k * es, (g.K - k) * es);
    load_w16<WT>(buf, 0, lo, hi);
  }
  if (g.fold_w) fold_group_scale(g, n, k, lo, hi);
}

// One MR x NR register tile over one K block of a panel: its state comes from `state` (zero on the
// first K block) and goes back there.
template <int MR, int NR>
__attribute__((noinline)) void panel_tile(const Gemm& g, int64_t m, int64_t nb, int64_t j, const float* panel,
                                          int64_t kc0, int64_t klen, bool first, float rescale, V8* state) {
  const float* a[MR];
  const void* w[NR];
  const void* tail[NR];
  for (int r = 0; r < MR; ++r) a[r] = g.a + (m + r) * g.lda + kc0;
  for (int c = 0; c < NR; ++c) w[c] = panel + (j + c) * g.panel_k, tail[c] = nullptr;
  V8* s = state + m * g.panel_rows + j;
  V8 st[MR][NR];
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) st[r][c] = first ? V8::zero() : s[r * g.panel_rows + c];
  accumulate<MR, NR, W_F32>(g, m, nb + j, a, w, tail, klen, 0, klen, kc0, 0, rescale, st);
  for (int r = 0; r < MR; ++r)
    for (int c = 0; c < NR; ++c) s[r * g.panel_rows + c] = st[r][c];
}

// Blocked GEMM over weight rows [n_begin, n_end): each block of panel_rows rows x panel_k of K is
// decoded once into an fp32 panel (the same values as in registers; sized for L1), then
// kTileM x kTileN register tiles sweep every row of `a` over it. Tile states [M, panel_rows] persist
// across K blocks, so each lane still adds its products in increasing k; the last K block is
// followed by the reductions, eight outputs at a time.
template <int WT>
void gemm_panel(const Gemm& g, int64_t n_begin, int64_t n_end, float* panel, V8* state) {
  constexpr int TM = V8::kTileM, TN = V8::kTileN;
  constexpr int64_t es = elem_size<WT>();
  const char* wb = static_cast<const char*>(g.w);
  const int64_t nc = g.panel_rows, kc = g.panel_k;
  for (int64_t nb = n_begin; nb < n_end; nb += nc) {
    const int64_t rows = std::min(nc, n_end - nb);
    for (int64_t kc0 = 0; kc0 < g.Kp; kc0 += kc) {
      const int64_t klen = std::min(kc, g.Kp - kc0);
      for (int64_t r = 0; r < rows; ++r) {  // decode the block, zero-padding the last chunk of K
        const char* src = wb + (nb + r) * g.ldw * es;
        float* dst = panel + r * kc;
        for (int64_t k = 0; k < klen; k += 16) {
          const int64_t gk = kc0 + k;
          V8 lo, hi;
          panel_w16<WT>(g, src, nb + r, gk, lo, hi);
          lo.store(dst + k), hi.store(dst + k + 8);
        }
      }
      const bool first = kc0 == 0;
      int64_t m = 0;
      for (; m + TM <= g.M; m += TM) {
        int64_t j = 0;
        for (; j + TN <= rows; j += TN) panel_tile<TM, TN>(g, m, nb, j, panel, kc0, klen, first, rescale_of<WT>(), state);
        for (; j < rows; ++j) panel_tile<TM, 1>(g, m, nb, j, panel, kc0, klen, first, rescale_of<WT>(), state);
      }
      for (; m < g.M; ++m) {
        int64_t j = 0;
        for (; j + TN <= rows; j += TN) panel_tile<1, TN>(g, m, nb, j, panel, kc0, klen, first, rescale_of<WT>(), state);
        for (; j < rows; ++j) panel_tile<1, 1>(g, m, nb, j, panel, kc0, klen, first, rescale_of<WT>(), state);
      }
    }
    for (int64_t m = 0; m < g.M; ++m) finish_row(g, m, nb, rows, state + m * nc, rescale_of<WT>());
  }
}

#if FP8T_ISA == 2
// AVX-512 panels: weight rows in pairs, interleaved by 8 floats (pair q, chunk c of 8 k: row 2q's
// 8 values then row 2q+1's), so one zmm load holds both rows' chunk and each zmm accumulator carries
// two rows' 8 lanes. Every lane adds the same products in the same order as the ymm panel (and the
// small-M path), with the same per-k_step scale fmas: the same bits, at twice the FMAs per instruction.
constexpr int kPairTileM = 4, kPairTileP = 6;  // 24 zmm accumulators + 4 broadcasts + 1 weight of 32

// z[r][q] += a[r][k0 .. k1) * rows of pairs wp[q], in k order (16 per step: the low 8, then the high 8).
template <int MR, int NP>
FP8T_INLINE void dot_pairs(const float* const (&a)[MR], const float* const (&wp)[NP], int64_t k0, int64_t k1,
                           __m512 (&z)[MR][NP]) {
  for (int64_t k = k0; k < k1; k += 8) {
    __m512 av[MR];
    for (int r = 0; r < MR; ++r) av[r] = _mm512_broadcast_f32x8(_mm256_loadu_ps(a[r] + k));
    for (int q = 0; q < NP; ++q) {
      const __m512 w = _mm512_loadu_ps(wp[q] + 2 * k);
      for (int r = 0; r < MR; ++r) z[r][q] = _mm512_fmadd_ps(av[r], w, z[r][q]);
    }
  }
}

// One MR x (2 NP) tile (rows m.., weight rows nb + j .., j even) over one K block of the pair panel,
// its state in `state` V8 [M, panel_rows] as panel_tile keeps it; the scales as `accumulate` does.
template <int MR, int NP>
__attribute__((noinline)) void panel_tile_pairs(const Gemm& g, int64_t m, int64_t nb, int64_t j, const float* panel,
                                                int64_t kc0, int64_t klen, bool first, float rescale, V8* state) {
  const float* a[MR];
  const float* wp[NP];
  for (int r = 0; r < MR; ++r) a[r] = g.a + (m + r) * g.lda + kc0;
  for (int q = 0; q < NP; ++q) wp[q] = panel + (j / 2 + q) * 2 * g.panel_k;
  V8* s = state + m * g.panel_rows + j;
  __m512 z[MR][NP];
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < NP; ++q)
      z[r][q] = first ? _mm512_setzero_ps()
                      : _mm512_insertf32x8(_mm512_castps256_ps512(s[r * g.panel_rows + 2 * q].x),
                                           s[r * g.panel_rows + 2 * q + 1].x, 1);
  if (!g.scales_along_k) {
    dot_pairs<MR, NP>(a, wp, 0, klen, z);
  } else {
    for (int64_t k = 0; k < klen; k += g.k_step) {
      __m512 p[MR][NP];
      for (int r = 0; r < MR; ++r)
        for (int q = 0; q < NP; ++q) p[r][q] = _mm512_setzero_ps();
      dot_pairs<MR, NP>(a, wp, k, std::min(k + g.k_step, klen), p);
      const int64_t kg = kc0 + k;
      for (int r = 0; r < MR; ++r)
        for (int q = 0; q < NP; ++q) {
          const float s0 = (g.as.at(m + r, kg) * g.ws.at(nb + j + 2 * q, kg)) * rescale;
          const int64_t n1 = std::min(nb + j + 2 * q + 1, g.N - 1);  // (a missing second row: any scale)
          const float s1 = (g.as.at(m + r, kg) * g.ws.at(n1, kg)) * rescale;
          const __m512 sv = _mm512_insertf32x8(_mm512_set1_ps(s0), _mm256_set1_ps(s1), 1);
          z[r][q] = _mm512_fmadd_ps(p[r][q], sv, z[r][q]);
        }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int q = 0; q < NP; ++q) {
      s[r * g.panel_rows + 2 * q].x = _mm512_castps512_ps256(z[r][q]);
      s[r * g.panel_rows + 2 * q + 1].x = _mm512_extractf32x8_ps(z[r][q], 1);
    }
}

template <int MR>
FP8T_INLINE void pair_tiles(const Gemm& g, int64_t m, int64_t nb, int64_t pairs, const float* panel, int64_t kc0,
                            int64_t klen, bool first, float rescale, V8* state) {
  int64_t q = 0;
  for (; q + kPairTileP <= pairs; q += kPairTileP)
    panel_tile_pairs<MR, kPairTileP>(g, m, nb, 2 * q, panel, kc0, klen, first, rescale, state);
  for (; q < pairs; ++q) panel_tile_pairs<MR, 1>(g, m, nb, 2 * q, panel, kc0, klen, first, rescale, state);
}

// gemm_panel with the pair panel (panel_rows even). A missing second row of the last pair reads zeros
// and its state slot (inside [M, panel_rows]) is never finished.
template <int WT>
void gemm_panel_pairs(const Gemm& g, int64_t n_begin, int64_t n_end, float* panel, V8* state) {
  constexpr int64_t es = elem_size<WT>();
  const char* wb = static_cast<const char*>(g.w);
  const int64_t nc = g.panel_rows, kc = g.panel_k;
  for (int64_t nb = n_begin; nb < n_end; nb += nc) {
    const int64_t rows = std::min(nc, n_end - nb), pairs = (rows + 1) / 2;
    for (int64_t kc0 = 0; kc0 < g.Kp; kc0 += kc) {
      const int64_t klen = std::min(kc, g.Kp - kc0);
      for (int64_t r = 0; r < 2 * pairs; ++r) {  // decode the block, zero-padding the last chunk of K
        float* dst = panel + (r / 2) * 2 * kc + (r % 2) * 8;
        if (r == rows) {
          for (int64_t k = 0; k < klen; k += 8) V8::zero().store(dst + 2 * k);
          continue;
        }
        const char* src = wb + (nb + r) * g.ldw * es;
        for (int64_t k = 0; k < klen; k += 16) {
          const int64_t gk = kc0 + k;
          V8 lo, hi;
          panel_w16<WT>(g, src, nb + r, gk, lo, hi);
          lo.store(dst + 2 * k), hi.store(dst + 2 * k + 16);
        }
      }
      const bool first = kc0 == 0;
      int64_t m = 0;
      for (; m + kPairTileM <= g.M; m += kPairTileM) pair_tiles<kPairTileM>(g, m, nb, pairs, panel, kc0, klen, first, rescale_of<WT>(), state);
      for (; m < g.M; ++m) pair_tiles<1>(g, m, nb, pairs, panel, kc0, klen, first, rescale_of<WT>(), state);
    }
    for (int64_t m = 0; m < g.M; ++m) finish_row(g, m, nb, rows, state + m * nc, rescale_of<WT>());
  }
}
#endif

// The whole GEMM on weight rows [n_begin, n_end) (one thread's share); panel == nullptr: small M.
// state: V8 [M, panel_rows] (panel path only).
inline void gemm_range(const Gemm& g, int64_t n_begin, int64_t n_end, float* panel, float* state) {
  V8* st = reinterpret_cast<V8*>(state);
#if FP8T_ISA == 2
  if (panel && g.panel_rows % 2 == 0) {
    switch (g.wtype) {
      case W_E4M3: return gemm_panel_pairs<W_E4M3>(g, n_begin, n_end, panel, st);
      case W_BF16: return gemm_panel_pairs<W_BF16>(g, n_begin, n_end, panel, st);
      default: return gemm_panel_pairs<W_F32>(g, n_begin, n_end, panel, st);
    }
  }
#endif
  switch (g.wtype) {
    case W_E4M3: return panel ? gemm_panel<W_E4M3>(g, n_begin, n_end, panel, st) : gemv<W_E4M3>(g, n_begin, n_end);
    case W_BF16: return panel ? gemm_panel<W_BF16>(g, n_begin, n_end, panel, st) : gemv<W_BF16>(g, n_begin, n_end);
    default: return panel ? gemm_panel<W_F32>(g, n_begin, n_end, panel, st) : gemv<W_F32>(g, n_begin, n_end);
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
      float s = compute_scale(amax_span(xr, q.K));
      if (q.pow2) s = pow2_scale(s);
      q.scale[r] = s;
      quantize_span(xr, q.K, s, qr, br);
    } else {
      const int64_t groups = (q.K + q.group_size - 1) / q.group_size;
      for (int64_t gi = 0; gi < groups; ++gi) {
        const int64_t k0 = gi * q.group_size, len = std::min(q.group_size, q.K - k0);
        float s = compute_scale(amax_span(xr + k0, len));
        if (q.pow2) s = pow2_scale(s);
        q.scale[r * groups + gi] = s;
        quantize_span(xr + k0, len, s, qr + k0, br ? br + k0 : nullptr);
      }
    }
    for (int64_t k = q.K; k < q.Kp; ++k) qr[k] = 0.0f;
  }
}
