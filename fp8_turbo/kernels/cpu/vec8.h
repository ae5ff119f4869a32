// V8: eight fp32 lanes, the unit of every fixed-order reduction in the CPU kernels.
//
// Included once per instruction set by each kernel source, inside `namespace <isa>` and under the
// matching `#pragma GCC target`, with FP8T_ISA set to 0 (portable C++), 1 (AVX2 + FMA + F16C) or
// 2 (AVX-512: the same ymm code, with 32 registers for larger register tiles). Every operation
// gives the same bits on all of them, which makes a kernel's result independent of the ISA:
//   - fma is one rounding (std::fma in the portable code: glibc's, a hardware FMA where there is one);
//   - loads decode exactly (e4m3 -> fp32 is exact; bf16 -> fp32 is a shift);
//   - reduce() sums the lanes in one fixed tree: (i, i+4), then (i, i+2), then (0, 1); reduce8
//     does the same additions for eight vectors at once.
//
// e4m3 decoding goes through the fp16 bit pattern: byte b -> fp16 bits ((b & 0x80) << 8) |
// ((b & 0x7F) << 7) has e4m3's exponent and mantissa in fp16's fields, so it reads as
// value(b) * 2^-8 for normal and subnormal bytes alike (both formats' subnormals are 2^-8 apart).
// Kernels multiply by 256 (exact) at the end. The NaN bytes 0x7F/0xFF read as +-480 * 2^-8: e4m3
// weights never hold NaN (kernels/fp8.py rejects non-finite weights).
// The caller includes <immintrin.h>, <cmath>, <cstdint> and <cstring> and defines FP8T_INLINE
// (always_inline) and kE4m3Scaled (the 256 decoded values, for the portable code) first.
//
// Speed note: on Zen 3, vcvtph2ps (2 per 16 weights) bounds e4m3 decoding at ~10 GB/s per core.

#ifndef FP8T_ISA
#error "define FP8T_ISA (0 portable, 1 AVX2, 2 AVX-512) before including vec8.h"
#endif

#if FP8T_ISA == 0

struct V8 {
  float v[8];
  static constexpr int kTileM = 4, kTileN = 3;  // register tile of the GEMM micro-kernel
  static FP8T_INLINE V8 zero() {
    V8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = 0.0f;
    return r;
  }
  static FP8T_INLINE V8 load(const float* p) {
    V8 r;
    std::memcpy(r.v, p, sizeof r.v);
    return r;
  }
  static FP8T_INLINE V8 load_e4m3(const uint8_t* p) {
    V8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = kE4m3Scaled.v[p[i]];
    return r;
  }
  static FP8T_INLINE void load_e4m3x2(const uint8_t* p, V8& lo, V8& hi) {
    lo = load_e4m3(p);
    hi = load_e4m3(p + 8);
  }
  static FP8T_INLINE V8 load_bf16(const uint16_t* p) {
    V8 r;
    for (int i = 0; i < 8; ++i) {
      const uint32_t u = uint32_t(p[i]) << 16;
      std::memcpy(&r.v[i], &u, 4);
    }
    return r;
  }
  static FP8T_INLINE V8 broadcast(float s) {
    V8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = s;
    return r;
  }
  FP8T_INLINE void store(float* p) const { std::memcpy(p, v, sizeof v); }
  friend FP8T_INLINE V8 fma(const V8& a, const V8& b, const V8& c) {
    V8 r;
    for (int i = 0; i < 8; ++i) r.v[i] = std::fma(a.v[i], b.v[i], c.v[i]);
    return r;
  }
  FP8T_INLINE float reduce() const {
    float s[4];
    for (int i = 0; i < 4; ++i) s[i] = v[i] + v[i + 4];
    for (int i = 0; i < 2; ++i) s[i] = s[i] + s[i + 2];
    return s[0] + s[1];
  }
  static FP8T_INLINE void reduce8(const V8* x, float* out) {
    for (int i = 0; i < 8; ++i) out[i] = x[i].reduce();
  }
};

#else  // AVX2; AVX-512 compiles the same code with 32 vector registers

struct V8 {
  __m256 x;
  static constexpr int kTileM = 4, kTileN = FP8T_ISA == 2 ? 6 : 3;  // accumulators: 12 of 16, 24 of 32 registers
  static FP8T_INLINE V8 zero() { return {_mm256_setzero_ps()}; }
  static FP8T_INLINE V8 load(const float* p) { return {_mm256_loadu_ps(p)}; }
  // 8 or 16 e4m3 bytes -> fp16 bit patterns (see the top): sign-extend, shift the 7 low bits into
  // place, clear bit 14 (the sign extension's copy); then vcvtph2ps.
  static FP8T_INLINE V8 load_e4m3(const uint8_t* p) {
    __m128i h = _mm_cvtepi8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    h = _mm_and_si128(_mm_slli_epi16(h, 7), _mm_set1_epi16(int16_t(0xBF80)));
    return {_mm256_cvtph_ps(h)};
  }
  static FP8T_INLINE void load_e4m3x2(const uint8_t* p, V8& lo, V8& hi) {
    __m256i h = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    h = _mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16(int16_t(0xBF80)));
    lo.x = _mm256_cvtph_ps(_mm256_castsi256_si128(h));
    hi.x = _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1));
  }
  static FP8T_INLINE V8 load_bf16(const uint16_t* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(w, 16))};
  }
  static FP8T_INLINE V8 broadcast(float s) { return {_mm256_set1_ps(s)}; }
  FP8T_INLINE void store(float* p) const { _mm256_storeu_ps(p, x); }
  friend FP8T_INLINE V8 fma(const V8& a, const V8& b, const V8& c) { return {_mm256_fmadd_ps(a.x, b.x, c.x)}; }
  FP8T_INLINE float reduce() const {
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
  }
  // out[i] = x[i].reduce() for i < 8, the same additions done eight vectors at a time.
  static FP8T_INLINE void reduce8(const V8* v, float* out) {
    __m256 s4[4];  // [v(2i).s4 | v(2i+1).s4]: lanes (j, j+4)
    for (int i = 0; i < 4; ++i) {
      const __m256 a = v[2 * i].x, b = v[2 * i + 1].x;
      s4[i] = _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
    }
    __m256 s2[2];  // lanes (j, j+2): [v0 v2 | v1 v3] pairs, then [v4 v6 | v5 v7]
    for (int i = 0; i < 2; ++i) {
      const __m256d p = _mm256_castps_pd(s4[2 * i]), q = _mm256_castps_pd(s4[2 * i + 1]);
      s2[i] = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(p, q)), _mm256_castpd_ps(_mm256_unpackhi_pd(p, q)));
    }
    // (0, 1): [v0 v2 v4 v6 | v1 v3 v5 v7] -> v0..v7
    const __m256 s = _mm256_hadd_ps(s2[0], s2[1]);
    _mm256_storeu_ps(out, _mm256_permutevar8x32_ps(s, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
  }
};

#endif
