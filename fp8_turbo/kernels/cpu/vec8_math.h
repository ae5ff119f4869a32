// Elementwise fp32 math on V8 (vec8.h) for the attention, fused small-op and step kernels: add, sub,
// mul, div, max, abs, one exp2 and the e4m3 rounding. Included after vec8.h, inside the same per-ISA namespace.
//
// Every function gives the same bits on every instruction set (each step is one IEEE fp32 operation
// in round-to-nearest-even, spelled out: no contraction, -ffp-contract=off), so a scalar caller
// uses the same function on a broadcast vector and gets the vector's bits.

#if FP8T_ISA == 0

#define FP8T_LANEWISE(expr)          \
  V8 r;                              \
  for (int i = 0; i < 8; ++i) {      \
    const float x = a.v[i];          \
    const float y = b.v[i];          \
    (void)y;                         \
    r.v[i] = (expr);                 \
  }                                  \
  return r;

FP8T_INLINE V8 add(const V8& a, const V8& b) { FP8T_LANEWISE(x + y) }
FP8T_INLINE V8 sub(const V8& a, const V8& b) { FP8T_LANEWISE(x - y) }
FP8T_INLINE V8 mul(const V8& a, const V8& b) { FP8T_LANEWISE(x * y) }
FP8T_INLINE V8 div(const V8& a, const V8& b) { FP8T_LANEWISE(x / y) }
// max(a, b) as vmaxps: a > b ? a : b (b when either is NaN).
FP8T_INLINE V8 max(const V8& a, const V8& b) { FP8T_LANEWISE(x > y ? x : y) }
FP8T_INLINE float lane(const V8& a, int i) { return a.v[i]; }

// |a| lane by lane (the sign bit cleared), and whether any lane is NaN.
FP8T_INLINE V8 abs(const V8& a) {
  V8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = std::fabs(a.v[i]);
  return r;
}
FP8T_INLINE bool any_nan(const V8& a) {
  for (int i = 0; i < 8; ++i)
    if (a.v[i] != a.v[i]) return true;
  return false;
}
// common.h round_to_e4m3 on each lane.
FP8T_INLINE V8 round_e4m3(const V8& a) {
  V8 r;
  for (int i = 0; i < 8; ++i) r.v[i] = round_to_e4m3(a.v[i]);
  return r;
}

// 2^x: x < -126 (and NaN) -> 0, x > 128 -> +inf; else 2^n p(f), n = round(x), f = x - n (exact),
// p the degree-7 polynomial of kExp2Poly in Horner form with one FMA per step.
FP8T_INLINE V8 exp2(const V8& a) {
  V8 r;
  for (int i = 0; i < 8; ++i) {
    const float x = a.v[i];
    float xc = x > -126.0f ? x : -126.0f;
    xc = xc < 127.0f ? xc : 127.0f;
    const float n = std::nearbyint(xc);
    const float f = xc - n;  // exact, |f| <= 0.5
    float p = kExp2Poly[7];
    for (int c = 6; c >= 0; --c) p = std::fma(p, f, kExp2Poly[c]);
    const float two_n = bits_to_float(uint32_t(int32_t(n) + 127) << 23);
    const float y = x >= -126.0f ? p * two_n : 0.0f;
    r.v[i] = x > 128.0f ? INFINITY : y;
  }
  return r;
}
#undef FP8T_LANEWISE

#else

FP8T_INLINE V8 add(const V8& a, const V8& b) { return {_mm256_add_ps(a.x, b.x)}; }
FP8T_INLINE V8 sub(const V8& a, const V8& b) { return {_mm256_sub_ps(a.x, b.x)}; }
FP8T_INLINE V8 mul(const V8& a, const V8& b) { return {_mm256_mul_ps(a.x, b.x)}; }
FP8T_INLINE V8 div(const V8& a, const V8& b) { return {_mm256_div_ps(a.x, b.x)}; }
FP8T_INLINE V8 max(const V8& a, const V8& b) { return {_mm256_max_ps(a.x, b.x)}; }
FP8T_INLINE float lane(const V8& a, int i) {
  alignas(32) float t[8];
  _mm256_store_ps(t, a.x);
  return t[i];
}

FP8T_INLINE V8 abs(const V8& a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.0f), a.x)}; }
FP8T_INLINE bool any_nan(const V8& a) { return _mm256_movemask_ps(_mm256_cmp_ps(a.x, a.x, _CMP_UNORD_Q)) != 0; }

// common.h round_to_e4m3, the same steps on 8 lanes: a = min(|x|, 448) (vminps(448, a) keeps a NaN),
// e = max(exponent(a), -6) - 3, then nearbyint(a * 2^-e) * 2^e (both scalings exact), with x's sign.
FP8T_INLINE V8 round_e4m3(const V8& v) {
  const __m256 sign = _mm256_and_ps(_mm256_set1_ps(-0.0f), v.x);
  const __m256 a = _mm256_min_ps(_mm256_set1_ps(448.0f), _mm256_andnot_ps(_mm256_set1_ps(-0.0f), v.x));
  __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(_mm256_castps_si256(a), 23), _mm256_set1_epi32(127));
  e = _mm256_sub_epi32(_mm256_max_epi32(e, _mm256_set1_epi32(-6)), _mm256_set1_epi32(3));
  const __m256 step = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(e, _mm256_set1_epi32(127)), 23));
  const __m256 inv_step = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_sub_epi32(_mm256_set1_epi32(127), e), 23));
  const __m256 r = _mm256_mul_ps(_mm256_round_ps(_mm256_mul_ps(a, inv_step), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), step);
  return {_mm256_or_ps(r, sign)};
}

FP8T_INLINE V8 exp2(const V8& a) {
  const __m256 x = a.x;
  __m256 xc = _mm256_max_ps(x, _mm256_set1_ps(-126.0f));
  xc = _mm256_min_ps(xc, _mm256_set1_ps(127.0f));  // vminps: xc < 127 ? xc : 127
  const __m256 n = _mm256_round_ps(xc, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(xc, n);
  __m256 p = _mm256_set1_ps(kExp2Poly[7]);
  for (int c = 6; c >= 0; --c) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExp2Poly[c]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  const __m256 r = _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(e)), _mm256_cmp_ps(x, _mm256_set1_ps(-126.0f), _CMP_GE_OQ));
  return {_mm256_blendv_ps(r, _mm256_set1_ps(INFINITY), _mm256_cmp_ps(x, _mm256_set1_ps(128.0f), _CMP_GT_OQ))};
}

#endif

// Largest lane, then of lane pairs (i, i+4), (i, i+2), (0, 1): max is exact, so any order would do.
FP8T_INLINE float reduce_max(const V8& a) {
  float m = lane(a, 0);
  for (int i = 1; i < 8; ++i) m = std::max(m, lane(a, i));
  return m;
}
