// V16: sixteen fp32 lanes, the unit of every fixed-order reduction in the CPU kernels.
//
// Included once per instruction set by each kernel source, inside `namespace <isa>` and under the
// matching `#pragma GCC target`, with FP8T_ISA set to 0 (portable C++), 1 (AVX2 + FMA + F16C: two
// ymm registers) or 2 (AVX-512F: one zmm register). Every operation gives the same bits on all
// three, which is what makes a kernel's result independent of the instruction set:
//   - fma is one rounding (std::fma in the portable code: a hardware FMA where glibc finds one);
//   - loads decode exactly (e4m3 -> fp32 is exact; bf16 -> fp32 is a shift);
//   - reduce() sums the lanes in one fixed tree: (i, i+8), then (i, i+4), (i, i+2), (0, 1).
//
// e4m3 decoding goes through the fp16 bit pattern: byte b -> fp16 bits ((b & 0x80) << 8) |
// ((b & 0x7F) << 7) has e4m3's exponent and mantissa in fp16's fields, so it reads as
// value(b) * 2^-8 for normal and subnormal bytes alike (both formats' subnormals are 2^-8 apart).
// Kernels multiply by 256 (exact) at the end. The NaN bytes 0x7F/0xFF read as +-480 * 2^-8: e4m3
// weights never hold NaN (kernels/fp8.py rejects non-finite weights).
// The caller includes <immintrin.h>, <cmath>, <cstdint> and <cstring> first.

#ifndef FP8T_ISA
#error "define FP8T_ISA (0 portable, 1 AVX2, 2 AVX-512) before including vec16.h"
#endif

#define FP8T_INLINE inline __attribute__((always_inline))

// e4m3 byte -> value * 2^-8, exactly what vcvtph2ps of the fp16 pattern above gives.
FP8T_INLINE float e4m3_scaled(uint8_t b) {
  const int e = (b >> 3) & 0xF, m = b & 7;
  const float mag = e == 0 ? std::ldexp(float(m), -17) : std::ldexp(float(8 + m), e - 18);
  return (b & 0x80) ? -mag : mag;
}

FP8T_INLINE float bf16_to_float(uint16_t h) {
  uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

#if FP8T_ISA == 0

struct V16 {
  float v[16];
  static constexpr int kTileM = 2, kTileN = 2;  // register tile of the GEMM micro-kernel
  static FP8T_INLINE V16 zero() {
    V16 r;
    for (int i = 0; i < 16; ++i) r.v[i] = 0.0f;
    return r;
  }
  static FP8T_INLINE V16 load(const float* p) {
    V16 r;
    std::memcpy(r.v, p, sizeof r.v);
    return r;
  }
  static FP8T_INLINE V16 load_e4m3(const uint8_t* p) {
    V16 r;
    for (int i = 0; i < 16; ++i) r.v[i] = e4m3_scaled(p[i]);
    return r;
  }
  static FP8T_INLINE V16 load_bf16(const uint16_t* p) {
    V16 r;
    for (int i = 0; i < 16; ++i) r.v[i] = bf16_to_float(p[i]);
    return r;
  }
  static FP8T_INLINE V16 broadcast(float s) {
    V16 r;
    for (int i = 0; i < 16; ++i) r.v[i] = s;
    return r;
  }
  FP8T_INLINE void store(float* p) const { std::memcpy(p, v, sizeof v); }
  friend FP8T_INLINE V16 fma(const V16& a, const V16& b, const V16& c) {
    V16 r;
    for (int i = 0; i < 16; ++i) r.v[i] = std::fma(a.v[i], b.v[i], c.v[i]);
    return r;
  }
  FP8T_INLINE float reduce() const {
    float s[8];
    for (int i = 0; i < 8; ++i) s[i] = v[i] + v[i + 8];
    for (int i = 0; i < 4; ++i) s[i] = s[i] + s[i + 4];
    for (int i = 0; i < 2; ++i) s[i] = s[i] + s[i + 2];
    return s[0] + s[1];
  }
};

#else  // AVX2 and AVX-512 share the 8-lane tail of the tree and the e4m3/bf16 decoding steps

// 8 lanes -> their sum: (i, i+4), (i, i+2), (0, 1).
FP8T_INLINE float reduce8(__m256 s8) {
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  __m128 s1 = _mm_add_ss(s2, _mm_movehdup_ps(s2));
  return _mm_cvtss_f32(s1);
}

// 16 e4m3 bytes -> 16 fp16 bit patterns (see the top): sign-extend, shift the 7 low bits into
// place, clear bit 14 (the sign extension's copy).
FP8T_INLINE __m256i e4m3_to_fp16_bits(const uint8_t* p) {
  __m256i h = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16(int16_t(0xBF80)));
}

#if FP8T_ISA == 1

struct V16 {
  __m256 lo, hi;  // lanes 0-7, 8-15
  static constexpr int kTileM = 2, kTileN = 2;
  static FP8T_INLINE V16 zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
  static FP8T_INLINE V16 load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
  static FP8T_INLINE V16 load_e4m3(const uint8_t* p) {
    __m256i h = e4m3_to_fp16_bits(p);
    return {_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1))};
  }
  static FP8T_INLINE V16 load_bf16(const uint16_t* p) {
    __m256i lo = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    __m256i hi = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(lo, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(hi, 16))};
  }
  static FP8T_INLINE V16 broadcast(float s) { return {_mm256_set1_ps(s), _mm256_set1_ps(s)}; }
  FP8T_INLINE void store(float* p) const {
    _mm256_storeu_ps(p, lo);
    _mm256_storeu_ps(p + 8, hi);
  }
  friend FP8T_INLINE V16 fma(const V16& a, const V16& b, const V16& c) {
    return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
  }
  FP8T_INLINE float reduce() const { return reduce8(_mm256_add_ps(lo, hi)); }
};

#elif FP8T_ISA == 2

struct V16 {
  __m512 x;
  static constexpr int kTileM = 4, kTileN = 2;  // 32 zmm registers: 8 accumulators + operands
  static FP8T_INLINE V16 zero() { return {_mm512_setzero_ps()}; }
  static FP8T_INLINE V16 load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static FP8T_INLINE V16 load_e4m3(const uint8_t* p) { return {_mm512_cvtph_ps(e4m3_to_fp16_bits(p))}; }
  static FP8T_INLINE V16 load_bf16(const uint16_t* p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(w, 16))};
  }
  static FP8T_INLINE V16 broadcast(float s) { return {_mm512_set1_ps(s)}; }
  FP8T_INLINE void store(float* p) const { _mm512_storeu_ps(p, x); }
  friend FP8T_INLINE V16 fma(const V16& a, const V16& b, const V16& c) { return {_mm512_fmadd_ps(a.x, b.x, c.x)}; }
  FP8T_INLINE float reduce() const {
    __m256 lo = _mm512_castps512_ps256(x);
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1));
    return reduce8(_mm256_add_ps(lo, hi));
  }
};

#else
#error "FP8T_ISA must be 0, 1 or 2"
#endif
#endif
