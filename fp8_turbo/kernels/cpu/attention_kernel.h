// Paged attention of one (query token, KV head): the GROUP query heads sharing the KV head, written
// once against V8 and compiled once per instruction set (attention.cpp includes it inside
// `namespace portable | avx2 | avx512`).
//
// Each query row (token, head) is computed by the same arithmetic over keys 0..L-1 (L: the row's
// causal length), whatever the call (decode or prefill), batch, thread count or instruction set:
//   scores    s[j] = tree(lanes of q . k[j]) * c, c = sm_scale * k_scale * log2(e) (* 256 for e4m3:
//             decoded as value * 2^-8); lane i (of 8) sums q[d] k[j][d] over d = i, i+8, ... in order,
//             one FMA each; the tree is V8::reduce's.
//   max       m = max_j s[j] (exact in any order).
//   weights   p[j] = exp2(s[j] - m) (vec8_math.h exp2); l = tree(lanes) with lane i summing p[j]
//             over j = i, i+8, ... in order.
//   values    acc[d] = sum over j in order of fma(p[j], v[j][d], acc[d]);
//             out[d] = acc[d] * ((v_scale (* 256 for e4m3)) / l), then the output dtype.
// Rows of one (token, KV head) are done together only to decode each K/V row once; no value crosses rows.

template <int KV>
FP8T_INLINE V8 load_kv(const void* row, int64_t d) {
  if constexpr (KV == KV_E4M3) return V8::load_e4m3(static_cast<const uint8_t*>(row) + d);
  else if constexpr (KV == KV_BF16) return V8::load_bf16(static_cast<const uint16_t*>(row) + d);
  else return V8::load(static_cast<const float*>(row) + d);
}

// The cache lines of one fp32 K or V row (D floats), fetched ahead; no effect on values. Measured
// (bench/attention_cpu.py, 1 thread): decode B32 x L2048 on an fp32 cache 19-21 -> 15 ms, shorter
// contexts unchanged; on e4m3 caches (a quarter of the bytes) no gain, so only fp32 rows are fetched.
template <int KV>
FP8T_INLINE void prefetch_row(const void* row, int64_t D) {
  if constexpr (KV == KV_F32)
    for (int64_t b = 0; b < D * 4; b += 64) __builtin_prefetch(static_cast<const char*>(row) + b, 0, 3);
}

// s[r][j] for j in [j0, j0 + 8) and rows r < RT (q rows qf[r], D floats each); keys at or past L
// get -inf.
// The next group's keys (`next` of them) are fetched meanwhile.
template <int RT, int KV>
FP8T_INLINE void scores8(const Attn& a, const float* const* qf, const void* const* krows, int nk, float c,
                         float* const* s, int64_t j0, int next) {
  for (int jj = 0; jj < next; ++jj) prefetch_row<KV>(krows[8 + jj], a.D);  // the next group's keys
  V8 part[RT][8];
  for (int jj = 0; jj < 8; ++jj) {
    V8 acc[RT];
    for (int r = 0; r < RT; ++r) acc[r] = V8::zero();
    if (jj < nk) {
      for (int64_t d = 0; d < a.D; d += 8) {
        const V8 k = load_kv<KV>(krows[jj], d);
        for (int r = 0; r < RT; ++r) acc[r] = fma(V8::load(qf[r] + d), k, acc[r]);
      }
    }
    for (int r = 0; r < RT; ++r) part[r][jj] = acc[r];
  }
  const V8 cv = V8::broadcast(c);
  for (int r = 0; r < RT; ++r) {
    alignas(32) float dots[8];
    V8::reduce8(part[r], dots);
    V8 sv = mul(V8::load(dots), cv);
    sv.store(s[r] + j0);
    for (int jj = nk; jj < 8; ++jj) s[r][j0 + jj] = -INFINITY;
  }
}

// acc[r][c] (chunks c0 .. c0 + CT of D) = sum_j p[r][j] v[j] in key order; then scaled into out rows.
template <int RT, int CT, int KV>
FP8T_INLINE void values_tile(const float* const* p, int64_t L, int64_t c0, const void* const* vrows,
                             const float* inv_l, float* const* out, int64_t D) {
  V8 acc[RT][CT];
  for (int r = 0; r < RT; ++r)
    for (int c = 0; c < CT; ++c) acc[r][c] = V8::zero();
  for (int64_t j = 0; j < L; ++j) {
    const void* row = vrows[j];
    if (c0 == 0 && j + 4 < L) prefetch_row<KV>(vrows[j + 4], D);  // the first pass brings the rows in
    V8 pr[RT];
    for (int r = 0; r < RT; ++r) pr[r] = V8::broadcast(p[r][j]);
    for (int c = 0; c < CT; ++c) {
      const V8 v = load_kv<KV>(row, (c0 + c) * 8);
      for (int r = 0; r < RT; ++r) acc[r][c] = fma(pr[r], v, acc[r][c]);
    }
  }
  for (int r = 0; r < RT; ++r) {
    const V8 s = V8::broadcast(inv_l[r]);
    for (int c = 0; c < CT; ++c) mul(acc[r][c], s).store(out[r] + (c0 + c) * 8);
  }
}

template <int RT, int KV>
FP8T_INLINE void values(const Attn& a, const float* const* p, int64_t L, const void* const* vrows, const float* inv_l,
                        float* const* out) {
  constexpr int CT = RT <= 2 ? 4 : RT == 3 ? 3 : 2;  // RT * CT accumulators + RT weights + 1 value <= 16 registers
  const int64_t chunks = a.D / 8;
  int64_t c0 = 0;
  for (; c0 + CT <= chunks; c0 += CT) values_tile<RT, CT, KV>(p, L, c0, vrows, inv_l, out, a.D);
  switch (chunks - c0) {
    case 3: values_tile<RT, 3, KV>(p, L, c0, vrows, inv_l, out, a.D); break;
    case 2: values_tile<RT, 2, KV>(p, L, c0, vrows, inv_l, out, a.D); break;
    case 1: values_tile<RT, 1, KV>(p, L, c0, vrows, inv_l, out, a.D); break;
    default: break;
  }
}

// Rows r < RT of one (token, KV head): q rows qf (fp32, D each), causal length L >= 1, the K and V
// rows of keys 0..L-1 (krows, vrows), outputs (fp32, D each) into out. s: RT score rows of at least
// round_up(L, 8) floats.
template <int RT, int KV>
void attend_rows(const Attn& a, const float* const* qf, int64_t L, const void* const* krows,
                 const void* const* vrows, float* const* s, float* const* out) {
  for (int64_t j0 = 0; j0 < L; j0 += 8)
    scores8<RT, KV>(a, qf, krows + j0, int(std::min<int64_t>(8, L - j0)), a.qk_scale, s, j0,
                    int(std::max<int64_t>(0, std::min<int64_t>(8, L - j0 - 8))));
  const int64_t Lp = (L + 7) / 8 * 8;
  float inv_l[RT];
  for (int r = 0; r < RT; ++r) {
    V8 mv = V8::broadcast(-INFINITY);
    for (int64_t j = 0; j < Lp; j += 8) mv = max(mv, V8::load(s[r] + j));
    const V8 m = V8::broadcast(reduce_max(mv));
    V8 lsum = V8::zero();
    for (int64_t j = 0; j < Lp; j += 8) {
      const V8 p = exp2(sub(V8::load(s[r] + j), m));
      p.store(s[r] + j);
      lsum = add(lsum, p);
    }
    inv_l[r] = a.v_scale / lsum.reduce();
  }
  values<RT, KV>(a, s, L, vrows, inv_l, out);
}
