// The fused small ops of a decoder layer (RMSNorm with an optional residual add, rotary embedding,
// SiLU(gate) * up), written once against V8 and compiled once per instruction set (ops.cpp includes
// it inside `namespace portable | avx2 | avx512`). Every op works on one row at a time with a fixed
// order (8 lanes over the row, one tree), so a row's result does not depend on the other rows, the
// thread count or the instruction set. bf16 tensors round after every op, as torch computes them.

// 8 elements of a row of T (float or bf16 bits) from p, n <= 8 of them (the rest read as 0).
template <typename T>
FP8T_INLINE V8 load8(const T* p, int64_t n) {
  if (n == 8) {
    if constexpr (std::is_same_v<T, float>) return V8::load(p);
    else return V8::load_bf16(p);
  }
  alignas(32) float t[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<T, float>) t[i] = p[i];
    else t[i] = bf16_to_float(p[i]);
  }
  return V8::load(t);
}

template <typename T>
FP8T_INLINE void store8(T* p, const V8& v, int64_t n) {
  if (std::is_same_v<T, float> && n == 8) return v.store(reinterpret_cast<float*>(p));
  alignas(32) float t[8];
  v.store(t);
  for (int64_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<T, float>) p[i] = t[i];
    else p[i] = float_to_bf16(t[i]);
  }
}

// The value of an op's fp32 result in T's precision (bf16: round to nearest even).
template <typename T>
FP8T_INLINE V8 in_dtype(const V8& v) {
  if constexpr (std::is_same_v<T, float>) {
    return v;
  } else {
    alignas(32) float t[8];
    v.store(t);
    for (int i = 0; i < 8; ++i) t[i] = round_bf16(t[i]);
    return V8::load(t);
  }
}

// RMSNorm of rows [r0, r1): h = x (+ residual, in T), written to h_out when there is a residual;
// ms = tree(lanes of fma(h, h, .)) / N; r = 1 / sqrt(ms + eps); out = T(weight * T(h * r)).
template <typename T>
void rms_norm_rows(const Norm& a, int64_t r0, int64_t r1) {
  const T* w = static_cast<const T*>(a.weight);
  for (int64_t r = r0; r < r1; ++r) {
    const T* x = static_cast<const T*>(a.x) + r * a.ldx;
    const T* h = x;
    V8 ss = V8::zero();
    if (a.residual) {
      const T* res = static_cast<const T*>(a.residual) + r * a.ldr;
      T* h_out = static_cast<T*>(a.h_out) + r * a.ldh;
      for (int64_t k = 0; k < a.N; k += 8) {
        const int64_t n = std::min<int64_t>(8, a.N - k);
        const V8 hv = in_dtype<T>(add(load8(x + k, n), load8(res + k, n)));
        store8(h_out + k, hv, n);
        ss = fma(hv, hv, ss);
      }
      h = h_out;
    } else {
      for (int64_t k = 0; k < a.N; k += 8) {
        const V8 hv = load8(x + k, std::min<int64_t>(8, a.N - k));
        ss = fma(hv, hv, ss);
      }
    }
    const float inv_rms = 1.0f / std::sqrt(ss.reduce() / float(a.N) + a.eps);
    const V8 s = V8::broadcast(inv_rms);
    T* out = static_cast<T*>(a.out) + r * a.ldo;
    for (int64_t k = 0; k < a.N; k += 8) {
      const int64_t n = std::min<int64_t>(8, a.N - k);
      store8(out + k, mul(load8(w + k, n), in_dtype<T>(mul(load8(h + k, n), s))), n);
    }
  }
}

// Rotary ("rotate half") in place on rows [r0, r1) of (token, head) pairs: with x1, x2 the halves,
// x1' = T(T(x1 cos1) - T(x2 sin1)), x2' = T(T(x2 cos2) + T(x1 sin2)), as torch's x * cos + cat(-x2, x1) * sin.
template <typename T>
void rotary_rows(const Rotary& a, int64_t r0, int64_t r1) {
  const int64_t half = a.D / 2;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t t = r / a.heads, hd = r % a.heads;
    T* x = static_cast<T*>(a.x) + t * a.ldt + hd * a.ldh;
    const T* c = static_cast<const T*>(a.cos) + t * a.ldc;
    const T* s = static_cast<const T*>(a.sin) + t * a.ldc;
    for (int64_t k = 0; k < half; k += 8) {
      const int64_t n = std::min<int64_t>(8, half - k);
      const V8 x1 = load8(x + k, n), x2 = load8(x + half + k, n);
      const V8 y1 = in_dtype<T>(sub(in_dtype<T>(mul(x1, load8(c + k, n))), in_dtype<T>(mul(x2, load8(s + k, n)))));
      const V8 y2 = in_dtype<T>(add(in_dtype<T>(mul(x2, load8(c + half + k, n))),
                                    in_dtype<T>(mul(x1, load8(s + half + k, n)))));
      store8(x + k, y1, n);
      store8(x + half + k, y2, n);
    }
  }
}

// out = T(T(silu(g)) * u) for rows [r0, r1), silu(g) = g / (1 + exp2(-g log2(e))) (vec8_math.h exp2).
template <typename T>
void silu_mul_rows(const SiluMul& a, int64_t r0, int64_t r1) {
  const V8 one = V8::broadcast(1.0f), neg_log2e = V8::broadcast(-1.4426950408889634f);
  for (int64_t r = r0; r < r1; ++r) {
    const T* g = static_cast<const T*>(a.x) + r * a.ldx;
    const T* u = g + a.I;
    T* out = static_cast<T*>(a.out) + r * a.ldo;
    for (int64_t k = 0; k < a.I; k += 8) {
      const int64_t n = std::min<int64_t>(8, a.I - k);
      const V8 gv = load8(g + k, n);
      const V8 silu = in_dtype<T>(div(gv, add(one, exp2(mul(gv, neg_log2e)))));
      store8(out + k, mul(silu, load8(u + k, n)), n);
    }
  }
}
