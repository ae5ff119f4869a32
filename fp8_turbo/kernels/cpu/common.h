// Scalar helpers shared by the GEMM, attention and small-op kernels (gemm.cpp, attention.cpp, ops.cpp): exact bit
// conversions, bf16 rounding, e4m3 rounding (kernels/fp8.py's numerics), the exp2 polynomial's
// coefficients, the e4m3 table the portable V8 reads, the ISA ids. Included once, outside the per-ISA
// namespaces, before vec8.h.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#define FP8T_INLINE inline __attribute__((always_inline))  // see gemm.cpp: no out-of-line calls from AVX code

namespace fp8t {

enum Isa { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

inline int best_isa() {
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  if (avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
    return ISA_AVX512;  // (every AVX-512 CPU since Skylake-SP and Zen 4)
  return avx2 ? ISA_AVX2 : ISA_PORTABLE;
}

FP8T_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
FP8T_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
FP8T_INLINE float bf16_to_float(uint16_t h) { return bits_to_float(uint32_t(h) << 16); }
FP8T_INLINE uint16_t float_to_bf16(float f) {  // round to nearest even, as torch's .to(bfloat16)
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return uint16_t((u >> 16) | 0x40);  // quiet NaN
  return uint16_t((u + 0x7FFFu + ((u >> 16) & 1)) >> 16);
}
FP8T_INLINE float round_bf16(float f) { return bf16_to_float(float_to_bf16(f)); }

// kernels/fp8.py round_to_e4m3: saturate to +-448, round half to even onto the e4m3 grid (3 mantissa
// bits, subnormal step 2^-9). Scaling by the grid step is exact (a power of two).
FP8T_INLINE float round_to_e4m3(float x) {
  float a = std::fabs(x);
  if (a > 448.0f) a = 448.0f;  // NaN stays NaN
  int e = int(float_to_bits(a) >> 23) - 127;
  e = (e > -6 ? e : -6) - 3;
  const float step = bits_to_float(uint32_t(e + 127) << 23), inv_step = bits_to_float(uint32_t(127 - e) << 23);
  return std::copysign(std::nearbyint(a * inv_step) * step, x);
}

// A value on the e4m3 grid -> its float8_e4m3fn byte (NaN -> 0x7F with the sign, as torch).
FP8T_INLINE uint8_t e4m3_byte(float g) {
  const uint32_t u = float_to_bits(g), au = u & 0x7FFFFFFFu;
  const uint8_t sign = uint8_t((u >> 24) & 0x80);
  if (au > 0x7F800000u) return sign | 0x7F;
  if (au >= 0x3C800000u)  // >= 2^-6: normal
    return sign | uint8_t(((int(au >> 23) - 127 + 7) << 3) | ((au >> 20) & 7));
  return sign | uint8_t(std::fabs(g) * 512.0f);  // subnormal: 0..7 times 2^-9
}

// 2^f on [-0.5, 0.5]: Taylor coefficients ln(2)^k / k!, k = 0..7 (truncation < 2^-27 relative).
constexpr float kExp2Poly[8] = {1.0f, 0.693147180559945309f, 0.240226506959100712f, 0.0555041086648215800f,
                                0.00961812910762847716f, 0.00133335581464284434f, 1.54035303933816099e-4f,
                                1.52527338040598403e-5f};

// e4m3 byte -> value * 2^-8, as vec8.h's vector code decodes it (the portable V8 reads this table).
struct E4m3ScaledTable {
  float v[256];
  E4m3ScaledTable() {
    for (int b = 0; b < 256; ++b) {
      const int e = (b >> 3) & 0xF, m = b & 7;
      const float mag = e == 0 ? std::ldexp(float(m), -17) : std::ldexp(float(8 + m), e - 18);
      v[b] = (b & 0x80) ? -mag : mag;
    }
  }
};
static const E4m3ScaledTable kE4m3Scaled;

}  // namespace fp8t
